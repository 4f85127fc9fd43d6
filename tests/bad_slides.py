"""Slides made to fail, one way each, for the bad-input tests.

Each is a tiny synthetic pyramid (transforms/samples/slides.py, a 20x level of 1904 x 1456 px)
copied with one defect: a header attribute changed, a level left out, frames replaced. Every
copy gets its own series and instance UIDs, so each is a slide of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.uid import generate_uid

from transforms.samples.slides import FRAME_SIZE, SampleSpec, write_slide

TINY = SampleSpec(
    name="tiny-20x",
    native_spacing_mm=0.0005,
    width=1904,
    height=1456,
    level_downsamples=(1, 4, 8),
    seed=7,
)


def tiny_slide(root: Path, name: str = TINY.name, seed: int = TINY.seed) -> Path:
    """A good tiny slide (about 18 patches on tissue) in root/name/."""
    spec = SampleSpec(name, TINY.native_spacing_mm, TINY.width, TINY.height,
                      TINY.level_downsamples, seed)  # fmt: skip
    write_slide(root, spec)
    return root / name


def _uid(name: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=["pathembed-bad-slide", name, *map(str, parts)])


def _frames(ds: pydicom.Dataset) -> list[bytes]:
    n = int(ds.NumberOfFrames)
    return [b"".join(f) for f in generate_fragmented_frames(ds.PixelData, number_of_frames=n)]


def _set_frames(ds: pydicom.Dataset, frames: list[bytes]) -> None:
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = len(frames)


def derive(
    good: Path,
    out: Path,
    name: str,
    change: Callable[[pydicom.Dataset, int], None] = lambda ds, level: None,
    levels: tuple[int, ...] | None = None,
) -> Path:
    """A copy of slide `good` as out/name/ with `change(ds, level)` applied to each level."""
    target = out / name
    target.mkdir(parents=True)
    files = sorted(good.glob("level-*.dcm"))
    for level, path in enumerate(files):
        if levels is not None and level not in levels:
            continue
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = _uid(name, "series")
        ds.SOPInstanceUID = _uid(name, "instance", level)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        change(ds, level)
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def set_spacing(row_mm: float | None, col_mm: float | None = None, levels=(0,)):
    """A change setting PixelSpacing (None: removed) on some levels, scaled per level."""

    def change(ds: pydicom.Dataset, level: int) -> None:
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        if level not in levels:
            return
        if row_mm is None:
            del measures.PixelSpacing
            return
        scale = float(measures.PixelSpacing[0]) / TINY.native_spacing_mm
        col = row_mm if col_mm is None else col_mm
        measures.PixelSpacing = [f"{row_mm * scale:.8g}", f"{col * scale:.8g}"]

    return change


def set_attribute(keyword: str, value, levels=(0, 1, 2)):
    def change(ds: pydicom.Dataset, level: int) -> None:
        if level in levels:
            setattr(ds, keyword, value)

    return change


def set_transfer_syntax(uid: str):
    def change(ds: pydicom.Dataset, level: int) -> None:
        ds.file_meta.TransferSyntaxUID = uid

    return change


def label_only(ds: pydicom.Dataset, level: int) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]


def second_optical_path(ds: pydicom.Dataset, level: int) -> None:
    path = pydicom.Dataset()
    path.OpticalPathIdentifier = "2"
    path.OpticalPathDescription = "second channel"
    ds.OpticalPathSequence.append(path)
    ds.NumberOfOpticalPaths = 2


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def blank(ds: pydicom.Dataset, level: int) -> None:
    """Every frame background-white: no tissue anywhere."""
    white = _jpeg(np.full((FRAME_SIZE, FRAME_SIZE, 3), 242, np.uint8))
    _set_frames(ds, [white] * int(ds.NumberOfFrames))
    ds.PhotometricInterpretation = "YBR_FULL_422"


def corrupt_level_0(mode: str):
    """The 20x level's frames truncated to a third, or replaced by random bytes; the mask
    levels stay readable, so planning succeeds and reading patches fails."""

    def change(ds: pydicom.Dataset, level: int) -> None:
        if level != 0:
            return
        rng = np.random.default_rng(0)
        frames = []
        for frame in _frames(ds):
            if mode == "truncate":
                frames.append(frame[: len(frame) // 3])
            else:
                frames.append(rng.integers(0, 256, len(frame), dtype=np.uint8).tobytes())
        _set_frames(ds, frames)

    return change


def huge_sparse_slide(good: Path, out: Path, name: str = "huge-grid") -> Path:
    """A 20x level of 32768 x 32768 px (3.2 GB as RGB if loaded whole; 16384 frames, ~12 MB as
    JPEG) that is white except a 1024 px square of tissue, with 4 and 16 µm levels above it."""
    target = out / name
    target.mkdir(parents=True)
    template = pydicom.dcmread(good / "level-0.dcm")
    rng = np.random.default_rng(1)
    white = _jpeg(np.full((FRAME_SIZE, FRAME_SIZE, 3), 242, np.uint8))
    series = _uid(name, "series")
    side, tissue_at, tissue_px = 32768, 16384, 1024
    for level, downsample in enumerate((1, 8, 32)):
        width = side // downsample
        across = width // FRAME_SIZE
        lo, hi = tissue_at // downsample, (tissue_at + tissue_px) // downsample
        frames = []
        for index in range(across * across):
            fy, fx = divmod(index, across)
            y0, x0 = fy * FRAME_SIZE, fx * FRAME_SIZE
            if y0 + FRAME_SIZE <= lo or y0 >= hi or x0 + FRAME_SIZE <= lo or x0 >= hi:
                frames.append(white)
                continue
            rgb = np.full((FRAME_SIZE, FRAME_SIZE, 3), 242, np.uint8)
            ys = slice(max(lo - y0, 0), min(hi - y0, FRAME_SIZE))
            xs = slice(max(lo - x0, 0), min(hi - x0, FRAME_SIZE))
            shape = rgb[ys, xs].shape[:2]
            pink = np.array([190, 110, 160]) + rng.integers(-20, 20, (*shape, 3))
            rgb[ys, xs] = pink.clip(0, 255).astype(np.uint8)
            frames.append(_jpeg(rgb))
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = _uid(name, "instance", level)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if level:
            ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixRows = width
        spacing = TINY.native_spacing_mm * downsample
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        measures.PixelSpacing = [f"{spacing:.8g}", f"{spacing:.8g}"]
        ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = width * spacing
        ds.PhotometricInterpretation = "YBR_FULL_422"
        _set_frames(ds, frames)
        ds.save_as(target / f"level-{level}.dcm", enforce_file_format=True)
    return target
