"""Tests of transforms.samples.slides: valid, deterministic synthetic DICOM WSI pyramids."""

from __future__ import annotations

import math
import pathlib

import cv2
import numpy as np
import pydicom
import pytest
from ez_wsi_dicomweb import dicom_slide, pixel_spacing
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from transforms.samples import slides as sample_slides
from transforms.samples.slides import (
    SAMPLES,
    SampleSpec,
    sample_uids,
    write_sample_slide,
    write_samples,
)

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
TISSUE_V_MAX = 204  # HSV value (max of R, G, B) at or below which a pixel counts as tissue
PATCH_UM = 224 * 0.5  # a 224-px patch at 20x
FIXTURES = {"small-40x": "small_paths", "medium-20x": "medium_paths"}


@pytest.fixture(scope="module")
def small_paths(sample_slides: pathlib.Path) -> list[pathlib.Path]:
    return sorted((sample_slides / "small-40x").glob("level-*.dcm"))


@pytest.fixture(scope="module")
def medium_paths(sample_slides: pathlib.Path) -> list[pathlib.Path]:
    return sorted((sample_slides / "medium-20x").glob("level-*.dcm"))


def _paths(request: pytest.FixtureRequest, name: str) -> list[pathlib.Path]:
    return request.getfixturevalue(FIXTURES[name])


def _value(rgb: np.ndarray) -> np.ndarray:
    """HSV value: max(R, G, B)."""
    return rgb.max(axis=-1)


def _tissue(rgb: np.ndarray) -> np.ndarray:
    value = _value(rgb)
    return (value > 0) & (value <= TISSUE_V_MAX)


def _level_with_spacing(spec: SampleSpec, spacing_mm: float) -> int:
    levels = [
        i
        for i in range(len(spec.level_downsamples))
        if math.isclose(spec.level_spacing_mm(i), spacing_mm, rel_tol=1e-9)
    ]
    assert levels, f"{spec.name} has no level at {spacing_mm} mm/px"
    return levels[0]


def _whole_level(path: pathlib.Path) -> np.ndarray:
    """A whole (small) level as RGB, decoded with pydicom and assembled from its frames."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array  # (frames, 256, 256, 3) RGB
    cols = math.ceil(ds.TotalPixelMatrixColumns / ds.Columns)
    rows = math.ceil(ds.TotalPixelMatrixRows / ds.Rows)
    full = frames.reshape(rows, cols, ds.Rows, ds.Columns, 3).transpose(0, 2, 1, 3, 4)
    full = full.reshape(rows * ds.Rows, cols * ds.Columns, 3)
    return full[: ds.TotalPixelMatrixRows, : ds.TotalPixelMatrixColumns]


# --- specs ----------------------------------------------------------------------------------


def test_sample_specs() -> None:
    assert set(SAMPLES) == {"small-40x", "medium-20x"}
    for name, spec in SAMPLES.items():
        assert spec.name == name
        assert spec.level_downsamples[0] == 1
        assert list(spec.level_downsamples) == sorted(set(spec.level_downsamples))
    small = SAMPLES["small-40x"]
    spacings_um = [small.level_spacing_mm(i) * 1000 for i in range(len(small.level_downsamples))]
    assert spacings_um[0] == pytest.approx(0.25)
    assert not any(0.35 <= s <= 0.7 for s in spacings_um), "small-40x must have no ~20x level"
    assert any(4.0 <= s <= 5.0 for s in spacings_um), "small-40x needs a ~2x (4-5 um) level"
    medium = SAMPLES["medium-20x"]
    assert medium.native_spacing_mm == pytest.approx(0.0005)
    assert len(medium.level_downsamples) >= 3
    with pytest.raises(ValueError):
        SampleSpec("bad", 0.00025, 100, 100, (2, 4), 1)


def test_sample_uids_are_deterministic_and_valid() -> None:
    uids = {name: sample_uids(name) for name in SAMPLES}
    assert uids == {name: sample_uids(name) for name in SAMPLES}
    flat = [uid for pair in uids.values() for uid in pair]
    assert len(set(flat)) == len(flat)
    assert all(UID(uid).is_valid for uid in flat)
    with pytest.raises(KeyError):
        sample_uids("no-such-sample")
    with pytest.raises(KeyError):
        write_samples(pathlib.Path("/nonexistent"), ["no-such-sample"])


# --- files ----------------------------------------------------------------------------------


def test_output_is_byte_identical(small_paths: list[pathlib.Path], tmp_path: pathlib.Path) -> None:
    sample_slides._fields.cache_clear()  # recompute everything, as a fresh process would
    sample_slides._taps.cache_clear()
    sample_slides._noise_quantiles.cache_clear()
    again = write_sample_slide(tmp_path, "small-40x")
    assert [p.name for p in again] == [p.name for p in small_paths]
    for first, second in zip(small_paths, again, strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("name", list(SAMPLES))
def test_dicom_attributes(request: pytest.FixtureRequest, name: str) -> None:
    paths = _paths(request, name)
    spec = SAMPLES[name]
    assert [p.name for p in paths] == [f"level-{i}.dcm" for i in range(len(spec.level_downsamples))]
    assert all(p.parent.name == name for p in paths)
    study_uid, series_uid = sample_uids(name)
    sop_uids = set()
    for level, path in enumerate(paths):
        with path.open("rb") as f:
            assert f.read(132)[128:] == b"DICM"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        width, height = spec.level_size(level)
        spacing = spec.level_spacing_mm(level)

        assert ds.file_meta.TransferSyntaxUID == JPEG_BASELINE
        assert ds.file_meta.MediaStorageSOPClassUID == VL_WSI
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == VL_WSI
        assert ds.Modality == "SM"
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study_uid, series_uid)
        sop_uids.add(ds.SOPInstanceUID)
        assert ds.InstanceNumber == level + 1
        assert ds.Manufacturer == "pathembed sample"
        for keyword in ("PatientID", "PatientName", "StudyDate", "StudyTime", "SeriesNumber"):
            assert ds.get(keyword) not in (None, ""), keyword
        assert ds.ContainerIdentifier
        expected_type = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if level == 0
            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        assert list(ds.ImageType) == expected_type

        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert (ds.SamplesPerPixel, ds.PlanarConfiguration) == (3, 0)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            8,
            8,
            7,
            0,
        )
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(ds.LossyImageCompressionRatio) > 1

        assert (ds.Rows, ds.Columns) == (256, 256)
        assert ds.DimensionOrganizationType == "TILED_FULL"
        assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (width, height)
        assert ds.NumberOfFrames == math.ceil(width / 256) * math.ceil(height / 256)
        assert ds.TotalPixelMatrixFocalPlanes == 1
        assert ds.NumberOfOpticalPaths == 1
        (optical_path,) = ds.OpticalPathSequence
        assert optical_path.OpticalPathIdentifier == "1"
        assert optical_path.IlluminationTypeCodeSequence[0].CodeMeaning.startswith("Brightfield")
        assert optical_path.IlluminationColorCodeSequence[0].CodeMeaning == "Full Spectrum"
        assert ds.ImagedVolumeWidth == pytest.approx(width * spacing, rel=1e-6)
        assert ds.ImagedVolumeHeight == pytest.approx(height * spacing, rel=1e-6)
        assert len(ds.TotalPixelMatrixOriginSequence) == 1
        assert len(ds.ImageOrientationSlide) == 6
        (shared,) = ds.SharedFunctionalGroupsSequence
        measures = shared.PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == pytest.approx([spacing, spacing])
        assert float(measures.SliceThickness) > 0
        assert list(shared.WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType) == (
            expected_type
        )
    assert len(sop_uids) == len(paths)


@pytest.mark.parametrize("name", list(SAMPLES))
def test_frames_decode_to_the_generated_pixels(request: pytest.FixtureRequest, name: str) -> None:
    spec = SAMPLES[name]
    for level, path in enumerate(_paths(request, name)):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        n = int(ds.NumberOfFrames)
        for index in sorted({0, n // 2, n - 1}):
            frame = pixel_array(path, index=index)  # pydicom's own JPEG decoding, YBR -> RGB
            assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
            expected = sample_slides._render_frame(spec, level, index)
            diff = np.abs(frame.astype(np.int16) - expected)
            assert diff.mean() < 4, (level, index, diff.mean())
        # the last frame is padded with bright background beyond the pixel matrix
        width, height = spec.level_size(level)
        last = pixel_array(path, index=n - 1)
        pad_w, pad_h = (-width) % 256, (-height) % 256
        padding = [last[256 - pad_h :, :], last[:, 256 - pad_w :]]
        for block in padding:
            if block.size:
                assert _value(block).min() > TISSUE_V_MAX


def test_frames_are_baseline_jpeg_with_422_chroma(small_paths: list[pathlib.Path]) -> None:
    ds = pydicom.dcmread(small_paths[-1])
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
    assert len(frames) == ds.NumberOfFrames
    for frame in frames:
        assert frame[:2] == b"\xff\xd8"
        sof = frame.index(b"\xff\xc0")  # baseline DCT
        components = frame[sof + 9]
        assert components == 3
        sampling = [frame[sof + 11 + 3 * c] for c in range(3)]  # (H << 4) | V per component
        assert sampling == [0x21, 0x11, 0x11]  # Y 2x1, Cb 1x1, Cr 1x1: 4:2:2


# --- ez-wsi ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_ez_wsi_opens_the_slide(request: pytest.FixtureRequest, name: str) -> None:
    spec = SAMPLES[name]
    paths = _paths(request, name)
    slide = dicom_slide.LocalDicomSlide([str(p) for p in paths])
    levels = list(slide.levels)
    assert len(levels) == len(spec.level_downsamples)
    for level, ez_level in enumerate(levels):  # ez-wsi orders levels from the largest
        width, height = spec.level_size(level)
        spacing = spec.level_spacing_mm(level)
        assert (ez_level.width, ez_level.height) == (width, height)
        assert ez_level.pixel_spacing.row_spacing_mm == pytest.approx(spacing, rel=1e-6)
        assert ez_level.pixel_spacing.column_spacing_mm == pytest.approx(spacing, rel=1e-6)
        assert (ez_level.frame_width, ez_level.frame_height) == (256, 256)
        assert ez_level.number_of_frames == math.ceil(width / 256) * math.ceil(height / 256)
        assert ez_level.transfer_syntax_uid == JPEG_BASELINE
    assert slide.native_level.pixel_spacing.row_spacing_mm == pytest.approx(
        spec.native_spacing_mm, rel=1e-6
    )

    # Patches at the finest level: one across a tissue boundary, one inside the background.
    finest = levels[0]
    ds0 = spec.level_downsamples[-1]
    low_mask = sample_slides._tissue_mask(spec, len(spec.level_downsamples) - 1)
    edge = low_mask & ~cv2.erode(low_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    ys, xs = np.nonzero(edge)
    i = len(ys) // 2
    w, h = 300, 200
    x = int(np.clip(xs[i] * ds0 - w // 2, 0, finest.width - w))
    y = int(np.clip(ys[i] * ds0 - h // 2, 0, finest.height - h))
    patch = slide.get_patch(finest, x, y, w, h).image_bytes()
    assert patch.shape == (h, w, 3) and patch.dtype == np.uint8
    expected = sample_slides._render_region(spec, 0, x, y, w, h)
    assert np.abs(patch.astype(np.int16) - expected).mean() < 4
    tissue = _tissue(patch)
    assert 0.05 < tissue.mean() < 0.95  # the boundary is in the patch
    assert (tissue == _tissue(expected)).mean() > 0.98

    patch = slide.get_patch(finest, 0, 0, w, h).image_bytes()  # slide corner: background
    assert _value(patch).min() > TISSUE_V_MAX
    assert 230 <= _value(patch).mean() <= 250

    # 20x patches (small-40x has no 20x level: ez-wsi resizes the 40x level)
    twenty_x = pixel_spacing.PixelSpacing.FromMagnificationString("20X")
    resized = finest.resize(twenty_x) if spec.native_spacing_mm < 0.0004 else finest
    exact_w = spec.width * spec.native_spacing_mm / 0.0005
    exact_h = spec.height * spec.native_spacing_mm / 0.0005
    assert abs(resized.width - exact_w) <= 1 and abs(resized.height - exact_h) <= 1
    assert (resized.width // 224, resized.height // 224) == (exact_w // 224, exact_h // 224)
    scale = round(0.0005 / spec.native_spacing_mm)
    x20, y20 = (x + w // 2) // scale - 112, (y + h // 2) // scale - 112
    patch20 = slide.get_patch(resized, x20, y20, 224, 224).image_bytes()
    assert patch20.shape == (224, 224, 3)
    source = sample_slides._render_region(
        spec, 0, x20 * scale, y20 * scale, 224 * scale, 224 * scale
    )
    expected = cv2.resize(source, (224, 224), interpolation=cv2.INTER_AREA)
    assert np.abs(patch20.astype(np.int16) - expected).mean() < 6
    assert 0.05 < _tissue(patch20).mean() < 0.95


# --- tissue ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_tissue_fraction_and_patch_counts(request: pytest.FixtureRequest, name: str) -> None:
    spec = SAMPLES[name]
    paths = _paths(request, name)
    lowest = _whole_level(paths[-1])
    value = _value(lowest)
    tissue = _tissue(lowest)
    assert 0.2 < tissue.mean() < 0.6
    assert np.median(value[tissue]) < 190  # tissue is clearly darker than the threshold
    assert np.percentile(value[~tissue], 1) > 225  # background is near-white, slightly noisy
    assert 235 <= np.median(value[~tissue]) <= 245
    assert value[~tissue].std() > 0.5

    # 224-px patches at 20x (112 um) on the 4 um level: 28 x 28 px blocks.
    level = _level_with_spacing(spec, 0.004)
    mask = _tissue(_whole_level(paths[level]))
    block = round(PATCH_UM / 4.0)
    cols = math.floor(spec.width * spec.native_spacing_mm * 1000 / PATCH_UM)
    rows = math.floor(spec.height * spec.native_spacing_mm * 1000 / PATCH_UM)
    fraction = mask[: rows * block, : cols * block].reshape(rows, block, cols, block).mean((1, 3))
    count = int((fraction >= 0.5).sum())
    if name == "small-40x":
        assert 100 <= count < 500
    else:
        assert 2000 <= count <= 5000
    partial = int(((fraction > 0) & (fraction < 1)).sum())
    assert partial >= 20  # mask edge cases: patches that are only partly tissue


def _boundary_points(spec: SampleSpec, count: int) -> list[tuple[float, float]]:
    """(x, y) in mm of points on tissue boundaries, spread over the slide."""
    lowest = len(spec.level_downsamples) - 1
    mask = sample_slides._tissue_mask(spec, lowest).astype(np.uint8)
    edge = (mask != cv2.erode(mask, np.ones((3, 3), np.uint8))).nonzero()
    order = np.argsort(edge[1] * mask.shape[0] + edge[0])  # by x, then y
    picks = order[np.linspace(0, len(order) - 1, count).astype(int)]
    spacing = spec.level_spacing_mm(lowest)
    return [((edge[1][i] + 0.5) * spacing, (edge[0][i] + 0.5) * spacing) for i in picks]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_tissue_boundaries_agree_between_levels(request: pytest.FixtureRequest, name: str) -> None:
    """Decoded finest-level patches on tissue boundaries vs. every decoded lower level."""
    spec = SAMPLES[name]
    paths = _paths(request, name)
    slide = dicom_slide.LocalDicomSlide([str(p) for p in paths])
    finest = next(iter(slide.levels))
    s0 = spec.native_spacing_mm
    size = 768
    lows = {level: _tissue(_whole_level(paths[level])) for level in range(1, len(paths))}
    for x_mm, y_mm in _boundary_points(spec, 6):
        x = int(np.clip(x_mm / s0 - size / 2, 0, finest.width - size))
        y = int(np.clip(y_mm / s0 - size / 2, 0, finest.height - size))
        mask0 = _tissue(slide.get_patch(finest, x, y, size, size).image_bytes())
        assert 0.02 < mask0.mean() < 0.98
        for level, low in lows.items():
            spacing = spec.level_spacing_mm(level)
            # the low-level pixel that each finest-level pixel falls in
            rows = ((y + np.arange(size) + 0.5) * s0 / spacing).astype(int)
            cols = ((x + np.arange(size) + 0.5) * s0 / spacing).astype(int)
            rows = np.minimum(rows, low.shape[0] - 1)
            cols = np.minimum(cols, low.shape[1] - 1)
            low_up = low[rows][:, cols]
            # disagreements only within half a low-level pixel + 3 um of a boundary
            radius = math.ceil((spacing / 2 + 0.003) / s0)
            kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
            m = mask0.astype(np.uint8)
            near_edge = cv2.dilate(m, kernel) != cv2.erode(m, kernel)
            inner = (slice(radius, size - radius),) * 2  # boundaries outside the patch
            far = (low_up != mask0) & ~near_edge
            assert not far[inner].any(), (name, level, int(far[inner].sum()))
            assert (low_up != mask0).mean() < 0.1


def test_tissue_has_varied_texture(small_paths: list[pathlib.Path]) -> None:
    """Patches on tissue differ from each other (region types, nuclei), not just in colour."""
    spec = SAMPLES["small-40x"]
    slide = dicom_slide.LocalDicomSlide([str(p) for p in small_paths])
    finest = next(iter(slide.levels))
    low_mask = sample_slides._tissue_mask(spec, len(spec.level_downsamples) - 1)
    ds0 = spec.level_downsamples[-1]
    # centres of 448-px (112 um, 14 lowest-level px) patches well inside the tissue
    inner = cv2.erode(low_mask.astype(np.uint8), np.ones((19, 19), np.uint8)).astype(bool)
    ys, xs = np.nonzero(inner)
    rng = np.random.default_rng(0)
    features = []
    for i in rng.choice(len(ys), size=24, replace=False):
        x, y = int((xs[i] + 0.5) * ds0) - 224, int((ys[i] + 0.5) * ds0) - 224
        patch = slide.get_patch(finest, x, y, 448, 448)
        rgb = patch.image_bytes()
        value = _value(rgb).astype(np.float32)
        assert _tissue(rgb).mean() > 0.99
        features.append([value.mean(), value.std(), (value < 130).mean(), rgb[..., 0].mean()])
    features = np.array(features)
    assert (features[:, 1] > 10).all()  # texture within every patch
    spread = features.max(axis=0) - features.min(axis=0)
    assert spread[0] > 8  # brightness differs between regions
    assert spread[2] > 0.1  # so does the share of nucleus-dark pixels
