"""Decoding one stored frame to RGB: JPEG baseline and JPEG 2000, at full or half resolution.

The decoders were chosen by `scripts/bench.py --only decoders` (docs/performance.md):

- JPEG baseline: OpenCV (`cv2.imdecode`, straight to RGB). Half resolution (`reduce=1`) is
  libjpeg's DCT scaling (`IMREAD_REDUCED_COLOR_2`): each 8 x 8 block is inverse-transformed
  to 4 x 4, so the decoder does a quarter of the IDCT work and writes a quarter of the pixels.
- JPEG 2000 (1.2.840.10008.1.2.4.90/.91): OpenJPEG through imagecodecs
  (`jpeg2k_decode(numthreads=1)`). On the real Camelyon frames OpenCV, imagecodecs and
  pylibjpeg-openjpeg decode bit-exactly the same pixels at the same speed (all three are
  OpenJPEG 2.5); imagecodecs is already a dependency (ez-wsi). One thread per frame: the patch
  reader decodes a chunk's frames in parallel (transforms/patches.py), which the bench measured
  faster per CPU second than OpenJPEG's own threads on 256-512 px frames. Half resolution is
  OpenJPEG's resolution factor (the finest wavelet level is never decoded), which no PyPI
  binding exposes for in-memory codestreams: `openjpeg_reduce` calls the same OpenJPEG library
  through ctypes (Pillow, which can reduce, costs about twice the CPU and holds the GIL).

`decode_frame` returns None for a transfer syntax it does not handle (the caller falls back to
ez-wsi's decoder) and raises ValueError for bytes that do not decode.
"""

from __future__ import annotations

import cv2
import imagecodecs
import numpy as np

from transforms.dicom_io import openjpeg_reduce

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000 = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
# cv2.IMREAD_REDUCED_COLOR_2 is IMREAD_COLOR (BGR) | 16; OpenCV 5 refuses BGR and RGB together.
_JPEG_FLAGS = {
    0: cv2.IMREAD_COLOR_RGB,
    1: (cv2.IMREAD_REDUCED_COLOR_2 & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB,
}


def handles(transfer_syntax: str) -> bool:
    """Whether `decode_frame` decodes this transfer syntax itself."""
    return transfer_syntax == JPEG_BASELINE or transfer_syntax in JPEG2000


def reduced_size(size: int, reduce: int) -> int:
    """A frame side after `reduce` halvings in the codec (JPEG and JPEG 2000 round up)."""
    return -(-size // (1 << reduce))


def decode_frame(data: bytes, transfer_syntax: str, reduce: int = 0) -> np.ndarray | None:
    """uint8 [h, w, 3] RGB of one frame, each side divided by 2**reduce (0 or 1) in the codec;
    None if this syntax is not handled here."""
    if reduce not in (0, 1):
        raise ValueError(f"reduce must be 0 or 1, not {reduce}")
    if transfer_syntax == JPEG_BASELINE:
        frame = cv2.imdecode(np.frombuffer(data, np.uint8), _JPEG_FLAGS[reduce])
        if frame is None:
            raise ValueError(f"JPEG frame of {len(data)} bytes does not decode")
        return frame
    if transfer_syntax in JPEG2000:
        return decode_jpeg2000(data, reduce)
    return None


def decode_jpeg2000(data: bytes, reduce: int = 0) -> np.ndarray:
    """A JPEG 2000 codestream as uint8 RGB (a grey frame gains a channel axis)."""
    frame = None
    if reduce and openjpeg_reduce.available():
        try:
            frame = openjpeg_reduce.decode(data, reduce)
        except ValueError:  # e.g. subsampled or > 8-bit components: decoded whole below
            frame = None
    try:
        if frame is None:
            frame = imagecodecs.jpeg2k_decode(data, numthreads=1)
            if reduce:  # no libopenjp2 to call, or a codestream it does not reduce
                frame = halve(frame)
    except (imagecodecs.Jpeg2kError, ValueError) as exc:
        raise ValueError(f"JPEG 2000 frame of {len(data)} bytes does not decode: {exc}") from exc
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.dtype != np.uint8:
        raise ValueError(f"JPEG 2000 frame of {frame.dtype}, not uint8")
    return frame


def halve(frame: np.ndarray) -> np.ndarray:
    """A fully decoded frame at the size `reduce=1` gives (INTER_AREA, 2 x 2 means): for the
    decoders that cannot reduce in the codec."""
    h, w = frame.shape[:2]
    size = (reduced_size(w, 1), reduced_size(h, 1))
    out = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    return out if out.ndim == frame.ndim else out[:, :, None]
