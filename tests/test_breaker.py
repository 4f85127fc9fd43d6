"""The breaker: its stop message advises by the reason codes that tripped it, and it judges
each stage by the slides that reached that stage in the same process, whichever processes the
shuffles spread slides over."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from transforms import failures
from transforms.errors import ReasonCode, SlideError


def _trip(run_id: str, reason: str) -> str:
    for _ in range(3):
        failures.note_tried(run_id, "plan")
    with pytest.raises(failures.FailedShareExceeded) as err:
        for k in range(3):
            row = {"instance_uuid": f"slide-{k}", "stage": "plan", "reason_code": reason}
            failures.check_failure_row(row, run_id, 0.5, 3)
    return str(err.value)


@pytest.mark.parametrize(
    ("reason", "advice", "not_advice"),
    [
        ("truncated_pixel_data", "the input files themselves", "credentials"),
        ("malformed_header", "the input files themselves", "credentials"),
        ("decode_error", "the input files themselves", "credentials"),
        ("transient_http", "check credentials", "input files"),
        ("inference_error", "check the model", "credentials"),
    ],
)
def test_the_advice_follows_the_reason_codes(reason, advice, not_advice):
    message = _trip(f"run-{uuid.uuid4()}", reason)
    assert advice in message and not_advice not in message, message
    assert f"{reason} " in message  # the most common reasons are named


class _FailSome(beam.DoFn):
    """A stage after the shuffle: counts what reaches it, fails the slides numbered < bad."""

    def __init__(self, run_id: str, bad: int):
        self._run_id, self._bad = run_id, bad

    def process(self, k: int):
        failures.note_tried(self._run_id, "plan")
        if k < self._bad:
            raise SlideError(ReasonCode.DECODE_ERROR, f"slide {k} is corrupt")
        yield k


def _multi_process_run(bad: int, slides: int = 200) -> tuple[str, Exception | None]:
    """`slides` slides shuffled over two worker processes, `bad` of them failing after the
    shuffle; the failure rows go through the real breaker step. (run_id, the run's error)."""
    run_id = f"run-{uuid.uuid4()}"
    options = PipelineOptions([], direct_num_workers=2, direct_running_mode="multi_processing")
    try:
        with beam.Pipeline(runner=FnApiRunner(), options=options) as p:
            stage = (
                p
                | beam.Create(range(slides))
                | beam.Reshuffle()
                | beam.ParDo(_FailSome(run_id, bad)).with_exception_handling()
            )
            _ = (
                stage.bad
                | beam.Map(failures.dead_letter_row, "plan", run_id)
                | beam.Map(failures.check_failure_row, run_id, 0.5, 20)
            )
    except Exception as exc:
        return run_id, exc
    return run_id, None


@pytest.fixture(autouse=True)
def _workers_import_this_module(monkeypatch):
    """The worker processes unpickle _FailSome by reference: they need tests/ on their path."""
    path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))


def test_a_multi_process_run_with_a_few_bad_slides_goes_on():
    """20 of 200 slides fail after the shuffle: 10% of the slides each worker saw, far from
    run.max_failed_fraction, so the run finishes (the old breaker read "20 of 20")."""
    run_id, error = _multi_process_run(bad=20)
    assert error is None
    assert not failures.tripped(run_id, 0.5, 20)


def test_a_multi_process_run_where_most_slides_fail_stops():
    run_id, error = _multi_process_run(bad=150)
    assert error is not None
    assert failures.BREAKER_MARK in str(error)
    assert failures.tripped(run_id, 0.5, 20, error=error)  # the driver tells it from a crash
