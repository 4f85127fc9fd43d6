"""`pathembed search | index | lookup | fetch | show`: finding and reading slides after a run.

Subcommand parsers and handlers only: the search itself is in transforms/ranking.py, slide and
table access in transforms/archive.py, the QC picture in transforms/search/qc.py. pipeline/cli.py
registers the `add_*_parser` functions (SUBCOMMANDS).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import html
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import config_from_flags
from pipeline.run import checked_config, execute, local_runner
from transforms import bigquery, urls
from transforms.errors import SlideError
from transforms.outputs import archive
from transforms.search import qc, ranking
from transforms.sources.dicom_files import enumerate_dicom_folder

# faiss logs at INFO which CPU build it loads, on every approximate search.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

_SLIDE_ERRORS = (LookupError, ValueError, FileNotFoundError, SlideError)
_RESULT_COLUMNS = [
    "rank", "score", "hits", "collection", "protocol", "StudyInstanceUID", "SeriesInstanceUID",
    "instance_uuid", "thumbnail_uri", "source_license", "source_doi",
    *ranking.SEED_COLUMNS,
]  # fmt: skip


@contextlib.contextmanager
def _user_errors(command: str) -> Iterator[None]:
    """A slide or table the user named that is not there: one line on what to do, no trace."""
    try:
        yield
    except _SLIDE_ERRORS as error:
        raise SystemExit(f"pathembed {command}: {error}") from None


def _add_slide_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uuid", nargs="?", help="instance UUID of the slide")
    parser.add_argument("--study", help="StudyInstanceUID (with --series) instead of a UUID")
    parser.add_argument("--series", help="SeriesInstanceUID (with --study)")


def _named_slide(args: argparse.Namespace) -> dict[str, str | None]:
    if args.uuid is not None:
        if args.study or args.series:
            raise SystemExit("name the slide by UUID or by --study and --series, not both")
        return {"instance_uuid": args.uuid}
    if not (args.study and args.series):
        raise SystemExit("name the slide: a UUID, or --study and --series")
    return {"study_instance_uid": args.study, "series_instance_uid": args.series}


def _add_bigquery_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("BigQuery")
    group.add_argument(
        "--bq-resource-table",
        default=archive.PUBLISHED_RESOURCE_TABLE,
        help="resource table, project.dataset.table (default: the published one)",
    )
    group.add_argument("--bq-project", help="project billed for queries (default: gcloud's)")
    return group


def _local_root(args: argparse.Namespace, command: str) -> str:
    if not args.output_root:
        raise SystemExit(
            f"pathembed {command}: give --output-root (the folder or gs:// prefix that "
            "`pathembed run` wrote to)"
        )
    return args.output_root


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "search",
        help="find archive slides that look like a slide",
        description=(
            "Finds archive slides that look like the query slide: for each of its centroids,\n"
            "the --top-k most cosine-similar archive rows (its own study left out), summed (or\n"
            "maxed) per study/series; prints the best --limit slides.\n\n"
            "Query by an archive slide (UUID, or --study and --series), or by a folder with\n"
            "one new DICOM slide (--dicom: embedded first with `pathembed run`).\n"
            "Backends: exact (the local Parquet tables), approximate (the IVF index that\n"
            "`pathembed index` builds), bigquery (VECTOR_SEARCH, published or your tables)."
        ),
        epilog="examples:\n"
        "  pathembed search 0b7c5a56-8d3e-4c51-9f5e-2f0d1c8a9b10 --output-root out\n"
        "  pathembed search --dicom my_slide/ --output-root out --html similar.html\n"
        "  pathembed search --study 2.25.1 --series 1.2.3 --backend bigquery --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_slide_args(parser)
    parser.add_argument(
        "--dicom",
        help="folder (or gs:// prefix) holding one new DICOM slide: embed it, then search",
    )
    parser.add_argument(
        "--output-root",
        help="the archive: where `pathembed run` wrote (exact/approximate); for bigquery, "
        f"where artifacts (thumbnails) are (default {archive.PUBLIC_OUTPUT_ROOT})",
    )
    parser.add_argument(
        "--backend",
        choices=["exact", "approximate", "bigquery"],
        default="exact",
        help="where to search (default: exact)",
    )
    parser.add_argument("--top-k", type=int, default=20, help="hits per query centroid (20)")
    parser.add_argument("--limit", type=int, default=100, help="slides returned (100)")
    parser.add_argument(
        "--aggregate",
        choices=ranking.AGGREGATES,
        default="sum",
        help="per slide: sum of similarities (default, broad match) or max (one close match)",
    )
    parser.add_argument(
        "--include-own-study",
        action="store_true",
        help="also search the query slide's own study (left out by default)",
    )
    parser.add_argument(
        "--fraction-lists-to-search",
        type=float,
        help="IVF lists probed: approximate (default: the index's), bigquery (0.005)",
    )
    parser.add_argument(
        "--block-rows", type=int, default=8192, help="exact: archive rows per block (memory)"
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON instead of a table")
    form.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    parser.add_argument("--html", type=Path, help="also write a page with the thumbnails here")
    parser.add_argument(
        "--anonymous", action="store_true", help="read gs:// artifacts without credentials"
    )
    dicom = parser.add_argument_group("--dicom (options of `pathembed run`)")
    dicom.add_argument("--model", help="model for the new slide (must match the archive's)")
    dicom.add_argument("--config", type=Path, help="YAML config for the new slide's run")
    dicom.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    dicom.add_argument(
        "--query-output-root",
        help="keep the new slide's outputs here (default: a temporary folder, removed after)",
    )
    bigquery = _add_bigquery_args(parser)
    bigquery.add_argument(
        "--bq-search-table",
        default=ranking.PUBLISHED_SEARCH_TABLE,
        help="search table, project.dataset.table (default: the published one)",
    )
    bigquery.add_argument(
        "--bq-idc-table",
        default=ranking.IDC_METADATA_TABLE,
        help="IDC table giving collection_name and ClinicalTrialProtocolName",
    )
    parser.set_defaults(handler=search_command)


def search_command(args: argparse.Namespace, _: list[str]) -> int:
    if (args.dicom is None) == (args.uuid is None and args.study is None):
        raise SystemExit("search by one slide: a UUID, --study and --series, or --dicom FOLDER")
    with _user_errors("search"), contextlib.ExitStack() as cleanup:
        params = ranking.SearchParams(
            top_k=args.top_k,
            limit=args.limit,
            aggregate=args.aggregate,
            include_own_study=args.include_own_study,
        )
        if args.dicom is not None:
            query_root = args.query_output_root or cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="pathembed-query-")
            )
            query, embedded = _embed_new_slide(args, query_root)
        else:
            query, embedded = None, None
        if args.backend == "bigquery":
            if embedded is not None and embedded["model_is_stand_in"]:
                raise ValueError(
                    f"the new slide was embedded with {embedded['model_name']}, a stand-in "
                    "model; BigQuery's tables hold Path Foundation embeddings: give --model "
                    "with Path Foundation (see `pathembed run --help`)"
                )
            root = args.output_root or archive.PUBLIC_OUTPUT_ROOT
            client = bigquery.client(args.bq_project)
            tables = ranking.BigQueryTables(
                args.bq_search_table, args.bq_resource_table, args.bq_idc_table
            )
            if query is None:
                query = _bigquery_archive_query(client, tables, root, _named_slide(args))
            fraction = args.fraction_lists_to_search or 0.005
            matches = ranking.bigquery_search(client, query, params, tables, fraction, root)
        else:
            root = _local_root(args, "search")
            resources = archive.newest_resources(root)
            if query is None:
                query = ranking.archive_query(root, resources, **_named_slide(args))
            else:
                model = (embedded["model_name"], embedded["model_version"])
                ranking.check_same_model(model, resources, root)
            if args.backend == "approximate":
                index = ranking.SearchIndex.load(root)
                print(ranking.describe_index(index.info), file=sys.stderr)
                matches = ranking.approximate_search(
                    index, query, params, args.fraction_lists_to_search
                )
            else:
                matches = ranking.exact_search(
                    root, query, params, resources=resources, block_rows=args.block_rows
                )
        _print_matches(args, query, params, matches)
        if args.html:
            # Thumbnail paths come from table rows: only those under the output roots of this
            # search are read or linked (a tampered row must not inline /etc/passwd).
            roots = [root] + ([query_root] if args.dicom is not None else [])
            args.html.write_text(
                results_page(query, matches, _thumbnail_src(query, args.anonymous, roots), roots)
            )
            print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _embed_new_slide(
    args: argparse.Namespace, query_root: str
) -> tuple[ranking.SlideQuery, dict[str, Any]]:
    """Runs the pipeline on the --dicom folder: the query (its one slide's centroids) and the
    slide's resource row."""
    found = list(enumerate_dicom_folder(args.dicom))
    if len(found) != 1:
        raise SystemExit(
            f"{args.dicom} holds {len(found)} slide series; search takes one: give a folder "
            "with one slide, or `pathembed run` them all and search by UUID"
        )
    flags = {"source.input": args.dicom, "output_root": query_root, "model.name": args.model}
    cfg = checked_config(config_from_flags(args.config, args.set, flags))
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the results (--json)
        execute(cfg, [], local_runner([]))
    # The slide is found by its series: its instance UUID depends on the level the run chose.
    resources = archive.newest_resources(query_root)
    series = found[0].series_instance_uid
    rows = [r for r in resources.to_pylist() if r["SeriesInstanceUID"] == series]
    if not rows:
        raise SystemExit(
            f"the pipeline could not embed {args.dicom}; why is in {query_root}/tables/failures"
        )
    query = ranking.archive_query(query_root, resources, instance_uuid=rows[0]["instance_uuid"])
    return query, rows[0]


def _bigquery_archive_query(
    client: Any, tables: ranking.BigQueryTables, root: str, slide: dict[str, str | None]
) -> ranking.SlideQuery:
    """An archive slide as a BigQuery query: its UIDs (BigQuery reads its centroids)."""
    found = archive.bigquery_find_resource(client, tables.resource, **slide)
    return ranking.SlideQuery(
        centroids=None,
        instance_uuid=found["instance_uuid"],
        study_instance_uid=found["StudyInstanceUID"],
        series_instance_uid=found["SeriesInstanceUID"],
        thumbnail_uri=ranking.thumbnail_uri(root, found["instance_uuid"]),
    )


def _print_matches(
    args: argparse.Namespace,
    query: ranking.SlideQuery,
    params: ranking.SearchParams,
    matches: list[ranking.SlideMatch],
) -> None:
    rows = ranking.matches_as_rows(matches, params.aggregate)
    for row in rows:  # DICOM's column names, as in the tables
        row["StudyInstanceUID"] = row.pop("study_instance_uid")
        row["SeriesInstanceUID"] = row.pop("series_instance_uid")
    described = {
        "instance_uuid": query.instance_uuid,
        "StudyInstanceUID": query.study_instance_uid,
        "SeriesInstanceUID": query.series_instance_uid,
        "centroids": None if query.centroids is None else len(query.centroids),
        "excluded_study": query.excluded_study(params),
    }
    if args.json:
        document = {
            "query": described,
            "backend": args.backend,
            "params": vars(params),
            "results": [{k: row[k] for k in _RESULT_COLUMNS} for row in rows],
        }
        print(json.dumps(document, indent=1))
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, _RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(urls.for_terminal_lines(_results_table(described, args.backend, params, rows)))


def _results_table(
    query: dict[str, Any], backend: str, params: ranking.SearchParams, rows: list[dict]
) -> str:
    centroids = "" if query["centroids"] is None else f", {query['centroids']} centroids"
    excluded = query["excluded_study"]
    lines = [
        f"query    {query['instance_uuid']} (study {query['StudyInstanceUID']}, series "
        f"{query['SeriesInstanceUID']}){centroids}",
        f"search   {backend}: top {params.top_k} per centroid, {params.aggregate} of cosine "
        f"similarity per slide, "
        + (f"study {excluded} left out" if excluded else "own study included"),
    ]
    if not rows:
        return "\n".join([*lines, "no slides found"])
    columns = ["rank", "score", "hits", "collection", "instance_uuid", "StudyInstanceUID",
               "SeriesInstanceUID"]  # fmt: skip
    if any(row["protocol"] for row in rows):
        columns.insert(4, "protocol")
    if any(row["source_license"] for row in rows):
        columns += ["source_license", "source_doi"]
    cells = [
        [
            f"{row[c]:.4f}" if c == "score" else "-" if row[c] is None else str(row[c])
            for c in columns
        ]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    table = [columns, *cells]
    lines.append("")
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return "\n".join(lines)


def _image_src(uri: str | None) -> str | None:
    """A browser-loadable address for an artifact URI (public gs:// objects over HTTPS)."""
    if not uri:
        return None
    if uri.startswith("gs://"):
        return "https://storage.googleapis.com/" + uri[len("gs://") :]
    return Path(uri).resolve().as_uri()


def _thumbnail_src(query: ranking.SlideQuery, anonymous: bool, roots: list[str]) -> str | None:
    """The query thumbnail inlined (a --dicom query's outputs may be temporary); only a file
    under one of `roots` is read."""
    if not query.thumbnail_uri or not urls.is_under_any(query.thumbnail_uri, roots):
        return None
    try:
        jpeg = archive.read_bytes(query.thumbnail_uri, anonymous)
    except OSError:
        return _image_src(query.thumbnail_uri)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def results_page(
    query: ranking.SlideQuery,
    matches: list[ranking.SlideMatch],
    query_src: str | None,
    roots: list[str],
) -> str:
    """An HTML page: the query thumbnail beside the thumbnails of the slides found (linked
    only when under one of `roots`)."""
    e = html.escape

    def figure(src: str | None, caption: str, css: str = "") -> str:
        image = f'<img src="{e(src)}" alt="thumbnail">' if src else "<div>no thumbnail</div>"
        css = f' class="{css}"' if css else ""
        return f"<figure{css}>{image}<figcaption>{caption}</figcaption></figure>"

    cards = [
        figure(
            _image_src(m.thumbnail_uri)
            if m.thumbnail_uri and urls.is_under_any(m.thumbnail_uri, roots)
            else None,
            f"<b>#{m.rank}</b> score {m.score:.3f} ({m.hits} hits)<br>{e(m.collection or '-')}"
            f"<br><code>{e(m.instance_uuid or '-')}</code>"
            f"<br><small>study {e(m.study_instance_uid)}<br>series {e(m.series_instance_uid)}"
            "</small>",
        )
        for m in matches
    ]
    title = f"Slides like {query.instance_uuid or query.series_instance_uid}"
    query_caption = (
        f"<b>query</b><br><code>{e(query.instance_uuid or '-')}</code><br><small>study "
        f"{e(query.study_instance_uid or '-')}<br>series {e(query.series_instance_uid or '-')}"
        "</small>"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; }}
main {{ display: flex; gap: 24px; align-items: flex-start; }}
.query {{ position: sticky; top: 16px; flex: none; width: 360px; }}
.query img {{ max-width: 360px; max-height: 360px; }}
.results {{ display: flex; flex-wrap: wrap; gap: 16px; }}
figure {{ margin: 0; width: 220px; font-size: 13px; overflow-wrap: anywhere; }}
figure img {{ max-width: 220px; max-height: 220px; border: 1px solid #ccc; }}
</style></head>
<body><h1>{e(title)}</h1>
<main>
{figure(query_src, query_caption, "query")}
<section class="results">
{chr(10).join(cards) if cards else "<p>no slides found</p>"}
</section>
</main></body></html>
"""


def add_index_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "index",
        help="build the approximate (IVF) search index of a local archive",
        description="Builds a faiss IVF index over {output-root}/tables/search (each slide's "
        "newest run), saves it under tables/search_index/, and prints its recall@k against "
        "exact search on a few archive slides. `pathembed search --backend approximate` uses "
        "it; rebuild after new runs.",
    )
    parser.add_argument("--output-root", required=True, help="where `pathembed run` wrote")
    parser.add_argument("--nlist", type=int, help="IVF lists (default ~4 sqrt(rows))")
    parser.add_argument(
        "--fraction-lists-to-search",
        type=float,
        default=0.05,
        help="share of lists probed per query by default (0.05)",
    )
    parser.add_argument(
        "--recall-slides", type=int, default=3, help="archive slides queried to measure recall"
    )
    parser.add_argument("--top-k", type=int, default=20, help="k of recall@k (20)")
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.set_defaults(handler=index_command)


def index_command(args: argparse.Namespace, _: list[str]) -> int:
    with _user_errors("index"):
        index = ranking.build_index(
            args.output_root,
            nlist=args.nlist,
            fraction_lists_to_search=args.fraction_lists_to_search,
            recall_slides=args.recall_slides,
            top_k=args.top_k,
            block_rows=args.block_rows,
        )
        uri = index.save(args.output_root)
    print(ranking.describe_index(index.info))
    print(f"saved {uri}")
    return 0


def add_lookup_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "lookup",
        help="instance UUID <-> Study/Series UIDs of a slide",
        description="Finds a slide in the resource table: the local one under --output-root, "
        "or a BigQuery one (--bigquery; default: the published table).",
    )
    _add_slide_args(parser)
    parser.add_argument("--output-root", help="where `pathembed run` wrote")
    parser.add_argument("--bigquery", action="store_true", help="look up in BigQuery instead")
    _add_bigquery_args(parser)
    parser.add_argument("--json", action="store_true", help="print the row as JSON")
    parser.set_defaults(handler=lookup_command)


def lookup_command(args: argparse.Namespace, _: list[str]) -> int:
    slide = _named_slide(args)
    with _user_errors("lookup"):
        if args.bigquery:
            client = bigquery.client(args.bq_project)
            row = archive.bigquery_find_resource(client, args.bq_resource_table, **slide)
        else:
            row = archive.find_resource(_local_root(args, "lookup"), **slide)
    keys = ["instance_uuid", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
            "collection", "metadata_uri", "thumbnail_uri", "embedding_count",
            "number_of_centroids", "model_name", "run_id", "created_time",
            "clustering_method", "source_license", "source_doi",
            "superseded_by_instance_uuid", "superseded_by_run_id"]  # fmt: skip
    found = {key: row[key] for key in keys if key in row}
    if args.json:
        print(json.dumps(found, indent=1, default=str))
    else:
        width = max(map(len, found))
        for key, value in found.items():
            print(f"{key.ljust(width)}  {urls.for_terminal(str(value))}")
    return 0


def add_fetch_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "fetch",
        help="copy a slide's artifacts (metadata, npy, jpeg) to a local folder",
        description="Copies metadata.json and every artifact it names from "
        "{output-root}/{uuid}/path_foundation/v1/ to {out}/{uuid}/.",
        epilog="example (the public dataset): pathembed fetch UUID --output-root "
        f"{archive.PUBLIC_OUTPUT_ROOT} --anonymous --out slides/",
    )
    parser.add_argument("uuid", help="instance UUID of the slide")
    parser.add_argument("--output-root", required=True, help="local folder or gs:// prefix")
    parser.add_argument("--out", type=Path, required=True, help="local folder to copy into")
    parser.add_argument("--anonymous", action="store_true", help="public gs:// bucket")
    parser.set_defaults(handler=fetch_command)


def fetch_command(args: argparse.Namespace, _: list[str]) -> int:
    with _user_errors("fetch"):
        slide = archive.SlideArtifacts.open(args.output_root, args.uuid, anonymous=args.anonymous)
        target = args.out / slide.instance_uuid
        target.mkdir(parents=True, exist_ok=True)
        for name in slide.files():  # each checked against the slide's completion marker
            (target / name).write_bytes(slide.read(name))
            print(target / name)
    return 0


def add_show_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "show",
        help="QC picture: sampled patches coloured by k-means centroid",
        description="Writes a PNG: the slide thumbnail beside the same thumbnail with every "
        "sampled patch drawn as a square in the colour of its centroid index (one fixed "
        "colour per index, the same on every slide).",
    )
    parser.add_argument("uuid", help="instance UUID of the slide")
    parser.add_argument("--output-root", required=True, help="local folder or gs:// prefix")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--min-patch-px",
        type=int,
        default=4,
        help="upscale the thumbnail so a patch spans at least this many pixels (4)",
    )
    parser.add_argument("--max-px", type=int, default=4096, help="widest thumbnail panel")
    parser.add_argument("--anonymous", action="store_true", help="public gs:// bucket")
    parser.set_defaults(handler=show_command)


def show_command(args: argparse.Namespace, _: list[str]) -> int:
    with _user_errors("show"):
        slide = archive.SlideArtifacts.open(args.output_root, args.uuid, anonymous=args.anonymous)
        thumbnail = slide.thumbnail()
        patch_size, level_size = slide.patch_size, slide.level_size
        scale = qc.upscale_for_patches(
            thumbnail.shape[1], patch_size[0], level_size[0], args.min_patch_px, args.max_px
        )
        picture = qc.qc_picture(
            thumbnail, slide.coordinates(), slide.labels(), patch_size, level_size, scale
        )
    args.out.write_bytes(qc.png_bytes(picture))
    print(f"wrote {args.out} ({picture.shape[1]} x {picture.shape[0]})")
    return 0
