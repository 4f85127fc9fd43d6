"""A large synthetic DICOM WSI for the benchmark, written in seconds from already-encoded frames.

`transforms.samples.slides` renders every frame, which for a 100k-patch slide would take most of
an hour on 2 cores. Here the 20x level is tiled with JPEG frames taken from a rendered sample
slide (its tissue frames, in a fixed order: patches straddle different frame pairs, so their
content varies), and the ~5 um mask level is one tissue-coloured frame repeated, so every grid
cell is tissue. Both levels are complete DICOM VL Whole Slide Microscopy instances (TILED_FULL,
JPEG baseline, Basic Offset Table) with the sample slides' attributes; the PixelData element is
streamed to disk, so writing never holds the level in memory.
"""

from __future__ import annotations

import pathlib
import struct

import numpy as np
import pydicom
from pydicom.encaps import generate_frames

from transforms.samples import slides as sample_slides
from transforms.samples.slides import FRAME_SIZE, SampleSpec

PATCH = 224
MASK_DOWNSAMPLE = 10  # 0.5 um -> 5 um, the mask level the pipeline looks for
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)[:4]
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_TISSUE_RGB = (182, 120, 168)  # a cytoplasm colour of sample_slides: V = 182 <= 204


def tissue_frames(level0: pathlib.Path, count: int, min_bytes: int = 15000) -> list[bytes]:
    """`count` encoded frames of a sample slide's finest level that hold tissue (the larger
    ones: background frames compress to ~5 kB)."""
    ds = pydicom.dcmread(level0)
    frames = [
        bytes(f)
        for f in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
        if len(f) >= min_bytes
    ]
    if not frames:
        raise ValueError(f"{level0} has no frame of {min_bytes} bytes or more")
    return frames[:count]


def _solid_frame() -> bytes:
    rgb = np.empty((FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    rgb[...] = _TISSUE_RGB
    return sample_slides._encode_frame(rgb)


def _write_level(path: pathlib.Path, ds: pydicom.Dataset, frames: list[bytes], n: int) -> None:
    """Writes `ds` and an encapsulated PixelData of frames[k % len(frames)], k < n."""
    padded = [f + b"\0" * (len(f) % 2) for f in frames]
    sizes = np.array([8 + len(f) for f in padded], np.int64)
    item_sizes = sizes[np.arange(n) % len(padded)]
    offsets = np.concatenate([[0], np.cumsum(item_sizes)[:-1]])
    if offsets[-1] >= 2**32:
        raise ValueError("level too large for a 32-bit Basic Offset Table")
    partial = path.with_name(path.name + ".partial")
    ds.save_as(partial, enforce_file_format=True)
    with open(partial, "ab") as out:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        out.write(_ITEM + struct.pack("<I", 4 * n))
        out.write(offsets.astype("<u4").tobytes())
        for k in range(n):
            frame = padded[k % len(padded)]
            out.write(_ITEM + struct.pack("<I", len(frame)))
            out.write(frame)
        out.write(_SEQUENCE_END)
    partial.replace(path)


def write_large_slide(
    out_dir: pathlib.Path, patches: int, frames: list[bytes], name: str | None = None
) -> list[pathlib.Path]:
    """A square 20x slide (0.5 um/px) whose grid has at least `patches` cells, all tissue.
    `name` (default bench-{patches}) decides its folder and UIDs: other names, other slides."""
    side = (int(np.ceil(np.sqrt(patches))) * PATCH + PATCH // 2) // 20 * 20 + 20
    spec = SampleSpec(
        name=name or f"bench-{patches}",
        native_spacing_mm=0.0005,
        width=side,
        height=side,
        level_downsamples=(1, MASK_DOWNSAMPLE),
        seed=0,
    )
    slide_dir = out_dir / spec.name
    slide_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for level, level_frames in ((0, frames), (1, [_solid_frame()])):
        width, height = spec.level_size(level)
        n = -(-width // FRAME_SIZE) * -(-height // FRAME_SIZE)
        compressed = sum(len(level_frames[k % len(level_frames)]) for k in range(n))
        ds = sample_slides._level_dataset(spec, level, n, compressed)
        path = slide_dir / f"level-{level}.dcm"
        _write_level(path, ds, level_frames, n)
        paths.append(path)
    return paths
