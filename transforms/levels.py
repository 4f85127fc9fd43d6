"""Pyramid level choice by pixel spacing (DESIGN.md §3), as pure functions.

Pixel spacing is always millimetres per pixel, as DICOM stores it, behind `PixelSpacing`.
The embedding level is the coarsest level at most `target * (1 + tolerance)`; a finer one
is read and downsampled with INTER_AREA. The mask level is the level nearest ~2X.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transforms.errors import ReasonCode, SlideError

# Plausible range for a brightfield WSI pyramid level: 0.05 µm/px (beyond any optics) to
# 1 mm/px (a whole slide in ~75 px). Outside it the header is wrong; we never guess.
MIN_PLAUSIBLE_SPACING_MM = 0.00005
MAX_PLAUSIBLE_SPACING_MM = 1.0
# Rows and columns may differ by this relative amount and still count as square pixels.
SQUARE_PIXEL_TOLERANCE = 0.02
# Levels of one pyramid image the same area: their extents (size x spacing) may differ by this
# relative amount (plus one pixel of rounding) before the header counts as inconsistent.
EXTENT_TOLERANCE = 0.05

_LOG = logging.getLogger(__name__)


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


def _area(level: LevelInfo) -> int:
    return level.width * level.height


def extent_problem(level: LevelInfo, reference: LevelInfo) -> SlideError | None:
    """Whether `level` images the same area as `reference` (the largest level), within
    EXTENT_TOLERANCE plus one pixel of rounding per side (a 1 x 1 px level covers the slide
    only to the nearest pixel)."""
    for axis, size, ref_size, spacing, ref_spacing in (
        ("width", level.width, reference.width, level.spacing.column_mm,
         reference.spacing.column_mm),
        ("height", level.height, reference.height, level.spacing.row_mm,
         reference.spacing.row_mm),
    ):  # fmt: skip
        extent, ref_extent = size * spacing, ref_size * ref_spacing
        if abs(extent - ref_extent) > EXTENT_TOLERANCE * ref_extent + spacing:
            return SlideError(
                ReasonCode.INCONSISTENT_LEVELS,
                f"instance {level.sop_instance_uid} is {extent:.4g} mm in {axis} "
                f"({size} px x {spacing * 1000:.4g} µm) but the largest level, instance "
                f"{reference.sop_instance_uid}, is {ref_extent:.4g} mm ({ref_size} px x "
                f"{ref_spacing * 1000:.4g} µm); their PixelSpacing or size disagree",
            )
    return None


def _fine_enough(level: LevelInfo, limit_mm: float) -> bool:
    """True when a level's stated spacing (valid or not) is a ~20x one."""
    spacing = level.spacing
    return spacing is not None and 0 < spacing.mm <= limit_mm


def usable_levels(
    levels: Sequence[LevelInfo], unusable: Mapping[str, SlideError] | None = None
) -> tuple[list[LevelInfo], dict[str, SlideError]]:
    """(levels with a plausible spacing and an extent consistent with the largest of them,
    {SOPInstanceUID: why each other level cannot be used}). `unusable` adds header problems
    found elsewhere (frame geometry, pixel format, UIDs)."""
    problems: dict[str, SlideError] = dict(unusable or {})
    for level in levels:
        if level.sop_instance_uid in problems:
            continue
        try:
            validate_spacing(level)
        except SlideError as error:
            problems[level.sop_instance_uid] = error
    good = [lv for lv in levels if lv.sop_instance_uid not in problems]
    if good:
        reference = max(good, key=_area)
        for level in good:
            if (error := extent_problem(level, reference)) is not None:
                problems[level.sop_instance_uid] = error
        good = [lv for lv in good if lv.sop_instance_uid not in problems]
    return good, problems


def choose_levels(
    levels: Sequence[LevelInfo],
    rule: LevelRule = DEFAULT_RULE,
    unusable: Mapping[str, SlideError] | None = None,
    concatenations: Mapping[str, str] | None = None,
) -> LevelChoice:
    """Chooses the embedding and mask levels of a pyramid by the DESIGN.md §3 rule.

    Levels that cannot be used (implausible or missing spacing, an extent that disagrees with
    the largest level, the header problems in `unusable`) are left out with a logged reason; the
    slide fails for one of them only when it is needed: when no usable level is fine enough
    and a bad level is larger than every usable one (it would have been the ~20x level). Two
    usable instances of the same size at a chosen level fail as `ambiguous_level` (which one
    holds the slide is a guess; an unused duplicate, or an unusable one, is left out).
    Instances of one concatenation (`concatenations`: SOPInstanceUID -> ConcatenationUID) are
    one level, not duplicates. A bad level whose own stated spacing is ~20x is needed too
    when no usable level is fine enough.
    """
    target_spacing_mm, tolerance = rule.target_spacing_mm, rule.tolerance
    if not levels:
        raise SlideError(ReasonCode.NO_PYRAMID, "the series has no pyramid (VOLUME) levels")
    good, problems = usable_levels(levels, unusable)
    bad = [lv for lv in levels if lv.sop_instance_uid in problems]
    largest_good = max((_area(lv) for lv in good), default=-1)
    needed_bad = [
        lv
        for lv in bad
        if _area(lv) > largest_good or _fine_enough(lv, target_spacing_mm * (1 + tolerance))
    ]
    spacings = {level.sop_instance_uid: level.spacing.mm for level in good}
    fine_enough = [
        lv for lv in good if spacings[lv.sop_instance_uid] <= target_spacing_mm * (1 + tolerance)
    ]
    if not fine_enough:
        if needed_bad:  # the largest bad level would have been the one to embed
            raise problems[max(needed_bad, key=_area).sop_instance_uid]
        finest = min(spacings.values())
        raise SlideError(
            ReasonCode.NO_HIGH_RESOLUTION_LEVEL,
            f"finest level is {finest * 1000:.3g} µm/px; embeddings need a level at most "
            f"{target_spacing_mm * (1 + tolerance) * 1000:.3g} µm/px (~20x)",
        )
    for level in bad:
        _LOG.info(
            "level %s (%d x %d px) is not used: %s",
            level.sop_instance_uid, level.width, level.height, problems[level.sop_instance_uid],
        )  # fmt: skip
    embedding = max(fine_enough, key=lambda lv: spacings[lv.sop_instance_uid])
    native = spacings[embedding.sop_instance_uid]
    downsample = target_spacing_mm / native if native < target_spacing_mm / (1 + tolerance) else 1.0
    # Nearest ~2X in log space: 2.5 and 10 µm are equally far from 5 µm.
    mask = min(
        good, key=lambda lv: abs(math.log(spacings[lv.sop_instance_uid] / rule.mask_spacing_mm))
    )
    parts = concatenations or {}
    for role, chosen in (("embedding", embedding), ("mask", mask)):
        group = parts.get(chosen.sop_instance_uid)
        twins = [
            lv.sop_instance_uid
            for lv in levels
            if lv.sop_instance_uid != chosen.sop_instance_uid
            and (lv.width, lv.height) == (chosen.width, chosen.height)
            and (group is None or parts.get(lv.sop_instance_uid) != group)
            and lv.sop_instance_uid not in problems  # a usable instance beats an unusable one
        ]
        if twins:
            claimants = ", ".join(sorted([chosen.sop_instance_uid, *twins]))
            raise SlideError(
                ReasonCode.AMBIGUOUS_LEVEL,
                f"the {role} level ({chosen.width} x {chosen.height} px) is claimed by "
                f"{len(twins) + 1} instances ({claimants}); "
                "which one holds the slide would be a guess",
            )
    return LevelChoice(embedding=embedding, mask=mask, downsample=downsample)
