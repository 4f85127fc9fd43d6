"""Progress of a running job, read from what it has committed under the output root.

Each slide commits its rows the moment it is done (transforms/outputs/layout.py): a resource
row file per slide written, a failures row file per slide and stage that failed, and, once
SkipDone has seen every slide, runs/{run_id}.todo with the number of slides to do. The
driver polls those through Beam's FileSystems (a local root or gs://, so a Dataflow job's
launcher reports the same way) while the pipeline runs:

- a live tqdm bar on a terminal: slides finished / to do, failures, patches/s, ETA;
- elsewhere one log line every `interval` seconds:
  `progress: 12/40 slides (3 failed), 850 patches/s, ETA 4m10s`.

"Finished" counts slides written and slides failed; patches are the `embedding_count` of the
resource row files, each file read once.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms.outputs.layout import run_rows_dir, todo_uri
from transforms.urls import is_remote

_LOG = logging.getLogger("pathembed")

MODES = ("auto", "bar", "log", "off")
LOCAL_POLL_SECONDS = 2.0  # a local root is cheap to list; a bucket is polled every `interval`


@dataclass(frozen=True)
class Counts:
    done: int = 0  # slides written (resource row files)
    failed: int = 0  # distinct slides with a failure row file
    total: int | None = None  # slides to do, once the todo file exists
    patches: int = 0  # embedding_count summed over the resource row files read

    @property
    def finished(self) -> int:
        return self.done + self.failed


class Tracker:
    """What run `run_id` has committed under `output_root`, re-read on each `poll()`."""

    def __init__(self, output_root: str, run_id: str) -> None:
        self.resource_dir = run_rows_dir(output_root, "resource", run_id)
        self.failures_dir = run_rows_dir(output_root, "failures", run_id)
        self.todo = todo_uri(output_root, run_id)
        self._total: int | None = None
        self._patches: dict[str, int] = {}  # resource row file -> its embedding_count

    def poll(self) -> Counts:
        resource = _parquet_files(self.resource_dir)
        for path in resource:
            if path not in self._patches:
                count = _embedding_count(path)
                if count is not None:  # unreadable (being written?): tried again next poll
                    self._patches[path] = count
        failed = {_failed_slide(path) for path in _parquet_files(self.failures_dir)}
        if self._total is None:
            self._total = _todo_slides(self.todo)
        return Counts(len(resource), len(failed), self._total, sum(self._patches.values()))


def _parquet_files(directory: str) -> list[str]:
    pattern = FileSystems.join(directory, "*.parquet")
    return [m.path for m in FileSystems.match([pattern])[0].metadata_list]


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _failed_slide(path: str) -> str:
    """The slide of a failure row file (outputs/sinks.py failure_key): the instance UUID it
    starts with; a row without one (a source failure) is a slide of its own."""
    key = path.rsplit("/", 1)[-1].removesuffix(".parquet")
    found = _UUID.match(key)
    return found.group(0) if found else key


def _embedding_count(path: str) -> int | None:
    try:
        with FileSystems.open(path) as handle:
            table = pq.read_table(pa.BufferReader(handle.read()), columns=["embedding_count"])
        return sum(table.column("embedding_count").to_pylist())
    except (OSError, pa.ArrowException, KeyError) as exc:
        _LOG.debug("progress: cannot read %s yet: %s", path, exc)
        return None


def _todo_slides(path: str) -> int | None:
    if not FileSystems.exists(path):
        return None
    try:
        with FileSystems.open(path) as handle:
            return int(json.loads(handle.read())["slides"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _LOG.debug("progress: cannot read %s yet: %s", path, exc)
        return None


def duration(seconds: float) -> str:
    """4m10s, 1h02m, 9s."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def eta_seconds(counts: Counts, elapsed: float) -> float | None:
    """Time left at the pace so far (None until the total is known and a slide finished)."""
    if counts.total is None or counts.finished == 0:
        return None
    return max(0, counts.total - counts.finished) * elapsed / counts.finished


def line(counts: Counts, elapsed: float) -> str:
    """`progress: 12/40 slides (3 failed), 850 patches/s, ETA 4m10s`."""
    total = "?" if counts.total is None else str(counts.total)
    rate = counts.patches / elapsed if elapsed > 0 else 0.0
    eta = eta_seconds(counts, elapsed)
    return (
        f"progress: {counts.finished}/{total} slides ({counts.failed} failed), "
        f"{rate:.0f} patches/s, ETA {'?' if eta is None else duration(eta)}"
    )


def validate(mode: str, interval: float) -> None:
    """ValueError naming the key when run.progress / run.progress_interval cannot be used."""
    if mode not in MODES:
        raise ValueError(f"run.progress {mode!r}: one of {', '.join(MODES)}")
    if not interval > 0:
        raise ValueError(f"run.progress_interval {interval!r}: seconds, more than 0")


def choose_mode(mode: str, stream: IO) -> str:
    """bar, log or off: `auto` is a bar on a terminal, log lines elsewhere."""
    if mode not in MODES:
        raise ValueError(f"run.progress {mode!r}: one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "log"


class Reporter:
    """Polls a Tracker in a daemon thread and shows its counts as a bar or as log lines.

    Use as a context manager around the pipeline's run: the last poll is shown on exit,
    whether the run ended or raised."""

    def __init__(
        self,
        tracker: Tracker,
        mode: str,
        interval: float = 30.0,
        poll_seconds: float | None = None,
        stream: IO | None = None,
    ) -> None:
        self.tracker = tracker
        self.stream = stream or sys.stderr
        self.mode = choose_mode(mode, self.stream)
        self.interval = interval
        self.poll_seconds = min(interval, poll_seconds or interval)
        self.counts = Counts()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._started = time.monotonic()
        self._logged = self._started

    def __enter__(self) -> Reporter:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if self.mode == "off":
            return
        self._started = self._logged = time.monotonic()
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="slide", desc="slides", file=self.stream)
        self._thread = threading.Thread(target=self._loop, name="pathembed-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._update(final=True)
        if self._bar is not None:
            self._bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._update()

    def _update(self, final: bool = False) -> None:
        try:
            self.counts = self.tracker.poll()
        except Exception as exc:  # progress must never stop a run
            _LOG.debug("progress: poll failed: %s", exc)
            return
        now = time.monotonic()
        elapsed = now - self._started
        if self._bar is not None:
            c = self.counts
            if c.total is not None and self._bar.total != c.total:
                self._bar.total = c.total
            self._bar.update(c.finished - self._bar.n)
            rate = c.patches / elapsed if elapsed > 0 else 0.0
            self._bar.set_postfix_str(f"{c.failed} failed, {rate:.0f} patches/s", refresh=False)
            self._bar.refresh()
        elif final or now - self._logged >= self.interval:
            self._logged = now
            _LOG.info("%s", line(self.counts, elapsed))


def reporting(output_root: str, run_id: str, mode: str, interval: float = 30.0) -> Reporter:
    """The reporter `execute` runs the pipeline inside: local roots polled every 2 s (the bar
    moves), remote ones every `interval`; log lines every `interval` either way."""
    poll = interval if is_remote(output_root) else LOCAL_POLL_SECONDS
    return Reporter(Tracker(output_root, run_id), mode, interval=interval, poll_seconds=poll)
