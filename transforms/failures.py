"""Failure rows, and stopping a run whose slides fail wholesale (a broken credential, a store
that is down) before it turns the whole archive into failure rows.

Every stage's dead letters (Beam's `with_exception_handling`) and every source failure become
one row shape: {instance_uuid, SeriesInstanceUID, stage, reason_code, message, run_id, time}.

The breaker, and the one failed-share rule (`exceeds`) that both it and the end-of-run check
(pipeline/summary.py) apply:

Each worker process counts, per run and per stage, the slides that reached the stage in it
(`tried`, counted by the stage's own step: stages.py) and the distinct slides that failed
there. Once a stage has tried `min_slides` in a process and more than `max_failed_fraction` of
them failed, the next failure row raises `FailedShareExceeded` in a step without exception
handling, which fails the job (Dataflow: after its bundle retries, which fail the same way).
The failure rows of a stage are counted where the stage ran (the breaker step is fused with
it), so the share is right whichever processes and workers the shuffles spread slides over:
twenty bad slides among 68,000 never read as "20 of 20". The counts are each worker's own
sample; `pathembed run` also checks the job's counters when the run ends (pipeline/summary.py).

Not for judging single slides: a slide's own failure always becomes a row and the run goes on.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from transforms import metrics, urls
from transforms.errors import ReasonCode, SlideError
from transforms.plan import PatchChunk, SlidePlan, SlideResult
from transforms.records import FolderFailure, SlideRecord

_LOG = logging.getLogger(__name__)
RERUN = "then rerun the failures (docs/failures.md: Recovering from failures)"
# Starts the breaker's message: how the driver tells it from other errors in a worker's text.
BREAKER_MARK = "[failed-share breaker]"


def exceeds(failed: int, tried: int, max_failed_fraction: float | None, min_slides: int) -> bool:
    """The failed-share rule: more than `max_failed_fraction` of at least `min_slides` tried
    slides failed (a broken credential or store rather than bad slides)."""
    if max_failed_fraction is None or tried < max(1, min_slides):
        return False
    return failed / tried > max_failed_fraction


# What to check, by the most common reason code among a run's failures: a broken credential
# and a folder of corrupt files both trip the breaker, but need different fixes.
_ACCESS = "check credentials, the network and the pixel source"
_INPUT = (
    "the input files themselves are unreadable or inconsistent (see the failures table); if "
    "the input is known to hold many such files, raise run.max_failed_fraction"
)
_MODEL = "check the model (its output, memory per chunk) and the workers"
_ADVICE = {
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
    return _ADVICE.get(top, _INPUT)


class FailedShareExceeded(RuntimeError):
    """Too large a share of the slides failed: the run is stopped."""


@dataclass
class _Counts:
    tried: int = 0
    failed: set[str | None] = field(default_factory=set)
    failed_rows: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)


_LOCK = threading.Lock()
_RUNS: dict[tuple[str, str], _Counts] = {}  # (run_id, stage) -> counts in this process


def note_tried(run_id: str, stage: str) -> None:
    """A slide of run `run_id` reached `stage` in this process."""
    with _LOCK:
        _RUNS.setdefault((run_id, stage), _Counts()).tried += 1


def tried(element: Any, run_id: str, stage: str) -> Any:
    """`element` unchanged, counted as tried at `stage` (a Map fused with the stage)."""
    note_tried(run_id, stage)
    return element


def _share(counts: _Counts, max_failed_fraction: float | None, min_slides: int):
    """(failed, tried) when the failed share exceeds the threshold, else None."""
    failed, tried_ = len(counts.failed), max(counts.tried, len(counts.failed))
    return (failed, tried_) if exceeds(failed, tried_, max_failed_fraction, min_slides) else None


def note_failed(
    run_id: str,
    stage: str,
    instance_uuid: str | None,
    max_failed_fraction: float | None,
    min_slides: int,
    reason: str | None = None,
) -> None:
    """A failure row of run `run_id` at `stage`; raises FailedShareExceeded when the share of
    the slides that reached the stage in this process and failed there is exceeded."""
    with _LOCK:
        counts = _RUNS.setdefault((run_id, stage), _Counts())
        counts.failed_rows += 1
        if reason:
            counts.reasons[reason] += 1
        counts.failed.add(instance_uuid if instance_uuid else f"row-{counts.failed_rows}")
        exceeded = _share(counts, max_failed_fraction, min_slides)
        reasons = collections.Counter(counts.reasons)
    if exceeded:
        failed, tried_ = exceeded
        raise FailedShareExceeded(
            f"{BREAKER_MARK} run {run_id} stopped: {failed} of the {tried_} slides that reached "
            f"the {stage} stage in this worker failed there "
            f"({failed / tried_:.0%}), more than run.max_failed_fraction = "
            f"{max_failed_fraction:.0%} (most common reasons: "
            f"{', '.join(f'{r} {n}' for r, n in reasons.most_common(3)) or 'unknown'}); "
            f"{advice_for(reasons)}, {RERUN}"
        )


def tripped(
    run_id: str,
    max_failed_fraction: float | None,
    min_slides: int,
    error: BaseException | None = None,
) -> bool:
    """True when the breaker stopped run `run_id`: this process's counts exceed the threshold
    (an in-process runner), or `error`, the run's exception, carries the breaker's message (a
    worker process's exception reaches the driver as text)."""
    if error is not None and f"{BREAKER_MARK} run {run_id} stopped" in str(error):
        return True
    with _LOCK:
        return any(
            _share(counts, max_failed_fraction, min_slides) is not None
            for (run, _), counts in _RUNS.items()
            if run == run_id
        )


# Failure rows of these stages are failures of the step that counts them (stages.py): reading
# happens inside the embed step.
_COUNTED_AT = {"read": "embed"}


def check_failure_row(
    row: dict, run_id: str, max_failed_fraction: float | None, min_slides: int
) -> dict:
    """Counts a failure row at its stage (a slide that failed at enumeration also counts as
    tried there: the records that did not fail are counted by the DAG's CountFound step)."""
    stage = _COUNTED_AT.get(row.get("stage"), row.get("stage") or "unknown")
    if stage == "enumerate":
        note_tried(run_id, stage)
    note_failed(
        run_id, stage, row.get("instance_uuid"), max_failed_fraction, min_slides,
        row.get("reason_code"),
    )  # fmt: skip
    return row


def _identity(element: Any) -> tuple[str | None, str | None]:
    """(instance_uuid, SeriesInstanceUID) of whatever element a stage failed on."""
    if isinstance(element, SlideRecord | FolderFailure):
        return element.instance_uuid, element.series_instance_uid
    if isinstance(element, PatchChunk | SlidePlan):
        return _identity(element.record)
    if isinstance(element, SlideResult):
        return _identity(element.plan.record)
    if isinstance(element, tuple) and element and isinstance(element[0], SlidePlan):
        return _identity(element[0])  # RunInference's PredictionResult(plan, embeddings)
    if isinstance(element, tuple) and element and isinstance(element[0], str):
        return element[0], None  # (uuid, ...) keyed elements
    if isinstance(element, list) and element:
        return _identity(element[0])  # a RunInference batch of slides
    return None, None


def failure_row(element: Any, stage: str, reason: str, message: str, run_id: str) -> dict:
    instance_uuid, series_uid = _identity(element)
    return {
        "instance_uuid": instance_uuid,
        "SeriesInstanceUID": series_uid,
        "stage": stage,
        "reason_code": reason,
        # Stored and shown: no user-info or URL signature may reach the failures table.
        "message": urls.redact_text(message),
        "run_id": run_id,
        "time": datetime.datetime.now(datetime.UTC),
    }


def dead_letter_row(dead_letter: tuple, stage: str, run_id: str) -> dict:
    """Beam's (element, (exc_type, repr, traceback)) dead letter -> failure row."""
    element, (exc_type, exc_repr, trace) = dead_letter
    if isinstance(exc_type, type) and issubclass(exc_type, SlideError):
        # SlideError's str() is "reason_code: message"; the exception object is not kept.
        text = trace[-1].split(": ", 1)[-1].strip()
        reason, _, message = text.partition(": ")
    else:
        # An exception in the model call (out of memory, a kernel error) fails one chunk.
        code = ReasonCode.INFERENCE_ERROR if stage == "embed" else ReasonCode.INTERNAL_ERROR
        what = (
            "the model call failed for this slide"
            if stage == "embed"
            else f"an unexpected error stopped this slide at the {stage} stage"
        )
        reason = code.value
        message = f"{what}: {exc_repr} at {''.join(trace[-3:-1]).strip()}"
    row = failure_row(element, stage, reason, message, run_id)
    _LOG.warning(
        "slide %s failed at %s: %s: %s", row["instance_uuid"], stage, reason, row["message"]
    )
    _count(row)
    return row


def source_failure_row(failure: FolderFailure, run_id: str) -> dict:
    """A source's failure (a series that could not become a record) -> failure row."""
    row = failure_row(
        failure, "enumerate", failure.error.reason.value, failure.error.message, run_id
    )
    _LOG.warning(
        "slide %s failed at enumerate: %s: %s", failure.instance_uuid, row["reason_code"],
        row["message"],
    )  # fmt: skip
    _count(row)
    return row


def _count(row: dict) -> None:
    """Failure rows in all, and per reason code (the run summary shows both)."""
    metrics.counter(metrics.FAILURES).inc()
    metrics.counter(metrics.REASON_PREFIX + row["reason_code"]).inc()
