"""The ~2X image the tissue mask and thumbnails are made from, with bounded memory.

The mask level is the pyramid level nearest ~2X (transforms/levels.py). On a shallow pyramid
that level can be much finer than ~2X: a 0.5 um/px-only slide would have its whole 20x level
(GBs of RGB) read into memory. When the chosen level is at least twice finer than the mask
spacing, it is read in tiles instead, each tile reduced by the integer factor
k = floor(mask spacing / level spacing) with INTER_AREA (a box average for integer factors) as
it arrives; only the reduced image and one tile are held. The level and factor are recorded
(metadata.json `mask_level`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from ez_wsi_dicomweb import dicom_slide, slide_level_map

from transforms import patches

# A level at most this much finer than the mask spacing is read whole, as it is (a ~2X level
# of a full pyramid: a few MB to tens of MB).
MAX_DIRECT_FACTOR = 2.0
TILE_LEVEL_PX = 4096  # level pixels per tile side: 48 MiB of RGB per tile at most


@dataclass(frozen=True)
class MaskImage:
    """The RGB image the tissue mask is thresholded on, and how it was made."""

    image: np.ndarray  # uint8 [H, W, 3], the mask level reduced by `factor`
    factor: int  # mask-level pixels per image pixel (1: the level as is)

    @property
    def interpolation(self) -> str | None:
        return "INTER_AREA" if self.factor > 1 else None


def mask_factor(level_spacing_mm: float, mask_spacing_mm: float) -> int:
    """The integer reduction of a mask level: 1 unless it is >= 2x finer than the mask
    spacing, then floor(mask spacing / level spacing) (the result is at most ~2X, never
    coarser than the mask spacing)."""
    ratio = mask_spacing_mm / level_spacing_mm
    return math.floor(ratio + 1e-9) if ratio >= MAX_DIRECT_FACTOR else 1


def read_mask_image(
    slide: dicom_slide.LocalDicomSlide,
    level: slide_level_map.Level,
    factor: int,
    tile_level_px: int = TILE_LEVEL_PX,
) -> MaskImage:
    """The mask level reduced by `factor`: read whole when factor is 1, else tile by tile
    (tiles of at most `tile_level_px` level pixels a side, aligned to the factor, so every
    image pixel averages the same k x k level pixels as a whole-level resize would)."""
    if factor <= 1:
        return MaskImage(patches.read_level_image(slide, level), 1)
    width, height = int(level.width), int(level.height)
    out_w, out_h = math.ceil(width / factor), math.ceil(height / factor)
    step = max(1, tile_level_px // factor)  # image pixels per tile side
    out = np.empty((out_h, out_w, 3), np.uint8)
    for ty in range(0, out_h, step):
        for tx in range(0, out_w, step):
            x0, y0 = tx * factor, ty * factor
            w, h = min(step * factor, width - x0), min(step * factor, height - y0)
            tile = patches.read_region(slide, level, x0, y0, w, h)
            ow, oh = min(step, out_w - tx), min(step, out_h - ty)
            out[ty : ty + oh, tx : tx + ow] = cv2.resize(
                tile, (ow, oh), interpolation=cv2.INTER_AREA
            )
            del tile  # one tile at a time
    return MaskImage(out, factor)
