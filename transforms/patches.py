"""Reading a slide's pixels through ez-wsi-dicomweb: the mask-level image and 224 px patches.

Slides are ez-wsi slide objects: local files and gs://, s3://, http(s) files are read by byte
ranges (`transforms.dicom_io.byte_ranges`: a frame offset index, only the frames asked for, so
a worker never holds a whole instance, which for a 100k-patch 20x level is ~2 GB compressed),
WADO-RS URLs through DICOMweb (`transforms.dicom_io.dicomweb`); `open_slide` picks the reader.

Patches are assembled from decoded DICOM frames in numpy: each patch copies the parts of the
1-4 frames it overlaps (4-9 at 40x) into place, and a finer-than-20x level is downsampled per
patch with cv2.INTER_AREA (patch [x, y] covers native pixels from floor(x * d), size
round(224 * d)), so a patch's pixels never depend on which chunk it travelled in. Only the
frames that kept patches overlap are decoded, each once per chunk: a chunk is assembled one
patch row at a time, keeping the frames the next row still needs. Frames reaching outside the
chunk's footprint also go to a per-worker LRU cache bounded in bytes (`FRAME_CACHE_BYTES`), so
the neighbouring chunk finds them if it comes while they are cached. With the default chunks
(16 x 16 cells) and 256 px frames, chunk borders fall on frame borders at 20x and at exactly
40x (16 x 224 = 14 x 256), so every frame of a slide is decoded once whatever the order.

Frames are decoded by the slide: the byte-range slide's `decode_instance_frame()` (JPEG
baseline with OpenCV and JPEG 2000 with OpenJPEG, straight to RGB, `dicom_io.codecs`; other
syntaxes with ez-wsi's decoder), or ez-wsi's `get_frame()` for DICOMweb slides. A slide that
fetches frames in batches offers `prefetch_frames(level, frame_numbers)`: it is called once per
chunk with the frames the chunk needs that the cache lacks (one request per run of neighbouring
frames), before they are decoded. The frames a patch row needs that are neither kept nor cached
are decoded in parallel on a pool of DECODE_THREADS threads (one per core; the decoders release
the GIL), the next row's starting while this row's patches are copied: a JPEG 2000 frame takes
~5-20 ms, so one thread would leave the other cores idle.

With `reduced` (config read.reduced_decode), a level at least REDUCE_MIN_DOWNSAMPLE finer than
the patch frame (40x for 20x patches) is decoded at half resolution inside the codec (JPEG: DCT
scaling; JPEG 2000: its finest wavelet level is never decoded) and patches are cut from the
half-size frames, with the same geometry halved; the result differs slightly from the INTER_AREA
path (docs/performance.md), so it is an option in the parameter hash.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future

import cv2
import numpy as np
from ez_wsi_dicomweb import dicom_slide, ez_wsi_errors, image_util, slide_level_map
from PIL import ImageCms

from transforms.dicom_io import byte_ranges, codecs, dicomweb
from transforms.dicom_io.frames import FrameGrid
from transforms.errors import ReasonCode, SlideError

# Open slides kept per worker process (each keeps a bounded cache of compressed frames).
SLIDE_CACHE_SIZE = 2
# Decoded frames kept per worker process (a 256 x 256 RGB frame is 192 KiB).
FRAME_CACHE_BYTES = 256 * 1024 * 1024
# color.icc_profile: none = stored values; srgb = from the slide's ICC profile to sRGB.
ICC_PROFILES = ("none", "srgb")
# read.reduced_decode: a level at least this much finer than the patch frame (40x for a 20x
# target) is decoded at half resolution in the codec, then resized by the rest (~1).
REDUCE_MIN_DOWNSAMPLE = 1.8
# Threads decoding a chunk's frames in parallel (the decoders release the GIL): the cores this
# process may run on, or PATHEMBED_DECODE_THREADS (e.g. 1 where a runner starts one worker
# process per core).
DECODE_THREADS = int(os.environ.get("PATHEMBED_DECODE_THREADS") or 0) or len(
    os.sched_getaffinity(0)
)


@contextlib.contextmanager
def slide_errors(what: str) -> Iterator[None]:
    """Turns ez-wsi and decoder errors into SlideErrors with a reason code."""
    try:
        yield
    except ez_wsi_errors.UnsupportedTransferSyntaxError as exc:
        # ez-wsi raises this also for a frame that does not decode in a supported syntax.
        corrupt = "decoding frame bytes" in str(exc)
        reason = ReasonCode.DECODE_ERROR if corrupt else ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX
        raise SlideError(reason, f"{what}: {exc}") from exc
    except (
        ez_wsi_errors.HttpTooManyRequestsError,
        ez_wsi_errors.HttpServiceUnavailableError,
        ez_wsi_errors.HttpGatewayTimeoutError,
        ez_wsi_errors.HttpRequestTimeoutError,
        ez_wsi_errors.HttpInternalServerError,
    ) as exc:
        raise SlideError(ReasonCode.TRANSIENT_HTTP, f"{what}: {exc}") from exc
    except (ez_wsi_errors.EZWsiError, OSError) as exc:
        # PIL reports a truncated JPEG frame as an OSError.
        corrupt = "image file is truncated" in str(exc)
        reason = ReasonCode.DECODE_ERROR if corrupt else ReasonCode.READ_ERROR
        raise SlideError(reason, f"{what}: {exc}") from exc
    except (cv2.error, ValueError) as exc:
        raise SlideError(ReasonCode.DECODE_ERROR, f"{what}: {exc}") from exc


@functools.lru_cache(maxsize=SLIDE_CACHE_SIZE)
def open_slide(
    files: tuple[tuple[str, str], ...], dicomweb_auth: str = "auto"
) -> dicom_slide.LocalDicomSlide:
    """The ez-wsi slide of these (SOPInstanceUID, URI) levels, opened once per worker process.

    WADO-RS instance URLs are read through DICOMweb (batched frame requests; `dicomweb_auth`:
    auto, google or none, see dicomweb.credentials_for); local paths and gs://, s3://, http(s)
    files by the byte-range reader (ez-wsi's LocalDicomSlide would load whole files: 1.8 GB of
    memory for a 100k-patch level). Both are ez-wsi slides (`levels`, `get_patch(...)`), so
    everything below works on either unchanged.
    """
    uris = [uri for _, uri in files]
    web = [dicomweb.is_instance_url(u) for u in uris]
    with slide_errors("opening slide"):
        if all(web):
            try:
                return dicomweb.open_dicomweb_slide(uris, dicomweb_auth)
            except ValueError as exc:
                raise SlideError(ReasonCode.READ_ERROR, f"DICOMweb slide: {exc}") from exc
        if any(web):
            raise SlideError(ReasonCode.READ_ERROR, "a slide mixes DICOMweb URLs and file URIs")
        return byte_ranges.open_range_slide(uris)


def level_of(slide: dicom_slide.LocalDicomSlide, sop_instance_uid: str) -> slide_level_map.Level:
    """The ez-wsi pyramid level that holds this instance."""
    for level in slide.levels:
        if sop_instance_uid in level.get_level_sop_instance_uids():
            return level
    raise SlideError(ReasonCode.READ_ERROR, f"instance {sop_instance_uid} is not a pyramid level")


def read_region(
    slide: dicom_slide.LocalDicomSlide, level: slide_level_map.Level, x: int, y: int, w: int, h: int
) -> np.ndarray:
    """RGB uint8 [h, w, 3] of a level region (pixels outside the level are padding)."""
    with slide_errors(f"reading region {w}x{h} at ({x}, {y})"):
        pixels = slide.get_patch(level, x, y, w, h).image_bytes()
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise SlideError(ReasonCode.DECODE_ERROR, f"expected RGB pixels, got {pixels.shape}")
    return pixels


class FrameCache:
    """Decoded frames, least recently used first out, at most `max_bytes`; thread-safe.

    `decodes` counts the frames decoded through it (kept or not), `hits` those it served.
    """

    def __init__(self, max_bytes: int = FRAME_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.decodes = 0
        self.hits = 0
        self._frames: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, touch: bool = True) -> np.ndarray | None:
        """The cached frame, or None; a hit makes it the most recently used (and counts)
        unless `touch` is False."""
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None and touch:
                self._frames.move_to_end(key)
                self.hits += 1
            return frame

    def decode(
        self, key: tuple, decode: Callable[[], np.ndarray | None], keep: bool
    ) -> np.ndarray | None:
        """Decodes a frame that `get` did not have; keeps it if asked and it fits."""
        frame = decode()
        with self._lock:
            self.decodes += 1
            if not keep or frame is None or frame.nbytes > self.max_bytes or key in self._frames:
                return frame
            frame.flags.writeable = False
            self._frames[key] = frame
            self.bytes += frame.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._frames.popitem(last=False)
                self.bytes -= old.nbytes
        return frame

    def forget(self, sop_instance_uids: Collection[str]) -> None:
        """Drops the frames of these instances (their slide is done: no chunk wants them)."""
        with self._lock:
            for key in [k for k in self._frames if k[0] in sop_instance_uids]:
                self.bytes -= self._frames.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self.bytes = self.decodes = self.hits = 0


FRAMES = FrameCache()  # the worker process's decoded frames


class _ChunkFrames:
    """The decoded frames of one chunk's level, each decoded at most once for the chunk.

    Patches are assembled one row at a time; frames stay in `window` while a later row still
    needs them, and the next row's frames are decoding on the pool while a row's patches are
    copied (so at most two rows of frames are held). Frames reaching outside the chunk's
    footprint may be wanted by a neighbouring chunk, so they also go to the worker's cache.
    """

    def __init__(
        self,
        slide: dicom_slide.LocalDicomSlide,
        level: slide_level_map.Level,
        cache: FrameCache,
        footprint: tuple[int, int, int, int],  # x0, y0, x1, y1 (decoded pixels, exclusive)
        reduce: int = 0,  # frames decoded with each side halved this many times
    ) -> None:
        self._slide, self._level, self._cache = slide, level, cache
        self._footprint = footprint
        self._reduce = reduce
        self._grid = _decoded_grid(level, reduce)
        self.window: dict[int, np.ndarray | None] = {}
        # frames being decoded (Future) or to decode when read (a call), by number
        self._pending: dict[int, Future | Callable[[], np.ndarray | None]] = {}
        self._pool = DECODE_THREADS > 1

    def prefetch(self, numbers: set[int]) -> None:
        """Fetches the stored bytes of the chunk's frames that the cache lacks, in one batch
        (one request per run of neighbouring frames), if the slide fetches in batches."""
        fetch = getattr(self._slide, "prefetch_frames", None)
        if fetch is None:
            return
        wanted = []
        for number in sorted(numbers):
            located = _locate(self._level, number, self._reduce)
            if located is not None and self._cache.get(located[0], touch=False) is None:
                wanted.append(number)
        if wanted:
            with slide_errors(f"fetching {len(wanted)} frames"):
                fetch(self._level, wanted)

    def get(
        self, numbers: list[int], ahead: list[int] | tuple[int, ...] = ()
    ) -> dict[int, np.ndarray | None]:
        """Frames by whole-level 1-based number, decoding those neither kept nor cached; the
        frames `ahead` (the next patch row's) start decoding on the pool meanwhile."""
        self._start(numbers)
        self._start(ahead)
        out = {}
        for number in numbers:
            if number in self.window:
                out[number] = self.window[number]
            else:
                pending = self._pending.pop(number)
                out[number] = pending.result() if isinstance(pending, Future) else pending()
        self.window.update(out)
        return out

    def _start(self, numbers: list[int] | tuple[int, ...]) -> None:
        """Looks frames up in the cache and starts decoding the rest: on the pool (one frame
        per task; the decoders release the GIL) when there are several cores, else when read."""
        for number in numbers:
            if number in self.window or number in self._pending:
                continue
            located = _locate(self._level, number, self._reduce)
            frame = None if located is None else self._cache.get(located[0])
            if frame is None and located is not None:
                decode = functools.partial(self._decode, number, *located)
                self._pending[number] = _decode_pool().submit(decode) if self._pool else decode
            else:
                self.window[number] = frame

    def _decode(
        self, number: int, key: tuple, instance: slide_level_map.Instance
    ) -> np.ndarray | None:
        with slide_errors(f"reading frame {number}"):
            decode = functools.partial(
                _decoded, self._slide, self._level, number, key[1], instance, self._reduce
            )
            return self._cache.decode(key, decode, keep=self._outside(number))

    def keep_rows_from(self, frame_row: int) -> None:
        """Forgets the frames above `frame_row` (no later patch row needs them)."""
        self.window = {
            n: f for n, f in self.window.items() if self._grid.row_col(n)[0] >= frame_row
        }

    def _outside(self, number: int) -> bool:
        fw, fh = self._grid.frame_width, self._grid.frame_height
        row, col = self._grid.row_col(number)
        x0, y0, x1, y1 = self._footprint
        return col * fw < x0 or (col + 1) * fw > x1 or row * fh < y0 or (row + 1) * fh > y1


@functools.cache
def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The worker process's frame-decoding threads, made when first needed."""
    return concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")


def _decoded_grid(level: slide_level_map.Level, reduce: int) -> FrameGrid:
    """The level's frame grid in decoded pixels: frames of ceil(side / 2**reduce), the same
    frame numbers (reduce > 0 needs frame sides divisible by 2**reduce, `_reduction`)."""
    grid = FrameGrid.of(level)
    if not reduce:
        return grid
    size = functools.partial(codecs.reduced_size, reduce=reduce)
    return FrameGrid(
        size(grid.width), size(grid.height), size(grid.frame_width), size(grid.frame_height)
    )


def _reduction(level: slide_level_map.Level, downsample: float, reduced: bool) -> int:
    """Halvings done in the codec: 1 when asked for, the level is at least
    REDUCE_MIN_DOWNSAMPLE finer than the patch frame and its frames have even sides."""
    if not reduced or downsample < REDUCE_MIN_DOWNSAMPLE:
        return 0
    grid = FrameGrid.of(level)
    return int(grid.frame_width % 2 == 0 and grid.frame_height % 2 == 0)


def _locate(
    level: slide_level_map.Level, frame_number: int, reduce: int = 0
) -> tuple[tuple, slide_level_map.Instance] | None:
    """((SOPInstanceUID, frame number in it[, reduce]), instance) of a whole-level frame
    number, None if the level leaves the frame out (TILED_SPARSE)."""
    instance = level.get_instance_by_frame(frame_number)
    if instance is None:
        return None
    n = instance.instance_frame_number_from_wholes_slide_frame_number(frame_number)
    key = (instance.dicom_object.sop_instance_uid, n)
    return ((*key, reduce) if reduce else key), instance


def _decoded(
    slide: dicom_slide.LocalDicomSlide,
    level: slide_level_map.Level,
    frame_number: int,
    instance_frame_number: int,
    instance: slide_level_map.Instance,
    reduce: int = 0,
) -> np.ndarray | None:
    # The byte-range slide decodes an instance's frame directly: ez-wsi's get_frame() builds
    # path strings and Frame objects per frame, ~10% of the decode time of a 256 px frame.
    decode = getattr(slide, "decode_instance_frame", None)
    if decode is not None:
        if reduce:
            pixels = decode(instance.path, instance_frame_number, reduce=reduce)
        else:
            pixels = decode(instance.path, instance_frame_number)
    else:
        frame = slide.get_frame(level, frame_number)
        if frame is None:
            return None
        pixels = frame.image_np
        if reduce:  # DICOMweb frames: decoded whole, then halved
            pixels = codecs.halve(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise SlideError(ReasonCode.DECODE_ERROR, f"expected RGB frames, got {pixels.shape}")
    return pixels


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a chunk's patches lie in a level's decoded frames: patch rows (indices into
    coords, top to bottom) and the frames each row overlaps."""

    reduce: int  # halvings done in the codec (read.reduced_decode)
    grid: FrameGrid  # the level's frames in decoded pixels
    native: int  # a patch's side in decoded pixels
    starts: np.ndarray  # int64 [n, 2]: each patch's top-left in decoded pixels
    footprint: tuple[int, int, int, int]  # x0, y0, x1, y1 of all patches
    rows: list[np.ndarray]
    row_numbers: list[list[int]]

    @classmethod
    def of(cls, level, coords: np.ndarray, downsample: float, patch_size: int, reduced: bool):
        reduce = _reduction(level, downsample, reduced)
        d = downsample / (1 << reduce)  # from the patch frame to decoded pixels
        grid = _decoded_grid(level, reduce)
        # decoded pixels past the level's edge are the codec's rounding up: never read them
        width, height = level.width >> reduce, level.height >> reduce
        native = round(patch_size * d)
        starts = np.floor(coords * d).astype(np.int64)
        starts[:, 0] = np.minimum(starts[:, 0], width - native)
        starts[:, 1] = np.minimum(starts[:, 1], height - native)
        x0, y0 = starts.min(axis=0).tolist()
        x1, y1 = (starts.max(axis=0) + native).tolist()
        order = np.lexsort((starts[:, 0], starts[:, 1]))
        rows = np.split(order, np.flatnonzero(np.diff(starts[order, 1])) + 1)
        row_numbers = []  # per patch row: the frames it overlaps
        for members in rows:
            sy = int(starts[members[0], 1])
            xs = starts[members, 0].tolist()
            columns = sorted({c for sx in xs for c in grid.columns(sx, native)})
            row_numbers.append([grid.number(r, c) for r in grid.rows(sy, native) for c in columns])
        return cls(reduce, grid, native, starts, (x0, y0, x1, y1), rows, row_numbers)

    def fetch(self, slide, level, cache: FrameCache | None) -> _ChunkFrames:
        """The chunk's frames, their stored bytes fetched (remote: the requests in flight)."""
        frames = _ChunkFrames(
            slide, level, FRAMES if cache is None else cache, self.footprint, self.reduce
        )
        frames.prefetch({n for numbers in self.row_numbers for n in numbers})
        return frames


def fetch_ahead(
    slide: dicom_slide.LocalDicomSlide,
    level: slide_level_map.Level,
    coords: np.ndarray,
    downsample: float,
    patch_size: int = 224,
    reduced: bool = False,
    cache: FrameCache | None = None,
) -> None:
    """Starts fetching the stored frames that `read_patches` will need for these patches and
    returns at once, where the slide fetches concurrently (remote byte ranges: the requests go
    to the fetch pool); elsewhere it does nothing (a local read is as fast done when needed).
    The chunk reader calls it for the chunks queued behind the one being decoded, so their
    round trips overlap its decoding (`transforms/stages.embed_plan`)."""
    coords = np.asarray(coords, np.int64)
    if len(coords) == 0 or not getattr(slide, "fetches_concurrently", False):
        return
    _Layout.of(level, coords, downsample, patch_size, reduced).fetch(slide, level, cache)


def read_patches(
    slide: dicom_slide.LocalDicomSlide,
    level: slide_level_map.Level,
    coords: np.ndarray,
    downsample: float,
    patch_size: int = 224,
    cache: FrameCache | None = None,
    reduced: bool = False,
) -> np.ndarray:
    """uint8 [N, patch, patch, 3]: the patches at `coords` (patch-source frame) of a level.

    With downsample d > 1, patch [x, y] covers native pixels starting at floor(x * d), size
    round(patch * d), resized to `patch` with INTER_AREA. `cache` defaults to the worker's.
    `reduced` (read.reduced_decode): a level with d >= REDUCE_MIN_DOWNSAMPLE is decoded at
    half resolution in the codec and patch [x, y] is cut from that image (start
    floor(x * d / 2), size round(patch * d / 2)), resized only when that size is not `patch`.
    """
    coords = np.asarray(coords, np.int64)
    out = np.empty((len(coords), patch_size, patch_size, 3), np.uint8)
    if len(coords) == 0:
        return out
    lay = _Layout.of(level, coords, downsample, patch_size, reduced)
    frames = lay.fetch(slide, level, cache)
    grid, native, starts = lay.grid, lay.native, lay.starts
    rows, row_numbers = lay.rows, lay.row_numbers
    fw, fh = grid.frame_width, grid.frame_height
    scratch = None if native == patch_size else np.empty((native, native, 3), np.uint8)
    for k, members in enumerate(rows):
        sy = int(starts[members[0], 1])
        frame_rows = grid.rows(sy, native)
        xs = starts[members, 0].tolist()
        row_frames = frames.get(row_numbers[k], row_numbers[k + 1] if k + 1 < len(rows) else ())
        for index, sx in zip(members.tolist(), xs, strict=True):
            target = out[index] if scratch is None else scratch
            for r in frame_rows:
                fy = r * fh
                py0, py1 = max(sy, fy), min(sy + native, fy + fh)
                for c in grid.columns(sx, native):
                    fx = c * fw
                    px0, px1 = max(sx, fx), min(sx + native, fx + fw)
                    frame = row_frames[grid.number(r, c)]
                    region = target[py0 - sy : py1 - sy, px0 - sx : px1 - sx]
                    if frame is None:
                        region[...] = 0  # a frame the level leaves out
                    else:
                        region[...] = frame[py0 - fy : py1 - fy, px0 - fx : px1 - fx]
            if scratch is not None:
                cv2.resize(
                    scratch, (patch_size, patch_size), dst=out[index], interpolation=cv2.INTER_AREA
                )
        if k + 1 < len(rows):
            frames.keep_rows_from(grid.rows(int(starts[rows[k + 1][0], 1]), 1).start)
    return out


def read_level_image(
    slide: dicom_slide.LocalDicomSlide, level: slide_level_map.Level
) -> np.ndarray:
    """The whole level as RGB uint8 (for the ~2X mask level and the thumbnail)."""
    return read_region(slide, level, 0, 0, level.width, level.height)


def chunk_order(coords: np.ndarray, columns_per_block: int) -> list[np.ndarray]:
    """Index arrays splitting row-major grid coords into square blocks of neighbouring patches.

    `coords` are [x, y] multiples of the patch size divided out by the caller (grid indices).
    """
    if len(coords) == 0:
        return []
    block = np.asarray(coords) // columns_per_block
    keys = block[:, 1] * (block[:, 0].max() + 1) + block[:, 0]
    order = np.lexsort((coords[:, 0], coords[:, 1], keys))
    sorted_keys = keys[order]
    splits = np.flatnonzero(np.diff(sorted_keys)) + 1
    return np.split(order, splits)


def block_side(chunk_size: int) -> int:
    """Grid cells per block side so that a block holds at most `chunk_size` patches."""
    return max(1, math.isqrt(chunk_size))


@functools.lru_cache(maxsize=SLIDE_CACHE_SIZE)
def srgb_transform(
    files: tuple[tuple[str, str], ...], dicomweb_auth: str = "auto"
) -> ImageCms.ImageCmsTransform | None:
    """The slide's ICC profile -> sRGB transform (ez-wsi), None if the slide has no profile.

    Local and bucket slides read the profile from the header; DICOMweb asks the server
    (the profile's bulk data URI, or the instance where the server gives none)."""
    slide = open_slide(files, dicomweb_auth)
    with slide_errors("reading the ICC profile"):
        return slide.create_icc_profile_transformation(dicom_slide.get_srgb_icc_profile())


def to_srgb(patches: np.ndarray, transform: ImageCms.ImageCmsTransform | None) -> np.ndarray:
    """uint8 RGB patches [N, H, W, 3] through `transform`: ez-wsi's colour transform, applied
    once to the patches stacked into one image."""
    if transform is None or len(patches) == 0:
        return patches
    n, h, w, c = patches.shape
    stacked = image_util.transform_image_bytes_color(patches.reshape(n * h, w, c), transform)
    return np.ascontiguousarray(stacked).reshape(n, h, w, c)
