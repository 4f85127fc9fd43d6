"""Tissue mask at ~2X and the 224 px patch grid at ~20x (DESIGN.md §3), as pure functions.

Tissue is where the HSV value channel (max of R, G, B) lies in (v_min, v_max]: glass and
background are bright, black padding is 0. The grid tiles the patch-source image into
non-overlapping squares, drops partial ones at the right and bottom edges, and keeps a patch
when the share of its footprint that is tissue is at least `min_tissue_fraction`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def tissue_mask(rgb: np.ndarray, v_min: int = 0, v_max: int = 204) -> np.ndarray:
    """Boolean mask of tissue pixels: v_min < V <= v_max with V = max(R, G, B)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    value = rgb.max(axis=2)
    return (value > v_min) & (value <= v_max)


@dataclass(frozen=True)
class PatchGrid:
    """The kept patches of a slide, row-major, in patch-source pixel coordinates."""

    coords: np.ndarray  # int64 [N, 2], upper-left [x, y]
    tissue_fraction: np.ndarray  # float32 [N]
    columns: int  # grid columns (whole patches across the source image)
    rows: int


def _footprint_index_ranges(count: int, patch: int, scale: float, size: int) -> np.ndarray:
    """Mask-pixel index ranges [k0, k1) whose pixel centres fall in each patch footprint."""
    starts = np.arange(count) * patch * scale
    k0 = np.ceil(starts - 0.5).astype(np.int64)
    k1 = np.ceil(starts + patch * scale - 0.5).astype(np.int64)
    k1 = np.maximum(k1, k0 + 1)  # a mask coarser than a patch still gives each patch a pixel
    return np.clip(np.stack([k0, k1], axis=1), 0, size)


def patch_grid(
    mask: np.ndarray,
    source_width: int,
    source_height: int,
    patch_size: int = 224,
    min_tissue_fraction: float = 0.5,
) -> PatchGrid:
    """Tiles the source image and keeps patches whose tissue fraction is high enough.

    `mask` covers the same physical extent as the source image at its own resolution, so a
    source pixel x maps to mask pixel x * mask_width / source_width. The tissue fraction of a
    patch is the mean of the mask pixels whose centres fall inside its footprint.
    """
    columns, rows = source_width // patch_size, source_height // patch_size
    if columns == 0 or rows == 0:
        empty = np.zeros((0, 2), np.int64)
        return PatchGrid(empty, np.zeros(0, np.float32), columns, rows)
    mask_h, mask_w = mask.shape
    xs = _footprint_index_ranges(columns, patch_size, mask_w / source_width, mask_w)
    ys = _footprint_index_ranges(rows, patch_size, mask_h / source_height, mask_h)
    integral = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)  # [H+1, W+1]
    x0, x1 = xs[None, :, 0], xs[None, :, 1]
    y0, y1 = ys[:, None, 0], ys[:, None, 1]
    tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = (x1 - x0) * (y1 - y0)
    fraction = np.where(area > 0, tissue / np.maximum(area, 1), 0.0)  # [rows, columns]
    keep_rows, keep_cols = np.nonzero(fraction >= min_tissue_fraction)  # row-major order
    coords = np.stack([keep_cols, keep_rows], axis=1).astype(np.int64) * patch_size
    return PatchGrid(coords, fraction[keep_rows, keep_cols].astype(np.float32), columns, rows)


def thumbnail_with_patches(
    thumbnail: np.ndarray,
    coords: np.ndarray,
    patch_size: int,
    source_width: int,
    source_height: int,
) -> np.ndarray:
    """The thumbnail with a black square drawn over every sampled patch (seed's mask image)."""
    out = thumbnail.copy()
    sx, sy = out.shape[1] / source_width, out.shape[0] / source_height
    for x, y in coords:
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = int(np.ceil((x + patch_size) * sx)), int(np.ceil((y + patch_size) * sy))
        out[y0:y1, x0:x1] = 0
    return out
