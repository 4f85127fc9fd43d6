"""Frame decoding (transforms/dicom_io/codecs.py) and read.reduced_decode, on real pixels.

JPEG 2000 frames decode to exactly ez-wsi's pixels; the thread-pooled chunk decode gives the
same patches and reports a bad frame as a DECODE_ERROR; reduced decoding of a 40x level halves
the frames in the codec, changes the parameter hash and moves patch pixels only a little.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pydicom
import pytest
from ez_wsi_dicomweb import dicom_frame_decoder
from pydicom.encaps import generate_frames

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pipeline.config import PipelineConfig, load_config, parameter_hash
from scripts import bench_decoders
from transforms import patches
from transforms.dicom_io import byte_ranges, codecs, openjpeg_reduce
from transforms.errors import ReasonCode, SlideError

REAL = bench_decoders.REAL
needs_real = pytest.mark.skipif(
    not (bench_decoders.CAMELYON_J2K.exists() and bench_decoders.CMU_LEVEL0.exists()),
    reason=f"real test files absent from {REAL} (see its README)",
)


def _frames(path: pathlib.Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return [
        bytes(f) for f in generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
    ]


@needs_real
def test_jpeg2000_frames_decode_to_ez_wsis_pixels_and_reduce_in_the_codec():
    syntax = "1.2.840.10008.1.2.4.90"
    diffs = []
    for data in _frames(bench_decoders.CAMELYON_J2K):
        ours = codecs.decode_frame(data, syntax)
        theirs = dicom_frame_decoder.decode_dicom_compressed_frame_bytes(data, syntax)
        assert ours.shape == (256, 256, 3) and np.array_equal(ours, theirs)
        assert np.array_equal(openjpeg_reduce.decode(data), ours)  # the same library, by ctypes
        half = codecs.decode_frame(data, syntax, reduce=1)
        assert half.shape == (128, 128, 3)
        # the wavelet's low band, not a box filter: close to the 2 x 2 means, not equal
        diffs.append(np.abs(half.astype(int) - codecs.halve(ours)).mean())
    assert 0 < np.mean(diffs) < 4, diffs
    assert codecs.decode_frame(b"", "1.2.840.10008.1.2.1") is None  # not handled here
    with pytest.raises(ValueError):
        codecs.decode_frame(b"\xff\x4f\xff\x51 not a codestream", syntax)


@needs_real
def test_jpeg2000_patches_on_the_thread_pool_are_the_frames_pixels(monkeypatch):
    monkeypatch.setattr(patches, "DECODE_THREADS", 2)
    slide = byte_ranges.open_range_slide([str(bench_decoders.CAMELYON_J2K)])
    (level,) = slide.levels
    frames = [
        dicom_frame_decoder.decode_dicom_compressed_frame_bytes(f, "1.2.840.10008.1.2.4.90")
        for f in _frames(bench_decoders.CAMELYON_J2K)
    ]
    per_row = -(-level.width // 256)
    mosaic = np.concatenate(
        [np.concatenate(frames[r * per_row : (r + 1) * per_row], axis=1) for r in range(3)]
    )
    coords = np.array([[x, y] for y in (0, 300, 500) for x in (0, 224, 700, 1400)])
    cache = patches.FrameCache()
    got = patches.read_patches(slide, level, coords, 1.0, 224, cache)
    for (x, y), patch in zip(coords, got, strict=True):
        assert np.array_equal(patch, mosaic[y : y + 224, x : x + 224])
    assert cache.decodes == len({(x // 256, y // 256) for x0, y0 in coords
                                 for x in (x0, x0 + 223) for y in (y0, y0 + 223)})  # fmt: skip


def _cmu_40x(tmp_path: pathlib.Path, kind: str, corrupt: int | None = None) -> pathlib.Path:
    """A 2048 x 2048 region of the CMU scan's pixels labelled 40x (the bench's 40x source), as
    one DICOM level of 256 px frames (`corrupt`: that frame's bytes replaced by garbage)."""
    rgb = bench_decoders.cmu_pixels("40x")[512:2560, 0:2048]
    frames = [bench_decoders.encode(t, kind) for t in bench_decoders.tiles(rgb, 256)]
    if corrupt is not None:
        frames[corrupt] = b"\xff\x4f\xff\x51" + b"\x00" * 200
    path = tmp_path / f"{kind}.dcm"
    return bench_decoders.write_slide(path, rgb.shape, frames, 256, 0.0002495, kind)


def _read(path: pathlib.Path, reduced: bool) -> tuple[np.ndarray, patches.FrameCache]:
    slide = byte_ranges.open_range_slide([str(path)])
    (level,) = slide.levels
    coords = np.array([[x, y] for y in range(0, 1024 - 223, 224) for x in range(0, 801, 224)])
    cache = patches.FrameCache()
    return patches.read_patches(slide, level, coords, 2.0, 224, cache, reduced=reduced), cache


@needs_real
@pytest.mark.parametrize("kind", ["jpeg", "j2k-lossy"])
def test_reduced_decode_differs_little_on_real_tissue(tmp_path, kind):
    path = _cmu_40x(tmp_path, kind)
    exact, exact_cache = _read(path, False)
    reduced, reduced_cache = _read(path, True)
    assert exact.shape == reduced.shape == (16, 224, 224, 3)
    # 4 x 4 patches of 448 native px from (0, 0): native [0, 1792)^2, 7 x 7 frames, each once
    assert exact_cache.decodes == reduced_cache.decodes == 49
    assert {f.shape for f in reduced_cache._frames.values()} <= {(128, 128, 3)}
    diff = np.abs(exact.astype(int) - reduced)
    # JPEG's 4 x 4 IDCT of the low coefficients is nearly the 2 x 2 mean (~0.5 of 255 here);
    # JPEG 2000's level-1 low band is the wavelet's 9/7 low-pass, sharper than a box (~5)
    assert 0 < diff.mean() < {"jpeg": 1.5, "j2k-lossy": 7}[kind], diff.mean()
    assert exact.std() > 20  # tissue, not blank background
    # 20x sources are never reduced: the same pixels with or without the option
    slide = byte_ranges.open_range_slide([str(path)])
    (level,) = slide.levels
    coords = np.array([[0, 0], [500, 700]])
    assert np.array_equal(
        patches.read_patches(slide, level, coords, 1.0, 224, patches.FrameCache()),
        patches.read_patches(slide, level, coords, 1.0, 224, patches.FrameCache(), reduced=True),
    )


@needs_real
def test_a_frame_that_does_not_decode_on_the_pool_is_a_decode_error(tmp_path, monkeypatch):
    monkeypatch.setattr(patches, "DECODE_THREADS", 2)
    path = _cmu_40x(tmp_path, "j2k-lossless", corrupt=9)
    for reduced in (False, True):
        with pytest.raises(SlideError) as err:
            _read(path, reduced)
        assert err.value.reason == ReasonCode.DECODE_ERROR


def test_reduced_decode_is_in_the_parameter_hash_and_metadata_parameters():
    base = PipelineConfig().output_params("stub-tiny", "v1")
    reduced = load_config(None, {"read.reduced_decode": True}).output_params("stub-tiny", "v1")
    assert base["reduced_decode"] is False and reduced["reduced_decode"] is True
    assert parameter_hash(base) != parameter_hash(reduced)
    with pytest.raises(ValueError):
        load_config(None, {"read.reduced_decode": "yes"})


@needs_real
def test_without_libopenjp2_reduced_jpeg2000_is_the_full_decode_halved(monkeypatch):
    data = _frames(bench_decoders.CAMELYON_J2K)[5]
    syntax = "1.2.840.10008.1.2.4.90"
    monkeypatch.setattr(openjpeg_reduce, "available", lambda: False)
    full = codecs.decode_frame(data, syntax)
    assert np.array_equal(codecs.decode_frame(data, syntax, reduce=1), codecs.halve(full))


def test_read_reduced_decode_reaches_the_pipeline_reads(sample_slides, tmp_path):
    """read.reduced_decode travels config -> DAG -> the slide handler -> read_chunk, and there
    changes the 40x pixels only a little (the codec's half-size decode vs INTER_AREA)."""
    import apache_beam as beam

    from models.handler import PathFoundationModelHandler
    from pipeline import dag
    from transforms import stages
    from transforms.plan import PlanParams, plan_slide
    from transforms.sources.dicom_files import enumerate_dicom_folder

    (record,) = enumerate_dicom_folder(sample_slides / "small-40x")
    chunks = plan_slide(record, PlanParams()).chunks
    exact = stages.read_chunk(chunks[0])
    reduced = stages.read_chunk(chunks[0], stages.ReadSpec(reduced_decode=True))
    difference = np.abs(exact.astype(np.int16) - reduced.astype(np.int16))
    assert difference.any() and difference.mean() < 3

    cfg = load_config(None, {
        "read.reduced_decode": True, "output_root": str(tmp_path),
        "source.input": str(sample_slides / "small-40x"),
    })  # fmt: skip
    handler = PathFoundationModelHandler("stub-tiny", cache_dir=tmp_path / "models")
    built = {}
    real = stages.EmbedSlides.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        built["handler"] = self._slides

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.EmbedSlides, "__init__", spy)
        dag.build(beam.Pipeline(), cfg, handler, "run-1")
    assert built["handler"]._spec.reduced_decode is True
