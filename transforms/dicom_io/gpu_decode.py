"""Decoding JPEG and JPEG 2000 frames on the GPU (nvImageCodec), where a worker has one.

`decode_frames(frames, transfer_syntax)` returns the frames decoded to RGB uint8 arrays
[rows, columns, 3], or None when GPU decoding is not available for them: the caller then
decodes on the CPU (`byte_ranges.RangeDicomFiles.get_decoded_frame_image`). It is available
when all of these hold, decided once per process (the first call) and logged once:

- `read.gpu_decode` is `auto` (the default; `off` always returns None), set per process with
  `set_mode()` by the read step;
- the package `nvidia-nvimgcodec-cu12` imports (`pip install -e '.[gpu]'`, the worker image);
- the CUDA driver reports at least one GPU (`cuDeviceGetCount` through libcuda, so that the
  check neither loads TensorFlow nor reserves GPU memory);
- the transfer syntax is JPEG baseline or JPEG 2000 (lossless, lossy or HTJ2K).

A batch whose frames do not all decode returns None too, so a corrupt frame is decoded (and
reported with its frame number) by the CPU path, as without a GPU.

Pixels: JPEG 2000 decoding is exact for reversible (5/3) code streams; JPEG decoders differ
in their IDCT and chroma upsampling, so GPU and CPU pixels differ by a few levels
(tests/test_gpu_decode.py states the tolerance and checks it on real frames where a GPU is
present).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

import numpy as np
import pydicom

from transforms import metrics

_LOG = logging.getLogger(__name__)

MODES = ("auto", "off")
# Transfer syntaxes handed to the GPU decoder: JPEG baseline and the JPEG 2000 family.
SYNTAXES = frozenset(
    {
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)

_mode = "auto"
_lock = threading.Lock()  # one decode call at a time per process (DoFn threads share it)
_FRAMES = metrics.counter(metrics.GPU_DECODED_FRAMES)


def set_mode(mode: str) -> None:
    """`read.gpu_decode` for this process: auto (GPU when available) or off (always CPU)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"read.gpu_decode: one of {MODES}, not {mode!r}")
    _mode = mode


def mode() -> str:
    return _mode


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver or a GPU)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@functools.cache
def _decoder():
    """(nvimgcodec module, Decoder) once per process, or (None, reason)."""
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        return None, f"nvImageCodec is not installed ({exc}); pip install -e '.[gpu]'"
    if cuda_device_count() == 0:
        return None, "no GPU (the CUDA driver reports none)"
    try:
        decoder = nvimgcodec.Decoder(
            backends=[
                nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY),
                nvimgcodec.Backend(nvimgcodec.BackendKind.HYBRID_CPU_GPU),
            ]
        )
    except Exception as exc:  # a driver / library mismatch: decode on the CPU
        return None, f"nvImageCodec could not create a GPU decoder: {exc}"
    return (nvimgcodec, decoder), "nvImageCodec on the GPU"


def status() -> str:
    """Why frames are (or are not) decoded on the GPU in this process, for logs and tests."""
    if _mode == "off":
        return "off (read.gpu_decode: off)"
    found, reason = _decoder()
    return ("on: " if found else "unavailable: ") + reason


@functools.cache
def _log_once() -> None:
    _LOG.info("GPU frame decode: %s", status())


def available() -> bool:
    return _mode == "auto" and _decoder()[0] is not None


def decode_frames(frames: list[bytes], syntax: str) -> list[np.ndarray] | None:
    """`frames` (compressed frame bytes of one transfer syntax) decoded to RGB uint8
    [rows, columns, 3] on the GPU, in order; None = not available here, decode on the CPU."""
    if _mode == "off" or str(syntax) not in SYNTAXES or not frames:
        return None
    _log_once()
    found, _ = _decoder()
    if found is None:
        return None
    nvimgcodec, decoder = found
    params = nvimgcodec.DecodeParams(
        color_spec=nvimgcodec.ColorSpec.RGB, allow_any_depth=False, apply_exif_orientation=False
    )
    with _lock:
        try:
            images = decoder.decode(list(frames), params=params)
        except Exception as exc:
            _LOG.warning("GPU decode of %d frames failed (%s); CPU decode", len(frames), exc)
            return None
        if images is None or len(images) != len(frames) or any(i is None for i in images):
            return None
        out = [np.asarray(image.cpu()) for image in images]
    for array in out:
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            return None  # e.g. a grey or 16-bit frame: the CPU path handles those
    _FRAMES.inc(len(out))
    return out
