"""The DAG (DESIGN.md §2), composed from transforms/: read it top to bottom.

Enumerate -> SkipDone -> PlanSlide -> Reshuffle -> Embed (ReadPatches -> RunInference, the only
step with a GPU hint) -> GroupBySlide -> ClusterSlide -> WriteArtifacts -> tables (Parquet or
BigQuery, tables.sink); every stage's dead letters -> failures (through a breaker that stops the
run when most slides fail: transforms/failures.py).
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from pipeline.config import PIPELINE_VERSION, PipelineConfig, parameter_hash
from transforms import failures, stages
from transforms.outputs.artifacts import RunContext
from transforms.outputs.layout import DATASET_VERSION
from transforms.outputs.sinks import WriteTable
from transforms.sources.enumeration import EnumerateSlides


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
        verify_checksums=cfg.run.verify_checksums,
    )  # fmt: skip
    write_artifacts = stages.WriteArtifactsFn(RunContext(
        output_root=root, model=model, parameter_hash=p_hash, params=params,
        dataset_version=DATASET_VERSION, pipeline_version=PIPELINE_VERSION, run_id=run_id,
        hashing=dataclasses.asdict(cfg.hashing),
    ))  # fmt: skip

    found = p | "Enumerate" >> enumerate_slides
    todo = found.slides | "SkipDone" >> beam.ParDo(skip_done)
    planned = todo | "PlanSlide" >> beam.ParDo(stages.PlanSlideFn(cfg.plan_params())).with_outputs(
        "plan", main="chunks"
    ).with_exception_handling()  # fmt: skip
    embed = stages.EmbedChunks(
        handler, cfg.grid.patch_size, cfg.color.icc_profile, cfg.read.gpu_decode
    ).with_resource_hints(**cfg.dataflow.embed_resource_hints())
    embedded = planned.chunks | "Reshuffle" >> beam.Reshuffle() | "Embed" >> embed
    clustered = (
        {"plan": planned.plan, "patches": embedded["embedded"]}
        | "GroupBySlide" >> beam.CoGroupByKey()
        | "ClusterSlide" >> beam.ParDo(stages.ClusterSlideFn(cfg.kmeans)).with_exception_handling()
    )
    written = clustered.good | "WriteArtifacts" >> beam.ParDo(write_artifacts).with_outputs(
        "search", main="resource"
    ).with_exception_handling()  # fmt: skip

    tables = cfg.tables
    written.resource | "WriteResourceTable" >> WriteTable("resource", tables, root, run_id)
    written.search | "WriteSearchTable" >> WriteTable("search", tables, root, run_id)
    # Each branch passes the breaker where its failures arise (fused with the failing stage).
    threshold = (cfg.run.max_failed_fraction, cfg.run.failure_check_min_slides)
    failure_rows = [
        found.failed
        | "EnumerateFailures" >> beam.Map(failures.source_failure_row, run_id)
        | "EnumerateBreaker" >> beam.Map(failures.check_failure_row, run_id, *threshold)
    ]
    for stage, bad in [("plan", planned.bad), ("read", embedded["bad"]),
                       ("embed", embedded["embed_bad"]),
                       ("cluster", clustered.bad), ("write", written.bad)]:  # fmt: skip
        failure_rows.append(
            bad
            | f"{stage.title()}Failures" >> beam.Map(failures.dead_letter_row, stage, run_id)
            | f"{stage.title()}Breaker" >> beam.Map(failures.check_failure_row, run_id, *threshold)
        )
    (
        failure_rows
        | "AllFailures" >> beam.Flatten()
        | "WriteFailuresTable" >> WriteTable("failures", tables, root, run_id)
    )
