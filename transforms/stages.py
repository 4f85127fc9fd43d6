"""The DAG's steps as thin Beam wrappers: each times and counts; the work is elsewhere.

After planning, the slide is the unit: SkipDoneOrUnrequested (outputs/artifacts.py: markers),
PlanSlideFn (plan.py), EmbedSlides = RunInference over whole slides (SlideModelHandler: the
chunks read ahead by threads with patches.py, embedded with models/handler.py),
ClusterSlideFn (clustering.py), WriteSlideFn (outputs/artifacts.py: files, rows, marker). No
step waits for other slides, so a slide is written and committed while others are still being
read. Failures are not handled here: the DAG wraps every step with Beam's
`with_exception_handling`, and transforms/failures.py turns dead letters into failure rows;
each step counts the slides that reach it for the breaker (failures.note_tried).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.runners.worker import statesampler

from models.signature import EMBEDDING_DIM
from transforms import clustering, failures, metrics, patches
from transforms.dicom_io import gpu_decode
from transforms.errors import ReasonCode, SlideError
from transforms.outputs import artifacts, lease, reruns
from transforms.outputs.layout import ArtifactPaths
from transforms.plan import PatchChunk, PlanParams, SlidePlan, SlideResult, plan_slide
from transforms.records import SlideRecord, requested

_LOG = logging.getLogger(__name__)


class SkipDoneOrUnrequested(beam.DoFn):
    """Keeps slides that were asked for and are not complete with these parameters.

    Complete: the completion marker is present, its parameter hash is this run's, its
    instance hash is the record's (when both are known), the run that wrote it wrote the
    slide's rows (its resource row file), and the files it records are there with their recorded
    sizes (and SHA-256 checksums with `verify_checksums`). With `resource_table` (new-release
    mode) slides in that table with an unchanged instance hash are skipped without looking
    at their markers; the table is read once per worker, in `setup`.
    """

    def __init__(
        self,
        *,
        output_root: str,
        dataset_version: str,
        n_clusters: int,
        parameter_hash: str,
        uuids: frozenset[str],
        force: bool,
        resource_table: str | None = None,
        run_id: str | None = None,
        verify_checksums: bool = False,
        lease_ttl_s: float = 3600.0,
    ):
        self._root = output_root
        self._version = dataset_version
        self._n_clusters = n_clusters
        self._hash = parameter_hash
        self._uuids = uuids
        self._force = force
        self._resource_table = resource_table
        self._run_id = run_id
        self._verify_checksums = verify_checksums
        self._lease_ttl_s = lease_ttl_s
        self._in_use = metrics.counter(metrics.SLIDES_SKIPPED_IN_USE)
        self._known: dict[str, str | None] = {}
        self._skipped = metrics.counter(metrics.SLIDES_SKIPPED_COMPLETE)
        self._to_process = metrics.counter(metrics.SLIDES_TO_PROCESS)

    def setup(self) -> None:
        if self._resource_table:
            self._known = reruns.known_instances(self._resource_table)
            _LOG.info("%d slides already in %s", len(self._known), self._resource_table)

    def _complete(self, record: SlideRecord) -> bool:
        paths = ArtifactPaths.for_slide(
            self._root, record.instance_uuid, self._version, self._n_clusters
        )
        marker = artifacts.completion_marker(paths)
        done = (
            marker is not None
            and marker.get("parameter_hash") == self._hash
            and (
                record.instance_hash is None
                or marker.get("instance_hash") in (None, record.instance_hash)
            )
            and artifacts.rows_committed(self._root, marker.get("run_id"), record.instance_uuid)
        )
        if not done:
            return False
        # The marker vouches for the files only if they are still the ones it recorded.
        problem = artifacts.marker_problem(paths, marker, self._verify_checksums)
        if problem is not None:
            _LOG.warning("slide %s is redone: %s", record.instance_uuid, problem)
        return problem is None

    def process(self, record: SlideRecord) -> Iterator[SlideRecord]:
        if not requested(record, self._uuids):  # by its UUID or an earlier failure row's
            return
        unchanged = self._resource_table and reruns.is_unchanged(
            self._known, record.instance_uuid, record.instance_hash
        )
        if unchanged or (not self._force and self._complete(record)):
            self._skipped.inc()
            return
        if self._run_id and not self._lease(record):
            self._in_use.inc()  # another live run is writing it: it is that run's to finish
            return
        self._to_process.inc()
        yield record

    def _lease(self, record: SlideRecord) -> bool:
        """Takes the slide's lease for this run (one writer per slide: outputs/lease.py); it
        is released when the slide is written or has failed."""
        paths = ArtifactPaths.for_slide(self._root, record.instance_uuid, self._version)
        return lease.acquire(paths, self._run_id, self._lease_ttl_s) is not None


class PlanSlideFn(beam.DoFn):
    """SlideRecord -> SlidePlan (coordinates, thumbnails and the chunks to read; no pixels)."""

    def __init__(self, params: PlanParams, run_id: str):
        self._params = params
        self._run_id = run_id
        self._patches = metrics.counter(metrics.PATCHES_PLANNED)
        self._slides = metrics.counter(metrics.SLIDES_PLANNED)

    def process(self, record: SlideRecord) -> Iterator[SlidePlan]:
        failures.note_tried(self._run_id, "plan")
        with metrics.timed("plan"):
            plan = plan_slide(record, self._params)
        self._slides.inc()
        self._patches.inc(len(plan.coords))
        _LOG.info(
            "planned %s: %d patches on tissue (of %d x %d grid), %d chunks",
            record.instance_uuid,
            len(plan.coords),
            plan.grid_columns,
            plan.grid_rows,
            len(plan.chunks),
        )
        yield plan


class ReadError(SlideError):
    """A chunk of the slide could not be read: its failure row says stage `read`."""


@dataclasses.dataclass(frozen=True)
class ReadSpec:
    """How the embedding step reads a slide's patches (grid.patch_size, color.icc_profile,
    read.reduced_decode, read.gpu_decode) and with how many reader threads."""

    patch_size: int = 224
    icc_profile: str = "none"  # or "srgb": converted with the slide's ICC profile
    reduced_decode: bool = False  # a 40x level decoded at half size in the codec
    gpu_decode: str = "auto"
    read_threads: int = 2  # chunks read at once by a slide's reader

    @classmethod
    def of(cls, cfg) -> ReadSpec:
        """From a PipelineConfig."""
        return cls(
            cfg.grid.patch_size, cfg.color.icc_profile, cfg.read.reduced_decode,
            cfg.read.gpu_decode,
        )  # fmt: skip


def read_chunk(chunk: PatchChunk, spec: ReadSpec = ReadSpec()) -> np.ndarray:
    """uint8 patches [n, patch, patch, 3] of one chunk, read as one region."""
    record = chunk.record
    with metrics.timed("read"):
        slide = patches.open_slide(record.files, record.dicomweb_auth)
        level = patches.level_of(slide, record.sop_instance_uid)
        pixels = patches.read_patches(
            slide, level, chunk.coords, record.levels.downsample, spec.patch_size,
            reduced=spec.reduced_decode,
        )  # fmt: skip
        if spec.icc_profile == "srgb":
            transform = patches.srgb_transform(record.files, record.dicomweb_auth)
            pixels = patches.to_srgb(pixels, transform)
    return pixels


def _read_or_raise(chunk: PatchChunk, spec: ReadSpec, tracker) -> np.ndarray:
    # Beam finds a step's metrics through a thread-local state tracker: a reader thread borrows
    # the step's, so its counters (pixel requests, frames) and read times are not lost.
    statesampler.set_current_tracker(tracker)
    try:
        return read_chunk(chunk, spec)
    except SlideError as exc:
        raise ReadError(exc.reason, exc.message) from exc
    except Exception as exc:  # an unexpected error still fails only this slide, at `read`
        raise ReadError(
            ReasonCode.INTERNAL_ERROR,
            f"an unexpected error stopped reading chunk {chunk.chunk_index}: {exc!r}",
        ) from exc
    finally:
        statesampler.set_current_tracker(None)


def embed_plan(
    plan: SlidePlan, embed: Callable[[np.ndarray], np.ndarray], spec: ReadSpec = ReadSpec()
) -> np.ndarray:
    """float32 [N, D] embeddings of a slide's patches, row k from plan.coords[k].

    Chunks are read by `spec.read_threads` threads, at most one more ahead of the model
    (decoders and the model release the GIL): the model never waits on decoding once the
    first chunk is in, and a slide's pixels are never all in memory. From a remote source the
    frames of the queued chunks and of FETCH_LEAD more are being fetched (`fetch_ahead`: only
    their stored bytes), so their round trips overlap the decoding of the chunks before them.
    Each chunk is embedded as it always was (`embed(pixels)`: the model in batches of
    model.batch_size), so the embeddings do not depend on the threads.
    """
    out = np.zeros((len(plan.coords), EMBEDDING_DIM), np.float32)
    ahead = spec.read_threads + 1
    read = functools.partial(_read_or_raise, spec=spec, tracker=statesampler.get_current_tracker())
    pool = _reader_pool(spec.read_threads)
    queue: collections.deque = collections.deque()
    chunks, fetched = list(plan.chunks), 0

    def submit(k: int) -> None:
        nonlocal fetched
        while fetched < min(len(chunks), k + 1 + FETCH_LEAD):
            # several chunks at once: a frame row that neighbouring chunks share is one request
            fetch_ahead(chunks[fetched : fetched + FETCH_GROUP], spec)
            fetched += FETCH_GROUP
        queue.append((k, pool.submit(read, chunks[k])))

    try:
        for k in range(min(ahead, len(chunks))):
            submit(k)
        while queue:
            k, future = queue.popleft()
            pixels = future.result()
            if k + ahead < len(chunks):
                submit(k + ahead)
            out[chunks[k].indices] = checked_embeddings(embed(pixels), chunks[k])
    finally:
        for _, future in queue:
            future.cancel()
        concurrent.futures.wait([future for _, future in queue])  # none outlives the slide
        # Frames kept for a neighbouring chunk are of no use once the slide is read: without
        # this the worker's cache filled to its bound (256 MB) over a run's first slides.
        patches.FRAMES.forget({sop for sop, _ in plan.record.files})
    return out


# Chunks whose frames a remote slide's reader fetches beyond those queued for decoding (the
# remote part of scripts/bench.py compares it with none). The compressed bytes of at most
# read_threads + 1 + FETCH_LEAD + FETCH_GROUP chunks (~1.5 MB a chunk at 20x, ~6 MB at 40x)
# wait in the instance's byte cache (byte_ranges.FRAME_CACHE_BYTES, 64 MB).
FETCH_LEAD = 3
# Chunks fetched together: neighbours share frame rows, so the remote bench's slide takes 4.5
# requests a chunk, against 9.1 when each chunk asks for its own frames.
FETCH_GROUP = 3


def fetch_ahead(chunks: list[PatchChunk], spec: ReadSpec = ReadSpec()) -> None:
    """Starts the range requests of the frames of these chunks of one slide (remote sources;
    patches.fetch_ahead) without waiting for them. Any error here is left to the chunks' own
    reads, which report it as a read failure (a failed request is raised again where its
    frames are read): a hint must not fail the slide, nor under another stage."""
    record = chunks[0].record
    coords = np.concatenate([chunk.coords for chunk in chunks])
    with contextlib.suppress(Exception):
        slide = patches.open_slide(record.files, record.dicomweb_auth)
        level = patches.level_of(slide, record.sop_instance_uid)
        patches.fetch_ahead(
            slide, level, coords, record.levels.downsample, spec.patch_size, spec.reduced_decode
        )


@functools.cache
def _reader_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The reader threads of this process, kept for every slide it embeds."""
    return concurrent.futures.ThreadPoolExecutor(threads, "read-chunk")


def checked_embeddings(embeddings: Any, chunk: PatchChunk) -> np.ndarray:
    """The model's output for a chunk, checked before it can reach a table: one row of
    EMBEDDING_DIM finite floats per patch, else the slide fails (never written with NaN/Inf or
    misshapen vectors)."""
    instance_uuid, n = chunk.record.instance_uuid, len(chunk.indices)
    embeddings = np.asarray(embeddings)
    if embeddings.shape != (n, EMBEDDING_DIM):
        raise SlideError(
            ReasonCode.BAD_MODEL_OUTPUT,
            f"the model returned an array of shape {embeddings.shape} for a chunk of "
            f"{n} patches of slide {instance_uuid}; expected ({n}, {EMBEDDING_DIM})",
        )
    embeddings = embeddings.astype(np.float32)
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise SlideError(
            ReasonCode.NON_FINITE_EMBEDDING,
            f"the model returned NaN or infinite values for {int(bad.sum())} of the "
            f"{n} patches of a chunk of slide {instance_uuid} (first at patch row "
            f"{int(chunk.indices[bad][0])})",
        )
    return embeddings


class SlideModelHandler(ModelHandler[SlidePlan, PredictionResult, Any]):
    """RunInference's handler for whole slides: a SlidePlan in, its embeddings out.

    The slide, not the chunk, is RunInference's element so that nothing after the model needs a
    GroupByKey: a run-wide barrier on every batch runner (no slide could be clustered, written
    or committed until every slide was embedded, and memory grew with the run). Reading is
    therefore inside `run_inference` (embed_plan: a bounded read-ahead of chunks) rather than
    in a preprocessing step, which would hold a whole slide's pixels as one element. The model
    is still loaded and shared per process by RunInference (and across processes with the
    wrapped handler's large_model / model_copies), with its metrics and dead letters.
    """

    def __init__(self, handler, spec: ReadSpec):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self._handler = handler  # models.handler.PathFoundationModelHandler
        self._spec = spec

    def load_model(self) -> Any:
        return self._handler.load_model()

    def run_inference(self, batch, model, inference_args=None) -> list[PredictionResult]:
        def embed(pixels: np.ndarray) -> np.ndarray:
            (result,) = self._handler.run_inference([pixels], model)
            return result.inference

        # read.gpu_decode for the frames this process decodes (with model_copies the model
        # may live in another process than the one that reads).
        gpu_decode.set_mode(self._spec.gpu_decode)
        results = []
        for plan in batch:
            embeddings = embed_plan(plan, embed, self._spec)
            results.append(PredictionResult(plan, embeddings, self._handler.model_info().name))
        return results

    def get_num_bytes(self, batch) -> int:
        return sum(len(plan.coords) for plan in batch) * self._spec.patch_size**2 * 3

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()

    def share_model_across_processes(self) -> bool:
        return self._handler.share_model_across_processes()

    def model_copies(self) -> int:
        return self._handler.model_copies()

    def __repr__(self) -> str:
        return f"SlideModelHandler({self._handler!r})"


class EmbedSlides(beam.PTransform):
    """SlidePlans -> {'embedded': PredictionResult(plan, embeddings [N, D]), 'read_bad': dead
    letters of slides whose pixels could not be read, 'embed_bad': of the model call and its
    output check}.

    Reading and embedding are one step so that they run on the same worker: a GPU resource
    hint on it (Dataflow right fitting, pipeline/dag.py) puts both on the GPU workers, and only
    coordinates (the plans) cross into it, never pixels.
    """

    def __init__(self, handler, spec: ReadSpec, *, run_id: str):
        super().__init__()
        self._slides = SlideModelHandler(handler, spec)
        self._run_id = run_id

    def expand(self, plans):
        # Beam's own dead letters for RunInference: a slide whose read or model call fails
        # fails that slide, not the run.
        inferred, dlq = (
            plans
            | "CountTried" >> beam.Map(failures.tried, self._run_id, "embed")
            | "RunInference" >> RunInference(self._slides).with_exception_handling()
        )
        bad = [dlq.failed_inferences, *dlq.failed_preprocessing, *dlq.failed_postprocessing]
        split = (
            bad
            | "DeadLetters" >> beam.Flatten()
            | "ReadOrEmbed" >> beam.Partition(lambda dead, _: 0 if _is_read_error(dead) else 1, 2)
        )
        return {"embedded": inferred, "read_bad": split[0], "embed_bad": split[1]}


def _is_read_error(dead_letter: tuple) -> bool:
    _, (exc_type, _, _) = dead_letter
    return isinstance(exc_type, type) and issubclass(exc_type, ReadError)


class ClusterSlideFn(beam.DoFn):
    """PredictionResult(plan, embeddings) -> SlideResult."""

    def __init__(self, params: clustering.KMeansParams, run_id: str):
        self._params = params
        self._run_id = run_id

    def process(self, inferred: PredictionResult) -> Iterator[SlideResult]:
        failures.note_tried(self._run_id, "cluster")
        plan, embeddings = inferred.example, inferred.inference
        _LOG.info("embedded %s: %d patches; clustering", plan.record.instance_uuid, len(embeddings))
        with metrics.timed("cluster"):
            clusters = clustering.cluster_embeddings(
                embeddings, self._params, clustering.random_state_for(plan.record.instance_uuid)
            )
        yield SlideResult(plan, embeddings, clusters)


class WriteSlideFn(beam.DoFn):
    """SlideResult -> the slide's artifacts, its resource and search row files, then its
    completion marker: the slide is committed here (outputs/artifacts.py). Emits the slide's
    (instance_uuid, patches) for the counters' sake only."""

    def __init__(self, run: artifacts.RunContext, lease_ttl_s: float = 3600.0):
        self._run = run
        self._lease_ttl_s = lease_ttl_s
        self._written = metrics.counter(metrics.SLIDES_WRITTEN)
        self._embedded = metrics.counter(metrics.PATCHES_EMBEDDED)

    def process(self, result: SlideResult) -> Iterator[tuple[str, int]]:
        failures.note_tried(self._run.run_id, "write")
        slide = artifacts.slide_outputs(result, self._run)
        # The lease SkipDone took, renewed (re-entrant for this run) before the files change:
        # a run that took over an expired lease meanwhile owns the slide now.
        held = lease.acquire(slide.paths, self._run.run_id, self._lease_ttl_s)
        if held is None:
            raise SlideError(
                ReasonCode.LEASE_LOST,
                f"run {lease.live_holder(slide.paths)} took this slide over while this run was "
                "embedding it (this run's lease had expired: raise run.lease_ttl_s)",
            )
        with metrics.timed("write"):
            artifacts.write_artifacts(
                slide.paths, slide.files, slide.marker, self._run.run_id,
                rows=artifacts.row_files(slide, self._run), held=held,
            )  # fmt: skip
        self._written.inc()
        self._embedded.inc(len(result.embeddings))
        uuid = result.plan.record.instance_uuid
        _LOG.info(
            "wrote %s: %d embeddings, %d centroids -> %s",
            uuid, len(result.embeddings), len(result.clusters.centroids), slide.paths.directory,
        )  # fmt: skip
        yield uuid, len(result.embeddings)
