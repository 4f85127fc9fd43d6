"""The GPU frame decode hook (transforms/dicom_io/gpu_decode.py) on the real Camelyon frames.

Tolerance, GPU against the CPU decoder (cv2.imdecode, what the byte-range reader uses):
- JPEG 2000: these frames are reversible (5/3 wavelet) code streams, so the pixels must be
  identical (max difference 0);
- JPEG baseline (YBR_FULL_422): decoders may differ in IDCT rounding and chroma upsampling, so
  per frame the mean absolute difference must be <= 1.5 levels, 99.9% of values within 8
  levels, and PSNR >= 40 dB.
The GPU comparison skips where no GPU decoder is available (no nvImageCodec or no GPU); the
fallback tests run everywhere and check the CPU path's pixels.
"""

from __future__ import annotations

import types

import cv2
import numpy as np
import pydicom
import pytest
from ez_wsi_dicomweb.ml_toolkit import dicom_path
from pydicom.encaps import generate_frames

from transforms.dicom_io import byte_ranges, gpu_decode

CASES = [
    ("camelyon_jpeg_multiframe.dcm", pydicom.uid.JPEGBaseline8Bit),
    ("camelyon_jpeg2000_multiframe.dcm", pydicom.uid.JPEG2000Lossless),
]


def _frames(path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def _cv2(frame: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR_RGB)


def _range_frames(path) -> list[np.ndarray]:
    """Every frame decoded by the byte-range reader (the call site of the hook)."""
    reader = byte_ranges.DicomInstanceReader(str(path))
    files = byte_ranges.RangeDicomFiles([reader])
    study, series, sop = reader.uid_tuple
    instance = dicom_path.FromString(
        f"https://mock_url/studies/{study}/series/{series}/instances/{sop}"
    )
    return [files.get_decoded_frame_image(instance, n) for n in range(1, reader.grid_frames + 1)]


@pytest.fixture
def auto_mode():
    gpu_decode.set_mode("auto")
    yield
    gpu_decode.set_mode("auto")


@pytest.mark.parametrize("name,syntax", CASES)
def test_gpu_pixels_match_cpu_decoder(real_slides, auto_mode, name, syntax):
    if not gpu_decode.available():
        pytest.skip(f"no GPU frame decoder here: {gpu_decode.status()}")
    frames = _frames(real_slides / name)
    gpu = gpu_decode.decode_frames(frames, syntax)
    assert gpu is not None and len(gpu) == len(frames)
    for n, (frame, pixels) in enumerate(zip(frames, gpu, strict=True), 1):
        cpu = _cv2(frame)
        assert pixels.shape == cpu.shape and pixels.dtype == np.uint8, f"frame {n}"
        diff = np.abs(pixels.astype(np.int16) - cpu.astype(np.int16))
        if syntax == pydicom.uid.JPEG2000Lossless:
            assert diff.max() == 0, f"frame {n}: reversible JPEG 2000 must decode exactly"
        else:
            mse = float(np.mean(diff.astype(np.float64) ** 2))
            psnr = 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)
            assert diff.mean() <= 1.5, f"frame {n}: mean |diff| {diff.mean():.2f}"
            assert np.percentile(diff, 99.9) <= 8, f"frame {n}"
            assert psnr >= 40, f"frame {n}: PSNR {psnr:.1f} dB"
    # and through the reader: the hook's pixels are what the pipeline gets
    through_reader = _range_frames(real_slides / name)
    assert all(np.array_equal(a, b) for a, b in zip(through_reader, gpu, strict=True))


@pytest.mark.parametrize("name,syntax", CASES)
def test_fallback_without_gpu_gives_cpu_pixels(real_slides, auto_mode, name, syntax):
    if gpu_decode.available():
        pytest.skip("a GPU frame decoder is available here; the fallback is not taken")
    assert gpu_decode.status().startswith("unavailable: ")
    frames = _frames(real_slides / name)
    assert gpu_decode.decode_frames(frames, syntax) is None
    decoded = _range_frames(real_slides / name)
    assert len(decoded) == len(frames)
    for n, (frame, pixels) in enumerate(zip(frames, decoded, strict=True), 1):
        assert np.array_equal(pixels, _cv2(frame)), f"frame {n}"


class _FakeImage:
    def __init__(self, array):
        self._array = array

    def cpu(self):
        return self._array


class _FakeDecoder:
    def __init__(self):
        self.calls = 0

    def decode(self, frames, params=None):
        self.calls += 1
        assert params.color_spec == "RGB"
        return [_FakeImage(np.full((256, 256, 3), 7, np.uint8)) for _ in frames]


@pytest.fixture
def fake_gpu(monkeypatch):
    """A stand-in nvImageCodec decoder, so the call site's switch is tested without a GPU."""
    module = types.SimpleNamespace(
        DecodeParams=lambda **kw: types.SimpleNamespace(**kw),
        ColorSpec=types.SimpleNamespace(RGB="RGB"),
    )
    decoder = _FakeDecoder()
    monkeypatch.setattr(gpu_decode, "_decoder", lambda: ((module, decoder), "fake"))
    yield decoder
    gpu_decode.set_mode("auto")


def test_reader_uses_the_gpu_decoder_when_available_and_not_when_off(real_slides, fake_gpu):
    path = real_slides / "camelyon_jpeg_multiframe.dcm"
    gpu_decode.set_mode("auto")
    assert gpu_decode.available()
    assert all((frame == 7).all() for frame in _range_frames(path))
    assert fake_gpu.calls == 15
    gpu_decode.set_mode("off")
    assert not gpu_decode.available() and gpu_decode.status().startswith("off")
    frames = _frames(path)
    assert gpu_decode.decode_frames(frames, pydicom.uid.JPEGBaseline8Bit) is None
    decoded = _range_frames(path)
    assert fake_gpu.calls == 15
    assert all(np.array_equal(a, _cv2(b)) for a, b in zip(decoded, frames, strict=True))


def test_other_syntaxes_and_bad_modes_stay_on_the_cpu(fake_gpu):
    gpu_decode.set_mode("auto")
    assert gpu_decode.decode_frames([b"x"], pydicom.uid.JPEGLSLossless) is None
    assert gpu_decode.decode_frames([b"x"], pydicom.uid.ExplicitVRLittleEndian) is None
    assert fake_gpu.calls == 0
    with pytest.raises(ValueError, match=r"read\.gpu_decode"):
        gpu_decode.set_mode("on")
