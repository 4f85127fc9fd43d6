"""Reading a slide's pixels with ez-wsi-dicomweb: the mask-level image and 224 px patches.

Patches of one chunk are row-major neighbours, so the chunk's bounding region is read once
(every DICOM frame in it decoded once) and the patches are cropped from it in numpy; one
`get_patch()` per patch would decode ~3 frames per patch. A finer-than-20x level is read
natively and each patch's footprint is downsampled with cv2.INTER_AREA, per patch, so a
patch's pixels never depend on which chunk it travelled in.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import cv2
import numpy as np
from ez_wsi_dicomweb import dicom_slide, ez_wsi_errors, slide_level_map

from transforms.errors import ReasonCode, SlideError

# Open slides kept per worker process; each holds its instances' frame bytes in memory.
SLIDE_CACHE_SIZE = 2


@contextlib.contextmanager
def slide_errors(what: str) -> Iterator[None]:
    """Turns ez-wsi and decoder errors into SlideErrors with a reason code."""
    try:
        yield
    except ez_wsi_errors.UnsupportedTransferSyntaxError as exc:
        # ez-wsi raises this also for a frame that does not decode in a supported syntax.
        corrupt = "decoding frame bytes" in str(exc)
        reason = ReasonCode.DECODE_ERROR if corrupt else ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX
        raise SlideError(reason, f"{what}: {exc}") from exc
    except (
        ez_wsi_errors.HttpTooManyRequestsError,
        ez_wsi_errors.HttpServiceUnavailableError,
        ez_wsi_errors.HttpGatewayTimeoutError,
        ez_wsi_errors.HttpRequestTimeoutError,
        ez_wsi_errors.HttpInternalServerError,
    ) as exc:
        raise SlideError(ReasonCode.TRANSIENT_HTTP, f"{what}: {exc}") from exc
    except (ez_wsi_errors.EZWsiError, OSError) as exc:
        # PIL reports a truncated JPEG frame as an OSError.
        corrupt = "image file is truncated" in str(exc)
        reason = ReasonCode.DECODE_ERROR if corrupt else ReasonCode.READ_ERROR
        raise SlideError(reason, f"{what}: {exc}") from exc
    except (cv2.error, ValueError) as exc:
        raise SlideError(ReasonCode.DECODE_ERROR, f"{what}: {exc}") from exc


@functools.lru_cache(maxsize=SLIDE_CACHE_SIZE)
def open_slide(files: tuple[tuple[str, str], ...]) -> dicom_slide.LocalDicomSlide:
    """The slide of these (SOPInstanceUID, URI) files, opened once per worker process: local
    paths with ez-wsi; gs://, s3://, http(s) and DICOMweb URIs through transforms/pixels.py."""
    with slide_errors("opening slide"):
        if any("://" in uri for _, uri in files):
            from transforms.pixels import open_remote_slide

            return open_remote_slide(files)
        return dicom_slide.LocalDicomSlide([path for _, path in files])


def level_of(slide: dicom_slide.LocalDicomSlide, sop_instance_uid: str) -> slide_level_map.Level:
    """The ez-wsi pyramid level that holds this instance."""
    for level in slide.levels:
        if sop_instance_uid in level.get_level_sop_instance_uids():
            return level
    raise SlideError(ReasonCode.READ_ERROR, f"instance {sop_instance_uid} is not a pyramid level")


def read_region(
    slide: dicom_slide.LocalDicomSlide, level: slide_level_map.Level, x: int, y: int, w: int, h: int
) -> np.ndarray:
    """RGB uint8 [h, w, 3] of a level region (pixels outside the level are padding)."""
    with slide_errors(f"reading region {w}x{h} at ({x}, {y})"):
        pixels = slide.get_patch(level, x, y, w, h).image_bytes()
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise SlideError(ReasonCode.DECODE_ERROR, f"expected RGB pixels, got {pixels.shape}")
    return pixels


def read_patches(
    slide: dicom_slide.LocalDicomSlide,
    level: slide_level_map.Level,
    coords: np.ndarray,
    downsample: float,
    patch_size: int = 224,
) -> np.ndarray:
    """uint8 [N, patch, patch, 3]: the patches at `coords` (patch-source frame) of a level.

    With downsample d > 1, patch [x, y] covers native pixels starting at floor(x * d), size
    round(patch * d), resized to `patch` with INTER_AREA.
    """
    coords = np.asarray(coords, np.int64)
    out = np.empty((len(coords), patch_size, patch_size, 3), np.uint8)
    if len(coords) == 0:
        return out
    native = round(patch_size * downsample)
    starts = np.floor(coords * downsample).astype(np.int64)
    starts[:, 0] = np.minimum(starts[:, 0], level.width - native)
    starts[:, 1] = np.minimum(starts[:, 1], level.height - native)
    x0, y0 = starts.min(axis=0)
    x1, y1 = starts.max(axis=0) + native
    region = read_region(slide, level, int(x0), int(y0), int(x1 - x0), int(y1 - y0))
    for k, (sx, sy) in enumerate(starts - [x0, y0]):
        crop = region[sy : sy + native, sx : sx + native]
        if native == patch_size:
            out[k] = crop
        else:
            out[k] = cv2.resize(crop, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
    return out


def read_level_image(
    slide: dicom_slide.LocalDicomSlide, level: slide_level_map.Level
) -> np.ndarray:
    """The whole level as RGB uint8 (for the ~2X mask level and the thumbnail)."""
    return read_region(slide, level, 0, 0, level.width, level.height)


def chunk_order(coords: np.ndarray, columns_per_block: int) -> list[np.ndarray]:
    """Index arrays splitting row-major grid coords into square blocks of neighbouring patches.

    `coords` are [x, y] multiples of the patch size divided out by the caller (grid indices).
    """
    if len(coords) == 0:
        return []
    block = np.asarray(coords) // columns_per_block
    keys = block[:, 1] * (block[:, 0].max() + 1) + block[:, 0]
    order = np.lexsort((coords[:, 0], coords[:, 1], keys))
    sorted_keys = keys[order]
    splits = np.flatnonzero(np.diff(sorted_keys)) + 1
    return np.split(order, splits)


def block_side(chunk_size: int) -> int:
    """Grid cells per block side so that a block holds at most `chunk_size` patches."""
    return max(1, math.isqrt(chunk_size))
