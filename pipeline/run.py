"""`pathembed run | rerun | failures | sample`: embed slides, see why some failed, run those again.

`execute` is the one run lifecycle: run id, model check, BigQuery staging, the pipeline, the
merge and the summary. `pathembed run`, `rerun`, `launch` (on Dataflow) and `search --dicom`
all go through it. The tool's own flags map to config keys through one table (RUN_FLAGS); every
other flag is a Beam pipeline option, so `--runner DataflowRunner --project ...` needs no code.

Reruns: the slides are the distinct instance UUIDs of a failures table's rows (all runs, or
`--run-id`; all reason codes, or `--reason`), run as `pathembed run --uuids ...` with the same
source flags as the run that failed. Slides completed since (completion marker with this run's
parameter hash) are skipped unless `--force`, so rerunning an old failures table is safe.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import secrets
import time
from collections import Counter
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
)

from models.handler import PathFoundationModelHandler
from models.path_foundation import ModelAccessError
from pipeline import dag, progress, summary
from pipeline.config import PipelineConfig, config_from_flags
from transforms import failures
from transforms.errors import SlideError
from transforms.outputs import bigquery_sink, reruns
from transforms.records import validate_uuid
from transforms.samples.slides import SAMPLES, write_samples
from transforms.urls import for_terminal, is_remote

_LOG = logging.getLogger("pathembed")

# flag dest -> config key (each flag's help names its key)
RUN_FLAGS = {
    "source": "source.kind",
    "input": "source.input",
    "dicomweb_url": "source.dicomweb_url",
    "dicomweb_auth": "source.dicomweb_auth",
    "limit": "source.limit",
    "bigquery_table": "source.bigquery_table",
    "idc_bucket": "source.idc_bucket",
    "read_from": "source.read_from",
    "manifest_out": "source.manifest_out",
    "idc_version": "run.idc_version",
    "output_root": "output_root",
    "model": "model.name",
    "batch_size": "model.batch_size",
    "min_tissue_fraction": "tissue.min_tissue_fraction",
    "icc_profile": "color.icc_profile",
    "progress": "run.progress",
    "workers": "run.workers",
}
# The number of local worker processes when neither --workers nor run.workers says (the tests
# set 1: their spies and injected faults live in the test process).
WORKERS_ENV = "PATHEMBED_WORKERS"


def new_run_id() -> str:
    """A run id that sorts by start time: 20261202T104512Z-3fa2c1."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


def checked_model(cfg: PipelineConfig) -> tuple[PathFoundationModelHandler, object]:
    """The model handler and its ModelInfo, or SystemExit saying why the model cannot be used."""
    handler = PathFoundationModelHandler.from_config(
        cfg.model, model_copies=cfg.dataflow.model_copies
    )
    try:
        return handler, handler.model_info()
    except (ModelAccessError, ValueError) as exc:
        raise SystemExit(f"cannot use model {cfg.model.name!r}: {exc}") from None


def execute(
    cfg: PipelineConfig, beam_args: list[str], runner=None, run_id: str | None = None
) -> int:
    """Runs the DAG for `cfg` to the end and returns the exit status: 0, or
    summary.FAILED_SHARE_EXIT when too many slides failed."""
    run_id = run_id or new_run_id()
    handler, model = checked_model(cfg)
    _LOG.info(
        "run %s: input %s -> %s, model %s (%s)",
        run_id, cfg.source.input, cfg.output_root, model.name, model.version,
    )  # fmt: skip
    if model.is_stand_in:
        _LOG.warning(
            "model %s is a stand-in with random weights, NOT Path Foundation; outputs "
            "are labelled as such",
            model.name,
        )
    options = PipelineOptions(beam_args)
    project = options.view_as(GoogleCloudOptions).project
    started = time.perf_counter()
    pipeline = beam.Pipeline(runner=runner, options=options)
    dag.build(pipeline, cfg, handler, run_id)
    if cfg.tables.sink == "bigquery":  # per-run staging tables, merged when the run is done
        bigquery_sink.prepare_run(cfg.tables, run_id, project)
    reporter = progress.reporting(
        cfg.output_root, run_id, cfg.run.progress, cfg.run.progress_interval
    )
    try:
        with reporter:  # polls the output root in a thread until the job ends or fails
            result = pipeline.run()
            result.wait_until_finish()
    except Exception as exc:
        threshold = (cfg.run.max_failed_fraction, cfg.run.failure_check_min_slides)
        if not failures.tripped(run_id, *threshold, error=exc):
            raise
        _LOG.error("run %s stopped: too many slides failed (see the error above)", run_id)
        return summary.FAILED_SHARE_EXIT
    if cfg.tables.sink == "bigquery":
        merged = bigquery_sink.merge_run(cfg.tables, run_id, cfg.output_root, project)
        _LOG.info(
            "merged the rows of runs %s into %s", ", ".join(merged), cfg.tables.bigquery_dataset
        )
    return summary.finish(result, cfg, run_id, time.perf_counter() - started)


def local_runner(beam_args: list[str]):
    """Beam's FnApiRunner unless another runner is asked for: Beam's DirectRunner would first
    try the Prism runner, which downloads a binary. It runs in process, or in worker processes
    when the options say so (`local_workers`)."""
    from apache_beam.options.pipeline_options import StandardOptions

    if PipelineOptions(beam_args).view_as(StandardOptions).runner not in (None, "DirectRunner"):
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def cpu_count() -> int:
    """The cores this process may use (its affinity, e.g. a container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def local_workers(cfg: PipelineConfig, beam_args: list[str]) -> tuple[PipelineConfig, list[str]]:
    """`cfg` and Beam flags for a local run on `run.workers` processes (0: $PATHEMBED_WORKERS,
    else 1: one process already keeps the cores busy with its reader threads and TensorFlow's,
    and on 2 cores a second process was slower: `scripts/bench.py --only scale`).

    More than one: the FnApiRunner starts that many SDK worker processes
    (`--direct_num_workers=N --direct_running_mode=multi_processing`; Beam flags given by the
    user come later and win) and runs every stage's bundles across them, each process with its
    own model. An unset `model.intra_op_threads` becomes cores // workers so that together they
    use the cores once. One: everything runs in this process, as before.
    """
    workers = cfg.run.workers or int(os.environ.get(WORKERS_ENV) or 0) or 1
    if workers > 1:
        beam_args = [
            f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing",
            *beam_args,
        ]  # fmt: skip
    direct = PipelineOptions(beam_args).view_as(DirectOptions)
    if direct.direct_running_mode == "in_memory":
        workers = 1
    else:
        workers = direct.direct_num_workers or cpu_count()
    if cfg.model.intra_op_threads == 0:
        threads = max(1, cpu_count() // workers)
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, intra_op_threads=threads)
        )
    if workers > 1 and cfg.model.inter_op_threads == 0:
        # One inter-op pool thread per process: N processes' idle pools otherwise spin on the
        # cores the others decode on.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, inter_op_threads=1))
    _LOG.info(
        "local run: %d worker process(es), %d TensorFlow threads each",
        workers, cfg.model.intra_op_threads,
    )  # fmt: skip
    return cfg, beam_args


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    """The flags of `run`, shared by `rerun`."""
    add = run.add_argument
    add(
        "--config",
        type=Path,
        help="YAML config (default: built-in local defaults, the same as configs/local.yaml)",
    )
    add(
        "--source",
        choices=["dicom_folder", "manifest", "idc_index", "bigquery", "dicomweb"],
        help="where slides come from (source.kind; default dicom_folder)",
    )
    add(
        "--input",
        help="dicom_folder: folder, gs:// or s3:// prefix; manifest: .jsonl/.csv file "
        "(source.input)",
    )
    add(
        "--dicomweb-url",
        help="DICOMweb base URL: the store for --source dicomweb, or where IDC sources read "
        "pixels with --read-from dicomweb (source.dicomweb_url)",
    )
    add(
        "--dicomweb-auth",
        choices=["auto", "google", "none"],
        help="DICOMweb credentials: google = Application Default Credentials; auto = google "
        "for *.googleapis.com, else none (source.dicomweb_auth)",
    )
    add("--collections", help="IDC collection ids, comma-separated (source.collections)")
    add("--limit", type=int, help="at most this many slides (source.limit)")
    add("--bigquery-table", help="IDC dicom_all table of a pinned release (source.bigquery_table)")
    add(
        "--idc-bucket",
        help="bucket holding IDC series folders for --source idc_index (source.idc_bucket)",
    )
    add(
        "--read-from",
        choices=["bucket", "aws", "dicomweb"],
        help="where IDC sources read pixels (source.read_from)",
    )
    add("--manifest-out", help="also write the enumerated slides as a .jsonl/.csv manifest")
    add("--idc-version", help="IDC release to record, e.g. v20 (run.idc_version)")
    add("--output-root", help="where artifacts and tables go (output_root)")
    add("--model", help="stub-tiny | stub-vit-s16 | HF repo id | SavedModel dir")
    add("--batch-size", type=int, help="patches per model call (model.batch_size)")
    add(
        "--min-tissue-fraction",
        type=float,
        help="keep patches at least this much tissue (tissue.min_tissue_fraction)",
    )
    add(
        "--icc-profile",
        choices=["none", "srgb"],
        help="patch colour: stored values (none, default) or converted to sRGB from the slide's "
        "ICC profile (color.icc_profile)",
    )
    add("--uuids", help="comma-separated instance UUIDs: process only these")
    add("--uuids-file", type=Path, help="file with one instance UUID per line")
    add("--force", action="store_true", help="redo slides that are already complete")
    add(
        "--verify-checksums",
        action="store_true",
        help="skip a complete slide only when its files' SHA-256 match its marker "
        "(run.verify_checksums; sizes are always checked)",
    )
    add(
        "--only-new",
        action="store_true",
        help="new IDC release: only slides not in the resource table or whose instance hash "
        "changed (run.resource_table; default {output_root}/tables/resource)",
    )
    add(
        "--resource-table",
        help="resource table for --only-new: Parquet file/folder or BigQuery project.dataset.table",
    )
    add(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set kmeans.n_init=1 (repeatable)",
    )
    add(
        "--workers",
        type=int,
        help="local runs: worker processes, each with its own model (run.workers; default 1: "
        "in process, which keeps the cores busy with reader and TensorFlow threads)",
    )
    add(
        "--progress",
        choices=progress.MODES,
        help="progress while the job runs: a live bar (bar), a log line every "
        "run.progress_interval seconds (log), off; auto = bar on a terminal, else log "
        "(run.progress)",
    )
    add("--log-level", default="INFO")


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="embed slides end to end (Beam; DirectRunner by default)",
        description="Embeds every slide of the configured source and writes artifacts and "
        "tables. Flags not listed here are passed to Beam (e.g. --runner, --project, "
        "--direct_num_workers).",
    )
    add_run_arguments(run)
    run.set_defaults(handler=run_command, passes_beam_flags=True)


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The run's config: the YAML file, then --set, then the named flags."""
    flags = {key: getattr(args, dest) for dest, key in RUN_FLAGS.items()}
    uuids = [u for u in (args.uuids or "").split(",") if u.strip()]
    if args.uuids_file:
        uuids += [line.strip() for line in args.uuids_file.read_text().splitlines() if line.strip()]
    if uuids:
        flags["run.uuids"] = [u.strip() for u in uuids]
    if args.force:
        flags["run.force"] = True
    if getattr(args, "verify_checksums", False):
        flags["run.verify_checksums"] = True
    if args.only_new or args.resource_table:
        flags["run.resource_table"] = args.resource_table or "auto"
    if args.collections:
        flags["source.collections"] = [c.strip() for c in args.collections.split(",") if c]
    return checked_config(config_from_flags(args.config, args.set, flags))


def checked_config(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` validated (SystemExit naming the problem), UUIDs canonical, local output paths
    absolute (they are recorded in metadata and tables)."""
    try:
        cfg.source.validate()
        cfg.tables.validate()
        progress.validate(cfg.run.progress, cfg.run.progress_interval)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not is_remote(cfg.output_root):
        cfg = dataclasses.replace(cfg, output_root=str(Path(cfg.output_root).resolve()))
    try:  # before any UUID reaches a path or a query
        uuids = tuple(validate_uuid(value) for value in cfg.run.uuids)
    except SlideError as exc:
        raise SystemExit(f"--uuids / --uuids-file: {exc.message}") from None
    resource_table = cfg.run.resource_table
    if resource_table == "auto":
        resource_table = f"{cfg.output_root.rstrip('/')}/tables/resource"
    run_cfg = dataclasses.replace(cfg.run, uuids=uuids, resource_table=resource_table)
    return dataclasses.replace(cfg, run=run_cfg)


def run_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg, runner = config_from_args(args), local_runner(beam_args)
    if runner is not None:
        cfg, beam_args = local_workers(cfg, beam_args)
    if PipelineOptions(beam_args).view_as(DirectOptions).direct_running_mode != "in_memory":
        # Beam relays every log record of its worker processes through this logger, as
        # protobuf text; the progress lines say how the run goes, warnings still pass.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(
            logging.WARNING
        )
    return execute(cfg, beam_args, runner)


def add_rerun_parser(sub: argparse._SubParsersAction) -> None:
    rerun = sub.add_parser(
        "rerun",
        help="run again the slides of a failures table",
        description="Runs the slides named by a failures table again, with the same source "
        "flags as the run that failed (e.g. --input DIR, or --source manifest --input F). "
        "Other flags are those of `run`, and Beam's.",
    )
    rerun.add_argument(
        "--failures",
        required=True,
        help="failures table: Parquet file or folder ({output_root}/tables/failures) or "
        "BigQuery project.dataset.table",
    )
    rerun.add_argument("--run-id", help="only the failures of this run")
    rerun.add_argument(
        "--reason", action="append", default=[], help="only these reason codes (repeatable)"
    )
    add_run_arguments(rerun)
    rerun.set_defaults(handler=rerun_command, passes_beam_flags=True)


def rerun_command(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.uuids or args.uuids_file:
        raise SystemExit("rerun takes its slides from --failures; drop --uuids / --uuids-file")
    try:
        failed = reruns.failed_slides(args.failures, args.run_id, args.reason)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--failures {args.failures}: {exc}") from None
    if failed.rejected:
        print(f"not rerun (not UUIDs): {', '.join(repr(v) for v in failed.rejected)}")
    if not failed.uuids:
        print(f"no slides to rerun in {args.failures}")
        return 0
    _LOG.info("rerunning %d failed slides from %s", len(failed.uuids), args.failures)
    args.uuids = ",".join(failed.uuids)
    return run_command(args, beam_args)


def add_failures_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "failures",
        help="summarise a failures table: counts per reason code and stage, one line per row",
    )
    parser.add_argument("table", help="Parquet file or folder, e.g. OUT/tables/failures")
    parser.add_argument("--run-id", help="only the failures of this run")
    parser.add_argument("--reason", action="append", default=[], help="only these reason codes")
    parser.set_defaults(handler=failures_command)


def failures_command(args: argparse.Namespace, _: list[str]) -> int:
    try:
        rows = reruns.local_failure_rows(args.table, args.run_id, args.reason)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{args.table}: {exc}") from None
    slides = {r["instance_uuid"] for r in rows}
    print(f"{len(rows)} failure rows, {len(slides)} slides")
    # Every value comes from a table a run (or anyone with write access) filled from slide
    # headers: escaped and redacted before it reaches the terminal.
    shown = [{k: for_terminal(str(v)) for k, v in r.items()} for r in rows]
    for (reason, stage), n in sorted(
        Counter((r["reason_code"], r["stage"]) for r in shown).items()
    ):
        print(f"  {reason:<30} {stage:<10} {n}")
    for r in shown:
        print(f"{r['instance_uuid']}  {r['stage']:<9} {r['reason_code']:<28} {r['message']}")
    return 0


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
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


def sample_command(args: argparse.Namespace, _: list[str]) -> int:
    names = [n.strip() for n in args.which.split(",") if n.strip()]
    for name, paths in write_samples(args.out, names).items():
        print(f"{name}: {len(paths)} DICOM files in {paths[0].parent}")
    return 0
