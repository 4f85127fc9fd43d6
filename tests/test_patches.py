"""Patch reading: pixels equal a plain region read and crop; every frame is decoded once."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from ez_wsi_dicomweb import dicom_slide

from transforms import patches
from transforms.dicom_io import byte_ranges
from transforms.plan import PlanParams, plan_slide
from transforms.sources.dicom_files import enumerate_dicom_folder

PATCH = 224


@pytest.fixture(scope="module")
def plans(sample_slides):
    """name -> (record, plan, chunks) of both samples with the default chunks."""
    out = {}
    for record in enumerate_dicom_folder(sample_slides):
        plan = plan_slide(record, PlanParams())
        chunks = plan.chunks
        out[record.files[0][1].split("/")[-2]] = (record, plan, chunks)
    return out


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts every frame the slide reader decodes (local slides are byte-range slides: their
    one decoding method, wrapped)."""
    calls = [0]
    decode = byte_ranges.RangeDicomFiles.get_decoded_frame_image

    def counting(*args, **kwargs):
        calls[0] += 1
        return decode(*args, **kwargs)

    monkeypatch.setattr(byte_ranges.RangeDicomFiles, "get_decoded_frame_image", counting)
    return calls


def _fresh_slide(record) -> tuple[dicom_slide.LocalDicomSlide, object]:
    """A newly opened slide, as the pipeline opens it (no frames cached by other tests)."""
    slide = patches.open_slide.__wrapped__(record.files)
    return slide, patches.level_of(slide, record.sop_instance_uid)


def _frames_needed(coords: np.ndarray, downsample: float, level) -> set[tuple[int, int]]:
    """(column, row) of every frame the native footprints of these patches overlap."""
    native = round(PATCH * downsample)
    needed = set()
    for x, y in np.floor(np.asarray(coords) * downsample).astype(int):
        x, y = min(x, level.width - native), min(y, level.height - native)
        for row in range(y // level.frame_height, (y + native - 1) // level.frame_height + 1):
            for col in range(x // level.frame_width, (x + native - 1) // level.frame_width + 1):
                needed.add((col, row))
    return needed


def _region_reference(slide, level, coords: np.ndarray, downsample: float) -> np.ndarray:
    """Patches by the straightforward route: one ez-wsi region read, crop, resize per patch."""
    native = round(PATCH * downsample)
    starts = np.floor(np.asarray(coords) * downsample).astype(int)
    x0, y0 = starts.min(axis=0)
    x1, y1 = starts.max(axis=0) + native
    region = slide.get_patch(level, int(x0), int(y0), int(x1 - x0), int(y1 - y0)).image_bytes()
    out = []
    for sx, sy in starts - [x0, y0]:
        crop = region[sy : sy + native, sx : sx + native]
        if native != PATCH:
            crop = cv2.resize(crop, (PATCH, PATCH), interpolation=cv2.INTER_AREA)
        out.append(crop)
    return np.stack(out)


@pytest.mark.parametrize("name", ["medium-20x", "small-40x"])
def test_patches_equal_region_read_and_crop(plans, name):
    record, _, chunks = plans[name]
    slide, level = _fresh_slide(record)
    for chunk in chunks[:3] + chunks[-2:]:
        got = patches.read_patches(
            slide, level, chunk.coords, record.levels.downsample, PATCH, patches.FrameCache()
        )
        want = _region_reference(slide, level, chunk.coords, record.levels.downsample)
        assert got.dtype == np.uint8 and got.shape == (len(chunk.coords), PATCH, PATCH, 3)
        assert np.array_equal(got, want)


def test_patch_pixels_do_not_depend_on_the_chunk(plans):
    record, _, chunks = plans["small-40x"]
    slide, level = _fresh_slide(record)
    coords = chunks[0].coords
    together = patches.read_patches(slide, level, coords, 2.0, PATCH, patches.FrameCache())
    alone = [
        patches.read_patches(slide, level, coords[k : k + 1], 2.0, PATCH, patches.FrameCache())
        for k in (0, len(coords) // 2, len(coords) - 1)
    ]
    for k, one in zip((0, len(coords) // 2, len(coords) - 1), alone, strict=True):
        assert np.array_equal(together[k], one[0])


@pytest.mark.parametrize("name", ["medium-20x", "small-40x"])
def test_default_chunks_decode_each_frame_once_even_without_a_cache(plans, decodes, name):
    """16 x 16 cell chunks end on frame borders (16 x 224 = 14 x 256 at 20x, x2 at 40x)."""
    record, plan, chunks = plans[name]
    slide, level = _fresh_slide(record)
    no_cache = patches.FrameCache(max_bytes=0)
    shuffled = list(chunks)
    random.Random(0).shuffle(shuffled)
    for chunk in shuffled:
        patches.read_patches(slide, level, chunk.coords, record.levels.downsample, PATCH, no_cache)
    needed = _frames_needed(plan.coords, record.levels.downsample, level)
    assert decodes[0] == no_cache.decodes == len(needed)
    assert no_cache.bytes == 0


@pytest.mark.parametrize("chunk_size", [9, 30])
def test_chunks_across_frame_borders_decode_each_frame_once_with_the_cache(
    plans, decodes, chunk_size
):
    """3 x 3 and 5 x 5 cell chunks (672 / 1120 px) share frames with their neighbours: the
    worker's frame cache serves the second chunk, in any order, when the frames fit."""
    record, plan, _ = plans["medium-20x"]
    params = PlanParams(chunk_size=chunk_size)
    side = patches.block_side(params.chunk_size)
    order = patches.chunk_order(plan.coords // PATCH, side)
    random.Random(1).shuffle(order)
    slide, level = _fresh_slide(record)
    cache = patches.FrameCache(max_bytes=1 << 30)
    for rows in order:
        patches.read_patches(slide, level, plan.coords[rows], 1.0, PATCH, cache)
    needed = _frames_needed(plan.coords, 1.0, level)
    assert decodes[0] == cache.decodes == len(needed)
    assert cache.hits > 0


def test_frame_cache_stays_within_its_bound_and_changes_no_pixel(plans):
    record, _, chunks = plans["medium-20x"]
    slide, level = _fresh_slide(record)
    frame_bytes = level.frame_width * level.frame_height * 3
    small = patches.FrameCache(max_bytes=10 * frame_bytes)
    large = patches.FrameCache(max_bytes=1 << 30)
    for chunk in chunks[:6]:
        a = patches.read_patches(slide, level, chunk.coords, 1.0, PATCH, small)
        b = patches.read_patches(slide, level, chunk.coords, 1.0, PATCH, large)
        assert np.array_equal(a, b)
        assert small.bytes <= small.max_bytes
    assert large.bytes > small.max_bytes


def test_frame_cache_keeps_the_most_recently_used():
    cache = patches.FrameCache(max_bytes=3 * 100)
    frame = lambda: np.zeros(100, np.uint8)  # noqa: E731
    for key in "abc":
        cache.decode((key,), frame, keep=True)
    assert cache.get(("a",)) is not None  # a is now the most recent
    cache.decode(("d",), frame, keep=True)  # evicts b
    assert cache.get(("b",)) is None and cache.get(("a",)) is not None
    cache.decode(("e",), frame, keep=False)
    assert cache.get(("e",)) is None
    assert cache.decodes == 5 and cache.bytes == 300
    with pytest.raises(ValueError):
        cache.get(("a",))[0] = 1  # cached frames are read-only


def test_empty_chunk_reads_nothing(plans, decodes):
    record, _, _ = plans["small-40x"]
    slide, level = _fresh_slide(record)
    out = patches.read_patches(slide, level, np.zeros((0, 2), np.int64), 2.0, PATCH)
    assert out.shape == (0, PATCH, PATCH, 3) and decodes[0] == 0


def test_a_slide_leaves_no_frames_in_the_worker_cache(sample_slides):
    """Frames kept for a neighbouring chunk are used while the slide is read, then dropped:
    the worker's cache does not fill with finished slides over a run."""
    from models.signature import EMBEDDING_DIM
    from transforms import stages

    (record,) = enumerate_dicom_folder(sample_slides / "medium-20x")
    plan = plan_slide(record, PlanParams(chunk_size=9))  # chunks that share frames
    patches.FRAMES.clear()
    held = []

    def embed(pixels):  # what the worker's cache holds while the slide is read
        held.append(patches.FRAMES.bytes)
        return np.zeros((len(pixels), EMBEDDING_DIM), np.float32)

    stages.embed_plan(plan, embed)
    assert max(held) > 0 and patches.FRAMES.hits > 0
    assert patches.FRAMES.bytes == 0 and not patches.FRAMES._frames
