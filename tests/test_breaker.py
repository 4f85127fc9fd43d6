"""The breaker's stop message advises by the reason codes that tripped it."""

from __future__ import annotations

import uuid

import pytest

from transforms import failures


def _trip(run_id: str, reason: str) -> str:
    for _ in range(3):
        failures.note_tried(run_id)
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
