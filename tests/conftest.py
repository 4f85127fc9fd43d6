"""Shared fixtures: the real Camelyon slides (when present) and TF log noise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `pathembed run` in process unless a test asks for --workers: the spies, patched retries and
# injected faults of the end-to-end tests live in the test process (pipeline/run.py).
os.environ.setdefault("PATHEMBED_WORKERS", "1")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real"


@pytest.fixture(scope="session")
def sample_slides(tmp_path_factory) -> Path:
    """Both sample slides, written once per test session (read-only for the tests)."""
    from transforms.samples.slides import write_samples

    root = tmp_path_factory.mktemp("samples")
    write_samples(root, ["small-40x", "medium-20x"])
    return root


@pytest.fixture(scope="session")
def real_slides() -> Path:
    if not (REAL_DATA / "camelyon_jpeg_multiframe.dcm").exists():
        pytest.skip(f"real Camelyon test slides not found at {REAL_DATA} (../shared/testdata/real)")
    return REAL_DATA
