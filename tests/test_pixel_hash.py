"""The streamed SHA-512 of a PixelData value (transforms/dicom_io/pixel_hash.py), checked against
hashlib.sha512 of pydicom's `ds.PixelData` for the same instances read three ways: from the
local file, from gcp-storage-emulator (gs://) and from Orthanc (DICOMweb), for encapsulated
(the JPEG sample levels) and native pixel data; and its peak memory, measured with tracemalloc,
bounded by the block size whatever the instance size."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from tests import servers
from transforms.dicom_io import pixel_hash
from transforms.dicom_io.dicomweb import instance_url
from transforms.sources.dicom_files import VL_WSI_SOP_CLASS

MIB = 1024 * 1024


def _native_instance(path: Path, frames: int, seed: int) -> Path:
    """An uncompressed VL WSI instance of `frames` 256 x 256 RGB frames (192 KiB each)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = VL_WSI_SOP_CLASS
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = VL_WSI_SOP_CLASS
    ds.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["pixel-hash-study"])
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["pixel-hash", str(seed)])
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["pixel-hash-sop", str(seed)])
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "SM"
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PhotometricInterpretation, ds.PixelRepresentation, ds.PlanarConfiguration = "RGB", 0, 0
    ds.NumberOfFrames = frames
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 256, frames * 256 * 256 * 3, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def instances(sample_slides, tmp_path_factory) -> list[Path]:
    """Encapsulated (JPEG) sample levels and one native instance."""
    folder = tmp_path_factory.mktemp("native")
    return [
        *sorted((sample_slides / "small-40x").glob("*.dcm")),
        _native_instance(folder / "native.dcm", 12, seed=1),
    ]


def _expected(path: Path) -> str:
    return hashlib.sha512(pydicom.dcmread(path).PixelData).hexdigest()


def test_streamed_sha512_equals_pydicom_pixeldata_local_gs_and_dicomweb(
    instances, tmp_path_factory
):
    expected = {path: _expected(path) for path in instances}
    assert len(set(expected.values())) == len(instances)  # the instances differ
    block = 256 * 1024  # smaller than most values: items and values span blocks
    for path in instances:
        digest, read = pixel_hash.pixeldata_sha512(str(path), block=block)
        assert digest == expected[path], path
        assert read >= len(pydicom.dcmread(path).PixelData)

    objects = {f"hash/{path.parent.name}-{path.name}": path for path in instances}
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs")):
        servers.upload("hash-test", objects)
        for name, path in objects.items():
            digest, _ = pixel_hash.pixeldata_sha512(f"gs://hash-test/{name}", block=block)
            assert digest == expected[path], name

    with servers.orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        servers.stow(url, instances)
        for path in instances:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uri = instance_url(url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            digest, received = pixel_hash.pixeldata_sha512(uri, auth="none", block=block)
            assert digest == expected[path], uri
            assert received > 0


def test_a_truncated_value_is_a_read_error_not_a_wrong_hash(instances, tmp_path):
    data = instances[0].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(pixel_hash.SlideError, match="PixelData"):
        pixel_hash.pixeldata_sha512(str(cut), block=64 * 1024)


def _peak(function, *args) -> int:
    tracemalloc.start()
    try:
        function(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_bounded_by_the_block_not_the_instance(tmp_path):
    small = _native_instance(tmp_path / "small.dcm", 20, seed=2)  # ~3.8 MiB of pixels
    large = _native_instance(tmp_path / "large.dcm", 320, seed=3)  # ~60 MiB of pixels
    block = MIB

    def from_file(path: Path) -> None:
        pixel_hash.pixeldata_sha512(str(path), block=block)

    def from_stream(path: Path) -> None:  # the DICOMweb path: header parsed from the stream
        def chunks():
            with open(path, "rb") as handle:
                yield from iter(lambda: handle.read(block), b"")

        pixel_hash.sha512_of_stream(chunks())

    for function in (from_file, from_stream):
        peaks = [_peak(function, path) for path in (small, large)]
        assert max(peaks) < 6 * block, (function.__name__, peaks)  # a few blocks
        assert peaks[1] < peaks[0] + block, (function.__name__, peaks)  # not growing with size
    # and the hashes are right for the large one
    assert pixel_hash.pixeldata_sha512(str(large), block=block)[0] == _expected(large)
