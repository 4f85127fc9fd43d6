"""Progress of a run, read from the per-slide row files a run commits (pipeline/progress.py).

Real Parquet row files in the layout's places (transforms/outputs/layout.py), written with the
tables' own schemas while a reporter polls them.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import progress
from transforms.outputs import layout, sinks, tables

RUN = "20261202T120000Z-abcdef"
NOW = datetime.datetime(2026, 12, 2, 12, tzinfo=datetime.UTC)
_VALUES = {"STRING": "x", "INT64": 1, "FLOAT64": 0.5, "BOOL": False, "TIMESTAMP": NOW}


def _uuid(k: int) -> str:
    return str(uuid.UUID(int=k))


def _write(path: str, columns: list[tables.Column], row: dict) -> None:
    full = {c.name: _VALUES[c.type] if not c.repeated else [0.0] * c.length for c in columns}
    full.update(row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    schema = tables.arrow_schema(columns)
    pq.write_table(pa.Table.from_pylist([full], schema=schema), path)


def resource_row(root: Path, instance_uuid: str, patches: int, run_id: str = RUN) -> str:
    path = layout.row_file(str(root), "resource", run_id, instance_uuid)
    _write(path, tables.RESOURCE, {"instance_uuid": instance_uuid, "embedding_count": patches})
    return path


def failure_row(
    root: Path, instance_uuid: str | None, stage: str, run_id: str = RUN, message: str = "m"
) -> None:
    row = {"instance_uuid": instance_uuid, "stage": stage, "message": message}
    path = layout.row_file(str(root), "failures", run_id, sinks.failure_key(row))
    _write(path, tables.FAILURES, row)


def todo(root: Path, slides: int, run_id: str = RUN) -> None:
    path = Path(layout.todo_uri(str(root), run_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"slides": slides}))


def test_the_tracker_counts_this_runs_slides_failures_patches_and_total(tmp_path):
    tracker = progress.Tracker(str(tmp_path), RUN)
    assert tracker.poll() == progress.Counts(0, 0, None, 0)  # nothing written yet

    resource_row(tmp_path, _uuid(1), 100)
    resource_row(tmp_path, _uuid(2), 250)
    failure_row(tmp_path, _uuid(3), "read")
    failure_row(tmp_path, _uuid(3), "cluster")  # one slide, two failed stages
    failure_row(tmp_path, _uuid(3), "read", message="another")  # and two rows at one
    resource_row(tmp_path, _uuid(4), 999, run_id="20261201T000000Z-000000")  # another run
    failure_row(tmp_path, _uuid(5), "plan", run_id="20261201T000000Z-000000")
    todo(tmp_path, 7, run_id="20261201T000000Z-000000")
    assert tracker.poll() == progress.Counts(done=2, failed=1, total=None, patches=350)

    todo(tmp_path, 5)
    resource_row(tmp_path, _uuid(6), 50)
    assert tracker.poll() == progress.Counts(done=3, failed=1, total=5, patches=400)

    # source failures before a UUID was known: each distinct one is a slide
    failure_row(tmp_path, None, "enumerate", message="unreadable header a")
    failure_row(tmp_path, None, "enumerate", message="unreadable header b")
    assert tracker.poll().failed == 3


def test_each_row_file_is_read_once_and_an_unreadable_one_again_later(tmp_path):
    tracker = progress.Tracker(str(tmp_path), RUN)
    first = resource_row(tmp_path, _uuid(1), 100)
    assert tracker.poll().patches == 100
    resource_row(tmp_path, _uuid(1), 5000)  # rewritten: not read again
    partial = Path(layout.row_file(str(tmp_path), "resource", RUN, _uuid(2)))
    partial.write_bytes(Path(first).read_bytes()[:40])  # half written
    counts = tracker.poll()
    assert (counts.done, counts.patches) == (2, 100)
    resource_row(tmp_path, _uuid(2), 30)
    assert tracker.poll().patches == 130


def test_the_log_line_says_slides_failures_rate_and_eta():
    counts = progress.Counts(done=9, failed=3, total=40, patches=8500)
    # 28 slides left at 10 s per 12 slides
    assert progress.line(counts, 10.0) == (
        "progress: 12/40 slides (3 failed), 850 patches/s, ETA 23s"
    )
    assert progress.line(counts, 90.0).endswith("94 patches/s, ETA 3m30s")
    assert progress.line(progress.Counts(), 5.0) == (
        "progress: 0/? slides (0 failed), 0 patches/s, ETA ?"
    )
    assert progress.duration(250) == "4m10s" and progress.duration(3720) == "1h02m"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_anything_else_log_lines():
    assert progress.choose_mode("auto", _Terminal()) == "bar"
    assert progress.choose_mode("auto", io.StringIO()) == "log"
    assert progress.choose_mode("log", _Terminal()) == "log"
    assert progress.choose_mode("off", _Terminal()) == "off"
    with pytest.raises(ValueError, match=r"run\.progress"):
        progress.choose_mode("loud", io.StringIO())


def _until(condition) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the reporter never saw the files"
        time.sleep(0.02)


def test_the_reporter_logs_while_slides_are_committed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pathembed")
    tracker = progress.Tracker(str(tmp_path), RUN)
    reporter = progress.Reporter(tracker, "log", interval=0.01, stream=io.StringIO())
    with reporter:
        todo(tmp_path, 3)
        resource_row(tmp_path, _uuid(1), 120)
        _until(lambda: reporter.counts.done == 1)
        failure_row(tmp_path, _uuid(2), "plan")
        resource_row(tmp_path, _uuid(3), 80)
        _until(lambda: reporter.counts.finished == 3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert any(line.startswith("progress: 1/3 slides (0 failed)") for line in lines), lines
    assert lines[-1].startswith("progress: 3/3 slides (1 failed), ")
    assert lines[-1].endswith("ETA 0s")
    assert reporter.counts.patches == 200


def test_on_a_terminal_the_bar_shows_slides_and_failures(tmp_path, caplog):
    terminal = _Terminal()
    todo(tmp_path, 4)
    resource_row(tmp_path, _uuid(1), 10)
    failure_row(tmp_path, _uuid(2), "read")
    with progress.Reporter(progress.Tracker(str(tmp_path), RUN), "auto", 0.01, stream=terminal):
        pass  # stopping polls once more
    shown = terminal.getvalue()
    assert "2/4" in shown and "1 failed" in shown, shown
    assert not any(r.getMessage().startswith("progress:") for r in caplog.records)


def test_off_starts_nothing(tmp_path):
    reporter = progress.Reporter(progress.Tracker(str(tmp_path), RUN), "off", stream=_Terminal())
    with reporter:
        resource_row(tmp_path, _uuid(1), 10)
    assert reporter.counts == progress.Counts()


def _run_args(*extra: str):
    import argparse

    from pipeline.run import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(["--input", "x", *extra])


def test_the_progress_flag_and_key():
    from pipeline.run import config_from_args

    assert config_from_args(_run_args()).run.progress == "auto"
    assert config_from_args(_run_args("--progress", "log")).run.progress == "log"
    with pytest.raises(SystemExit, match="loud"):
        config_from_args(_run_args("--set", "run.progress=loud"))
    with pytest.raises(SystemExit, match=r"run\.progress_interval 0"):
        config_from_args(_run_args("--set", "run.progress_interval=0"))  # would never sleep


def test_launch_refuses_an_unknown_progress_mode_with_the_other_problems():
    import dataclasses

    from pipeline.config import PipelineConfig
    from pipeline.launch import check_dataflow_config

    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, progress="loud"))
    with pytest.raises(SystemExit, match=r"run\.progress 'loud'"):
        check_dataflow_config(cfg)
