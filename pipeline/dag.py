"""The DAG (DESIGN.md §2), composed from transforms/: read it top to bottom.

Enumerate -> Reshuffle -> SkipDone -> Reshuffle -> PlanSlide -> EmbedSlide (RunInference over
whole slides: chunks read ahead by threads, embedded in batches; the only step with a GPU hint)
-> ClusterSlide -> WriteSlide (artifacts, then the slide's resource and search row files, then
its completion marker). After the shuffles every step works on one slide and waits for no
other, so a slide is committed while the next ones are still being read, memory is bounded by
the slides in flight, and a run that dies keeps every slide it finished. Every stage's dead
letters -> failure rows, each written as a file at once, through a breaker that stops the run
when most slides fail (transforms/failures.py). BigQuery: the row files are loaded and merged
when the run ends (transforms/outputs/bigquery_sink.py).
"""

from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline.config import PIPELINE_VERSION, PipelineConfig, parameter_hash
from transforms import failures, stages
from transforms.outputs.artifacts import RunContext
from transforms.outputs.layout import DATASET_VERSION, todo_uri
from transforms.outputs.sinks import WriteFailureRowFn
from transforms.sources.enumeration import EnumerateSlides


def write_todo(slides: int, output_root: str, run_id: str) -> int:
    """runs/{run_id}.todo: how many slides this run has to do (progress and ETA)."""
    with FileSystems.create(todo_uri(output_root, run_id)) as handle:
        handle.write(json.dumps({"slides": slides}).encode())
    return slides


def build(p: beam.Pipeline, cfg: PipelineConfig, handler, run_id: str) -> None:
    """Adds the whole embedding DAG for `cfg` to pipeline `p`."""
    model = handler.model_info()
    params = cfg.output_params(model.name, model.version)
    p_hash = parameter_hash(params)
    root, uuids = cfg.output_root, frozenset(cfg.run.uuids)
    enumerate_slides = EnumerateSlides(
        cfg.source, cfg.levels.rule(), uuids=uuids, idc_version=cfg.run.idc_version
    )
    skip_done = stages.SkipDoneOrUnrequested(
        output_root=root, dataset_version=DATASET_VERSION, n_clusters=cfg.kmeans.n_clusters,
        parameter_hash=p_hash, uuids=uuids, force=cfg.run.force,
        resource_table=cfg.run.resource_table, run_id=run_id,
        verify_checksums=cfg.run.verify_checksums, lease_ttl_s=cfg.run.lease_ttl_s,
    )  # fmt: skip
    write_slide = stages.WriteSlideFn(RunContext(
        output_root=root, model=model, parameter_hash=p_hash, params=params,
        dataset_version=DATASET_VERSION, pipeline_version=PIPELINE_VERSION, run_id=run_id,
        hashing=dataclasses.asdict(cfg.hashing),
    ), cfg.run.lease_ttl_s)  # fmt: skip
    embed = stages.EmbedSlides(handler, stages.ReadSpec.of(cfg), run_id=run_id)
    embed = embed.with_resource_hints(**cfg.dataflow.embed_resource_hints())

    found = p | "Enumerate" >> enumerate_slides
    # The sources start from one element: spread the slides over the workers before the
    # marker checks (SkipDone) and again before planning, so neither runs in one bundle.
    todo = (
        found.slides
        | "CountFound" >> beam.Map(failures.tried, run_id, "enumerate")
        | "SpreadSlides" >> beam.Reshuffle()
        | "SkipDone" >> beam.ParDo(skip_done)
    )
    _ = todo | "CountTodo" >> beam.combiners.Count.Globally() | "WriteTodo" >> beam.Map(
        write_todo, root, run_id
    )  # fmt: skip
    planned = (
        todo
        | "SpreadTodo" >> beam.Reshuffle()
        | "PlanSlide" >> beam.ParDo(stages.PlanSlideFn(cfg.plan_params(), run_id))
        .with_exception_handling()
    )  # fmt: skip
    embedded = planned.good | "EmbedSlide" >> embed
    clustered = embedded["embedded"] | "ClusterSlide" >> beam.ParDo(
        stages.ClusterSlideFn(cfg.kmeans, run_id)
    ).with_exception_handling()  # fmt: skip
    written = clustered.good | "WriteSlide" >> beam.ParDo(write_slide).with_exception_handling()

    # Each branch passes the breaker where its failures arise (fused with the failing stage).
    threshold = (cfg.run.max_failed_fraction, cfg.run.failure_check_min_slides)
    failure_rows = [
        found.failed
        | "EnumerateFailures" >> beam.Map(failures.source_failure_row, run_id)
        | "EnumerateBreaker" >> beam.Map(failures.check_failure_row, run_id, *threshold)
    ]
    for stage, bad in [("plan", planned.bad), ("read", embedded["read_bad"]),
                       ("embed", embedded["embed_bad"]),
                       ("cluster", clustered.bad), ("write", written.bad)]:  # fmt: skip
        failure_rows.append(
            bad
            | f"{stage.title()}Failures" >> beam.Map(failures.dead_letter_row, stage, run_id)
            | f"{stage.title()}Breaker" >> beam.Map(failures.check_failure_row, run_id, *threshold)
        )
    _ = (
        failure_rows
        | "AllFailures" >> beam.Flatten()
        | "WriteFailureRows" >> beam.ParDo(WriteFailureRowFn(root, run_id))
    )
