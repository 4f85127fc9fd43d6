"""`pathembed launch`: the full-archive job on Dataflow, from configs/idc.yaml.

The job is the same DAG as `pathembed run` (pipeline/dag.py); this command only turns the
config's `dataflow` section and its flags into Dataflow pipeline options, and checks what a
Dataflow job needs (gs:// output root and temp location, a worker image, a project). The
embedding step carries the GPU resource hint (Dataflow right fitting: its own worker pool of
`gpu_machine_type` with `gpu_count` x `gpu_type`); every other step runs on `machine_type`.

`--dry-run` prints the options and renders the pipeline graph (text, and DOT with
`--graph-out`) without submitting anything; it needs no credentials or network when the model
is a stand-in or a local SavedModel.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, TestOptions
from apache_beam.portability.api import beam_runner_api_pb2

from models.path_foundation import is_hf_repo_id
from pipeline import progress, summary
from pipeline.config import PipelineConfig, config_from_flags
from pipeline.run import checked_model, execute, new_run_id
from transforms import urls
from transforms.outputs.bigquery_sink import merge_run

DEFAULT_CONFIG = resources.files("configs").joinpath("idc.yaml")
ACCELERATOR_URN = "beam:resources:accelerator:v1"

_COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a Hugging Face commit id

# flag dest -> config key (the flag's help names the key)
_CONFIG_FLAGS = {
    "project": "dataflow.project",
    "region": "dataflow.region",
    "temp_location": "dataflow.temp_location",
    "staging_location": "dataflow.staging_location",
    "image": "dataflow.sdk_container_image",
    "machine_type": "dataflow.machine_type",
    "max_workers": "dataflow.max_num_workers",
    "disk_size_gb": "dataflow.disk_size_gb",
    "job_name": "dataflow.job_name",
    "gpu_type": "dataflow.gpu_type",
    "gpu_count": "dataflow.gpu_count",
    "gpu_machine_type": "dataflow.gpu_machine_type",
    "output_root": "output_root",
    "bigquery_dataset": "tables.bigquery_dataset",
    "bigquery_table": "source.bigquery_table",
    "limit": "source.limit",
    "model": "model.name",
    "idc_version": "run.idc_version",
}


def add_launch_parser(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser(
        "launch",
        help="launch the full-archive job on Dataflow (GPU workers for the embedding step)",
        description="Submits the embedding DAG to Dataflow with the options of the config's "
        "`dataflow` section (default configs/idc.yaml), waits for it, then merges its BigQuery "
        "staging tables. Each flag overrides one config key; flags not listed here go to Beam "
        "unchanged (e.g. --service_account_email, --subnetwork, --no_use_public_ips).",
    )
    add = launch.add_argument
    add("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: %(default)s)")
    add("--project", help="GCP project that runs and pays for the job (dataflow.project)")
    add("--region", help="Dataflow region, e.g. us-central1 (dataflow.region)")
    add(
        "--temp-location",
        help="gs:// folder for temporary files and BigQuery load files (dataflow.temp_location)",
    )
    add(
        "--staging-location",
        help="gs:// folder for staged job files; default: the temp location "
        "(dataflow.staging_location)",
    )
    add(
        "--image",
        help="worker container built from the Dockerfile, e.g. "
        "us-central1-docker.pkg.dev/PROJECT/REPO/pathembed:TAG (dataflow.sdk_container_image)",
    )
    add(
        "--machine-type",
        help="workers of the CPU steps, e.g. n2-standard-4 (dataflow.machine_type)",
    )
    add("--max-workers", type=int, help="autoscaling ceiling, all pools (dataflow.max_num_workers)")
    add("--disk-size-gb", type=int, help="boot disk per worker, GB (dataflow.disk_size_gb)")
    add("--job-name", help="Dataflow job name (dataflow.job_name)")
    add(
        "--gpu-type",
        help="GPU of the embedding step's workers, e.g. nvidia-l4, nvidia-tesla-t4 "
        "(dataflow.gpu_type; 'none' = no GPU hint)",
    )
    add("--gpu-count", type=int, help="GPUs per embedding worker (dataflow.gpu_count)")
    add(
        "--gpu-machine-type",
        help="machine type of the embedding step's workers, e.g. g2-standard-16 "
        "(dataflow.gpu_machine_type)",
    )
    add("--output-root", help="gs://BUCKET/PREFIX for the per-slide artifacts (output_root)")
    add("--bigquery-dataset", help="project.dataset for the tables (tables.bigquery_dataset)")
    add("--bigquery-table", help="IDC dicom_all of a pinned release (source.bigquery_table)")
    add("--limit", type=int, help="at most this many slides, for trial runs (source.limit)")
    add("--model", help="HF repo id, SavedModel dir in the image, or a stub (model.name)")
    add("--idc-version", help="IDC release to record (run.idc_version)")
    add(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set grid.chunk_size=256 (repeatable)",
    )
    add(
        "--dry-run",
        action="store_true",
        help="print the job's options and the pipeline graph; submit nothing",
    )
    add("--graph-out", type=Path, help="with --dry-run: also write the graph as a DOT file")
    add(
        "--merge-only",
        metavar="RUN_ID",
        help="submit nothing; merge the BigQuery staging tables of run RUN_ID (a job whose "
        "launcher stopped before its merge)",
    )
    add("--log-level", default="INFO")
    launch.set_defaults(handler=launch_command, passes_beam_flags=True)


def config_from_launch_args(args: argparse.Namespace) -> PipelineConfig:
    flags = {key: getattr(args, dest) for dest, key in _CONFIG_FLAGS.items()}
    cfg = config_from_flags(args.config, args.set, flags)
    if args.gpu_type == "none":  # no GPU hint: the embedding step runs on the CPU workers
        cfg = dataclasses.replace(cfg, dataflow=dataclasses.replace(cfg.dataflow, gpu_type=None))
    return cfg


def check_dataflow_config(cfg: PipelineConfig) -> None:
    """SystemExit naming every key a Dataflow job still needs."""
    df = cfg.dataflow
    problems = []
    if not df.project:
        problems.append("a project (--project, dataflow.project)")
    if not (df.temp_location or "").startswith("gs://"):
        problems.append("a gs:// temp location (--temp-location, dataflow.temp_location)")
    if not df.sdk_container_image:
        problems.append("a worker image (--image, dataflow.sdk_container_image)")
    if not cfg.output_root.startswith("gs://"):
        problems.append("a gs:// output root (--output-root, output_root)")
    if is_hf_repo_id(cfg.model.name) and not _COMMIT.match(cfg.model.revision or ""):
        # Workers resolve the model themselves: a branch (or none: `main`) can move between the
        # driver's resolution and theirs, and the image may have baked another snapshot.
        problems.append(
            f"a model revision pinned to a 40-hex commit of {cfg.model.name} "
            f"(--set model.revision=COMMIT, model.revision; got {cfg.model.revision!r})"
        )
    try:
        cfg.tables.validate()
        cfg.source.validate()
    except ValueError as exc:
        problems.append(str(exc))
    try:
        progress.validate(cfg.run.progress, cfg.run.progress_interval)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise SystemExit("a Dataflow job needs " + "; ".join(problems))


def dataflow_options(df: Any) -> list[str]:
    """Beam flags for a DataflowRunner job from a DataflowConfig.

    The project lives in the worker image (installed there), so nothing is staged
    (--sdk_location container) and the SDK harness is the image's.
    """
    flags = {
        "runner": "DataflowRunner",
        "project": df.project,
        "region": df.region,
        "temp_location": df.temp_location,
        "staging_location": df.staging_location or df.temp_location,
        "sdk_container_image": df.sdk_container_image,
        "sdk_location": "container",
        "machine_type": df.machine_type,
        "max_num_workers": df.max_num_workers,
        "disk_size_gb": df.disk_size_gb,
        "job_name": df.job_name,
        "number_of_worker_harness_threads": df.harness_threads,
        # one SDK process per worker instead of one per vCPU (each loading its own model)
        "experiments": "no_use_multiple_sdk_containers" if df.single_sdk_process else None,
    }
    return [f"--{key}={value}" for key, value in flags.items() if value is not None]


def _hints(proto: Any, transform: Any) -> dict[str, str]:
    environment = proto.components.environments.get(transform.environment_id)
    if environment is None:
        return {}
    return {urn: value.decode() for urn, value in environment.resource_hints.items()}


def walk_transforms(proto: Any) -> Iterator[tuple[int, Any]]:
    """(depth, PTransform proto) of a runner-API pipeline, depth first, in applied order."""
    transforms = proto.components.transforms

    def visit(transform_id: str, depth: int) -> Iterator[tuple[int, Any]]:
        transform = transforms[transform_id]
        yield depth, transform
        for child in transform.subtransforms:
            yield from visit(child, depth + 1)

    for root in proto.root_transform_ids:
        for child in transforms[root].subtransforms:
            yield from visit(child, 0)


def resource_hints_by_transform(proto: Any) -> dict[str, dict[str, str]]:
    """{unique transform name: {hint urn: value}} for every transform of the pipeline."""
    return {t.unique_name: _hints(proto, t) for _, t in walk_transforms(proto)}


def render_graph_text(proto: Any, max_depth: int = 1) -> str:
    """The transforms down to `max_depth`, indented, each with its resource hints."""
    lines = []
    for depth, transform in walk_transforms(proto):
        if depth > max_depth:
            continue
        hints = _hints(proto, transform)
        named = {urn.split(":")[2] if urn.count(":") >= 3 else urn: v for urn, v in hints.items()}
        shown = f"  [{', '.join(f'{k}={v}' for k, v in named.items())}]" if hints else ""
        lines.append(f"{'  ' * depth}{transform.unique_name.rsplit('/', 1)[-1]}{shown}")
    return "\n".join(lines)


def render_graph_dot(proto: Any) -> str:
    """Graphviz DOT of the top-level transforms and the PCollections between them."""
    top = [t for depth, t in walk_transforms(proto) if depth == 0]
    producer = {pc: t.unique_name for t in top for pc in t.outputs.values()}
    edges = collections.OrderedDict()
    for t in top:
        for pc in t.inputs.values():
            if pc in producer and producer[pc] != t.unique_name:
                edges[(producer[pc], t.unique_name)] = None
    lines = ["digraph pathembed {", "  rankdir=LR;", "  node [shape=box];"]
    for t in top:
        hints = _hints(proto, t)
        color = ', style=filled, fillcolor="#a6d96a"' if ACCELERATOR_URN in hints else ""
        label = t.unique_name + ("\\nGPU" if ACCELERATOR_URN in hints else "")
        lines.append(f'  "{t.unique_name}" [label="{label}"{color}];')
    lines += [f'  "{a}" -> "{b}";' for a, b in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def dry_run_job(pipeline: Any) -> Any:
    """The Dataflow job (apiclient.Job) of a pipeline built with --dry_run=True: the runner
    translates it (Docker environments, resource hints) and returns before submitting."""
    if not pipeline.options.view_as(TestOptions).dry_run:
        raise ValueError("dry_run_job needs a pipeline built with --dry_run=True")
    return pipeline.run().job


def render_environments(proto: Any) -> str:
    """One line per worker environment: its container image and resource hints."""
    lines = []
    for env_id, env in sorted(proto.components.environments.items()):
        image = beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
        hints = {urn: value.decode() for urn, value in env.resource_hints.items()}
        lines.append(f"  {env_id}: {image} {json.dumps(hints) if hints else ''}".rstrip())
    return "\n".join(lines)


def build_pipeline(cfg: PipelineConfig, beam_args: list[str], run_id: str):
    """The job's Beam pipeline object (built, not run) and its options."""
    from pipeline import dag

    options = PipelineOptions(beam_args)
    handler, _ = checked_model(cfg)
    pipeline = beam.Pipeline(options=options)
    dag.build(pipeline, cfg, handler, run_id)
    return pipeline, options


def merge_only(cfg: PipelineConfig, run_id: str, bq: Any = None) -> list[str]:
    """`launch --merge-only RUN_ID`, for a job that died (or whose launcher did): the row files
    of the slides it finished are under the output root; they are loaded and merged (with any
    earlier run never merged), and the run's summary is written: the run is committed."""
    merged = merge_run(cfg.tables, run_id, cfg.output_root, cfg.dataflow.project, bq)
    summary.write_run_summary(cfg.output_root, run_id, {"merged_only": True, "merged": merged})
    return merged


def launch_command(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = config_from_launch_args(args)
    if args.merge_only:
        merged = merge_only(cfg, args.merge_only)
        print(f"merged runs {', '.join(merged)} into {cfg.tables.bigquery_dataset}")
        return 0
    check_dataflow_config(cfg)
    run_id = new_run_id()
    beam_args = dataflow_options(cfg.dataflow) + list(extra)
    if args.dry_run:  # Beam's own: the DataflowRunner translates the job and submits nothing
        beam_args.append("--dry_run=True")
    print(f"run {run_id}: {cfg.source.kind} {cfg.source.bigquery_table} -> {cfg.output_root}")
    print("Dataflow options:")
    shown = urls.redact_options(PipelineOptions(beam_args).get_all_options(drop_default=True))
    print(json.dumps(shown, indent=1, sort_keys=True))
    print("embedding step resource hints:", json.dumps(cfg.dataflow.embed_resource_hints()))
    if not args.dry_run:
        return execute(cfg, beam_args, run_id=run_id)
    try:
        pipeline, _ = build_pipeline(cfg, beam_args, run_id)
    except ValueError as exc:
        raise SystemExit(f"cannot build the job: {exc}") from None
    proto = dry_run_job(pipeline).proto_pipeline
    print("worker environments:")
    print(render_environments(proto))
    print("pipeline graph:")
    print(render_graph_text(proto))
    if args.graph_out:
        args.graph_out.write_text(render_graph_dot(proto))
        print(f"wrote {args.graph_out}")
    print("dry run: nothing submitted")
    return 0
