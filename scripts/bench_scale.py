"""The benchmark's `scale` part (issue: archive scale): runs of many slides, each measured in a
child `pathembed run` like the e2e part.

- memory: peak RSS (the whole process tree) of a 64-slide run against an 8-slide run of the
  same slides: flat when memory is bounded by the slides in flight, not by the run;
- first slide: in a 32-slide run, when the first slide is complete (its completion marker,
  written after its files and table rows) as a share of the run's wall time;
- workers: patches/s of `--workers 2` against `--workers 1` on the same 16 slides, between the
  first and the last completion marker (steady state: model loading excluded) and whole-run.

The slides are generated 20x slides whose every grid cell is tissue (bench_slides), distinct
UIDs per slide, `PATCHES` patches each; the model is the bench's pooling SavedModel, so the
runs measure the pipeline rather than a model.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

PATCHES = 1500
MEMORY_RUNS = (8, 64)
FIRST_SLIDE_RUN = 32
WORKER_RUN = 16


def write_slides(workdir: pathlib.Path, frames: list[bytes], count: int) -> pathlib.Path:
    """`count` distinct slides under workdir/scale-slides (kept between bench runs)."""
    from scripts import bench_slides

    folder = workdir / "scale-slides"
    for k in range(count):
        if not (folder / f"scale-{k:03d}" / "level-0.dcm").exists():
            bench_slides.write_large_slide(folder, PATCHES, frames, name=f"scale-{k:03d}")
    return folder


def subset(slides: pathlib.Path, count: int, into: pathlib.Path) -> pathlib.Path:
    """A folder of the first `count` slides (symbolic links to their files)."""
    for k in range(count):
        source = slides / f"scale-{k:03d}"
        target = into / source.name
        target.mkdir(parents=True, exist_ok=True)
        for path in source.glob("*.dcm"):
            link = target / path.name
            if not link.exists():
                link.symlink_to(path)
    return into


def run(run_pipeline, input_dir: pathlib.Path, out: pathlib.Path, model, cache_dir, workers: int):
    """One `pathembed run` (bench.run_pipeline: wall, CPU, peak RSS of the process tree) and
    the times its slides became complete (their completion markers)."""
    started = time.time()
    result = run_pipeline(
        input_dir, out, str(model), cache_dir, ["--workers", str(workers), "--progress", "off"]
    )
    markers = sorted(p.stat().st_mtime for p in out.glob("*/path_foundation/v1/_COMPLETE.json"))
    return {
        "wall_s": result["wall_s"],
        "cpu_s": result["cpu_s"],
        "cores_used": result["cpu_s"] / result["wall_s"],
        "peak_rss_tree": result["peak_rss_tree"],
        "slides": len(markers),
        "first_complete_s": markers[0] - started,
        "last_complete_s": markers[-1] - started,
        "marker_times_s": [t - started for t in markers],
        "workers": workers,
    }


def steady_patches_per_s(result: dict[str, Any]) -> float:
    """Patches/s between the first and the last completion marker (model loading excluded)."""
    span = result["last_complete_s"] - result["first_complete_s"]
    return (result["slides"] - 1) * PATCHES / span if span > 0 else float("nan")


def part_scale(
    workdir: pathlib.Path, cache_dir: pathlib.Path, model: pathlib.Path, frames, run_pipeline
):
    """(rows as dicts, ratios as (name, value, target, holds, note), the raw runs);
    `run_pipeline`: bench.run_pipeline."""
    slides = write_slides(workdir, frames, max(MEMORY_RUNS))
    runs: dict[str, dict[str, Any]] = {}

    def measure(label: str, count: int, workers: int) -> dict[str, Any]:
        folder = subset(slides, count, workdir / f"scale-input-{count}")
        out = workdir / f"scale-out-{label}-{time.time_ns()}"
        runs[label] = run(run_pipeline, folder, out, model, cache_dir, workers)
        return runs[label]

    small, large = (measure(f"memory-{n}", n, 1) for n in MEMORY_RUNS)
    first = measure(f"first-{FIRST_SLIDE_RUN}", FIRST_SLIDE_RUN, 2)
    one, two = (measure(f"workers-{w}", WORKER_RUN, w) for w in (1, 2))
    memory_ratio = large["peak_rss_tree"] / small["peak_rss_tree"]
    per_slide_mb = (large["peak_rss_tree"] - small["peak_rss_tree"]) / (
        MEMORY_RUNS[1] - MEMORY_RUNS[0]
    ) / 2**20  # fmt: skip
    first_share = first["first_complete_s"] / first["wall_s"]
    steady = steady_patches_per_s(two) / steady_patches_per_s(one)
    whole = (WORKER_RUN * PATCHES / two["wall_s"]) / (WORKER_RUN * PATCHES / one["wall_s"])
    ratios = [
        (
            f"peak RSS, {MEMORY_RUNS[1]}-slide run / {MEMORY_RUNS[0]}-slide run",
            memory_ratio, "<= 1.25", memory_ratio <= 1.25,
            f"{small['peak_rss_tree'] / 2**30:.2f} -> {large['peak_rss_tree'] / 2**30:.2f} GiB, "
            f"{per_slide_mb:+.1f} MB per added {PATCHES}-patch slide (--workers 1)",
        ),
        (
            f"first slide complete / wall time, {FIRST_SLIDE_RUN}-slide run",
            first_share, "< 0.30", first_share < 0.30,
            f"first marker at {first['first_complete_s']:.1f} s of {first['wall_s']:.1f} s "
            "(--workers 2; the model loads in the first seconds)",
        ),
        (
            f"patches/s, --workers 2 / --workers 1 ({WORKER_RUN} slides, steady state)",
            steady, ">= 1.5", steady >= 1.5,
            f"{steady_patches_per_s(one):.0f} -> {steady_patches_per_s(two):.0f} patches/s "
            f"between the first and last completion; whole run incl. model loading: {whole:.2f}x "
            f"({one['wall_s']:.1f} s -> {two['wall_s']:.1f} s); cores busy on average: "
            f"{one['cores_used']:.2f} -> {two['cores_used']:.2f} of {os.cpu_count()}",
        ),
    ]  # fmt: skip
    rows = [
        {
            "what": f"`pathembed run`, {r['slides']} slides x {PATCHES} patches, "
            f"--workers {r['workers']}",
            "wall_s": r["wall_s"],
            "patches_per_s": r["slides"] * PATCHES / r["wall_s"],
            "peak_rss_gib": r["peak_rss_tree"] / 2**30,
            "first_complete_s": r["first_complete_s"],
            "cores_used": r["cores_used"],
        }
        for r in runs.values()
    ]
    return rows, ratios, runs
