"""Reading DICOM slides by byte ranges: IDC's buckets (gs://, s3://), HTTP(S) files, local files.

An instance is never downloaded whole. The reader fetches the header (a few 64 KiB blocks),
finds PixelData, builds the frame offset index (Extended Offset Table, else Basic Offset Table,
else by walking the fragment item headers in 8 MiB blocks; kept per worker process, keyed by
URI, size and object version), then reads only the byte ranges of the frames a region needs:
neighbouring frames are one range request. A remote source (gs://, s3://, http(s)) fetches a
batch's ranges concurrently (`FETCH_THREADS` per process) and merges ranges up to
`REMOTE_MERGE_GAP` apart, so a chunk waits about one round trip, not one per range; decoding
starts as soon as the first range arrives. Frames are decoded to the pixels ez-wsi decodes
from local files: JPEG baseline and JPEG 2000 by faster decoders of the same libraries
(`codecs`, bit-exact), other syntaxes by ez-wsi's `dicom_frame_decoder` (the same code path);
regions are assembled by ez-wsi's own `LocalDicomSlide`, fed by a frame interface that reads
ranges. So a slide read here gives the same pixels as the same files on local disk.

gs:// objects' size and generation come from google-cloud-storage (anonymous: IDC's buckets are
public; STORAGE_EMULATOR_HOST points it at an emulator) and their ranges, of that generation,
from the JSON API's media URL; s3:// through the bucket's public HTTPS endpoint. Remote ranges
are read by `range_get` (kept-alive http.client connections, retry.py's policy), local paths
through `os.pread`.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import io
import logging
import os
import re
import stat
import struct
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import cachetools
import cv2
import numpy as np
import pydicom
import requests
from ez_wsi_dicomweb import (
    dicom_frame_decoder,
    dicom_slide,
    dicom_web_interface,
    ez_wsi_errors,
    local_dicom_file_interface,
    local_dicom_slide_cache,
)
from ez_wsi_dicomweb.ml_toolkit import dicom_path, tags

from transforms import metrics, urls
from transforms.dicom_io import codecs, geometry, gpu_decode, range_get, retry
from transforms.dicom_io.frames import FrameGrid
from transforms.errors import ReasonCode, SlideError
from transforms.urls import is_remote

_LOG = logging.getLogger(__name__)

HEADER_BLOCK = 64 * 1024  # header reads are whole blocks of this size
# A header larger than this is not read on (an annotation object without PixelData under a
# prefix would otherwise be fetched whole); nor are more frames than this indexed.
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_FRAMES = 1 << 22
MERGE_GAP = 16 * 1024  # local files: frames closer than this are fetched in one read
# Remote sources: ranges closer than this are one request. A request costs a round trip
# (20-80 ms to a bucket), which at the ~100 MB/s a worker reads is 2-8 MB, so reading a gap
# of up to 128 KiB is cheaper than another request. Measured (scripts/bench.py --only remote,
# medium-20x): 9.9 requests per chunk at 0, 9.1 at 64, 128 and 256 KiB (holes in a row of
# frames), 5.2 at 1 MiB, which merges whole rows of a chunk and reads 3x the bytes.
REMOTE_MERGE_GAP = 128 * 1024
# Concurrent range requests per worker process (all remote instances share them); at most
# the connection pool of a requests session (`retry.http_session` and the GCS client's are
# sized to it), so no connection is opened and thrown away per request.
FETCH_THREADS = 16
WALK_BLOCK = 8 * 1024 * 1024  # an instance without offset table is indexed in blocks of this
INDEX_CACHE_ENTRIES = 256  # frame indexes kept per worker process (18k frames: ~1 MB each)
FRAME_CACHE_BYTES = 64 * 1024 * 1024  # stored (compressed) frame bytes kept per instance
S3_ENDPOINT = "https://{bucket}.s3.amazonaws.com/{key}"
GCS_ENDPOINT = "https://storage.googleapis.com"
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010)

# Beam counters resolve to the running step's container when incremented: make them once.
_REQUESTS = metrics.counter(metrics.PIXEL_SOURCE_REQUESTS)
_BYTES = metrics.counter(metrics.PIXEL_SOURCE_BYTES_READ)
_FRAMES = metrics.counter(metrics.PIXEL_FRAMES_READ)
# Set in the fetch pool's threads. Beam finds a counter's step through the thread that
# increments it: a pool thread has none, so the requests it makes are counted by the thread
# that asked for them (prefetch), as planned.
_FETCH_THREAD = threading.local()


# ---------------------------------------------------------------------------------------------
# Byte sources
# ---------------------------------------------------------------------------------------------


@dataclass
class IoStats:
    """Requests and bytes read, per instance and summed per slide."""

    requests: int = 0
    bytes: int = 0
    frames: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, requests_: int, bytes_: int, frames: int = 0) -> None:
        with self.lock:
            self.requests += requests_
            self.bytes += bytes_
            self.frames += frames


class ByteSource:
    """Random access to one object's bytes; counts what it reads. `read` is thread-safe."""

    # Whether a batch of ranges is fetched concurrently (a remote source waits a round trip
    # per request; a local file does not), and how far apart ranges may be to be merged.
    concurrent = False

    def __init__(self, uri: str, stats: IoStats | None = None):
        self.uri = uri
        self.stats = stats or IoStats()

    @property
    def merge_gap(self) -> int:
        return REMOTE_MERGE_GAP if self.concurrent else MERGE_GAP

    def size(self) -> int:
        raise NotImplementedError

    def version(self) -> str | None:
        """What changes when the object is replaced (GCS generation, ETag, mtime), known once
        size() was called; None when the source tells nothing (then nothing is cached)."""
        return None

    def _read(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) (shorter at the end of the object)."""
        if end <= start:
            return b""
        data = self._read(start, end)
        self.stats.add(1, len(data))
        if not getattr(_FETCH_THREAD, "active", False):  # (a pool thread has no Beam step)
            _REQUESTS.inc()
            _BYTES.inc(len(data))
        return data


class LocalSource(ByteSource):
    """A local file, kept open while the source lives (one per instance of an open slide)."""

    def __init__(self, uri: str, stats: IoStats | None = None):
        super().__init__(uri, stats)
        self._file = None

    def size(self) -> int:
        return os.path.getsize(self.uri)

    def version(self) -> str | None:
        info = os.stat(self.uri)
        return f"{info.st_ino}:{info.st_mtime_ns}"

    def _read(self, start: int, end: int) -> bytes:
        if self._file is None:
            self._file = open(self.uri, "rb")  # noqa: SIM115 - closed with the source
        return os.pread(self._file.fileno(), end - start, start)

    def __del__(self) -> None:
        if self._file is not None:
            self._file.close()


def gcs_client():
    """One anonymous client per process (IDC's buckets are public) and STORAGE_EMULATOR_HOST
    (which points it at an emulator)."""
    return _gcs_client(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.cache
def _gcs_client(emulator: str | None):
    from google.cloud import storage
    from requests.adapters import HTTPAdapter

    client = storage.Client.create_anonymous_client()
    # Room in the connection pool for every fetch thread (requests keeps 10 per host); a
    # plain adapter, as the session has: google-api-core does the retrying (retry.gcs_retry).
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=FETCH_THREADS)
    client._http.mount("https://", adapter)
    client._http.mount("http://", adapter)
    return client


def gcs_write_client():
    """One client per process for writing to the output bucket: Application Default
    Credentials, or the emulator at STORAGE_EMULATOR_HOST (which takes no credentials)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    return _gcs_client(emulator) if emulator else _gcs_credentialed_client()


@functools.cache
def _gcs_credentialed_client():
    from google.cloud import storage

    return storage.Client()


def split_bucket_uri(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("gs", "s3") or not parsed.netloc:
        raise ValueError(f"{uri!r} is not a gs:// or s3:// URI")
    return parsed.netloc, parsed.path.lstrip("/")


_GCS_TIMEOUT = (retry.CONNECT_TIMEOUT_SECONDS, retry.READ_TIMEOUT_SECONDS)


def _gcs_error(uri: str, exc: Exception) -> Exception:
    """transient_http once google-api-core's retries are spent, else an OSError (read_error)."""
    if retry.is_transient(exc):
        return retry.transient_http(f"GCS {uri}", exc)
    return OSError(f"{uri}: {exc}")


class GcsSource(ByteSource):
    concurrent = True

    def __init__(self, uri: str, stats: IoStats | None = None):
        super().__init__(uri, stats)
        bucket, name = split_bucket_uri(uri)
        self._blob = gcs_client().bucket(bucket).blob(name)
        self._size: int | None = None
        self._generation: str | None = None
        self._ranges: range_get.RangeReader | None = None

    def size(self) -> int:
        from google.api_core import exceptions

        if self._size is None:
            try:
                self._blob.reload(timeout=_GCS_TIMEOUT, retry=retry.gcs_retry())
            except exceptions.GoogleAPIError as exc:
                raise _gcs_error(self.uri, exc) from exc
            self._size = int(self._blob.size)
            # (a download overwrites the blob's properties from its response headers)
            self._generation = str(self._blob.generation or "") or None
        return self._size

    def version(self) -> str | None:
        return self._generation

    def _read(self, start: int, end: int) -> bytes:
        # Range GETs through range_get (cheaper per request than the client's download, see
        # there), of the object's generation that size() saw: all of an instance's frames come
        # from one version of it, the version its frame index is cached under.
        if self._ranges is None:
            self.size()
            bucket, name = split_bucket_uri(self.uri)
            base = os.environ.get("STORAGE_EMULATOR_HOST") or GCS_ENDPOINT
            base = base if "://" in base else f"http://{base}"
            url = f"{base}/download/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
            query = "alt=media" + (f"&generation={self._generation}" if self._generation else "")
            self._ranges = range_get.RangeReader(f"{url}?{query}")
        return self._ranges.read(start, end)


class HttpSource(ByteSource):
    """A file behind HTTP(S) with Range support (also s3:// through the public endpoint)."""

    concurrent = True

    def __init__(self, uri: str, stats: IoStats | None = None):
        super().__init__(uri, stats)
        self._version: str | None = None
        if uri.startswith("s3://"):
            bucket, key = split_bucket_uri(uri)
            self._url = S3_ENDPOINT.format(bucket=bucket, key=urllib.parse.quote(key))
        else:
            self._url = uri
        self._session = retry.http_session(pool_size=FETCH_THREADS)
        self._ranges = range_get.RangeReader(self._url)
        self._size: int | None = None

    def _head(self) -> requests.Response:
        """The file's headers (size, version); urllib3's Retry covers transient faults."""
        what = f"HEAD {urls.redact_url(self._url)}"
        try:
            response = self._session.head(self._url, allow_redirects=True)
        except requests.RequestException as exc:  # retries spent (connection, timeout)
            raise retry.transient_http(what, exc) from exc
        return retry.raise_for_status(response, what)

    def size(self) -> int:
        if self._size is None:
            response = self._head()
            self._size = int(response.headers["Content-Length"])
            tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
            self._version = tag or None
        return self._size

    def version(self) -> str | None:
        return self._version

    def _read(self, start: int, end: int) -> bytes:
        return self._ranges.read(start, end)


def open_source(uri: str, stats: IoStats | None = None) -> ByteSource:
    if uri.startswith("gs://"):
        return GcsSource(uri, stats)
    if uri.startswith(("s3://", "http://", "https://")):
        return HttpSource(uri, stats)
    return LocalSource(uri, stats)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over a ByteSource that reads whole blocks (for pydicom)."""

    def __init__(
        self, source: ByteSource, block: int = HEADER_BLOCK, limit: int = MAX_HEADER_BYTES
    ):
        super().__init__()
        self._source = source
        self._block = block
        self._limit = limit
        self._run = 1  # blocks read by the next miss
        self._blocks: dict[int, bytes] = {}
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._source.size() + offset
        return self._pos

    def _get_block(self, index: int) -> bytes:
        if index not in self._blocks:
            start = index * self._block
            if start >= self._limit:
                raise SlideError(
                    ReasonCode.OVERSIZED_HEADER,
                    f"{urls.redact_url(self._source.uri)}: no PixelData in the first "
                    f"{self._limit} bytes; not read further",
                )
            # Headers are read front to back: each miss reads twice as many blocks as the
            # last, so a large header (ICC profile, offset table) takes a few requests, not
            # one per 64 KiB.
            count = min(self._run, max(1, (self._limit - start) // self._block))
            self._run *= 2
            data = self._source.read(start, start + count * self._block)
            for k in range(count):
                self._blocks.setdefault(index + k, data[k * self._block : (k + 1) * self._block])
        return self._blocks[index]

    def buffered_after(self, position: int) -> bytes:
        """The bytes from `position` that the blocks read so far hold, without reading."""
        parts = []
        index, offset = divmod(position, self._block)
        while index in self._blocks:
            block = self._blocks[index]
            parts.append(block[offset:])
            if len(block) < self._block:  # the end of the object
                break
            index, offset = index + 1, 0
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            index, offset = divmod(self._pos, self._block)
            block = self._get_block(index)
            chunk = block[offset : offset + len(view) - done]
            if not chunk:
                break
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
            self._pos += len(chunk)
        return done


# ---------------------------------------------------------------------------------------------
# One instance: header, frame index, frame reads
# ---------------------------------------------------------------------------------------------


def read_header(uri: str, stats: IoStats | None = None) -> tuple[pydicom.Dataset, int]:
    """(header dataset without pixels, byte offset of the PixelData element) of a DICOM file."""
    return read_header_from(open_source(uri, stats))


class DicomInstanceReader:
    """Frames of one DICOM instance read by byte ranges."""

    def __init__(self, uri: str, stats: IoStats | None = None):
        self.uri = uri
        self.stats = stats or IoStats()
        self._source = open_source(uri, self.stats)
        self.header, self._pixel_data_at, self._after_header = _read_header(self._source)
        if self._pixel_data_at < 0:
            raise ez_wsi_errors.EZWsiError(f"{uri} has no PixelData")
        meta = self.header.file_meta
        self.transfer_syntax = str(meta.TransferSyntaxUID)
        self.number_of_frames = int(self.header.get("NumberOfFrames", 1) or 1)
        self._encapsulated = (
            self.transfer_syntax not in local_dicom_slide_cache.UNENCAPSULATED_TRANSFER_SYNTAXES
        )
        self._starts: list[int] | None = None  # absolute offset of each frame's first item
        self._ends: list[int | None] | None = None
        self._lock = threading.RLock()
        self._cache: cachetools.LRUCache = cachetools.LRUCache(FRAME_CACHE_BYTES, getsizeof=len)
        # {frame: its fetch in flight} (remote sources: prefetch returns before the bytes)
        self._pending: dict[int, concurrent.futures.Future] = {}
        # TILED_SPARSE: {row-major frame number: stored frame number}, from the frames'
        # positions; frames not in it are absent (background). None: frames in row-major order.
        self.sparse_frames = geometry.sparse_frame_map(self.header, f"instance file {uri}")

    @property
    def grid_frames(self) -> int:
        """Frames of the whole TILED_FULL grid (what ez-wsi's level map is told for a sparse
        instance, so that it asks for frames by row-major number)."""
        h = self.header
        across = -(-int(h.TotalPixelMatrixColumns) // int(h.Columns))
        return across * -(-int(h.TotalPixelMatrixRows) // int(h.Rows))

    def stored_frame(self, frame_number: int) -> int | None:
        """The stored frame holding row-major frame `frame_number`, None when a sparse level
        leaves it out."""
        if self.sparse_frames is None:
            return frame_number
        return self.sparse_frames.get(frame_number)

    def absent_frame(self) -> np.ndarray:
        """What a frame a sparse level leaves out holds: background, never black tissue. The
        colour is RecommendedAbsentPixelCIELabValue where the header gives it, else white."""
        h = self.header
        rgb = np.array([255, 255, 255], np.uint8)
        lab = h.get("RecommendedAbsentPixelCIELabValue")
        if lab is not None and len(lab) == 3:
            # DICOM scales L* 0..100 and a*, b* -128..127 to 0..65535.
            scaled = np.array(
                [[[lab[0] * 100 / 65535, lab[1] * 255 / 65535 - 128, lab[2] * 255 / 65535 - 128]]],
                np.float32,
            )
            rgb = (cv2.cvtColor(scaled, cv2.COLOR_Lab2RGB)[0, 0] * 255).round().astype(np.uint8)
        return np.broadcast_to(rgb, (int(h.Rows), int(h.Columns), 3)).copy()

    @property
    def uid_tuple(self) -> tuple[str, str, str]:
        h = self.header
        return str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPInstanceUID)

    @property
    def size(self) -> int:
        return self._source.size()

    def read_bytes(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the instance (one range read)."""
        return self._source.read(start, end)

    # -- frame index -----------------------------------------------------------------------

    def _native_frame_bytes(self) -> int:
        h = self.header
        return int(h.Rows) * int(h.Columns) * int(h.SamplesPerPixel) * (int(h.BitsAllocated) // 8)

    def pixel_data_value(self) -> tuple[int, int]:
        """(offset of the PixelData value, its length or 0xFFFFFFFF)."""
        return self._parse_pixel_data_head(
            self._source.read(self._pixel_data_at, self._pixel_data_at + 12)
        )

    def _parse_pixel_data_head(self, head: bytes) -> tuple[int, int]:
        explicit = self.transfer_syntax != pydicom.uid.ImplicitVRLittleEndian
        if explicit and head[4:6] in (b"OB", b"OW", b"UN", b"OD", b"OF", b"OV"):
            return self._pixel_data_at + 12, struct.unpack("<I", head[8:12])[0]
        return self._pixel_data_at + 8, struct.unpack("<I", head[4:8])[0]

    def _build_index(self) -> None:
        n = self.number_of_frames
        # NumberOfFrames sizes the frame index: a crafted value must not allocate beyond what
        # the object can hold (every frame takes at least an 8-byte item header).
        if not 1 <= n <= MAX_FRAMES or n * 8 > self.size:
            raise SlideError(
                ReasonCode.OVERSIZED_HEADER,
                f"{urls.redact_url(self.uri)}: NumberOfFrames {n} is not possible in an object "
                f"of {self.size} bytes (at most {MAX_FRAMES} frames are read)",
            )
        version = self._source.version()  # known now: self.size asked the store
        key = (self.uri, self.size, version, n)
        if version is not None:
            with _INDEX_LOCK:
                cached = _INDEX_CACHE.get(key)
            if cached is not None:
                self._starts, self._ends = cached
                self._after_header = b""
                return
        self._starts, self._ends = self._read_index()
        if version is not None:
            with _INDEX_LOCK:
                _INDEX_CACHE[key] = (self._starts, self._ends)

    def _read_index(self) -> tuple[list[int], list[int | None]]:
        n = self.number_of_frames
        # The PixelData element header, the Basic Offset Table item (and the table itself,
        # up to thousands of frames) and, without a table, the first items: the bytes the
        # header's last block read held after PixelData, else one read.
        at = self._pixel_data_at
        head, self._after_header = self._after_header, b""
        if len(head) < 64:
            head = self._source.read(at, at + HEADER_BLOCK)
        value_at, length = self._parse_pixel_data_head(head)
        if not self._encapsulated:
            size = self._native_frame_bytes()
            return (
                [value_at + k * size for k in range(n)],
                [value_at + (k + 1) * size for k in range(n)],
            )
        if length != 0xFFFFFFFF:
            raise ez_wsi_errors.EZWsiError(f"{self.uri}: encapsulated PixelData of defined length")
        bot_head = head[value_at - at : value_at - at + 8]
        if bot_head[:4] != _ITEM:
            raise ez_wsi_errors.EZWsiError(f"{self.uri}: no Basic Offset Table item")
        bot_length = struct.unpack("<I", bot_head[4:8])[0]
        if bot_length % 4 or bot_length > 4 * n:  # a Basic Offset Table holds n offsets
            raise SlideError(
                ReasonCode.OVERSIZED_HEADER,
                f"{urls.redact_url(self.uri)}: Basic Offset Table of {bot_length} bytes for "
                f"{n} frames",
            )
        first = value_at + 8 + bot_length  # first fragment's item tag
        eot = self.header.get("ExtendedOffsetTable")
        if eot is not None:
            offsets = np.frombuffer(bytes(eot), "<u8").tolist()
            lengths = np.frombuffer(bytes(self.header.ExtendedOffsetTableLengths), "<u8").tolist()
            starts = [first + int(o) for o in offsets]
            # A frame of one fragment ends 8 + length after its item tag.
            ends: list[int | None] = [
                s + 8 + int(n_) for s, n_ in zip(starts, lengths, strict=True)
            ]
            how = "Extended Offset Table"
        elif bot_length:
            table = head[value_at + 8 - at : first - at]
            if len(table) < bot_length:
                table = self._source.read(value_at + 8, first)
            starts = [first + int(o) for o in np.frombuffer(table, "<u4").tolist()]
            ends = [*starts[1:], None]
            how = "Basic Offset Table"
        else:
            starts, ends = self._walk_items(first, n, head[first - at :])
            how = f"walking {len(starts)} item headers"
        if len(starts) != n:
            raise SlideError(
                ReasonCode.INCONSISTENT_FRAMES,
                f"{self.uri} declares NumberOfFrames {n}, but its PixelData holds "
                f"{len(starts)} frames ({how})",
            )
        _LOG.debug("%s: frame index of %d frames from %s", self.uri, n, how)
        return starts, ends

    def _walk_items(
        self, position: int, n: int, buffer: bytes = b""
    ) -> tuple[list[int], list[int | None]]:
        """(item offsets, item ends) of the first n items from `position`, read in blocks of
        WALK_BLOCK (`buffer`: bytes from `position` already read), one fragment per frame
        assumed, as without an offset table the standard requires it for multi-frame images.
        The last frame's end is known when the sequence delimiter follows its item."""
        starts: list[int] = []
        end = self.size
        buffer_at = position
        last_end = None
        while True:
            offset = position - buffer_at
            if offset + 8 > len(buffer):  # the next item header is not in the block
                if position + 8 > end:
                    break
                buffer_at, buffer = position, self._source.read(position, position + WALK_BLOCK)
                offset = 0
                if len(buffer) < 8:
                    break
            tag = buffer[offset : offset + 4]
            if len(starts) == n:
                if tag == _SEQUENCE_END:
                    last_end = position
                break
            if tag != _ITEM:
                break
            starts.append(position)
            position += 8 + struct.unpack("<I", buffer[offset + 4 : offset + 8])[0]
        return starts, [*starts[1:], last_end]

    def _ensure_index(self) -> None:
        with self._lock:
            if self._starts is None:
                self._build_index()

    # -- frames --------------------------------------------------------------------------------

    def _parse_frame(self, data: bytes, frame: int) -> bytes:
        if not self._encapsulated:
            return data[: self._native_frame_bytes()]
        fragments, pos = [], 0
        while pos + 8 <= len(data):
            tag, length = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
            if tag != _ITEM:
                break
            fragments.append(data[pos + 8 : pos + 8 + length])
            pos += 8 + length
        if not fragments:
            raise ez_wsi_errors.EZWsiError(f"{self.uri}: frame {frame} has no fragment")
        return b"".join(fragments)

    def _read_last_frame(self, start: int) -> bytes:
        """The last frame when no table gives its end: its item(s) up to the sequence end."""
        parts, pos = [], start
        while True:
            head = self._source.read(pos, pos + 8)
            if head[:4] != _ITEM:
                break
            length = struct.unpack("<I", head[4:8])[0]
            parts.append(self._source.read(pos + 8, pos + 8 + length))
            pos += 8 + length
        return b"".join(parts)

    def prefetch(self, frame_numbers: Iterable[int]) -> tuple[int, int]:
        """Reads these frames (1-based) into the cache, ranges closer than the source's merge
        gap in one request; returns (requests, bytes) planned. A remote source's requests go
        to the process's fetch pool and this returns at once: `frame_bytes` waits for the
        frame's request (and raises its error)."""
        self._ensure_index()
        assert self._starts is not None and self._ends is not None
        with self._lock:
            wanted = []
            for f in sorted(set(frame_numbers)):
                if (self.uri, f) in self._cache:
                    continue
                pending = self._pending.get(f)
                if pending is not None and not pending.done():
                    continue
                self._pending.pop(f, None)
                wanted.append(f)
        if not wanted:
            return 0, 0
        gap = self._source.merge_gap
        runs: list[list[int]] = []
        for f in wanted:
            previous_end = self._ends[runs[-1][-1] - 1] if runs else None
            if previous_end is not None and 0 <= self._starts[f - 1] - previous_end <= gap:
                runs[-1].append(f)
            else:
                runs.append([f])
        planned = sum(
            (self._ends[r[-1] - 1] or self._starts[r[-1] - 1]) - self._starts[r[0] - 1]
            for r in runs
        )
        self.stats.add(0, 0, len(wanted))
        _FRAMES.inc(len(wanted))
        if not self._source.concurrent:
            for run in runs:
                self._fetch(run)
            return len(runs), planned
        pool = _fetch_pool()
        _REQUESTS.inc(len(runs))
        _BYTES.inc(planned)
        with self._lock:
            for run in runs:  # in file order: the first rows of a chunk arrive first
                future = pool.submit(self._fetch_in_pool, run)
                for f in run:
                    self._pending[f] = future
                future.add_done_callback(functools.partial(self._fetched, run))
        return len(runs), planned

    def _fetched(self, run: list[int], future: concurrent.futures.Future) -> None:
        """Forgets a fetch once its frames are cached; a failed one stays, so that reading
        one of its frames raises its error."""
        if future.exception() is None:
            with self._lock:
                for f in run:
                    if self._pending.get(f) is future:
                        del self._pending[f]

    def _fetch_in_pool(self, run: list[int]) -> None:
        _FETCH_THREAD.active = True
        self._fetch(run)

    def _fetch(self, run: list[int]) -> None:
        """One run of frames into the cache: one range read (the last frame, whose end no
        table gives, by its item headers)."""
        assert self._ends is not None and self._starts is not None
        if self._ends[run[-1] - 1] is None:
            if len(run) > 1:
                self._fetch_run(run[:-1])
            self._store(run[-1], self._read_last_frame(self._starts[run[-1] - 1]))
        else:
            self._fetch_run(run)

    def _store(self, frame: int, data: bytes) -> None:
        with self._lock:
            self._cache[(self.uri, frame)] = data

    def _fetch_run(self, run: list[int]) -> None:
        assert self._starts is not None and self._ends is not None
        lo, hi = self._starts[run[0] - 1], self._ends[run[-1] - 1]
        assert hi is not None
        data = self._source.read(lo, hi)
        for f in run:
            s, e = self._starts[f - 1] - lo, self._ends[f - 1]
            assert e is not None
            self._store(f, self._parse_frame(data[s : e - lo], f))

    def frame_bytes(self, frame_number: int) -> bytes:
        """Stored bytes of one frame (1-based): from the cache, from its request in flight,
        or one range read."""
        key = (self.uri, frame_number)
        with self._lock:
            data = self._cache.get(key)
            pending = self._pending.get(frame_number) if data is None else None
        if pending is not None:
            try:
                pending.result()  # the fetch's own error (retries spent, 404, ...) here
            finally:
                with self._lock:
                    if self._pending.get(frame_number) is pending:
                        del self._pending[frame_number]
            with self._lock:
                data = self._cache.get(key)
        if data is None:
            self.prefetch([frame_number])
            with self._lock:
                pending = self._pending.pop(frame_number, None)
            if pending is not None:
                pending.result()
            with self._lock:
                data = self._cache.get(key)
        if data is None:  # evicted at once: only when one frame exceeds the cache
            raise ez_wsi_errors.EZWsiError(
                f"{self.uri}: frame {frame_number} does not fit the cache"
            )
        return data


_INDEX_LOCK = threading.Lock()
# {(uri, size, version, NumberOfFrames): (starts, ends)}: every chunk of an instance that a
# worker process reads reuses its frame index, also after the slide left patches.open_slide's
# cache (an instance without offset table costs size / WALK_BLOCK requests to index).
_INDEX_CACHE: cachetools.LRUCache = cachetools.LRUCache(INDEX_CACHE_ENTRIES)
_POOL_LOCK = threading.Lock()
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _fetch_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The worker process's fetch threads, made on first use.

    Why threads over the existing sources rather than obstore's `get_ranges` or fsspec's
    `cat_ranges`: both would bring a second HTTP stack with its own retry rules (obstore's
    RetryConfig, gcsfs' and aiohttp's), its own credential and emulator handling, and a new
    dependency (gcsfs for gs://), where the sources here already carry the project's retry
    policy (retry.py, applied to range reads by range_get) and error mapping (transient_http,
    read_error). The requests are I/O: the GIL is released while they wait, and range_get
    keeps the Python work per request small (see there)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(
                FETCH_THREADS, thread_name_prefix="range-fetch"
            )
        return _POOL


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def read_header_from(source: ByteSource, limit: int | None = None) -> tuple[pydicom.Dataset, int]:
    """(header, PixelData offset or -1) read through whole-block range reads, at most
    `limit` bytes (MAX_HEADER_BYTES) of them: SlideError(oversized_header) beyond."""
    ds, offset, _ = _read_header(source, limit)
    return ds, offset


def _read_header(
    source: ByteSource, limit: int | None = None
) -> tuple[pydicom.Dataset, int, bytes]:
    """read_header_from, and the bytes from PixelData to the end of the blocks read."""
    handle = RangeFile(source, limit=limit or MAX_HEADER_BYTES)
    ds = pydicom.dcmread(handle, stop_before_pixels=True)
    offset = handle.tell()
    handle.seek(offset)
    if handle.read(4) != _PIXEL_DATA:
        return ds, -1, b""
    return ds, offset, _PIXEL_DATA + handle.buffered_after(offset + 4)


# ---------------------------------------------------------------------------------------------
# ez-wsi slide over range readers
# ---------------------------------------------------------------------------------------------

_INSTANCE_TAGS = {
    tag.number
    for tag in (
        tags.SOP_CLASS_UID,
        tags.STUDY_INSTANCE_UID,
        tags.ACCESSION_NUMBER,
        *dicom_web_interface.DEFAULT_INSTANCE_TAGS,
    )
}


class RangeDicomFiles(local_dicom_file_interface.LocalDicomFileInterface):
    """ez-wsi's local-file interface with frames from range reads instead of whole files."""

    def __init__(self, readers: Sequence[DicomInstanceReader], base: str = "https://mock_url"):
        # no super().__init__(): there are no local files to open
        self._readers = {r.uid_tuple: r for r in readers}
        self._by_path: dict[str, DicomInstanceReader] = {}
        self._base = base

    def _selected(self, study_uid: str, series_uid: str) -> Iterator[DicomInstanceReader]:
        for (study, series, _), reader in self._readers.items():
            if study_uid in ("", study) and series_uid in ("", series):
                yield reader

    def add_dicom(self, path: str) -> None:
        raise NotImplementedError("RangeDicomFiles is built from readers")

    def get_study_uids(self) -> set[str]:
        return {k[0] for k in self._readers}

    def get_series_uids(self, study_uid: str) -> set[str]:
        return {k[1] for k in self._readers if k[0] == study_uid}

    def get_instances(self, study_uid: str, series_uid: str):
        out = []
        for reader in self._selected(study_uid, series_uid):
            h = reader.header
            metadata = pydicom.Dataset()
            for elem in h:
                if f"{elem.tag:08X}" in _INSTANCE_TAGS:
                    metadata.add(elem)
            js = metadata.to_json_dict()
            js.update(h.file_meta.to_json_dict())
            if reader.sparse_frames is not None:  # frames are asked for by row-major number
                js["00280008"] = {"vr": "IS", "Value": [reader.grid_frames]}
            study, series, sop = reader.uid_tuple
            path = dicom_path.FromString(
                f"{self._base}/studies/{study}/series/{series}/instances/{sop}"
            )
            out.append(dicom_web_interface._build_dicom_object(dicom_path.Type.INSTANCE, path, js))
        return out

    def get_dicom_file_paths(self, study_uid: str, series_uid: str) -> list[str]:
        return [r.uri for r in self._selected(study_uid, series_uid)]

    def reader_at(self, path: str) -> DicomInstanceReader:
        """The reader of an instance by its path string (str(dicom_path.Path))."""
        reader = self._by_path.get(path)
        if reader is None:
            reader = self._by_path[path] = self.reader(dicom_path.FromString(path))
        return reader

    def reader(self, instance_path: dicom_path.Path) -> DicomInstanceReader:
        key = (instance_path.study_uid, instance_path.series_uid, instance_path.instance_uid)
        reader = self._readers.get(key)
        if reader is None:
            raise ez_wsi_errors.DicomSlideMissingError(f"instance {key} is not in this slide")
        return reader

    def get_decoded_frame_image(
        self, instance_path: dicom_path.Path, frame_index: int, reduce: int = 0
    ):
        """A frame decoded to RGB; with reduce=1 at half size (in the codec for JPEG baseline
        and JPEG 2000, `transforms.dicom_io.codecs`; otherwise decoded whole and halved)."""
        reader = self.reader(instance_path)
        stored = reader.stored_frame(frame_index)
        if stored is None:  # left out of a TILED_SPARSE level
            frame = reader.absent_frame()
            return codecs.halve(frame) if reduce else frame
        data = reader.frame_bytes(stored)
        if not reduce:
            # --- GPU decode hook (issue 14; gpu_decode.py): None = no GPU decoder, CPU below ---
            gpu = gpu_decode.decode_frames([data], reader.transfer_syntax)
            if gpu is not None:
                return gpu[0]
            # --- end GPU decode hook ---
        if codecs.handles(reader.transfer_syntax):
            try:
                return codecs.decode_frame(data, reader.transfer_syntax, reduce)
            except ValueError:
                if reader.transfer_syntax != pydicom.uid.JPEGBaseline8Bit:
                    raise SlideError(
                        ReasonCode.DECODE_ERROR,
                        f"frame {frame_index} of {reader.uri} does not decode "
                        f"({len(data)} bytes, {reader.transfer_syntax})",
                    ) from None
                # a JPEG frame OpenCV refuses: ez-wsi's decoder below has the last word
        frame = self._decoded_by_ez_wsi(reader, data, frame_index)
        return codecs.halve(frame) if reduce else frame

    def _decoded_by_ez_wsi(self, reader: DicomInstanceReader, data: bytes, frame_index: int):
        h = reader.header
        if not reader._encapsulated:
            pixel_format = local_dicom_file_interface._get_pixel_format(h)
            return np.frombuffer(data, pixel_format).reshape(
                int(h.Rows), int(h.Columns), int(h.SamplesPerPixel)
            )
        if not dicom_frame_decoder.can_decompress_dicom_transfer_syntax(reader.transfer_syntax):
            raise ez_wsi_errors.UnsupportedTransferSyntaxError(
                f"cannot decode transfer syntax {reader.transfer_syntax} ({reader.uri})"
            )
        frame = dicom_frame_decoder.decode_dicom_compressed_frame_bytes(
            data, reader.transfer_syntax
        )
        if frame is None:  # a supported syntax, but the bytes do not decode
            raise SlideError(
                ReasonCode.DECODE_ERROR,
                f"frame {frame_index} of {reader.uri} does not decode "
                f"({len(data)} bytes, {reader.transfer_syntax})",
            )
        return frame

    def get_icc_profile_bytes(self, study_uid: str, series_uid: str) -> bytes:
        for reader in self._selected(study_uid, series_uid):
            h = reader.header
            for item in h.get("OpticalPathSequence", []):
                if "ICCProfile" in item:
                    return bytes(item.ICCProfile)
            if "ICCProfile" in h:
                return bytes(h.ICCProfile)
        return b""


def level_frames_by_instance(level, frame_numbers: Iterable[int]) -> dict[str, list[int]]:
    """{instance path: 1-based frame numbers in it} of whole-level frame numbers."""
    level = getattr(level, "source_level", level)  # a ResizedLevel reads its source
    out: dict[str, list[int]] = {}
    by_instance: dict[int, list[int]] = {}  # id(instance) -> its list in `out`
    for frame_number in frame_numbers:
        instance = level.get_instance_by_frame(frame_number)
        if instance is None:  # TILED_SPARSE levels may leave frames out
            continue
        frames = by_instance.get(id(instance))
        if frames is None:  # str(path) is costly: once per instance
            frames = by_instance[id(instance)] = out.setdefault(str(instance.path), [])
        frames.append(instance.instance_frame_number_from_wholes_slide_frame_number(frame_number))
    return out


def log_fetch(what: str, uri: str, frames: int, requests_: int, bytes_: int, total) -> None:
    """One line per batched fetch: frames per request and bytes, with the slide's totals
    (INFO for remote sources, DEBUG for local files)."""
    level = logging.INFO if is_remote(uri) else logging.DEBUG
    if requests_ and _LOG.isEnabledFor(level):
        _LOG.log(
            level,
            "%s %s: %d frames in %d requests (%.1f frames/request), %d bytes; "
            "slide total %d bytes in %d requests",
            what, urls.redact_url(uri), frames, requests_, frames / requests_, bytes_,
            total[0], total[1],
        )  # fmt: skip


class RangeDicomSlide(dicom_slide.LocalDicomSlide):
    """An ez-wsi LocalDicomSlide whose frames come from range reads, fetched in batches:
    `prefetch_frames` (called by transforms/patches.py before a chunk's frames are read) and
    `get_patch` (regions) first read every frame they need, neighbours in one request."""

    def __init__(self, uris: Sequence[str]):
        self.io = IoStats()
        self.uris = tuple(uris)
        # ez-wsi keys instances by a mock DICOMweb path; make it unique to these URIs so
        # caches keyed by it never mix this slide with the same instances read elsewhere.
        tag = hashlib.sha1("\n".join(sorted(self.uris)).encode()).hexdigest()[:16]
        readers = _open_readers(self.uris, self.io)
        self._files = RangeDicomFiles(readers, f"https://ranges.invalid/{tag}")
        super().__init__(self._files)

    @property
    def instance_bytes(self) -> int:
        return sum(r.size for r in self._files._readers.values())

    @property
    def fetches_concurrently(self) -> bool:
        """Whether `prefetch_frames` returns with its requests in flight (remote sources)."""
        return any(r._source.concurrent for r in self._files._readers.values())

    def _prefetch(self, by_instance: dict[str, list[int]], what: str) -> None:
        """Starts the range reads of these frames (remote: concurrently, in flight when this
        returns; the log line counts the requests and bytes asked for)."""
        frames_before = self.io.frames
        requests_, bytes_ = 0, 0
        for path, frames in by_instance.items():
            reader = self._files.reader_at(path)
            stored = (reader.stored_frame(f) for f in frames)
            asked = reader.prefetch([f for f in stored if f is not None])
            requests_, bytes_ = requests_ + asked[0], bytes_ + asked[1]
        log_fetch(
            what, self.uris[0].rsplit("/", 1)[0], self.io.frames - frames_before,
            requests_, bytes_, (self.io.bytes, self.io.requests),
        )  # fmt: skip

    def prefetch_frames(self, level, frame_numbers: Iterable[int]) -> None:
        self._prefetch(level_frames_by_instance(level, frame_numbers), "range reads for frames of")

    def decode_instance_frame(
        self, instance_path: dicom_path.Path, frame_number: int, reduce: int = 0
    ):
        """Frame `frame_number` (1-based) of an instance, decoded to RGB: JPEG baseline and
        JPEG 2000 by `codecs.decode_frame`, other syntaxes by ez-wsi's decoder; `reduce=1`:
        each side halved (in the codec where it can, `codecs`)."""
        return self._files.get_decoded_frame_image(instance_path, frame_number, reduce)

    def get_patch(self, level, x, y, width, height, require_fully_in_source_image=False):
        # ez-wsi decodes a local slide's region as the patch is made: fetch its frames first.
        frames = FrameGrid.of(level).region_numbers(x, y, width, height)
        what = f"range reads for a {width}x{height} region of"
        self._prefetch(level_frames_by_instance(level, frames), what)
        return super().get_patch(level, x, y, width, height, require_fully_in_source_image)


def _open_readers(uris: Sequence[str], stats: IoStats) -> list[DicomInstanceReader]:
    """The readers of a slide's instances. A remote slide's headers are read at once in the
    fetch pool (a slide of 4 levels waits one round trip per header block, not four); the
    requests they took are counted here, in the caller's Beam step."""
    if len(uris) < 2 or not any(is_remote(u) for u in uris):
        return [DicomInstanceReader(u, stats) for u in uris]

    def open_one(uri: str) -> DicomInstanceReader:
        _FETCH_THREAD.active = True
        return DicomInstanceReader(uri, stats)

    before = (stats.requests, stats.bytes)
    try:
        return list(_fetch_pool().map(open_one, uris))
    finally:
        _REQUESTS.inc(stats.requests - before[0])
        _BYTES.inc(stats.bytes - before[1])


def open_range_slide(uris: Sequence[str]) -> RangeDicomSlide:
    return RangeDicomSlide(uris)


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------

_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_S3_LIST = "https://{bucket}.s3.amazonaws.com/"


def list_uris(prefix: str) -> list[str]:
    """Every object under a gs:// or s3:// prefix, or every file under a local folder, sorted."""
    if prefix.startswith("gs://"):
        bucket, name = split_bucket_uri(prefix)
        blobs = gcs_client().list_blobs(bucket, prefix=name)
        return sorted(f"gs://{bucket}/{b.name}" for b in blobs if not b.name.endswith("/"))
    if prefix.startswith("s3://"):
        return sorted(_list_s3(*split_bucket_uri(prefix)))
    if re.match(r"^[a-z][a-z0-9+.-]*://", prefix):
        raise ValueError(f"cannot list {prefix!r}: use a folder, gs:// or s3:// prefix")
    return _list_local(prefix)


def _list_local(folder: str) -> list[str]:
    """Regular files under a local folder, sorted. Symbolic links are followed once: a folder
    or file reached twice (a link loop, two links to one file) is listed once, under the first
    path the walk reaches (a folder's files, in sorted order, before its subfolders).
    Anything else (named pipes, sockets, devices) is skipped with a log line: opening a named
    pipe blocks until something writes to it."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    out: list[str] = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            info = os.stat(directory)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            continue
        seen_dirs.add((info.st_dev, info.st_ino))
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            _LOG.warning("cannot list %s: %s", directory, exc)
            continue
        subdirs = []
        for name in names:
            path = os.path.join(directory, name)
            try:
                info = os.stat(path)  # follows links
            except OSError:  # a broken link
                _LOG.info("skipped %s: a broken link", path)
                continue
            if stat.S_ISDIR(info.st_mode):
                subdirs.append(path)
            elif not stat.S_ISREG(info.st_mode):
                _LOG.warning("skipped %s: not a regular file", path)
            elif (info.st_dev, info.st_ino) not in seen_files:
                seen_files.add((info.st_dev, info.st_ino))
                out.append(path)
        pending.extend(reversed(subdirs))
    return sorted(out)


@functools.cache
def _list_session() -> requests.Session:
    return retry.http_session()


def list_object_md5s(prefix: str) -> dict[str, str | None]:
    """{URI: hex MD5 of the object as the store reports it, or None} of every object under a
    gs:// or s3:// prefix, from the listing itself (no request per object). GCS reports each
    object's MD5 (base64); S3 its ETag, which is the MD5 unless the object was uploaded in
    parts (then it holds a '-' and says nothing about the bytes: None)."""
    if prefix.startswith("gs://"):
        bucket, name = split_bucket_uri(prefix)
        out = {}
        for blob in gcs_client().list_blobs(bucket, prefix=name):
            if not blob.name.endswith("/"):
                md5 = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else None
                out[f"gs://{bucket}/{blob.name}"] = md5
        return out
    if prefix.startswith("s3://"):
        return dict(_list_s3(*split_bucket_uri(prefix), with_etag=True))
    raise ValueError(f"cannot list object MD5s under {prefix!r}: use a gs:// or s3:// prefix")


def _etag_md5(etag: str | None) -> str | None:
    value = (etag or "").strip('"').lower()
    return value if re.fullmatch(r"[0-9a-f]{32}", value) else None


def _list_s3(bucket: str, prefix: str, with_etag: bool = False) -> Iterator:
    token = None
    while True:
        params = {"list-type": "2", "prefix": prefix}
        if token:
            params["continuation-token"] = token
        # The project's retry policy (a `503 SlowDown` is retried, then transient_http).
        url = _S3_LIST.format(bucket=bucket)
        try:
            response = _list_session().get(url, params=params)
        except requests.RequestException as exc:
            raise retry.transient_http(f"S3 list {url}", exc) from exc
        retry.raise_for_status(response, f"S3 list {url}")
        root = ET.fromstring(response.content)
        for item in root.iter(f"{_S3_NS}Contents"):
            key = item.findtext(f"{_S3_NS}Key")
            if key and not key.endswith("/"):
                uri = f"s3://{bucket}/{key}"
                yield (uri, _etag_md5(item.findtext(f"{_S3_NS}ETag"))) if with_etag else uri
        if root.findtext(f"{_S3_NS}IsTruncated") != "true":
            return
        token = root.findtext(f"{_S3_NS}NextContinuationToken")
