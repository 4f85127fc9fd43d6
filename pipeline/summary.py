"""The run summary: slides done and failed, patches embedded, time per stage, where outputs are."""

from __future__ import annotations

from typing import Any

from apache_beam.metrics.metric import MetricsFilter

COUNTERS = [
    "pixel_source_requests",
    "pixel_frames_read",
    "pixel_source_bytes_read",
    "slides_found",
    "slides_skipped_complete",
    "slides_planned",
    "patches_planned",
    "slides_written",
    "patches_embedded",
    "failures",
]
STAGES = {
    "plan": "plan_ms",
    "read patches": "read_ms",
    "cluster": "cluster_ms",
    "write": "write_ms",
}
INFERENCE = "inference_batch_latency_micro_secs"


def collect(result: Any) -> dict[str, Any]:
    """Counters and per-stage totals from a finished Beam PipelineResult."""
    metrics = result.metrics().query(MetricsFilter())
    counters = {name: 0 for name in COUNTERS}
    for counter in metrics["counters"]:
        if counter.key.metric.name in counters:
            counters[counter.key.metric.name] += counter.committed or 0
    seconds: dict[str, float] = {}
    for dist in metrics["distributions"]:
        name, value = dist.key.metric.name, dist.committed
        if value is None:
            continue
        for stage, metric in STAGES.items():
            if name == metric:
                seconds[stage] = seconds.get(stage, 0.0) + value.sum / 1000
        if name.endswith(INFERENCE):
            seconds["model"] = seconds.get("model", 0.0) + value.sum / 1e6
    return {"counters": counters, "stage_seconds": seconds}


def render(summary: dict[str, Any], output_root: str, wall_seconds: float) -> str:
    c = summary["counters"]
    lines = [
        "",
        "pathembed run summary",
        f"  slides found        {c['slides_found']}",
        f"  already complete    {c['slides_skipped_complete']} (skipped; --force to redo)",
        f"  slides done         {c['slides_written']}",
        f"  failures            {c['failures']}",
        f"  patches embedded    {c['patches_embedded']} (of {c['patches_planned']} planned)",
        f"  remote pixel reads  {c['pixel_source_requests']} requests, "
        f"{c['pixel_frames_read']} frames, {c['pixel_source_bytes_read'] / 1e6:.1f} MB",
        f"  wall time           {wall_seconds:.1f} s",
        "  time per stage (summed over workers):",
    ]
    for stage, secs in summary["stage_seconds"].items():
        lines.append(f"    {stage:<14} {secs:8.1f} s")
    lines += [
        f"  artifacts           {output_root}/<instance_uuid>/path_foundation/v1/",
        f"  tables (Parquet)    {output_root}/tables/{{resource,search,failures}}/",
    ]
    if c["failures"]:
        lines.append(f"  see why: {output_root}/tables/failures/ (reason_code, message)")
    return "\n".join(lines)
