"""color.icc_profile: patches keep their stored values by default; `srgb` converts them from
the slide's ICC profile, and leaves slides without one as stored."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pydicom
import pytest
from ez_wsi_dicomweb import dicom_slide
from PIL import Image, ImageCms

from pipeline.config import load_config, parameter_hash
from transforms import patches, stages
from transforms.plan import PlanParams, plan_slide
from transforms.sources.dicom_files import enumerate_dicom_folder


@pytest.fixture(scope="module")
def adobe_slide(sample_slides, tmp_path_factory):
    """small-40x with an Adobe RGB (1998) ICC profile in every level's optical path."""
    folder = tmp_path_factory.mktemp("icc") / "small-40x-adobe"
    shutil.copytree(sample_slides / "small-40x", folder)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.OpticalPathSequence[0].ICCProfile = dicom_slide.get_adobergb_icc_profile_bytes()
        ds.save_as(path)
    return folder


def _first_chunk(folder):
    (record,) = enumerate_dicom_folder(folder)
    chunks = plan_slide(record, PlanParams()).chunks
    return chunks[0]


def _read(chunk, icc_profile):
    return stages.read_chunk(chunk, stages.ReadSpec(icc_profile=icc_profile))


def test_stored_values_by_default_and_srgb_from_the_profile(sample_slides, adobe_slide):
    patches.open_slide.cache_clear()
    patches.srgb_transform.cache_clear()
    chunk, plain_chunk = _first_chunk(adobe_slide), _first_chunk(sample_slides / "small-40x")
    stored = _read(chunk, "none")
    assert np.array_equal(stored, _read(plain_chunk, "none"))  # the profile alone changes nothing

    converted = _read(chunk, "srgb")
    assert converted.shape == stored.shape and converted.dtype == np.uint8
    assert np.abs(converted.astype(int) - stored.astype(int)).mean() > 1  # Adobe RGB != sRGB
    # The same conversion done independently, patch by patch, with Pillow's LittleCMS.
    source = ImageCms.ImageCmsProfile(io.BytesIO(dicom_slide.get_adobergb_icc_profile_bytes()))
    target = ImageCms.ImageCmsProfile(io.BytesIO(dicom_slide.get_srgb_icc_profile_bytes()))
    for k in (0, len(stored) // 2, len(stored) - 1):
        expected = ImageCms.profileToProfile(
            Image.fromarray(stored[k]), source, target, ImageCms.Intent.PERCEPTUAL
        )
        assert np.array_equal(converted[k], np.asarray(expected))

    # A slide without a profile is left as stored.
    assert np.array_equal(_read(plain_chunk, "srgb"), _read(plain_chunk, "none"))
    patches.open_slide.cache_clear()
    patches.srgb_transform.cache_clear()


def test_the_option_is_validated_and_part_of_the_parameter_hash():
    default = load_config(None)
    srgb = load_config(None, {"color.icc_profile": "srgb"})
    assert default.color.icc_profile == "none"
    assert parameter_hash(default.output_params("m", "1")) != parameter_hash(
        srgb.output_params("m", "1")
    )
    with pytest.raises(ValueError, match="icc_profile"):
        load_config(None, {"color.icc_profile": "p3"})


def test_srgb_over_dicomweb_equals_the_local_file_conversion(adobe_slide, tmp_path):
    from tests import servers
    from transforms.levels import DEFAULT_RULE
    from transforms.sources import dicomweb

    with servers.orthanc(tmp_path / "orthanc") as url:
        servers.stow(url, sorted(adobe_slide.glob("*.dcm")))
        [series] = list(dicomweb.list_series(url, "none", None))
        [record] = list(dicomweb.series_records(series, url, "none", DEFAULT_RULE))
        patches.open_slide.cache_clear()
        patches.srgb_transform.cache_clear()
        chunks = plan_slide(record, PlanParams()).chunks
        remote = _read(chunks[0], "srgb")
    patches.open_slide.cache_clear()
    patches.srgb_transform.cache_clear()
    local = _read(_first_chunk(adobe_slide), "srgb")
    assert np.array_equal(remote, local)
    assert not np.array_equal(local, _read(_first_chunk(adobe_slide), "none"))


def test_the_byte_range_reader_finds_the_profile_too(adobe_slide):
    from transforms.dicom_io import byte_ranges

    files = sorted(str(p) for p in adobe_slide.glob("*.dcm"))
    slide = byte_ranges.RangeDicomSlide(files)  # the reader of gs://, s3:// and http(s) files
    assert slide.get_icc_profile_bytes() == dicom_slide.get_adobergb_icc_profile_bytes()
    assert slide.create_icc_profile_transformation(dicom_slide.get_srgb_icc_profile()) is not None
