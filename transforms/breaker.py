"""Stopping a run whose slides fail wholesale (a broken credential, a store that is down),
before it turns the whole archive into failure rows.

Each worker process counts, per run, the slides it started (`tried`) and the distinct slides
that failed in it; once it has tried `min_slides` and more than `max_failed_fraction` of them
failed, the next failure row raises `FailedShareExceeded` in a step without exception handling,
which fails the job (Dataflow: after its bundle retries, which fail the same way). The counts
are per process, so on a many-worker job they are each worker's own sample; `pathembed run`
also checks the job's counters when the run ends (pipeline/summary.py).

Not for judging single slides: a slide's own failure always becomes a row and the run goes on.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

# What to check, by the most common reason code among a run's failures: a broken credential
# and a folder of corrupt files both trip the breaker, but need different fixes.
_ACCESS = "check credentials, the network and the pixel source"
_INPUT = (
    "the input files themselves are unreadable or inconsistent (see the failures table); if "
    "the input is known to hold many such files, raise run.max_failed_fraction"
)
_MODEL = "check the model (its output, memory per chunk) and the workers"
ADVICE = {
    "transient_http": _ACCESS,
    "read_error": _ACCESS,
    "inference_error": _MODEL,
    "bad_model_output": _MODEL,
    "non_finite_embedding": _MODEL,
    "internal_error": "see the failures table's messages (an unexpected error)",
}


def advice_for(reasons: collections.Counter) -> str:
    """What to check when these reason codes (code -> rows) tripped the breaker."""
    if not reasons:
        return _ACCESS
    (top, _), *_ = reasons.most_common(1)
    return ADVICE.get(top, _INPUT)


class FailedShareExceeded(RuntimeError):
    """Too large a share of the slides failed: the run is stopped."""


@dataclass
class _Counts:
    tried: int = 0
    failed: set[str | None] = field(default_factory=set)
    failed_rows: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)


_LOCK = threading.Lock()
_RUNS: dict[str, _Counts] = {}


def note_tried(run_id: str) -> None:
    """A slide of run `run_id` was started in this process."""
    with _LOCK:
        _RUNS.setdefault(run_id, _Counts()).tried += 1


def _share(counts: _Counts, max_failed_fraction: float | None, min_slides: int):
    """(failed, tried) when the failed share exceeds the threshold, else None."""
    failed, tried = len(counts.failed), max(counts.tried, len(counts.failed))
    if max_failed_fraction is None or tried < max(1, min_slides):
        return None
    return (failed, tried) if failed / tried > max_failed_fraction else None


def note_failed(
    run_id: str,
    instance_uuid: str | None,
    max_failed_fraction: float | None,
    min_slides: int,
    reason: str | None = None,
) -> None:
    """A failure row of run `run_id`; raises FailedShareExceeded when the share is exceeded."""
    with _LOCK:
        counts = _RUNS.setdefault(run_id, _Counts())
        counts.failed_rows += 1
        if reason:
            counts.reasons[reason] += 1
        counts.failed.add(instance_uuid if instance_uuid else f"row-{counts.failed_rows}")
        exceeded = _share(counts, max_failed_fraction, min_slides)
        reasons = collections.Counter(counts.reasons)
    if exceeded:
        failed, tried = exceeded
        raise FailedShareExceeded(
            f"run {run_id} stopped: {failed} of the {tried} slides tried in this worker failed "
            f"({failed / tried:.0%}), more than run.max_failed_fraction = "
            f"{max_failed_fraction:.0%} (most common reasons: "
            f"{', '.join(f'{r} {n}' for r, n in reasons.most_common(3)) or 'unknown'}); "
            f"{advice_for(reasons)}, then rerun (README: Recovering from failures)"
        )


def tripped(run_id: str, max_failed_fraction: float | None, min_slides: int) -> bool:
    """True when this process's counts for `run_id` exceed the threshold (the driver asks this
    after a DirectRunner run failed, to tell the breaker from other errors)."""
    with _LOCK:
        counts = _RUNS.get(run_id)
        return counts is not None and _share(counts, max_failed_fraction, min_slides) is not None


def check_failure_row(
    row: dict, run_id: str, max_failed_fraction: float | None, min_slides: int
) -> dict:
    """Counts a failure row (a slide that failed at enumeration also counts as tried)."""
    if row.get("stage") == "enumerate":
        note_tried(run_id)
    note_failed(
        run_id, row.get("instance_uuid"), max_failed_fraction, min_slides, row.get("reason_code")
    )
    return row
