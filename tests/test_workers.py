"""Local runs on several worker processes (`pathembed run --workers N`), and the Dataflow
options for processes and models per worker."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, PipelineOptions

from models.handler import PathFoundationModelHandler
from pipeline.cli import main
from pipeline.config import DataflowConfig, PipelineConfig
from pipeline.launch import dataflow_options
from pipeline.run import cpu_count, local_workers
from pipeline.summary import FAILED_SHARE_EXIT
from tests import bad_slides as bad
from transforms import failures, patches

ARRAYS = [
    "slide_embedding.npy", "slide_embedding_coord.npy", "embeddings_500_cluster_centroid.npy",
    "embeddings_500_labels.npy",
]  # fmt: skip


def _with(workers: int = 0, intra: int = 0) -> PipelineConfig:
    cfg = PipelineConfig()
    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, workers=workers),
        model=dataclasses.replace(cfg.model, intra_op_threads=intra),
    )


def test_workers_become_beam_worker_processes_and_divide_the_tensorflow_threads(monkeypatch):
    cfg, args = local_workers(_with(workers=2), ["--foo=1"])
    direct = PipelineOptions(args).view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (2, "multi_processing")
    assert cfg.model.intra_op_threads == max(1, cpu_count() // 2)
    assert cfg.model.inter_op_threads == 1  # no idle pool spinning on another's cores
    assert "--foo=1" in args

    cfg, args = local_workers(_with(workers=1), [])
    assert args == [] and cfg.model.intra_op_threads == cpu_count()  # in process

    cfg, _ = local_workers(_with(workers=4, intra=3), [])
    assert cfg.model.intra_op_threads == 3  # a thread count that is set stays

    # Beam's own flags, given by the user, win; the threads follow them.
    cfg, args = local_workers(_with(workers=2), ["--direct_num_workers=8"])
    assert PipelineOptions(args).view_as(DirectOptions).direct_num_workers == 8
    assert cfg.model.intra_op_threads == max(1, cpu_count() // 8)

    monkeypatch.setenv("PATHEMBED_WORKERS", "3")  # the default when nothing says
    _, args = local_workers(_with(), [])
    assert PipelineOptions(args).view_as(DirectOptions).direct_num_workers == 3
    monkeypatch.delenv("PATHEMBED_WORKERS")
    cfg, args = local_workers(_with(), [])
    assert args == []  # nothing says: one process (measured faster on 2 cores than two)
    assert cfg.model.intra_op_threads == cpu_count()


def test_the_dataflow_section_sets_processes_threads_and_model_copies():
    df = DataflowConfig(single_sdk_process=True, harness_threads=12, model_copies=2)
    options = PipelineOptions(dataflow_options(df)).view_as(DebugOptions)
    assert "no_use_multiple_sdk_containers" in options.experiments
    assert options.number_of_worker_harness_threads == 12
    handler = PathFoundationModelHandler.from_config(PipelineConfig().model, df.model_copies)
    assert handler.share_model_across_processes() and handler.model_copies() == 2

    options = PipelineOptions(dataflow_options(DataflowConfig())).view_as(DebugOptions)
    assert not options.experiments and options.number_of_worker_harness_threads is None
    handler = PathFoundationModelHandler.from_config(PipelineConfig().model)
    assert not handler.share_model_across_processes()


def _run(slides: Path, out: Path, cache: Path, workers: int, *flags: str) -> int:
    patches.open_slide.cache_clear()
    return main([
        "run", "--input", str(slides), "--output-root", str(out), "--model", "stub-tiny",
        "--set", f"model.cache_dir={cache}", "--workers", str(workers), "--progress", "off",
        *flags,
    ])  # fmt: skip


def _run_id(out: Path) -> str:
    (summary,) = (out / "runs").glob("*.json")
    return json.loads(summary.read_text())["run_id"]


@pytest.mark.e2e
def test_two_worker_processes_and_a_shared_model_give_the_same_bytes_as_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pathembed")
    slides, cache = tmp_path / "slides", tmp_path / "models"
    bad.tiny_slide(slides, "tiny-a", seed=11)
    bad.tiny_slide(slides, "tiny-b", seed=12)
    one, two, shared = tmp_path / "one", tmp_path / "two", tmp_path / "shared"
    copies = ("--set", "dataflow.model_copies=1")  # one model, served to RunInference by proxy
    for out, workers, extra in ((one, 1, ()), (two, 2, ()), (shared, 1, copies)):
        caplog.clear()
        assert _run(slides, out, cache, workers, "--progress", "log", *extra) == 0
        # the reporter's last poll, after the job: every slide of the run's todo is done
        shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
        assert shown and shown[-1].startswith("progress: 2/2 slides (0 failed), "), shown

    # The slides were worked on in other processes: this one counted none of them.
    counted_here = {run_id for run_id, _stage in failures._RUNS}
    assert _run_id(one) in counted_here and _run_id(two) not in counted_here
    written = sorted(p.relative_to(one) for p in one.glob("*/path_foundation/v1/*.npy"))
    assert len(written) == 2 * len(ARRAYS)
    for path in written:
        assert (two / path).read_bytes() == (one / path).read_bytes(), path
        assert (shared / path).read_bytes() == (one / path).read_bytes(), path


@pytest.mark.e2e
def test_a_worker_processs_breaker_stops_the_run_with_its_exit_status(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pathembed")
    good, slides = bad.tiny_slide(tmp_path / "good"), tmp_path / "slides"
    for k in range(2):
        bad.derive(good, slides, f"no-spacing-{k}", bad.set_spacing(None))
    out = tmp_path / "out"
    flags = ("--set", "run.failure_check_min_slides=1", "--progress", "log")
    assert _run(slides, out, tmp_path / "models", 2, *flags) == FAILED_SHARE_EXIT
    assert "stopped: too many slides failed" in caplog.text
    # the progress reporter ran around the job and was stopped when it failed
    assert any(r.getMessage().startswith("progress: ") for r in caplog.records)
    assert not (out / "runs").exists()  # nothing committed


def test_a_shared_model_copy_embeds_through_beams_proxy_as_a_model_of_its_own(tmp_path):
    """dataflow.model_copies: RunInference serves the model from a shared object
    (multi_process_shared, always through its proxy) instead of one per process; the chunks
    still get exactly the model calls of a per-process model."""
    import apache_beam as beam
    import numpy as np
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that

    from models.path_foundation import load_embedder, resolve_model

    model_dir, _ = resolve_model("stub-tiny", tmp_path)
    embedder = load_embedder(model_dir)
    rng = np.random.default_rng(5)
    chunks = {f"slide/{k}": rng.integers(0, 256, (n, 224, 224, 3), np.uint8) for k, n in [(0, 6)]}
    expected = {
        key: np.concatenate([embedder(c[i : i + 4]) for i in range(0, len(c), 4)])
        for key, c in chunks.items()
    }
    cfg = dataclasses.replace(PipelineConfig().model, cache_dir=str(tmp_path), batch_size=4)
    handler = PathFoundationModelHandler.from_config(cfg, model_copies=1)

    def check(results) -> None:
        assert sorted(key for key, _ in results) == sorted(chunks)
        for key, result in results:
            np.testing.assert_array_equal(result.inference, expected[key])

    with beam.Pipeline(runner=FnApiRunner()) as p:
        results = p | beam.Create(list(chunks.items())) | RunInference(KeyedModelHandler(handler))
        assert_that(results, check)


def test_a_worker_that_builds_the_stand_in_still_gets_its_thread_count(tmp_path):
    """Each worker process loads its model; building a stand-in runs TensorFlow, so the thread
    count must be set before (a fresh process: TensorFlow fixes it once per process)."""
    import subprocess
    import sys

    script = (
        "import tensorflow as tf\n"
        "from models.handler import PathFoundationModelHandler\n"
        f"h = PathFoundationModelHandler('stub-tiny', cache_dir={str(tmp_path)!r},"
        " intra_op_threads=1)\n"
        "h.load_model()\n"
        "print('intra', tf.config.threading.get_intra_op_parallelism_threads())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert (tmp_path / "stub-tiny").is_dir()  # built in that process
    assert done.stdout.strip().splitlines()[-1] == "intra 1", done.stderr[-2000:]
