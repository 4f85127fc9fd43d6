"""DICOMweb against a real Orthanc (Debian orthanc + orthanc-dicomweb) on 127.0.0.1: QIDO-RS
enumeration, slides built from WADO-RS metadata, batched frame requests, same pixels as the
local files."""

from __future__ import annotations

import numpy as np
import pytest

from tests import servers
from transforms import patches
from transforms.dicom_io import dicomweb
from transforms.levels import DEFAULT_RULE
from transforms.plan import PlanParams, plan_slide
from transforms.records import SlideRecord
from transforms.sources import dicomweb as dicomweb_source
from transforms.sources import enumeration
from transforms.sources.dicom_files import enumerate_dicom_folder


@pytest.fixture(scope="module")
def store(sample_slides, tmp_path_factory):
    with servers.orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        servers.stow(url, sorted((sample_slides / "small-40x").glob("*.dcm")))
        yield url


@pytest.fixture(scope="module")
def local_record(sample_slides) -> SlideRecord:
    (record,) = enumerate_dicom_folder(sample_slides / "small-40x")
    return record


def _enumerate(url: str) -> list:
    return [
        item
        for series in dicomweb_source.list_series(url, "none", None)
        for item in dicomweb_source.series_records(series, url, "none", DEFAULT_RULE)
    ]


def test_qido_enumeration_gives_the_folder_record_with_wado_urls(store, local_record):
    (record,) = _enumerate(store)
    assert isinstance(record, SlideRecord)
    for key in ("instance_uuid", "study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        assert getattr(record, key) == getattr(local_record, key)
    assert record.levels == local_record.levels
    assert record.dicomweb_url == store
    for sop, uri in record.files:
        assert uri == dicomweb.instance_url(
            store, record.study_instance_uid, record.series_instance_uid, sop
        )
    assert sorted(s for s, _ in record.files) == sorted(s for s, _ in local_record.files)


def test_orthanc_transfer_syntax_comes_from_a_frame_response(store, local_record):
    client = dicomweb.DicomWebClient(store, "none")
    (meta, *_) = client.series_metadata(
        local_record.study_instance_uid, local_record.series_instance_uid
    )
    assert "00020010" not in meta  # the trap: neither QIDO nor metadata has it
    sop = meta["00080018"]["Value"][0]
    syntax = client.stored_transfer_syntax(
        local_record.study_instance_uid, local_record.series_instance_uid, sop
    )
    assert syntax == "1.2.840.10008.1.2.4.50"


def test_patches_over_dicomweb_equal_local_and_frames_come_in_batches(store, local_record):
    (record,) = _enumerate(store)
    patches.open_slide.cache_clear()
    plan = plan_slide(record, PlanParams())
    chunks = plan.chunks
    local_plan = plan_slide(local_record, PlanParams())
    assert np.array_equal(plan.coords, local_plan.coords)
    assert plan.thumbnail_jpeg == local_plan.thumbnail_jpeg
    assert plan.instance_md5 is None and plan.pixeldata_sha512 is None  # not downloaded whole
    slide = patches.open_slide(record.files)
    local_slide = patches.open_slide(local_record.files)
    assert isinstance(slide, dicomweb.BatchedDicomSlide)
    level = patches.level_of(slide, record.sop_instance_uid)
    local_level = patches.level_of(local_slide, local_record.sop_instance_uid)
    for chunk in chunks[:4]:
        a = patches.read_patches(slide, level, chunk.coords, record.levels.downsample)
        b = patches.read_patches(local_slide, local_level, chunk.coords, 2.0)
        assert np.array_equal(a, b)
    stats = slide.slide_frame_cache._cache_stats
    assert stats.number_of_frames_read_in_frame_blocks >= 20 * stats.number_of_frame_blocks_read
    patches.open_slide.cache_clear()


def test_an_unknown_instance_is_a_read_error(store, local_record):
    from transforms.errors import SlideError

    url = dicomweb.instance_url(
        store, local_record.study_instance_uid, local_record.series_instance_uid, "1.2.3.4"
    )
    with pytest.raises(SlideError, match="read_error"):
        patches.open_slide((("1.2.3.4", url),))


def test_pixel_reads_authenticate_as_the_source_says(store, local_record, monkeypatch, tmp_path):
    """source.dicomweb_auth reaches the records and the pixel reader, not only the listing:
    `google` makes the reader want Google credentials, which it refuses to send to this
    plain-http store (a token never travels in clear text), `none` reads without credentials."""
    (record,) = _enumerate(store)
    [tagged] = enumeration._tagged(record, frozenset(), "google", store)
    assert tagged.dicomweb_auth == "google" and tagged.files == record.files
    [local] = enumeration._tagged(local_record, frozenset(), "google")
    assert local.dicomweb_auth == "auto"  # local files: no DICOMweb
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    patches.open_slide.cache_clear()
    with pytest.raises(Exception, match=r"Google credentials go only over https"):
        plan_slide(tagged, PlanParams())
    patches.open_slide.cache_clear()
    [anonymous] = enumeration._tagged(record, frozenset(), "none", store)
    plan = plan_slide(anonymous, PlanParams())
    assert len(plan.coords) > 0
    patches.open_slide.cache_clear()
