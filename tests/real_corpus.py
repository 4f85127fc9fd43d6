"""Slides with real converters' header quirks, re-wrapped from the real CMU-1-Small-Region
pyramid's JPEG frames (../shared/testdata/real/jcupitt_cmu1_small_region, never copied into the
repository: the corpus is written under a test's tmp folder).

Each case is one item of issue 12's "What happens today": a header that used to crash the run
or to be embedded as wrong pixels. Every copy gets its own series and instance UIDs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

CMU = "jcupitt_cmu1_small_region"


def cmu_files(real: Path) -> list[Path]:
    """The CMU pyramid's level files, level 0 (20x) first."""
    files = (real / CMU).glob("level-*.dcm")
    return sorted(files, key=lambda p: int(p.name.split("-")[1]))


def uid(name: str, *parts: object) -> str:
    return generate_uid(entropy_srcs=["pathembed-real-corpus", name, *map(str, parts)])


def frames_of(ds: pydicom.Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def set_frames(ds: pydicom.Dataset, frames: list[bytes], number: int | None = None) -> None:
    """PixelData re-encapsulated (with a Basic Offset Table); NumberOfFrames = `number` or the
    frames' count."""
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = len(frames) if number is None else number


Change = Callable[[pydicom.Dataset, int], None]


def derive(real: Path, out: Path, name: str, change: Change | None = None, levels=None) -> Path:
    """A copy of the CMU pyramid as out/name/ (new UIDs, frames re-wrapped), `change(ds,
    level)` applied to each level."""
    target = out / name
    target.mkdir(parents=True)
    for level, path in enumerate(cmu_files(real)):
        if levels is not None and level not in levels:
            continue
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid(name, "series")
        ds.SOPInstanceUID = uid(name, "instance", level)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        set_frames(ds, frames_of(ds))
        if change is not None:
            change(ds, level)
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def at_level_0(change: Change) -> Change:
    def apply(ds: pydicom.Dataset, level: int) -> None:
        if level == 0:
            change(ds, level)

    return apply


def long_uids(ds: pydicom.Dataset, level: int) -> None:
    """As the pathml TCGA file: UIDs of 65-66 characters and no ImageType."""
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498." + "8" * 39  # 65 characters
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498." + f"{level:02d}" + "7" * 38  # 66
    del ds.ImageType


def sop(value: str) -> Change:
    def change(ds: pydicom.Dataset, level: int) -> None:
        ds.SOPInstanceUID = value

    return at_level_0(change)


def no_series_uid(ds: pydicom.Dataset, level: int) -> None:
    del ds.SeriesInstanceUID


ABSENT = (7, 12)  # 0-based row-major frames a sparse copy leaves out


def sparse(keep_order: bool, off_grid: bool = False) -> Change:
    """Level 0 as TILED_SPARSE with per-frame positions: every frame in row-major order
    (`keep_order`), or frames ABSENT left out and the rest stored in reverse; `off_grid` moves
    the first stored frame 7 px off the frame grid."""

    def change(ds: pydicom.Dataset, level: int) -> None:
        frames = frames_of(ds)
        across = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
        order = list(range(len(frames)))
        if not keep_order:
            order = [k for k in reversed(order) if k not in ABSENT]
        per_frame = []
        for k in order:
            row, col = divmod(k, across)
            position = pydicom.Dataset()
            shift = 7 if off_grid and not per_frame else 0
            position.ColumnPositionInTotalImagePixelMatrix = col * int(ds.Columns) + 1 + shift
            position.RowPositionInTotalImagePixelMatrix = row * int(ds.Rows) + 1
            position.XOffsetInSlideCoordinateSystem = 0
            position.YOffsetInSlideCoordinateSystem = 0
            item = pydicom.Dataset()
            item.PlanePositionSlideSequence = Sequence([position])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.DimensionOrganizationType = "TILED_SPARSE"
        set_frames(ds, [frames[k] for k in order])

    return at_level_0(change)


def number_of_frames(value: int) -> Change:
    def change(ds: pydicom.Dataset, level: int) -> None:
        ds.NumberOfFrames = value

    return at_level_0(change)


def matrix_columns(value: int) -> Change:
    def change(ds: pydicom.Dataset, level: int) -> None:
        ds.TotalPixelMatrixColumns = value

    return at_level_0(change)


def fewer_stored_frames(ds: pydicom.Dataset, level: int) -> None:
    """PixelData holds 24 frames while the header (and its grid) says 30."""
    frames = frames_of(ds)
    set_frames(ds, frames[:24], number=len(frames))


def gray16(ds: pydicom.Dataset, level: int) -> None:
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PhotometricInterpretation = "MONOCHROME2"


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def white_frames(ds: pydicom.Dataset, level: int) -> None:
    white = _jpeg(np.full((int(ds.Rows), int(ds.Columns), 3), 242, np.uint8))
    set_frames(ds, [white] * int(ds.NumberOfFrames))


def second_level_0(real: Path, slide: Path, name: str) -> None:
    """A second, blank instance claiming level 0 of an existing copy (same series)."""
    ds = pydicom.dcmread(cmu_files(real)[0])
    ds.SeriesInstanceUID = uid(name, "series")
    ds.SOPInstanceUID = uid(name, "instance", "0-blank")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    white_frames(ds, 0)
    ds.save_as(slide / "level-0-blank.dcm", enforce_file_format=True)


def truncate_level_0(slide: Path) -> None:
    path = sorted(slide.glob("level-0-*.dcm"))[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def tiny(real: Path, out: Path, name: str, side: int = 50) -> Path:
    """One level of side x side px cut from the CMU slide's first 20x frame."""
    target = out / name
    target.mkdir(parents=True)
    ds = pydicom.dcmread(cmu_files(real)[0])
    rgb = cv2.cvtColor(
        cv2.imdecode(np.frombuffer(frames_of(ds)[0], np.uint8), 1), cv2.COLOR_BGR2RGB
    )
    ds.SeriesInstanceUID = uid(name, "series")
    ds.SOPInstanceUID = uid(name, "instance", 0)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = side
    set_frames(ds, [_jpeg(np.ascontiguousarray(rgb[:side, :side]))])
    ds.save_as(target / "level-0.dcm", enforce_file_format=True)
    return target


def odd_files(folder: Path) -> None:
    """A named pipe called *.dcm (opening it would block) and a symbolic link loop."""
    os.mkfifo(folder / "pipe.dcm")
    os.symlink(folder, folder / "loop")
