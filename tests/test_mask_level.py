"""The ~2X mask on shallow pyramids (issue 16 item 4): a mask level >= 2x finer than ~2X is
read in tiles and reduced with INTER_AREA, giving the same image as reducing the whole level at
once, with memory bounded by the tile instead of the level; the level and factor are recorded."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from transforms import mask_level, patches
from transforms.plan import PlanParams, plan_slide
from transforms.sources.dicom_files import enumerate_dicom_folder


def test_the_factor_is_one_near_2x_and_an_integer_reduction_below_it():
    assert mask_level.mask_factor(0.004, 0.005) == 1  # a full pyramid's 4 um level
    assert mask_level.mask_factor(0.008, 0.005) == 1  # coarser than ~2X: as it is
    assert mask_level.mask_factor(0.002, 0.005) == 2  # 2.5x finer -> 4 um
    assert mask_level.mask_factor(0.0005, 0.005) == 10  # 20x-only pyramid -> 5 um
    assert mask_level.mask_factor(0.00025, 0.005) == 20


@pytest.fixture(scope="module")
def shallow(sample_slides, tmp_path_factory) -> Path:
    """medium-20x with only its 0.5 and 2 um levels: the level nearest ~2X is 2 um, 2.5x
    finer than 5 um."""
    out = tmp_path_factory.mktemp("shallow")
    series = pydicom.uid.generate_uid(entropy_srcs=["pathembed-test", "shallow"])
    for name in ("level-0.dcm", "level-1.dcm"):
        ds = pydicom.dcmread(sample_slides / "medium-20x" / name)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["pathembed-shallow", name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / name)
    return out


def _peak(function):
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tiled_reduction_equals_the_whole_level_reduction_with_bounded_memory(shallow):
    (record,) = list(enumerate_dicom_folder(shallow))
    assert record.levels.mask.spacing.um == pytest.approx(2.0)
    factor = mask_level.mask_factor(record.levels.mask.spacing.mm, 0.005)
    assert factor == 2
    slide = patches.open_slide(record.files)
    level = patches.level_of(slide, record.levels.mask.sop_instance_uid)
    assert level.width % factor == 0 and level.height % factor == 0

    tiled, tiled_peak = _peak(lambda: mask_level.read_mask_image(slide, level, factor, 1024))
    patches.open_slide.cache_clear()
    slide = patches.open_slide(record.files)
    level = patches.level_of(slide, record.levels.mask.sop_instance_uid)
    whole, whole_peak = _peak(lambda: patches.read_level_image(slide, level))
    expected = cv2.resize(
        whole, (level.width // factor, level.height // factor), interpolation=cv2.INTER_AREA
    )
    assert tiled.factor == factor and tiled.interpolation == "INTER_AREA"
    assert np.array_equal(tiled.image, expected)
    level_bytes = level.width * level.height * 3
    assert whole_peak >= level_bytes  # the old way holds the whole level
    assert tiled_peak < level_bytes / 2, (tiled_peak, level_bytes)


def test_the_plan_uses_the_reduced_mask_and_records_it(shallow):
    patches.open_slide.cache_clear()
    (record,) = list(enumerate_dicom_folder(shallow))
    plan = plan_slide(record, PlanParams())
    assert plan.mask_factor == 2
    assert plan.mask_image_size == (record.levels.mask.width // 2, record.levels.mask.height // 2)
    assert len(plan.coords) > 0
    # A full pyramid keeps its ~2X level as it is.
    assert mask_level.mask_factor(0.004, PlanParams().mask_spacing_mm) == 1
