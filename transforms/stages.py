"""The DAG's steps as thin Beam wrappers: each keys, times and counts; the work is elsewhere.

SkipDoneOrUnrequested (outputs/artifacts.py: markers), PlanSlideFn (plan.py), EmbedChunks =
ReadPatchesFn (patches.py) + RunInference (models/handler.py), ClusterSlideFn (clustering.py),
WriteArtifactsFn (outputs/artifacts.py). Failures are not handled here: the DAG wraps every
step with Beam's `with_exception_handling`, and transforms/failures.py turns dead letters into
failure rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from models.signature import EMBEDDING_DIM
from transforms import clustering, failures, metrics, patches
from transforms.dicom_io import gpu_decode
from transforms.errors import ReasonCode, SlideError
from transforms.outputs import artifacts, reruns
from transforms.outputs.layout import ArtifactPaths
from transforms.plan import PatchChunk, PlanParams, SlidePlan, SlideResult, plan_slide
from transforms.records import SlideRecord

_LOG = logging.getLogger(__name__)


class SkipDoneOrUnrequested(beam.DoFn):
    """Keeps slides that were asked for and are not complete with these parameters.

    Complete: the completion marker is present, its parameter hash is this run's, its
    instance hash is the record's (when both are known), the run that wrote it finished
    (its tables hold the slide's rows), and the files it records are there with their recorded
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
        self._known: dict[str, str | None] = {}
        self._committed: dict[str, bool] = {}
        self._skipped = metrics.counter(metrics.SLIDES_SKIPPED_COMPLETE)
        self._to_process = metrics.counter(metrics.SLIDES_TO_PROCESS)

    def setup(self) -> None:
        if self._resource_table:
            self._known = reruns.known_instances(self._resource_table)
            _LOG.info("%d slides already in %s", len(self._known), self._resource_table)

    def _run_committed(self, run_id: str | None) -> bool:
        if run_id not in self._committed:
            self._committed[run_id] = artifacts.run_committed(self._root, run_id)
        return self._committed[run_id]

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
            and self._run_committed(marker.get("run_id"))
        )
        if not done:
            return False
        # The marker vouches for the files only if they are still the ones it recorded.
        problem = artifacts.marker_problem(paths, marker, self._verify_checksums)
        if problem is not None:
            _LOG.warning("slide %s is redone: %s", record.instance_uuid, problem)
        return problem is None

    def process(self, record: SlideRecord) -> Iterator[SlideRecord]:
        if self._uuids and record.instance_uuid not in self._uuids:
            return
        unchanged = self._resource_table and reruns.is_unchanged(
            self._known, record.instance_uuid, record.instance_hash
        )
        if unchanged or (not self._force and self._complete(record)):
            self._skipped.inc()
            return
        self._to_process.inc()
        if self._run_id:
            failures.note_tried(self._run_id)
        yield record


@beam.typehints.with_output_types(PatchChunk, plan=tuple)  # declares the tagged output
class PlanSlideFn(beam.DoFn):
    """SlideRecord -> chunks (main output) and ('plan', (uuid, SlidePlan))."""

    def __init__(self, params: PlanParams):
        self._params = params
        self._patches = metrics.counter(metrics.PATCHES_PLANNED)
        self._slides = metrics.counter(metrics.SLIDES_PLANNED)

    def process(self, record: SlideRecord) -> Iterator[Any]:
        with metrics.timed("plan"):
            plan, chunks = plan_slide(record, self._params)
        self._slides.inc()
        self._patches.inc(len(plan.coords))
        _LOG.info(
            "planned %s: %d patches on tissue (of %d x %d grid), %d chunks",
            record.instance_uuid,
            len(plan.coords),
            plan.grid_columns,
            plan.grid_rows,
            len(chunks),
        )
        yield beam.pvalue.TaggedOutput("plan", (record.instance_uuid, plan))
        yield from chunks


class ReadPatchesFn(beam.DoFn):
    """PatchChunk -> ((uuid, rows), uint8 patches [n, 224, 224, 3]), read as one region."""

    def __init__(self, patch_size: int, icc_profile: str = "none", gpu_decode: str = "auto"):
        self._patch_size = patch_size
        self._icc_profile = icc_profile
        self._gpu_decode = gpu_decode

    def setup(self) -> None:
        gpu_decode.set_mode(self._gpu_decode)  # read.gpu_decode, per worker process

    def process(self, chunk: PatchChunk) -> Iterator[tuple[tuple[str, np.ndarray], np.ndarray]]:
        record = chunk.record
        with metrics.timed("read"):
            slide = patches.open_slide(record.files, record.dicomweb_auth)
            level = patches.level_of(slide, record.sop_instance_uid)
            pixels = patches.read_patches(
                slide, level, chunk.coords, record.levels.downsample, self._patch_size
            )
            if self._icc_profile == "srgb":
                transform = patches.srgb_transform(record.files, record.dicomweb_auth)
                pixels = patches.to_srgb(pixels, transform)
        yield (record.instance_uuid, chunk.indices), pixels


def by_slide(keyed: tuple[tuple[str, np.ndarray], Any]) -> tuple[str, tuple]:
    """((uuid, rows), PredictionResult) -> (uuid, (rows, embeddings [n, D])).

    The model's output is checked per chunk before it can reach a table: one row of
    EMBEDDING_DIM finite floats per patch. A chunk that fails the check is a dead letter
    (its slide then fails as incomplete, never written with NaN/Inf or misshapen vectors)."""
    (instance_uuid, rows), result = keyed
    embeddings = np.asarray(result.inference)
    if embeddings.shape != (len(rows), EMBEDDING_DIM):
        raise SlideError(
            ReasonCode.BAD_MODEL_OUTPUT,
            f"the model returned an array of shape {embeddings.shape} for a chunk of "
            f"{len(rows)} patches of slide {instance_uuid}; expected "
            f"({len(rows)}, {EMBEDDING_DIM})",
        )
    embeddings = embeddings.astype(np.float32)
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise SlideError(
            ReasonCode.NON_FINITE_EMBEDDING,
            f"the model returned NaN or infinite values for {int(bad.sum())} of the "
            f"{len(rows)} patches of a chunk of slide {instance_uuid} (first at patch row "
            f"{int(np.asarray(rows)[bad][0])})",
        )
    return instance_uuid, (rows, embeddings)


class EmbedChunks(beam.PTransform):
    """PatchChunks -> {'embedded': (uuid, (rows, embeddings [n, D])), 'bad': read dead letters,
    'embed_bad': dead letters of the model call and of the output check, per chunk}.

    Reading and embedding are one composite so that they run on the same worker: a GPU
    resource hint on it (Dataflow right fitting, pipeline/dag.py) puts both on the GPU workers,
    and only coordinates (the chunks) cross into it, never pixels: a fusion break between a
    CPU-hinted reader and a GPU-hinted model would ship ~150 kB of pixels per patch.
    """

    def __init__(
        self, handler, patch_size: int, icc_profile: str = "none", gpu_decode: str = "auto"
    ):
        super().__init__()
        self._handler = handler  # models.handler.PathFoundationModelHandler
        self._read = ReadPatchesFn(patch_size, icc_profile, gpu_decode)

    def expand(self, chunks):
        read = chunks | "ReadPatches" >> beam.ParDo(self._read).with_exception_handling()
        # Beam's own dead letters for RunInference: one chunk whose model call fails (an
        # out-of-memory error, a kernel error) fails that chunk, not the run.
        inferred, dlq = (
            read.good
            | "RunInference"
            >> RunInference(KeyedModelHandler(self._handler)).with_exception_handling()
        )
        checked = inferred | "KeyBySlide" >> beam.Map(by_slide).with_exception_handling()
        embed_bad = [dlq.failed_inferences, checked.bad]
        embed_bad += [*dlq.failed_preprocessing, *dlq.failed_postprocessing]
        bad = embed_bad | "EmbedDeadLetters" >> beam.Flatten()
        return {"embedded": checked.good, "bad": read.bad, "embed_bad": bad}


class ClusterSlideFn(beam.DoFn):
    """(uuid, {'plan': [SlidePlan], 'patches': [(rows, embeddings)]}) -> SlideResult."""

    def __init__(self, params: clustering.KMeansParams):
        self._params = params

    def process(self, element: tuple[str, dict[str, list]]) -> Iterator[SlideResult]:
        instance_uuid, grouped = element
        if grouped["plan"]:  # else the plan failed and its failure row is already out
            yield self._cluster(instance_uuid, grouped["plan"][0], grouped["patches"])

    def _cluster(self, instance_uuid: str, plan: SlidePlan, chunks: list) -> SlideResult:
        rows = np.concatenate([r for r, _ in chunks]) if chunks else np.zeros(0, np.int64)
        if len(rows) != len(plan.coords):
            raise SlideError(
                ReasonCode.INCOMPLETE_SLIDE,
                f"{len(rows)} of {len(plan.coords)} patches were embedded; see this slide's "
                "other failure rows for the chunks that failed",
            )
        embeddings = np.concatenate([e for _, e in chunks])[np.argsort(rows)]
        _LOG.info("embedded %s: %d patches; clustering", instance_uuid, len(embeddings))
        with metrics.timed("cluster"):
            clusters = clustering.cluster_embeddings(
                embeddings, self._params, clustering.random_state_for(instance_uuid)
            )
        return SlideResult(plan, embeddings, clusters)


@beam.typehints.with_output_types(dict, search=dict)  # declares the tagged output
class WriteArtifactsFn(beam.DoFn):
    """SlideResult -> resource row (main output) and ('search', row) per centroid."""

    def __init__(self, run: artifacts.RunContext):
        self._run = run
        self._written = metrics.counter(metrics.SLIDES_WRITTEN)
        self._embedded = metrics.counter(metrics.PATCHES_EMBEDDED)

    def process(self, result: SlideResult) -> Iterator[Any]:
        slide = artifacts.slide_outputs(result, self._run)
        with metrics.timed("write"):
            artifacts.write_artifacts(slide.paths, slide.files, slide.marker, self._run.run_id)
        self._written.inc()
        self._embedded.inc(len(result.embeddings))
        _LOG.info(
            "wrote %s: %d embeddings, %d centroids -> %s",
            result.plan.record.instance_uuid,
            len(result.embeddings),
            len(result.clusters.centroids),
            slide.paths.directory,
        )
        yield slide.resource_row
        for row in slide.search_rows:
            yield beam.pvalue.TaggedOutput("search", row)
