import numpy as np
import pytest
from ez_wsi_dicomweb.dicom_slide import LocalDicomSlide

from transforms.tissue import patch_grid, thumbnail_with_patches, tissue_mask


def test_mask_rule_is_value_in_half_open_range():
    rgb = np.array([[[0, 0, 0], [204, 10, 10], [205, 205, 205], [10, 204, 1], [1, 0, 0]]], np.uint8)
    assert tissue_mask(rgb).tolist() == [[False, True, False, True, True]]
    assert tissue_mask(rgb, v_min=1, v_max=204).tolist() == [[False, True, False, True, False]]


def brute_force_fraction(mask, x, y, patch, source_w, source_h):
    """Mean of mask pixels whose centres fall inside the patch footprint (independent loop)."""
    mh, mw = mask.shape
    inside = []
    for my in range(mh):
        cy = (my + 0.5) * source_h / mh
        if not (y <= cy < y + patch):
            continue
        for mx in range(mw):
            cx = (mx + 0.5) * source_w / mw
            if x <= cx < x + patch:
                inside.append(mask[my, mx])
    return np.mean(inside)


def test_grid_fractions_match_brute_force_and_drop_partial_edges():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.6
    source_w, source_h = 53 * 20 + 7, 37 * 20 + 3  # not a multiple of the patch: partial edges
    grid = patch_grid(mask, source_w, source_h, patch_size=64, min_tissue_fraction=0.0)
    assert (grid.columns, grid.rows) == (source_w // 64, source_h // 64)
    assert len(grid.coords) == grid.columns * grid.rows  # min fraction 0 keeps every whole patch
    assert grid.coords[:, 0].max() + 64 <= source_w and grid.coords[:, 1].max() + 64 <= source_h
    for (x, y), frac in zip(grid.coords[::7], grid.tissue_fraction[::7], strict=True):
        assert frac == pytest.approx(brute_force_fraction(mask, x, y, 64, source_w, source_h))


def test_grid_keeps_row_major_patches_above_threshold():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 0:20] = True  # source is 10x the mask: tissue at x in [0, 200), y in [100, 300)
    grid = patch_grid(mask, 400, 400, patch_size=100, min_tissue_fraction=0.5)
    assert grid.coords.tolist() == [[0, 100], [100, 100], [0, 200], [100, 200]]
    assert np.allclose(grid.tissue_fraction, 1.0)
    assert len(patch_grid(mask, 400, 400, 100, min_tissue_fraction=1.01).coords) == 0


def test_grid_smaller_than_one_patch_is_empty():
    grid = patch_grid(np.ones((4, 4), bool), 200, 300, patch_size=224)
    assert grid.coords.shape == (0, 2) and grid.columns == 0


def test_thumbnail_mask_blacks_out_sampled_patches():
    thumb = np.full((100, 100, 3), 200, np.uint8)
    out = thumbnail_with_patches(thumb, np.array([[0, 0], [500, 500]]), 100, 1000, 1000)
    assert (out[0:10, 0:10] == 0).all() and (out[50:60, 50:60] == 0).all()
    assert (out[20:40, 20:40] == 200).all()
    assert (thumb == 200).all()  # input untouched


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("camelyon_jpeg_multiframe.dcm", 0.15, 0.30), ("camelyon_jpeg2000_multiframe.dcm", 0.05, 0.6)],
)
def test_mask_on_real_camelyon_slides(real_slides, name, low, high):
    slide = LocalDicomSlide(str(real_slides / name))
    level = slide.native_level
    rgb = slide.get_patch(level, 0, 0, level.width, level.height).image_bytes()
    mask = tissue_mask(rgb)
    assert low < mask.mean() < high, mask.mean()
    # Glass at the border, tissue inside: the border band is mostly background.
    border = np.concatenate([mask[:5].ravel(), mask[-5:].ravel(), mask[:, :5].ravel()])
    assert border.mean() < mask.mean()
