"""Remote reads against gcp-storage-emulator with the real google-cloud-storage client (issue
14): a chunk's ranges are fetched concurrently and merged across small gaps, an instance
without offset table is indexed in WALK_BLOCK blocks (not one request per frame), and the
index is kept per process for as long as the object is the same generation."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames

from tests import servers
from transforms.dicom_io import byte_ranges
from transforms.errors import SlideError

BUCKET = "remote-index"
MIB = 1024 * 1024


def _rewrite(src: Path, out: Path, how: str) -> Path:
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    if how == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            frames
        )
    else:
        ds.PixelData = encapsulate(frames, has_bot=how == "basic")
    path = out / f"{how}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _frames(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


@pytest.fixture(scope="module")
def bucket(sample_slides, tmp_path_factory):
    """small-40x's finest level (2,280 frames, 19 MB) with each kind of frame index."""
    out = tmp_path_factory.mktemp("kinds")
    level0 = sample_slides / "small-40x" / "level-0.dcm"
    paths = {how: _rewrite(level0, out, how) for how in ("none", "basic", "extended")}
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs")):
        levels = sorted((sample_slides / "small-40x").glob("*.dcm"))
        servers.upload(
            BUCKET,
            {
                **{f"{how}.dcm": path for how, path in paths.items()},
                **{f"slide/{path.name}": path for path in levels},
            },
        )
        byte_ranges._gcs_client.cache_clear()  # a client for this emulator
        yield paths
    byte_ranges._gcs_client.cache_clear()


def _index_requests(uri: str) -> tuple[byte_ranges.DicomInstanceReader, int, int]:
    reader = byte_ranges.DicomInstanceReader(uri)
    before = (reader.stats.requests, reader.stats.bytes)
    reader._ensure_index()
    return reader, reader.stats.requests - before[0], reader.stats.bytes - before[1]


def test_an_instance_without_offset_table_is_indexed_in_large_blocks(bucket):
    byte_ranges._INDEX_CACHE.clear()
    path = bucket["none"]
    frames = _frames(path)
    size = path.stat().st_size
    reader, requests, _ = _index_requests(f"gs://{BUCKET}/none.dcm")
    assert len(frames) > 2000  # one request per frame would be thousands
    assert requests <= size / (8 * MIB) + 2
    # The index is right: first, middle and last frames (the last one's end comes from the
    # sequence delimiter the walk saw) equal pydicom's.
    for k in (1, 2, len(frames) // 2, len(frames) - 1, len(frames)):
        assert reader.frame_bytes(k) == frames[k - 1]
    assert reader._ends[-1] is not None


def test_the_index_is_kept_per_process_while_the_object_is_the_same(bucket, tmp_path):
    byte_ranges._INDEX_CACHE.clear()
    uri = f"gs://{BUCKET}/none.dcm"
    _, first, _ = _index_requests(uri)
    _, again, _ = _index_requests(uri)  # another reader, e.g. the next chunk's slide
    assert first > 0 and again == 0
    # A new generation of the object (same name, other frames) is indexed again.
    original = _frames(bucket["none"])
    ds = pydicom.dcmread(bucket["none"])
    swapped = [original[1], original[0], *original[2:]]  # the same size, other offsets
    ds.PixelData = encapsulate(swapped, has_bot=False)
    replaced = tmp_path / "replaced.dcm"
    ds.save_as(replaced, enforce_file_format=True)
    assert replaced.stat().st_size == bucket["none"].stat().st_size
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    client.bucket(BUCKET).blob("other.dcm").upload_from_filename(str(bucket["none"]))
    _index_requests(f"gs://{BUCKET}/other.dcm")
    client.bucket(BUCKET).blob("other.dcm").upload_from_filename(str(replaced))
    reader, after_replace, _ = _index_requests(f"gs://{BUCKET}/other.dcm")
    assert after_replace > 0
    assert reader.frame_bytes(1) == original[1] and reader.frame_bytes(2) == original[0]


@pytest.mark.parametrize("how", ["basic", "extended"])
def test_an_offset_table_is_used_not_walked(bucket, how):
    byte_ranges._INDEX_CACHE.clear()
    reader, requests, read = _index_requests(f"gs://{BUCKET}/{how}.dcm")
    frames = _frames(bucket[how])
    # The Basic Offset Table came with the header's last block; the Extended one is in the
    # header itself: at most one small read, never a walk of the items.
    assert requests <= 1 and read <= byte_ranges.HEADER_BLOCK
    for k in (1, len(frames) // 3, len(frames)):
        assert reader.frame_bytes(k) == frames[k - 1]


def test_ranges_are_merged_across_small_gaps_and_fetched_concurrently(bucket):
    path = bucket["basic"]
    frames = _frames(path)
    remote = byte_ranges.DicomInstanceReader(f"gs://{BUCKET}/basic.dcm")
    local = byte_ranges.DicomInstanceReader(str(path))
    remote._ensure_index(), local._ensure_index()
    # Two runs of frames, 8 frames (~60 KB) apart; and a run in another row, far away.
    wanted = [1, 2, 11, 12, 1000, 1001]
    gap = remote._starts[10] - remote._ends[1]
    assert byte_ranges.MERGE_GAP < gap < byte_ranges.REMOTE_MERGE_GAP
    assert remote.prefetch(wanted)[0] == 2  # a bucket request costs more than 60 KB
    assert local.prefetch(wanted)[0] == 3  # a local read does not
    # Fetched in the pool: prefetch returned at once, frame_bytes waits for each.
    assert set(remote._pending) == set(wanted)
    for f in wanted:
        assert remote.frame_bytes(f) == frames[f - 1] == local.frame_bytes(f)
    assert not remote._pending
    assert remote.stats.frames == len(wanted)


def test_an_error_in_a_fetch_thread_reaches_the_frame_read(bucket, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    blob = client.bucket(BUCKET).blob("gone.dcm")
    blob.upload_from_filename(str(bucket["basic"]))
    reader = byte_ranges.DicomInstanceReader(f"gs://{BUCKET}/gone.dcm")
    reader._ensure_index()
    blob.delete()
    reader.prefetch([5, 6, 7])  # returns; the requests fail in the pool (404)
    with pytest.raises((OSError, SlideError), match=r"gone\.dcm"):
        reader.frame_bytes(6)


class _ReadFrames:
    """A DoFn body: reads frames of a bucket instance in a Beam step, yields its IoStats."""

    def __init__(self, uri: str, frames: list[int]):
        self.uri, self.frames = uri, frames

    def __call__(self, _):
        reader = byte_ranges.DicomInstanceReader(self.uri)
        reader.prefetch(self.frames)
        for f in self.frames:
            reader.frame_bytes(f)
        yield reader.stats.requests, reader.stats.bytes


def test_requests_made_in_fetch_threads_are_counted_in_the_beam_step(bucket):
    """Beam finds a counter's step through the incrementing thread; the pool's threads have
    none, so prefetch counts the requests it hands them."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms import metrics

    byte_ranges._INDEX_CACHE.clear()
    read = _ReadFrames(f"gs://{BUCKET}/extended.dcm", [3, 4, 5, 40, 41, 900])
    pipeline = beam.Pipeline(runner=FnApiRunner())
    stats = pipeline | beam.Create([0]) | beam.FlatMap(read)
    del stats
    result = pipeline.run()
    result.wait_until_finish()

    def counter(name):
        query = result.metrics().query(MetricsFilter().with_name(name))["counters"]
        return sum(c.committed for c in query)

    # The header (64 KiB blocks) in the step's thread; three runs of frames in the pool.
    requests = counter(metrics.PIXEL_SOURCE_REQUESTS)
    assert requests >= 4
    assert counter(metrics.PIXEL_FRAMES_READ) == 6
    reader = byte_ranges.DicomInstanceReader(f"gs://{BUCKET}/extended.dcm")  # same header
    header_requests = reader.stats.requests
    assert requests == header_requests + 3


class _OpenSlide:
    def __init__(self, uris: list[str]):
        self.uris = uris

    def __call__(self, _):
        yield len(list(byte_ranges.RangeDicomSlide(self.uris).levels))


def test_a_remote_slide_opens_its_headers_at_once_and_counts_them_in_the_beam_step(
    bucket, sample_slides
):
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms import metrics

    names = sorted(p.name for p in (sample_slides / "small-40x").glob("*.dcm"))
    uris = [f"gs://{BUCKET}/slide/{name}" for name in names]
    outside = byte_ranges.RangeDicomSlide(uris)  # the headers, read in the fetch pool
    assert len(list(outside.levels)) == len(names) and outside.io.requests >= len(names)
    pipeline = beam.Pipeline(runner=FnApiRunner())
    _ = pipeline | beam.Create([0]) | beam.FlatMap(_OpenSlide(uris))
    result = pipeline.run()
    result.wait_until_finish()
    query = MetricsFilter().with_name(metrics.PIXEL_SOURCE_REQUESTS)
    counted = sum(c.committed for c in result.metrics().query(query)["counters"])
    assert counted == outside.io.requests
