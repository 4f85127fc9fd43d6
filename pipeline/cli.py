"""`pathembed`: the command line. The tool's own flags are parsed here; every other flag is a
Beam pipeline option, so `--runner DataflowRunner --project ...` needs no code change."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import secrets
import sys
import time
from pathlib import Path

from pipeline.config import PipelineConfig, load_config, set_overrides
from pipeline.summary import FAILED_SHARE_EXIT
from transforms import urls

_LOG = logging.getLogger("pathembed")


def _run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="embed slides end to end (Beam; DirectRunner by default)",
        description="Embeds every slide of the configured source and writes artifacts and "
        "tables. Flags not listed here are passed to Beam (e.g. --runner, --project, "
        "--direct_num_workers).",
    )
    add_run_arguments(run)
    run.set_defaults(handler=run_command, passes_beam_flags=True)


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of `run`, shared by `rerun`."""
    run.add_argument(
        "--config",
        type=Path,
        help="YAML config (default: built-in local defaults, the same as configs/local.yaml)",
    )
    run.add_argument(
        "--source",
        choices=["dicom_folder", "manifest", "idc_index", "bigquery", "dicomweb"],
        help="where slides come from (source.kind; default dicom_folder)",
    )
    run.add_argument(
        "--input",
        help="dicom_folder: folder, gs:// or s3:// prefix; manifest: .jsonl/.csv file "
        "(source.input)",
    )
    run.add_argument(
        "--dicomweb-url",
        help="DICOMweb base URL: the store for --source dicomweb, or where IDC sources read "
        "pixels with --read-from dicomweb (source.dicomweb_url)",
    )
    run.add_argument(
        "--dicomweb-auth",
        choices=["auto", "google", "none"],
        help="DICOMweb credentials: google = Application Default Credentials; auto = google "
        "for *.googleapis.com, else none (source.dicomweb_auth)",
    )
    run.add_argument(
        "--collections", help="IDC collection ids, comma-separated (source.collections)"
    )
    run.add_argument("--limit", type=int, help="at most this many slides (source.limit)")
    run.add_argument(
        "--bigquery-table",
        help="IDC dicom_all table of a pinned release (source.bigquery_table)",
    )
    run.add_argument(
        "--idc-bucket",
        help="bucket holding IDC series folders for --source idc_index (source.idc_bucket)",
    )
    run.add_argument(
        "--read-from",
        choices=["bucket", "aws", "dicomweb"],
        help="where IDC sources read pixels (source.read_from)",
    )
    run.add_argument(
        "--manifest-out", help="also write the enumerated slides as a .jsonl/.csv manifest"
    )
    run.add_argument("--idc-version", help="IDC release to record, e.g. v20 (run.idc_version)")
    run.add_argument("--output-root", help="where artifacts and tables go (output_root)")
    run.add_argument("--model", help="stub-tiny | stub-vit-s16 | HF repo id | SavedModel dir")
    run.add_argument("--batch-size", type=int, help="patches per model call (model.batch_size)")
    run.add_argument(
        "--min-tissue-fraction",
        type=float,
        help="keep patches at least this much tissue (tissue.min_tissue_fraction)",
    )
    run.add_argument(
        "--icc-profile",
        choices=["none", "srgb"],
        help="patch colour: stored values (none, default) or converted to sRGB from the slide's "
        "ICC profile (color.icc_profile)",
    )
    run.add_argument("--uuids", help="comma-separated instance UUIDs: process only these")
    run.add_argument("--uuids-file", type=Path, help="file with one instance UUID per line")
    run.add_argument("--force", action="store_true", help="redo slides that are already complete")
    run.add_argument(
        "--verify-checksums",
        action="store_true",
        help="skip a complete slide only when its files' SHA-256 match its marker "
        "(run.verify_checksums; sizes are always checked)",
    )
    run.add_argument(
        "--only-new",
        action="store_true",
        help="new IDC release: only slides not in the resource table or whose instance hash "
        "changed (run.resource_table; default {output_root}/tables/resource)",
    )
    run.add_argument(
        "--resource-table",
        help="resource table for --only-new: Parquet file/folder or BigQuery project.dataset.table",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set kmeans.n_init=1 (repeatable)",
    )
    run.add_argument("--log-level", default="INFO")


def _sample_parser(sub: argparse._SubParsersAction) -> None:
    from transforms.sample_slides import SAMPLES

    sample = sub.add_parser(
        "sample",
        help="write synthetic DICOM WSI sample slides",
        description="Writes deterministic synthetic DICOM VL Whole Slide Microscopy pyramids "
        f"(not real tissue): {', '.join(SAMPLES)}.",
    )
    sample.add_argument("--out", type=Path, required=True, help="folder to write the slides into")
    sample.add_argument(
        "--which",
        default=",".join(SAMPLES),
        help=f"comma-separated sample names (default: {','.join(SAMPLES)})",
    )
    sample.set_defaults(handler=sample_command)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    overrides = set_overrides(args.set)
    flags = {
        "source.kind": args.source,
        "source.input": args.input,
        "source.dicomweb_url": args.dicomweb_url,
        "source.dicomweb_auth": args.dicomweb_auth,
        "source.limit": args.limit,
        "source.bigquery_table": args.bigquery_table,
        "source.idc_bucket": args.idc_bucket,
        "source.read_from": args.read_from,
        "source.manifest_out": args.manifest_out,
        "run.idc_version": args.idc_version,
        "output_root": args.output_root,
        "model.name": args.model,
        "model.batch_size": args.batch_size,
        "tissue.min_tissue_fraction": args.min_tissue_fraction,
        "color.icc_profile": args.icc_profile,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    uuids = [u for u in (args.uuids or "").split(",") if u.strip()]
    if args.uuids_file:
        uuids += [line.strip() for line in args.uuids_file.read_text().splitlines() if line.strip()]
    if uuids:
        overrides["run.uuids"] = [u.strip() for u in uuids]
    if args.force:
        overrides["run.force"] = True
    if getattr(args, "verify_checksums", False):
        overrides["run.verify_checksums"] = True
    if args.only_new or args.resource_table:
        overrides["run.resource_table"] = args.resource_table or "auto"
    if args.collections:
        overrides["source.collections"] = [c.strip() for c in args.collections.split(",") if c]
    cfg = load_config(args.config, overrides)
    try:
        cfg.source.validate()
        cfg.tables.validate()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return cfg


def run_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from models.handler import PathFoundationModelHandler
    from models.path_foundation import ModelAccessError
    from pipeline import dag, summary
    from transforms.errors import SlideError
    from transforms.slides import validate_uuid

    cfg = config_from_args(args)
    if "://" not in cfg.output_root:  # record absolute local paths in metadata and tables
        cfg = dataclasses.replace(cfg, output_root=str(Path(cfg.output_root).resolve()))
    try:  # before any UUID reaches a path or a query
        uuids = tuple(validate_uuid(value) for value in cfg.run.uuids)
    except SlideError as exc:
        raise SystemExit(f"--uuids / --uuids-file: {exc.message}") from None
    resource_table = cfg.run.resource_table
    if resource_table == "auto":
        resource_table = f"{cfg.output_root.rstrip('/')}/tables/resource"
    run_cfg = dataclasses.replace(cfg.run, uuids=uuids, resource_table=resource_table)
    cfg = dataclasses.replace(cfg, run=run_cfg)
    options = PipelineOptions(beam_args)
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner"):
        # Pin the in-process FnApiRunner: Beam's DirectRunner would first try the Prism
        # runner, which downloads a binary.
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)
    handler = PathFoundationModelHandler.from_config(cfg.model)
    try:
        model = handler.model_info()
    except (ModelAccessError, ValueError) as exc:
        raise SystemExit(f"cannot use model {cfg.model.name!r}: {exc}") from None
    _LOG.info(
        "run %s: input %s -> %s, model %s (%s)",
        run_id,
        cfg.source.input,
        cfg.output_root,
        model.name,
        model.version,
    )
    if model.is_stand_in:
        _LOG.warning(
            "model %s is a stand-in with random weights, NOT Path Foundation; outputs "
            "are labelled as such",
            model.name,
        )
    started = time.perf_counter()
    pipeline = beam.Pipeline(runner=runner, options=options)
    dag.build(pipeline, cfg, handler, run_id)
    if cfg.tables.sink == "bigquery":  # per-run staging tables, merged when the run is done
        from apache_beam.options.pipeline_options import GoogleCloudOptions

        from transforms import bigquery_sink

        project = options.view_as(GoogleCloudOptions).project
        bigquery_sink.prepare_run(cfg.tables, run_id, project)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception:
        from transforms import breaker

        threshold = (cfg.run.max_failed_fraction, cfg.run.failure_check_min_slides)
        if not breaker.tripped(run_id, *threshold):
            raise
        _LOG.error("run %s stopped: too many slides failed (see the error above)", run_id)
        return FAILED_SHARE_EXIT
    if cfg.tables.sink == "bigquery":
        bigquery_sink.merge_run(cfg.tables, run_id, project)
    return summary.finish(result, cfg, run_id, time.perf_counter() - started)


def sample_command(args: argparse.Namespace, _: list[str]) -> int:
    from transforms.sample_slides import write_samples

    names = [n.strip() for n in args.which.split(",") if n.strip()]
    for name, paths in write_samples(args.out, names).items():
        print(f"{name}: {len(paths)} DICOM files in {paths[0].parent}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(
        prog="pathembed",
        description="Path Foundation embeddings for DICOM whole-slide images (IDC or your own).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_beam_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # No URL user-info or signature, and no raw control character, reaches the log.
    urls.install_log_redaction()
    # Beam logs every string type hint (from `from __future__ import annotations`) at INFO.
    logging.getLogger("apache_beam.typehints.native_type_compatibility").setLevel(logging.WARNING)
    return args.handler(args, rest)


from pipeline.launch import add_launch_parser  # noqa: E402 (kept beside the list it extends)
from pipeline.rerun import (  # noqa: E402 (kept beside the list it extends)
    add_failures_parser,
    add_rerun_parser,
)
from pipeline.search_cli import (  # noqa: E402 (kept beside the list it extends)
    add_fetch_parser,
    add_index_parser,
    add_lookup_parser,
    add_search_parser,
    add_show_parser,
)

# Each adds one subcommand parser whose defaults set `handler(args, extra_flags) -> exit code`.
SUBCOMMANDS = [
    _run_parser,
    add_rerun_parser,
    add_failures_parser,
    _sample_parser,
    add_search_parser,
    add_index_parser,
    add_lookup_parser,
    add_fetch_parser,
    add_show_parser,
    add_launch_parser,
]
