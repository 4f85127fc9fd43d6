"""The run's Beam metrics: one namespace, every counter and timer name, read back by the summary.

Steps count what happened with `counter(NAME)` and time their work with `timed(STAGE)`;
pipeline/summary.py reads the same names from the finished job (locally or on Dataflow).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from apache_beam.metrics import Metrics

NAMESPACE = "pathembed"

PIXEL_SOURCE_REQUESTS = "pixel_source_requests"
PIXEL_FRAMES_READ = "pixel_frames_read"
PIXEL_SOURCE_BYTES_READ = "pixel_source_bytes_read"
SLIDES_FOUND = "slides_found"
ENUMERATE_FAILURES = "enumerate_failures"
SLIDES_SKIPPED_COMPLETE = "slides_skipped_complete"
SLIDES_SKIPPED_IN_USE = "slides_skipped_in_use"  # another live run holds the slide's lease
SLIDES_TO_PROCESS = "slides_to_process"
SLIDES_PLANNED = "slides_planned"
PATCHES_PLANNED = "patches_planned"
SLIDES_WRITTEN = "slides_written"
PATCHES_EMBEDDED = "patches_embedded"
FAILURES = "failures"
FILES_IGNORED = "files_ignored"  # files under a folder that are not WSI images
# Asked-for UUIDs (--uuids, rerun) that enumeration found, as a slide or as a failure.
REQUESTED_FOUND = "requested_found"
QIDO_OFFSET_IGNORED = "qido_offset_ignored"  # a DICOMweb server that ignored QIDO's offset
REASON_PREFIX = "failures_"  # + reason code: failure rows per reason
# + GPU or CPU: model loads (worker processes) whose first call ran on that kind of device
MODEL_DEVICE_PREFIX = "model_device_"
GPU_DECODED_FRAMES = "gpu_decoded_frames"  # frames decoded by nvImageCodec (read.gpu_decode)

COUNTERS = (
    PIXEL_SOURCE_REQUESTS,
    PIXEL_FRAMES_READ,
    PIXEL_SOURCE_BYTES_READ,
    SLIDES_FOUND,
    ENUMERATE_FAILURES,
    SLIDES_SKIPPED_COMPLETE,
    SLIDES_SKIPPED_IN_USE,
    SLIDES_TO_PROCESS,
    SLIDES_PLANNED,
    PATCHES_PLANNED,
    SLIDES_WRITTEN,
    PATCHES_EMBEDDED,
    FAILURES,
    FILES_IGNORED,
    REQUESTED_FOUND,
    GPU_DECODED_FRAMES,
)
# Summary label -> the distribution `timed(stage)` fills (milliseconds per call).
STAGES = {
    "plan": "plan_ms",
    "read patches": "read_ms",
    "cluster": "cluster_ms",
    "write": "write_ms",
}


def device_kind(device: str) -> str:
    """ "GPU" for a TensorFlow GPU device name ("GPU:0", "/device:GPU:0"), else "CPU"."""
    return "GPU" if "GPU" in device.upper() else "CPU"


def counter(name: str):
    """The Beam counter `name` of this namespace (resolved to the running step when used)."""
    return Metrics.counter(NAMESPACE, name)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Adds the block's wall time, in ms, to the `{stage}_ms` distribution."""
    start = time.perf_counter()
    try:
        yield
    finally:
        Metrics.distribution(NAMESPACE, f"{stage}_ms").update(
            int((time.perf_counter() - start) * 1000)
        )
