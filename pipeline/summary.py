"""The run summary: slides done and failed, patches embedded, time per stage, where outputs are."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from apache_beam.metrics.metric import MetricsFilter

from transforms import failures, metrics
from transforms.outputs.layout import run_summary_uri
from transforms.urls import is_remote

_LOG = logging.getLogger("pathembed")
FAILED_SHARE_EXIT = 3  # more than run.max_failed_fraction of the slides failed

INFERENCE = "inference_batch_latency_micro_secs"


def collect(result: Any) -> dict[str, Any]:
    """Counters and per-stage totals from a finished Beam PipelineResult."""
    queried = result.metrics().query(MetricsFilter())
    counters = {name: 0 for name in metrics.COUNTERS}
    by_reason: dict[str, int] = {}
    devices: dict[str, int] = {}
    for counter in queried["counters"]:
        name = counter.key.metric.name
        if name in counters:
            counters[name] += counter.committed or 0
        elif name.startswith(metrics.MODEL_DEVICE_PREFIX):
            kind = name.removeprefix(metrics.MODEL_DEVICE_PREFIX)
            devices[kind] = devices.get(kind, 0) + (counter.committed or 0)
        elif name.startswith(metrics.REASON_PREFIX):
            reason = name.removeprefix(metrics.REASON_PREFIX)
            by_reason[reason] = by_reason.get(reason, 0) + (counter.committed or 0)
    if by_reason:
        counters["failures_by_reason"] = dict(sorted(by_reason.items()))
    seconds: dict[str, float] = {}
    for dist in queried["distributions"]:
        name, value = dist.key.metric.name, dist.committed
        if value is None:
            continue
        for stage, metric in metrics.STAGES.items():
            if name == metric:
                seconds[stage] = seconds.get(stage, 0.0) + value.sum / 1000
        if name.endswith(INFERENCE):
            seconds["model"] = seconds.get("model", 0.0) + value.sum / 1e6
    return {
        "counters": counters,
        # model loads (worker processes) per device kind their first model call ran on
        "model_devices": dict(sorted(devices.items())),
        "failures_by_reason": dict(sorted(by_reason.items())),
        "stage_seconds": seconds,
    }


def failed_slides(counters: dict[str, int]) -> tuple[int, int]:
    """(slides that failed, slides tried): tried = not skipped as complete, including those
    that failed before they could be filtered (enumeration)."""
    tried = counters["slides_to_process"] + counters["enumerate_failures"]
    return max(0, tried - counters["slides_written"]), tried


def failure_threshold_exceeded(
    counters: dict[str, int], max_failed_fraction: float | None, min_slides: int
) -> str | None:
    """A message when more than `max_failed_fraction` of at least `min_slides` tried slides
    failed (a broken credential or store rather than bad slides), else None."""
    failed, tried = failed_slides(counters)
    if not failures.exceeds(failed, tried, max_failed_fraction, min_slides):
        return None
    return (
        f"{failed} of {tried} slides failed ({failed / tried:.0%}), more than "
        f"run.max_failed_fraction = {max_failed_fraction:.0%}: see the failures table for the "
        "reasons (credentials and the pixel source for read errors, the files themselves for "
        f"header and decode errors), {failures.RERUN}"
    )


def model_devices(summary: dict[str, Any]) -> str:
    """ "GPU (2 model loads)", "CPU (1 model load)", or both; "-" when no model ran."""
    devices = summary.get("model_devices") or {}
    parts = [f"{kind} ({n} model load{'s' if n != 1 else ''})" for kind, n in devices.items() if n]
    return ", ".join(parts) or "- (no model call)"


def render(
    summary: dict[str, Any], output_root: str, wall_seconds: float, tables: str = "Parquet"
) -> str:
    c = summary["counters"]
    failed, tried = failed_slides(c)
    not_found = []
    if c.get("requested_not_found"):
        not_found.append(
            f"  not found           {c['requested_not_found']} requested slides were not "
            f"found in the source (of {c['requested']} asked for by UUID)"
        )
    lines = [
        "",
        "pathembed run summary",
        f"  slides found        {c['slides_found']}",
        *not_found,
        f"  files ignored       {c['files_ignored']} (not whole-slide images; listed in the log)",
        f"  already complete    {c['slides_skipped_complete']} (skipped; --force to redo)",
        f"  slides done         {c['slides_written']}",
        f"  slides failed       {failed} (of {tried} tried; {c['failures']} failure rows)",
        *[f"    {reason:<20} {n}" for reason, n in c.get("failures_by_reason", {}).items()],
        f"  patches embedded    {c['patches_embedded']} (of {c['patches_planned']} planned)",
        f"  pixel reads         {c['pixel_source_requests']} requests "
        "(local files and remote sources), "
        f"{c['pixel_frames_read']} frames, {c['pixel_source_bytes_read'] / 1e6:.1f} MB",
        f"  model ran on        {model_devices(summary)}",
        f"  frames decoded      {c.get('gpu_decoded_frames', 0)} on the GPU (read.gpu_decode), "
        "the others on the CPU",
        f"  wall time           {wall_seconds:.1f} s",
        "  time per stage (summed over workers):",
    ]
    for stage, secs in summary["stage_seconds"].items():
        lines.append(f"    {stage:<14} {secs:8.1f} s")
    lines += [
        f"  artifacts           {output_root}/<instance_uuid>/path_foundation/v1/",
        f"  tables (Parquet)    {output_root}/tables/{{resource,search,failures}}/"
        if tables == "Parquet"
        else f"  tables              {tables}: resource, search, failures",
    ]
    if c["failures"]:
        lines.append(f"  see why: {output_root}/tables/failures/ (reason_code, message)")
        lines.append(f"  rerun:   pathembed rerun --failures {output_root}/tables/failures ...")
    return "\n".join(lines)


def finish(result: Any, cfg: Any, run_id: str, wall_seconds: float) -> int:
    """After a finished job (local or Dataflow): prints the summary, writes it (which commits
    the run's tables: a slide counts as done only then), checks the failed share; returns the
    exit status."""
    collected = collect(result)
    if cfg.run.uuids:
        note_requested(collected["counters"], len(cfg.run.uuids), run_id)
    tables = (
        f"BigQuery {cfg.tables.bigquery_dataset}" if cfg.tables.sink == "bigquery" else "Parquet"
    )
    print(render(collected, cfg.output_root, wall_seconds, tables))
    write_run_summary(cfg.output_root, run_id, collected)
    exceeded = failure_threshold_exceeded(
        collected["counters"], cfg.run.max_failed_fraction, cfg.run.failure_check_min_slides
    )
    if exceeded:
        _LOG.error("run %s: %s", run_id, exceeded)
        return FAILED_SHARE_EXIT
    return 0


def note_requested(counters: dict[str, Any], requested: int, run_id: str) -> None:
    """A run that asked for slides by UUID (--uuids, rerun): how many of them enumeration
    never found (neither as a slide nor as a failure: e.g. the files were removed), so that
    "0 done, 0 failed" is never all a rerun says about slides it could not find."""
    found = counters.get(metrics.REQUESTED_FOUND, 0)
    counters["requested"] = requested
    counters["requested_not_found"] = max(0, requested - found)
    if counters["requested_not_found"]:
        _LOG.warning(
            "run %s: %d requested slides were not found in the source (of %d asked for by "
            "UUID): not enumerated at all, e.g. their files were removed, or the source flags "
            "differ from the failed run's",
            run_id, counters["requested_not_found"], requested,
        )  # fmt: skip


def write_run_summary(output_root: str, run_id: str, collected: dict[str, Any]) -> str:
    """Writes {output_root}/runs/{run_id}.json (local path or gs://) and returns its path."""
    from apache_beam.io.filesystems import FileSystems

    path = run_summary_uri(output_root, run_id)
    if not is_remote(output_root):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileSystems.create(path) as handle:
        handle.write(json.dumps({"run_id": run_id, **collected}, indent=1).encode())
    return path
