"""Slide similarity search over an archive built from one real pipeline run.

The pipeline embeds the small sample slide once; the archive then gets, as Parquet rows in the
tables' own schema, slides derived from it under other UIDs: exact copies, near-copies (noise
added to its centroids), a copy inside the query's own study, unrelated slides, and a slide
whose older run was a copy but whose newest run is unrelated. Search must rank copies, then
near-copies, leave the own study out, search only newest runs, and agree with a brute-force
computation written here.
"""

from __future__ import annotations

import base64
import csv
import datetime
import io
import json
import re
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from transforms.outputs import archive as archive_io
from transforms.outputs.tables import TABLES, arrow_schema
from transforms.samples.slides import write_samples
from transforms.search import qc, ranking

OLD_RUN = "20000101T000000Z-old000"
NEW_RUN = "20000102T000000Z-new000"
COPIES = ["copy-a", "copy-b"]
NEAR = {"near-1": 0.15, "near-2": 0.6}  # noise std relative to the centroids' spread
UNRELATED = {"unrelated-1": 60, "unrelated-2": 150, "unrelated-3": 300}  # rows


def _uid(name: str, kind: str) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'pathembed-test/{name}/{kind}').int}"


def _instance_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pathembed-test/{name}"))


def _write(root: Path, table: str, run_id: str, rows: list[dict]) -> None:
    target = root / "tables" / table / f"{run_id}.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(TABLES[table])), target)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> dict:
    """One real run on the small sample plus derived slides; returns what the tests need."""
    base = tmp_path_factory.mktemp("search")
    write_samples(base / "slides", ["small-40x"])
    root, cache = base / "archive", base / "models"
    code = main([
        "run", "--input", str(base / "slides"), "--output-root", str(root),
        "--model", "stub-tiny", "--set", f"model.cache_dir={cache}",
    ])  # fmt: skip
    assert code == 0
    (real,) = pq.read_table(root / "tables" / "resource").to_pylist()
    real_rows = sorted(
        pq.read_table(root / "tables" / "search").to_pylist(), key=lambda r: r["centroid_index"]
    )
    centroids = np.array([r["embedding"] for r in real_rows])
    rng = np.random.default_rng(7)
    spread = centroids.std(axis=0)

    def slide(name: str, embeddings: np.ndarray, created: int, study: str | None = None):
        identity = {
            "instance_uuid": _instance_uuid(name),
            "StudyInstanceUID": study or _uid(name, "study"),
            "SeriesInstanceUID": _uid(name, "series"),
            "SOPInstanceUID": _uid(name, "sop"),
        }
        resource = {
            **real, **identity, "collection": f"collection-{name.split('-')[0]}",
            "number_of_centroids": len(embeddings),
            "created_time": datetime.datetime(2000, 1, created, tzinfo=datetime.UTC),
        }  # fmt: skip
        rows = [
            {**identity, "centroid_index": k, "cluster_size": 1, "embedding": e.tolist()}
            for k, e in enumerate(embeddings)
        ]
        return resource, rows

    def unrelated(count: int) -> np.ndarray:
        return rng.normal(centroids.mean(axis=0), spread, size=(count, centroids.shape[1]))

    new = [slide(name, centroids, 2) for name in COPIES]
    new += [
        slide(name, centroids + rng.normal(0, 1, centroids.shape) * spread * level, 2)
        for name, level in NEAR.items()
    ]
    new.append(slide("same-study", centroids, 2, study=real["StudyInstanceUID"]))
    new += [slide(name, unrelated(count), 2) for name, count in UNRELATED.items()]
    new.append(slide("stale", unrelated(100), 2))
    old = [slide("stale", centroids, 1)]
    for run_id, slides in ((OLD_RUN, old), (NEW_RUN, new)):
        _write(root, "resource", run_id, [{**res, "run_id": run_id} for res, _ in slides])
        _write(root, "search", run_id, [row for _, rows in slides for row in rows])
    current = [{**r, "run_id": real["run_id"]} for r in real_rows]
    current += [row for _, rows in new for row in rows]
    return {
        "root": str(root),
        "base": base,
        "cache": cache,
        "real": real,
        "centroids": centroids,
        "current": current,  # every search row that counts (newest runs)
        "name_of": {_instance_uuid(n): n for n in [*COPIES, *NEAR, *UNRELATED, "same-study",
                                                   "stale"]} | {real["instance_uuid"]: "query"},
    }  # fmt: skip


def brute_force(rows, centroids, params: ranking.SearchParams, excluded_study: str | None):
    """The seed's search, written out: per query embedding its top k rows (ties by UUID, then
    centroid index), summed or maxed per (study, series), best first (ties by UIDs)."""
    rows = [r for r in rows if r["StudyInstanceUID"] != excluded_study]
    matrix = np.array([r["embedding"] for r in rows])
    norms = np.linalg.norm(matrix, axis=1)
    scores: dict[tuple[str, str], list[float]] = {}
    for q in centroids:
        similarity = (matrix * q).sum(axis=1) / (norms * np.linalg.norm(q))
        ranked = np.round(similarity, 9)
        cut = np.sort(ranked)[-params.top_k]
        candidates = [j for j in range(len(rows)) if ranked[j] >= cut]
        candidates.sort(
            key=lambda j: (-ranked[j], rows[j]["instance_uuid"], rows[j]["centroid_index"])
        )
        for j in candidates[: params.top_k]:
            key = (rows[j]["StudyInstanceUID"], rows[j]["SeriesInstanceUID"])
            scores.setdefault(key, []).append(float(similarity[j]))
    aggregate = sum if params.aggregate == "sum" else max
    results = [(key, aggregate(values), len(values)) for key, values in scores.items()]
    results.sort(key=lambda r: (-round(r[1], 9), r[0]))
    return results[: params.limit]


def _query(archive) -> ranking.SlideQuery:
    return ranking.archive_query(archive["root"], instance_uuid=archive["real"]["instance_uuid"])


def names(archive, matches) -> list[str]:
    return [archive["name_of"][m.instance_uuid] for m in matches]


def test_copies_then_near_copies_rank_first_and_the_own_study_is_left_out(archive):
    query = _query(archive)
    assert np.array_equal(query.centroids, archive["centroids"])
    matches = ranking.exact_search(archive["root"], query, ranking.SearchParams())
    found = names(archive, matches)
    # Rows of the two copies tie; a tie for a query's last slot goes to the smaller UUID.
    assert found[:4] == [*sorted(COPIES, key=_instance_uuid), "near-1", "near-2"]
    assert matches[0].score >= matches[1].score > matches[2].score > matches[3].score
    assert matches[0].hits >= matches[1].hits > matches[2].hits > matches[3].hits
    assert archive["real"]["StudyInstanceUID"] not in {m.study_instance_uid for m in matches}
    assert "query" not in found and "same-study" not in found
    # The stale slide's newest run is unrelated: it must not rank like the copy it once was.
    assert "stale" not in found[:4]
    assert matches[0].collection == "collection-copy"
    assert Path(matches[0].thumbnail_uri).exists()
    assert [m.rank for m in matches] == list(range(1, len(matches) + 1))


@pytest.mark.parametrize("aggregate", ["sum", "max"])
@pytest.mark.parametrize("include_own_study", [False, True])
def test_exact_search_equals_brute_force(archive, aggregate, include_own_study):
    params = ranking.SearchParams(aggregate=aggregate, include_own_study=include_own_study)
    query = _query(archive)
    matches = ranking.exact_search(archive["root"], query, params, block_rows=500)
    expected = brute_force(
        archive["current"], archive["centroids"], params, query.excluded_study(params)
    )
    assert [(m.study_instance_uid, m.series_instance_uid) for m in matches] == [
        key for key, _, _ in expected
    ]
    np.testing.assert_allclose([m.score for m in matches], [s for _, s, _ in expected], rtol=1e-12)
    assert [m.hits for m in matches] == [n for _, _, n in expected]
    if include_own_study:  # the query slide and its same-study copy tie with the copies
        found = names(archive, matches)
        assert set(found[:4]) == {"query", "same-study", *COPIES} and found[4] == "near-1"


def test_block_size_does_not_change_results(archive):
    query, params = _query(archive), ranking.SearchParams(limit=5)
    whole = ranking.exact_search(archive["root"], query, params, block_rows=100_000)
    assert ranking.exact_search(archive["root"], query, params, block_rows=61) == whole
    assert ranking.exact_search(archive["root"], query, params, block_rows=1000) == whole


def test_approximate_index_measures_recall_and_finds_the_copies(archive, tmp_path, capsys):
    root = tmp_path / "archive"  # a copy: this test adds a table file to it
    shutil.copytree(Path(archive["root"]) / "tables", root / "tables")
    assert main(["index", "--output-root", str(root), "--nlist", "16",
                 "--fraction-lists-to-search", "0.125"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    index = ranking.SearchIndex.load(str(root))
    recall = index.info["recall"]
    assert f"recall@20 vs exact = {recall['recall']:.3f}" in printed
    assert recall["slides"] == 3 and recall["nprobe"] == 2 and 0 < recall["recall"] <= 1
    query, params = _query(archive), ranking.SearchParams()
    exact = ranking.exact_search(archive["root"], query, params)
    # Probing every list makes IVF exact (up to float32 and the order of tied copies).
    everything = ranking.approximate_search(index, query, params, fraction_lists_to_search=1.0)
    assert set(names(archive, everything)[:4]) == set(names(archive, exact)[:4])
    index.info["nprobe"] = 16
    assert ranking.measure_recall(index, str(root), 3)["recall"] == pytest.approx(1.0)
    fast = ranking.approximate_search(index, query, params)
    assert names(archive, fast)[:2] == names(archive, exact)[:2]  # copies: every probe finds them
    _write(root, "resource", "20990101T000000Z-later0", [])
    with pytest.raises(ValueError, match="rebuild it with `pathembed index"):
        ranking.SearchIndex.load(str(root))


def test_cli_search_prints_table_json_csv_and_writes_html(archive, tmp_path, capsys):
    uuid_ = archive["real"]["instance_uuid"]
    expected = ranking.exact_search(archive["root"], _query(archive), ranking.SearchParams())
    rows = [(m.instance_uuid, round(m.score, 6)) for m in expected]

    assert main(["search", uuid_, "--output-root", archive["root"], "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [(r["instance_uuid"], round(r["score"], 6)) for r in document["results"]] == rows
    assert document["query"]["excluded_study"] == archive["real"]["StudyInstanceUID"]
    assert document["query"]["centroids"] == len(archive["centroids"])

    real = archive["real"]
    by_uids = ["--study", real["StudyInstanceUID"], "--series", real["SeriesInstanceUID"]]
    assert main(["search", *by_uids, "--output-root", archive["root"], "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["instance_uuid"], round(float(r["score"]), 6)) for r in table] == rows

    page = tmp_path / "similar.html"
    assert main(["search", uuid_, "--output-root", archive["root"], "--limit", "4",
                 "--html", str(page)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "rank" in printed and "left out" in printed
    assert printed.index(_instance_uuid("copy-a")) < printed.index(_instance_uuid("near-2"))
    text = page.read_text()
    assert text.count('src="data:image/jpeg;base64,') == 1  # the query, inlined
    sources = [s.split('"')[0] for s in text.split('src="file://')[1:]]
    assert len(sources) == 4 and all(Path(s).exists() for s in sources)


def test_cli_search_with_a_new_dicom_folder_embeds_it_first(archive, tmp_path, capsys):
    # Its query outputs go to a copy of the archive's own run, which the pipeline then finds
    # complete: the run is exercised without embedding the slide a second time.
    query_root = tmp_path / "query"
    real = archive["real"]["instance_uuid"]
    shutil.copytree(Path(archive["root"]) / real, query_root / real)
    for table in ("resource", "search"):
        shutil.copytree(
            Path(archive["root"]) / "tables" / table / archive["real"]["run_id"],
            query_root / "tables" / table / archive["real"]["run_id"],
        )
    assert main(["search", "--dicom", str(archive["base"] / "slides"), "--output-root",
                 archive["root"], "--query-output-root", str(query_root), "--model", "stub-tiny",
                 "--set", f"model.cache_dir={archive['cache']}", "--json"]) == 0  # fmt: skip
    document = json.loads(capsys.readouterr().out)  # stdout holds only the results
    assert document["query"]["instance_uuid"] == real
    expected = ranking.exact_search(archive["root"], _query(archive), ranking.SearchParams())
    assert [r["instance_uuid"] for r in document["results"]] == [m.instance_uuid for m in expected]
    # The published BigQuery tables hold Path Foundation embeddings: a stand-in query is refused.
    with pytest.raises(SystemExit, match="stand-in model; BigQuery's tables hold Path Foundation"):
        main(["search", "--dicom", str(archive["base"] / "slides"), "--backend", "bigquery",
              "--query-output-root", str(query_root), "--model", "stub-tiny",
              "--set", f"model.cache_dir={archive['cache']}"])  # fmt: skip


def test_cli_errors_say_what_to_do(archive, tmp_path):
    unknown = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(SystemExit, match=r"not in the resource table at .*run `pathembed run`"):
        main(["search", unknown, "--output-root", archive["root"]])
    with pytest.raises(SystemExit, match="is not a UUID"):
        main(["search", "../../etc", "--output-root", archive["root"]])
    with pytest.raises(SystemExit, match="not a DICOM UID"):
        main(["search", "--study", "1.2;DROP", "--series", "1.2", "--output-root", archive["root"]])
    with pytest.raises(SystemExit, match="no resource table at"):
        main(["search", unknown, "--output-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="give --output-root"):
        main(["search", unknown])
    with pytest.raises(SystemExit, match="holds 0 slide series"):
        main(["search", "--dicom", str(tmp_path), "--output-root", archive["root"]])
    with pytest.raises(SystemExit, match="build it with `pathembed index"):
        main(["search", archive["real"]["instance_uuid"], "--output-root", archive["root"],
              "--backend", "approximate"])  # fmt: skip
    resources = archive_io.newest_resources(archive["root"])
    with pytest.raises(ValueError, match="rerun the query with --model stub-tiny"):
        ranking.check_same_model(("path-foundation", "v1"), resources, archive["root"])


@pytest.mark.parametrize("command", ["search", "index", "lookup", "fetch", "show"])
def test_help_explains_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--output-root" in text
    if command == "search":
        for phrase in ("--dicom", "--backend", "--include-own-study", "--aggregate", "--html"):
            assert phrase in text


def test_show_draws_the_real_slides_patches_in_label_colours(archive, tmp_path):
    png = tmp_path / "qc.png"
    uuid_ = archive["real"]["instance_uuid"]
    assert main(["show", uuid_, "--output-root", archive["root"], "--out", str(png)]) == 0
    picture = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    slide = archive_io.SlideArtifacts.open(archive["root"], uuid_)
    thumbnail, labels = slide.thumbnail(), slide.labels()
    height, width = thumbnail.shape[:2]
    assert picture.shape == (height, 2 * width + qc.GAP_PX, 3)
    assert np.array_equal(picture[:, :width], thumbnail)
    (level_w, level_h), (patch, _) = slide.level_size, slide.patch_size
    colours = qc.label_colours(int(labels.max()) + 1)
    on_tissue = 0
    for (x, y), label in zip(slide.coordinates(), labels, strict=True):
        cx = int((x + patch / 2) * width / level_w)
        cy = int((y + patch / 2) * height / level_h)
        assert np.array_equal(picture[cy, width + qc.GAP_PX + cx], colours[label])
        on_tissue += thumbnail[cy, cx].max() <= 204  # patches were kept where there is tissue
    assert on_tissue >= 0.9 * len(labels)


def test_bigquery_job_for_an_archive_slide(archive):
    real = archive["real"]
    query = ranking.SlideQuery(
        None, real["instance_uuid"], real["StudyInstanceUID"], real["SeriesInstanceUID"]
    )
    sql, config = ranking.bigquery_search_job(query, ranking.SearchParams(aggregate="max"))
    params = {p.name: p for p in config.query_parameters}
    values = {name: getattr(p, "value", None) for name, p in params.items()}
    assert values == {
        "query_study_uid": real["StudyInstanceUID"],
        "query_series_uid": real["SeriesInstanceUID"],
        "query_embeddings": None,
        "dimension": 1,
        "exclude_study_uid": real["StudyInstanceUID"],
        "top_k": 20,
        "result_limit": 100,
        "aggregate": "max",
    }
    assert params["query_embeddings"].array_type == "FLOAT64"
    assert params["query_embeddings"].values == []
    assert {p.type_ for n, p in params.items() if n != "query_embeddings"} == {"STRING", "INT64"}
    # Values travel only as parameters; the SQL names tables and the one literal option.
    assert real["StudyInstanceUID"] not in sql and "${" not in sql
    assert f"`{ranking.PUBLISHED_SEARCH_TABLE}`" in sql
    assert f"`{archive_io.PUBLISHED_RESOURCE_TABLE}`" in sql
    assert f"`{ranking.IDC_METADATA_TABLE}`" in sql
    assert """options => '{"fraction_lists_to_search": 0.005}'""" in sql
    code = "\n".join(line.split("--")[0] for line in sql.splitlines())  # without comments
    assert "1 - distance AS similarity" in code
    assert "SUM(similarity)" in code and "MAX(similarity)" in code
    assert not re.search(r"(SUM|MAX)\(\s*distance\s*\)", code, re.IGNORECASE)
    assert "distance AS CosineSimilarity" not in code
    assert "WHERE @exclude_study_uid IS NULL OR StudyInstanceUID != @exclude_study_uid" in code
    assert "top_k => @top_k" in code and "distance_type => 'COSINE'" in code
    assert code.rstrip().endswith(
        "ORDER BY matches.score DESC, matches.StudyInstanceUID, matches.SeriesInstanceUID"
    )
    assert "sorted it DESC, so the slides FARTHEST from the query came first" in sql


def test_bigquery_job_for_new_embeddings(archive):
    centroids = archive["centroids"][:3]
    query = ranking.SlideQuery(centroids, None, "2.25.1", "2.25.2")
    params = ranking.SearchParams(top_k=5, limit=7, include_own_study=True)
    tables = ranking.BigQueryTables("my-project.my_dataset.search", "my-project.my_dataset.res")
    sql, config = ranking.bigquery_search_job(query, params, tables, 0.05)
    params_ = {p.name: p for p in config.query_parameters}
    assert params_["query_embeddings"].values == centroids.ravel().tolist()
    assert params_["dimension"].value == centroids.shape[1]
    assert params_["query_study_uid"].value is None and params_["query_series_uid"].value is None
    assert params_["exclude_study_uid"].value is None  # own study included
    assert (params_["top_k"].value, params_["result_limit"].value) == (5, 7)
    assert "`my-project.my_dataset.search`" in sql and "`my-project.my_dataset.res`" in sql
    assert """'{"fraction_lists_to_search": 0.05}'""" in sql
    for bad in ["p.d.t` WHERE TRUE --", "my-project.my_dataset", "`p.d.t`", "p.d.t; DROP x"]:
        with pytest.raises(ValueError, match="not a BigQuery table id"):
            ranking.bigquery_search_job(query, params, ranking.BigQueryTables(search=bad))
    with pytest.raises(ValueError, match="fraction_lists_to_search"):
        ranking.bigquery_search_job(query, params, tables, 1.0)


def test_a_tampered_index_or_table_is_refused_before_faiss_reads_it(archive, tmp_path):
    root = tmp_path / "archive"
    shutil.copytree(Path(archive["root"]) / "tables", root / "tables")
    assert main(["index", "--output-root", str(root), "--nlist", "4"]) == 0
    assert ranking.SearchIndex.load(str(root)).info["nlist"] == 4
    index_file = Path(ranking.index_uri(str(root)))
    saved = dict(np.load(index_file, allow_pickle=False))
    # One byte of the serialized faiss index changed, the rest (meta included) kept.
    ivf = saved["ivf"].copy()
    ivf[len(ivf) // 2] ^= 0xFF
    with index_file.open("wb") as handle:
        np.savez(handle, **{**saved, "ivf": ivf})
    with pytest.raises(ValueError, match="does not match its recorded checksum"):
        ranking.SearchIndex.load(str(root))
    # A search table file rewritten in place with the same size: the tables' hash differs.
    assert main(["index", "--output-root", str(root), "--nlist", "4"]) == 0
    (table,) = (root / "tables" / "search").glob(f"{NEW_RUN}.parquet")
    data = bytearray(table.read_bytes())
    data[-12] ^= 0x01  # inside the Parquet footer (its metadata)
    table.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="rebuild it"):
        ranking.SearchIndex.load(str(root))


def test_search_html_reads_no_thumbnail_outside_the_output_root(archive, tmp_path, capsys):
    root = tmp_path / "archive"
    shutil.copytree(Path(archive["root"]), root)
    secret = tmp_path / "secret.jpeg"
    secret.write_bytes(b"\xff\xd8TOP-SECRET-BYTES")
    real = archive["real"]
    resource_dir = root / "tables" / "resource"
    for part in resource_dir.rglob("*.parquet"):
        table = pq.read_table(part)
        rows = table.to_pylist()
        for row in rows:  # a tampered table: thumbnails pointing outside the root
            row["thumbnail_uri"] = str(secret)
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    page = tmp_path / "similar.html"
    assert main(["search", real["instance_uuid"], "--output-root", str(root), "--limit", "3",
                 "--html", str(page)]) == 0  # fmt: skip
    text = page.read_text()
    assert base64.b64encode(secret.read_bytes()).decode()[:12] not in text
    assert str(secret) not in text and "data:image/jpeg" not in text
    capsys.readouterr()
