"""The byte-range DICOM reader (transforms/byte_ranges.py): on local files against ez-wsi's own
LocalDicomSlide, for every frame index kind and codec; then against gcp-storage-emulator with
IDC's bucket layout, reading a slide the way the pipeline does."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ez_wsi_dicomweb import dicom_frame_decoder, dicom_slide
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames

from models.signature import EMBEDDING_DIM
from tests import servers
from transforms import patches, stages
from transforms.dicom_io import byte_ranges
from transforms.plan import PlanParams, plan_slide
from transforms.sources import idc
from transforms.sources.dicom_files import enumerate_dicom_folder


def _pairs(files: list[str]):
    """(RangeDicomSlide, LocalDicomSlide) levels, matched by SOPInstanceUID."""
    ranged, local = byte_ranges.RangeDicomSlide(files), dicom_slide.LocalDicomSlide(files)
    by_uid = {lv.get_level_sop_instance_uids()[0]: lv for lv in local.levels}
    return (
        ranged,
        local,
        [(lv, by_uid[lv.get_level_sop_instance_uids()[0]]) for lv in ranged.levels],
    )


def _same_pixels(files: list[str], regions=None) -> byte_ranges.RangeDicomSlide:
    ranged, local, levels = _pairs(files)
    for lv, llv in levels:
        for x, y, w, h in regions or [(0, 0, lv.width, lv.height)]:
            a = ranged.get_patch(lv, x, y, w, h).image_bytes()
            b = local.get_patch(llv, x, y, w, h).image_bytes()
            assert a.shape == b.shape and np.array_equal(a, b), (files, x, y, w, h)
    return ranged


def test_sample_slide_regions_equal_ez_wsi_local_reads_basic_offset_table(sample_slides):
    files = sorted(str(p) for p in (sample_slides / "small-40x").glob("*.dcm"))
    ranged = _same_pixels(files[1:])  # the two small levels, whole
    level0 = [(5000, 3000, 1500, 900), (14560 - 700, 10080 - 300, 700, 300)]  # incl. the corner
    ranged0 = _same_pixels(files[:1], level0)
    # A region reads only its frames: neighbours in a row come in one request.
    size = ranged0.instance_bytes
    assert ranged0.io.bytes < size / 10
    assert ranged0.io.frames >= 2 * ranged0.io.requests - 10
    assert ranged.io.requests > 0


def _rewrite(src: Path, out: Path, how: str) -> Path:
    ds = pydicom.dcmread(src)
    n = int(ds.NumberOfFrames)
    frames = list(generate_frames(ds.PixelData, number_of_frames=n))
    if how == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            frames
        )
    elif how == "no-offset-table":
        ds.PixelData = encapsulate(frames, has_bot=False)
    else:  # native RGB
        syntax = str(ds.file_meta.TransferSyntaxUID)
        decoded = [
            dicom_frame_decoder.decode_dicom_compressed_frame_bytes(f, syntax) for f in frames
        ]
        ds.PixelData = np.stack(decoded).astype(np.uint8).tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds["PixelData"].VR = "OB"
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[how, str(src)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[how, "series", str(src)])
    path = out / f"{how}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("how", ["extended", "no-offset-table", "native"])
def test_every_frame_index_kind_reads_the_same_pixels(sample_slides, tmp_path, how):
    path = _rewrite(sample_slides / "small-40x" / "level-1.dcm", tmp_path, how)
    ranged = _same_pixels([str(path)], [(0, 0, 910, 630), (300, 200, 400, 300)])
    # Without an offset table the index is built by reading the items in WALK_BLOCK blocks:
    # the PixelData once more.
    walk = path.stat().st_size if how == "no-offset-table" else 0
    assert ranged.io.bytes <= path.stat().st_size + byte_ranges.HEADER_BLOCK + walk


def test_real_jpeg_and_jpeg2000_slides_decode_like_ez_wsi(real_slides):
    for name in ("camelyon_jpeg_multiframe.dcm", "camelyon_jpeg2000_multiframe.dcm"):
        # Real scanner files without an offset table: frames found by walking item headers.
        _same_pixels([str(real_slides / name)])
        _same_pixels([str(real_slides / name)], [(300, 100, 500, 400)])


# -- against gcp-storage-emulator -----------------------------------------------------------


@pytest.fixture(scope="module")
def idc_like_bucket(sample_slides, tmp_path_factory):
    """small-40x laid out like IDC's buckets: gs://idc-test/{series uuid}/{instance uuid}.dcm."""
    series_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "pathembed-test-series"))
    objects, uuids = {}, {}
    for path in sorted((sample_slides / "small-40x").glob("*.dcm")):
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        uuids[sop] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"pathembed-test-{sop}"))
        objects[f"{series_uuid}/{uuids[sop]}.dcm"] = path
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs")):
        servers.upload("idc-test", objects)
        yield series_uuid, uuids


def test_idc_series_resolves_from_bucket_headers_with_instance_uuids(
    idc_like_bucket, sample_slides
):
    series_uuid, uuids = idc_like_bucket
    (local,) = enumerate_dicom_folder(sample_slides / "small-40x")
    series = _series(series_uuid, local)
    record = idc.resolve_series(series, "gs://idc-test", "v25")
    assert record.instance_uuid == uuids[local.sop_instance_uid]  # the object's name, not uuid5
    assert record.levels == local.levels
    assert record.collection == "test_collection" and record.idc_version == "v25"
    assert all(uri.startswith(f"gs://idc-test/{series_uuid}/") for _, uri in record.files)
    assert not record.is_local
    # instance_hash: the object's MD5 as the store lists it, which is the file's MD5.
    embedding_file = Path(local.embedding_file).read_bytes()
    assert record.instance_hash == hashlib.md5(embedding_file, usedforsecurity=False).hexdigest()
    assert (record.source_license, record.source_doi) == ("CC BY 4.0", "10.5281/zenodo.0")


def test_pipeline_reads_from_the_bucket_only_the_frames_it_needs(idc_like_bucket, sample_slides):
    """Plan and read every chunk as the DAG does; same patches as local; part of the bytes."""
    series_uuid, uuids = idc_like_bucket
    (local,) = enumerate_dicom_folder(sample_slides / "small-40x")
    by_sop = {sop: f"gs://idc-test/{series_uuid}/{u}.dcm" for sop, u in uuids.items()}
    remote = type(local)(
        **{**local.__dict__, "files": tuple((s, by_sop[s]) for s, _ in local.files)}
    )
    patches.open_slide.cache_clear()
    plan = plan_slide(remote, PlanParams())
    chunks = plan.chunks
    local_plan = plan_slide(local, PlanParams())
    assert np.array_equal(plan.coords, local_plan.coords)
    slide, local_slide = patches.open_slide(remote.files), patches.open_slide(local.files)
    level = patches.level_of(slide, remote.sop_instance_uid)
    local_level = patches.level_of(local_slide, local.sop_instance_uid)
    for chunk in chunks[::3]:
        a = patches.read_patches(slide, level, chunk.coords, remote.levels.downsample)
        b = patches.read_patches(local_slide, local_level, chunk.coords, local.levels.downsample)
        assert np.array_equal(a, b)
    for chunk in chunks:
        patches.read_patches(slide, level, chunk.coords, remote.levels.downsample)
    # A third of the slide is tissue: far less than the whole instance is read.
    assert isinstance(slide, byte_ranges.RangeDicomSlide)
    assert slide.io.bytes < 0.8 * slide.instance_bytes
    assert slide.io.frames / slide.io.requests > 4  # frames per request
    patches.open_slide.cache_clear()


def test_the_slide_reader_fetches_queued_chunks_ahead(idc_like_bucket, sample_slides):
    """embed_plan asks for the frames of the chunks behind the one being decoded before their
    reads start (remote sources only); a read then finds its frames fetched, and a slide's
    embeddings are those of the local file."""
    series_uuid, uuids = idc_like_bucket
    (local,) = enumerate_dicom_folder(sample_slides / "small-40x")
    by_sop = {sop: f"gs://idc-test/{series_uuid}/{u}.dcm" for sop, u in uuids.items()}
    remote = dataclasses.replace(local, files=tuple((s, by_sop[s]) for s, _ in local.files))
    params = PlanParams(chunk_size=16)  # small chunks: 20 or so in this slide
    spec = stages.ReadSpec(params.patch_size)

    def fresh(record):
        patches.open_slide.cache_clear()
        patches.FRAMES.clear()
        return patches.open_slide(record.files, record.dicomweb_auth)

    slide = fresh(remote)
    plan = plan_slide(remote, params)
    chunks = plan.chunks
    local_plan = plan_slide(local, params)

    def frames_asked_for(n: int) -> int:  # by fetch_ahead of the first n chunks
        counted = fresh(remote)
        for chunk in chunks[:n]:
            stages.fetch_ahead([chunk], spec)
        return counted.io.frames

    # fetch_ahead returns with the chunk's requests in the fetch pool; its read asks no more.
    slide = fresh(remote)
    level = patches.level_of(slide, remote.sop_instance_uid)
    stages.fetch_ahead(chunks[1:2], spec)
    asked = slide.io.frames
    assert asked > 0 and any(r._pending for r in slide._files._readers.values())
    patches.read_patches(slide, level, chunks[1].coords, remote.levels.downsample)
    assert slide.io.frames == asked
    # A local slide is read when its chunk is: fetch_ahead reads nothing.
    local_slide = fresh(local)
    opened = local_slide.io.requests  # its headers
    stages.fetch_ahead(local_plan.chunks[2:3], spec)
    assert local_slide.io.requests == opened and local_slide.io.frames == 0

    queued = spec.read_threads + 1
    lead = min(len(chunks), queued + stages.FETCH_LEAD)
    assert len(chunks) > lead and frames_asked_for(lead) > frames_asked_for(queued + 1)
    expected_asked = frames_asked_for(lead + 1)
    seen = []

    def embed(pixels):  # records, at each chunk, the frames asked for so far
        seen.append(slide.io.frames)
        return pixels.reshape(len(pixels), -1)[:, :EMBEDDING_DIM].astype(np.float32)

    slide = fresh(remote)
    got = stages.embed_plan(plan, embed, spec)
    # When the first chunk was embedded, the next chunks' frames, FETCH_LEAD more than the
    # readers had started, were asked for.
    assert seen[0] >= expected_asked
    fresh(local)
    assert np.array_equal(got, stages.embed_plan(local_plan, embed, spec))
    patches.open_slide.cache_clear()


def _series(series_uuid: str, local) -> idc.IdcSeries:
    return idc.IdcSeries(
        collection_id="test_collection",
        study_instance_uid=local.study_instance_uid,
        series_instance_uid=local.series_instance_uid,
        crdc_series_uuid=series_uuid,
        instance_count=3,
        series_size_mb=20.0,
        transfer_syntax=None,
        series_aws_url=None,
        license_short_name="CC BY 4.0",
        source_doi="10.5281/zenodo.0",
    )


def test_a_bucket_prefix_is_enumerated_like_a_folder(idc_like_bucket, sample_slides):
    series_uuid, _ = idc_like_bucket
    (local,) = enumerate_dicom_folder(sample_slides / "small-40x")
    (remote,) = enumerate_dicom_folder(f"gs://idc-test/{series_uuid}/")
    assert remote.levels == local.levels and remote.instance_uuid == local.instance_uuid
    assert all(uri.startswith("gs://idc-test/") for _, uri in remote.files)


def test_the_idc_index_source_resolves_series_in_beam(idc_like_bucket, sample_slides, monkeypatch):
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.testing.util import assert_that, equal_to

    from pipeline.config import SourceConfig
    from transforms.levels import DEFAULT_RULE
    from transforms.sources.enumeration import EnumerateSlides

    series_uuid, uuids = idc_like_bucket
    (local,) = enumerate_dicom_folder(sample_slides / "small-40x")
    monkeypatch.setattr(idc, "sm_series", lambda *a, **k: [_series(series_uuid, local)])
    source = SourceConfig(kind="idc_index", idc_bucket="gs://idc-test")
    with beam.Pipeline(runner=FnApiRunner()) as p:
        found = p | EnumerateSlides(source, DEFAULT_RULE, idc_version="v25")
        uuids_found = found.slides | beam.Map(lambda r: (r.instance_uuid, r.idc_version))
        assert_that(uuids_found, equal_to([(uuids[local.sop_instance_uid], "v25")]))


@pytest.mark.parametrize("how", ["extended", "no-offset-table", "native"])
def test_instance_hashes_are_streamed_and_equal_whole_file_hashes(sample_slides, tmp_path, how):
    """dicom_io.pixel_data.instance_hashes finds the PixelData value through the range reader and
    hashes it in blocks; the digests equal hashing the whole file and pydicom's whole PixelData."""
    import hashlib

    from transforms.dicom_io.pixel_data import instance_hashes

    path = _rewrite(sample_slides / "small-40x" / "level-2.dcm", tmp_path, how)
    md5, sha512 = instance_hashes(str(path))
    assert md5 == hashlib.md5(path.read_bytes()).hexdigest()
    assert sha512 == hashlib.sha512(pydicom.dcmread(path).PixelData).hexdigest()
