"""Pyramid level choice by pixel spacing (DESIGN.md §3), as pure functions.

Pixel spacing is always millimetres per pixel, as DICOM stores it, behind `PixelSpacing`.
The embedding level is the coarsest level at most `target * (1 + tolerance)`; a finer one
is read and downsampled with INTER_AREA. The mask level is the level nearest ~2X.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transforms.errors import ReasonCode, SlideError

# Plausible range for a brightfield WSI pyramid level: 0.05 µm/px (beyond any optics) to
# 1 mm/px (a whole slide in ~75 px). Outside it the header is wrong; we never guess.
MIN_PLAUSIBLE_SPACING_MM = 0.00005
MAX_PLAUSIBLE_SPACING_MM = 1.0
# Rows and columns may differ by this relative amount and still count as square pixels.
SQUARE_PIXEL_TOLERANCE = 0.02


@dataclass(frozen=True)
class PixelSpacing:
    """Pixel spacing in mm/px, [row, column] as in DICOM PixelSpacing."""

    row_mm: float
    column_mm: float

    @property
    def mm(self) -> float:
        """The isotropic spacing (mean of row and column); valid only for square pixels."""
        return (self.row_mm + self.column_mm) / 2

    @property
    def um(self) -> float:
        return self.mm * 1000

    def __repr__(self) -> str:
        return f"PixelSpacing({self.row_mm * 1000:.4g} x {self.column_mm * 1000:.4g} µm)"


@dataclass(frozen=True)
class LevelRule:
    """The level rule's numbers, in mm/px like every spacing here (the config says them in µm).

    The embedding level is the coarsest level at most `target_spacing_mm * (1 + tolerance)`;
    the mask level is the level nearest `mask_spacing_mm` (~2X) in log space.
    """

    target_spacing_mm: float = 0.0005  # ~20x
    tolerance: float = 0.15
    mask_spacing_mm: float = 0.005  # ~2X


DEFAULT_RULE = LevelRule()


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its size in pixels, spacing and the instance(s) holding it."""

    width: int
    height: int
    spacing: PixelSpacing | None
    sop_instance_uid: str
    frame_width: int = 256
    frame_height: int = 256


@dataclass(frozen=True)
class LevelChoice:
    """The levels a slide is read at, and how the embedding level maps to the patch grid."""

    embedding: LevelInfo
    mask: LevelInfo
    downsample: float  # native embedding-level pixels per patch-source pixel (>= 1)

    @property
    def source_width(self) -> int:
        """Width of the patch-source image (the ~20x frame coordinates refer to)."""
        return int(self.embedding.width / self.downsample)

    @property
    def source_height(self) -> int:
        return int(self.embedding.height / self.downsample)


def validate_spacing(level: LevelInfo) -> PixelSpacing:
    """Returns the level's spacing or raises a SlideError saying what is wrong with it."""
    spacing = level.spacing
    if spacing is None:
        raise SlideError(
            ReasonCode.NO_PIXEL_SPACING,
            f"instance {level.sop_instance_uid} has no PixelSpacing in "
            "SharedFunctionalGroupsSequence/PixelMeasuresSequence",
        )
    for value in (spacing.row_mm, spacing.column_mm):
        if not (
            math.isfinite(value) and MIN_PLAUSIBLE_SPACING_MM <= value <= MAX_PLAUSIBLE_SPACING_MM
        ):
            raise SlideError(
                ReasonCode.IMPLAUSIBLE_PIXEL_SPACING,
                f"instance {level.sop_instance_uid} has PixelSpacing {spacing.row_mm!r}, "
                f"{spacing.column_mm!r} mm, outside [{MIN_PLAUSIBLE_SPACING_MM}, "
                f"{MAX_PLAUSIBLE_SPACING_MM}] mm",
            )
    if abs(spacing.row_mm - spacing.column_mm) > SQUARE_PIXEL_TOLERANCE * spacing.mm:
        raise SlideError(
            ReasonCode.NON_SQUARE_PIXELS,
            f"instance {level.sop_instance_uid} has non-square pixels {spacing!r}; "
            "patches would be distorted, so the slide is rejected",
        )
    return spacing


def choose_levels(levels: Sequence[LevelInfo], rule: LevelRule = DEFAULT_RULE) -> LevelChoice:
    """Chooses the embedding and mask levels of a pyramid by the DESIGN.md §3 rule."""
    target_spacing_mm, tolerance = rule.target_spacing_mm, rule.tolerance
    if not levels:
        raise SlideError(ReasonCode.NO_PYRAMID, "the series has no pyramid (VOLUME) levels")
    spacings = {level.sop_instance_uid: validate_spacing(level).mm for level in levels}
    fine_enough = [
        lv for lv in levels if spacings[lv.sop_instance_uid] <= target_spacing_mm * (1 + tolerance)
    ]
    if not fine_enough:
        finest = min(spacings.values())
        raise SlideError(
            ReasonCode.NO_HIGH_RESOLUTION_LEVEL,
            f"finest level is {finest * 1000:.3g} µm/px; embeddings need a level at most "
            f"{target_spacing_mm * (1 + tolerance) * 1000:.3g} µm/px (~20x)",
        )
    embedding = max(fine_enough, key=lambda lv: spacings[lv.sop_instance_uid])
    native = spacings[embedding.sop_instance_uid]
    downsample = target_spacing_mm / native if native < target_spacing_mm / (1 + tolerance) else 1.0
    # Nearest ~2X in log space: 2.5 and 10 µm are equally far from 5 µm.
    mask = min(
        levels, key=lambda lv: abs(math.log(spacings[lv.sop_instance_uid] / rule.mask_spacing_mm))
    )
    return LevelChoice(embedding=embedding, mask=mask, downsample=downsample)
