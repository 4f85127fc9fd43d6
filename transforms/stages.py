"""Thin Beam wrappers around the domain functions: one DoFn per DAG stage.

Each DoFn keys, times and counts; the work itself is in plan.py, patches.py, clustering.py
and artifacts.py. Failures are not handled here: the DAG wraps every stage with Beam's
`with_exception_handling`, and `failure_rows` turns its dead letters into failure rows.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms import artifacts, clustering, patches
from transforms.errors import ReasonCode, SlideError
from transforms.plan import PatchChunk, PlanParams, SlidePlan, plan_slide
from transforms.slides import FolderFailure, SlideRecord

_LOG = logging.getLogger(__name__)
NAMESPACE = "pathembed"
# Failure rows are also counted per reason code, as counters named with this prefix, so the
# run summary says how many slides failed for each reason (pipeline/summary.py).
FAILURES_BY_REASON = "failures_reason_"
# The license of the embeddings this pipeline publishes (as the seed's dataset: CC BY 4.0);
# the source images keep their own, recorded per slide as source_license.
EMBEDDINGS_LICENSE = "CC BY 4.0"


def _timed(name: str):
    distribution = Metrics.distribution(NAMESPACE, f"{name}_ms")

    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            distribution.update(int((time.perf_counter() - self.start) * 1000))

    return _Timer()


@dataclass(frozen=True)
class SlideResult:
    """A slide with all its embeddings and their clustering, ready to be written."""

    plan: SlidePlan
    embeddings: np.ndarray  # float32 [N, D], row k from plan.coords[k]
    clusters: clustering.Clustering

    def __repr__(self) -> str:
        return f"SlideResult({self.plan.record.instance_uuid}, {len(self.embeddings)})"


@beam.typehints.with_output_types(PatchChunk, plan=tuple)  # declares the tagged output
class PlanSlideFn(beam.DoFn):
    """SlideRecord -> chunks (main output) and ('plan', (uuid, SlidePlan))."""

    def __init__(self, params: PlanParams):
        self._params = params
        self._patches = Metrics.counter(NAMESPACE, "patches_planned")
        self._slides = Metrics.counter(NAMESPACE, "slides_planned")

    def process(self, record: SlideRecord) -> Iterator[Any]:
        with _timed("plan"):
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

    def __init__(self, patch_size: int, icc_profile: str = "none"):
        self._patch_size = patch_size
        self._icc_profile = icc_profile

    def process(self, chunk: PatchChunk) -> Iterator[tuple[tuple[str, np.ndarray], np.ndarray]]:
        record = chunk.record
        with _timed("read"):
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
    """((uuid, rows), PredictionResult) -> (uuid, (rows, embeddings [n, D]))."""
    (instance_uuid, rows), result = keyed
    return instance_uuid, (rows, np.asarray(result.inference, np.float32))


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
        with _timed("cluster"):
            clusters = clustering.cluster_embeddings(
                embeddings, self._params, clustering.random_state_for(instance_uuid)
            )
        return SlideResult(plan, embeddings, clusters)


@beam.typehints.with_output_types(dict, search=dict)  # declares the tagged output
class WriteArtifactsFn(beam.DoFn):
    """SlideResult -> resource row (main output) and ('search', row) per centroid."""

    def __init__(
        self,
        *,
        output_root: str,
        model: Any,
        parameter_hash: str,
        params: dict,
        dataset_version: str,
        pipeline_version: str,
        run_id: str,
        hashing: dict | None = None,
    ):
        self._root = output_root
        self._hashing = hashing or {"pixeldata_sha512": "local"}
        self._model = model  # models.ModelInfo
        self._hash = parameter_hash
        self._params = params
        self._dataset_version = dataset_version
        self._pipeline_version = pipeline_version
        self._run_id = run_id
        self._written = Metrics.counter(NAMESPACE, "slides_written")
        self._embedded = Metrics.counter(NAMESPACE, "patches_embedded")

    def process(self, result: SlideResult) -> Iterator[Any]:
        plan, record = result.plan, result.plan.record
        n_clusters = self._params["kmeans"]["n_clusters"]
        paths = artifacts.ArtifactPaths.for_slide(
            self._root, record.instance_uuid, self._dataset_version, n_clusters
        )
        choice = record.levels
        extra = {
            "model_is_stand_in": self._model.is_stand_in,
            "model_source": self._model.source,
            "embedding_level": {
                "sop_instance_uid": choice.embedding.sop_instance_uid,
                "width": choice.embedding.width,
                "height": choice.embedding.height,
                "pixel_spacing_mm": [
                    choice.embedding.spacing.row_mm,
                    choice.embedding.spacing.column_mm,
                ],
                "downsample_to_patch_source": choice.downsample,
                "resize_interpolation": "INTER_AREA" if choice.downsample != 1 else None,
            },
            "mask_level": {
                "sop_instance_uid": choice.mask.sop_instance_uid,
                "width": choice.mask.width,
                "height": choice.mask.height,
                "pixel_spacing_mm": [choice.mask.spacing.row_mm, choice.mask.spacing.column_mm],
                # The level was reduced by this integer factor (INTER_AREA, read in tiles) when
                # it is >= 2x finer than ~2X (a shallow pyramid); 1 = used as is.
                "downsample_to_mask": plan.mask_factor,
                "mask_width": plan.mask_image_size[0],
                "mask_height": plan.mask_image_size[1],
                "resize_interpolation": "INTER_AREA" if plan.mask_factor > 1 else None,
                "tissue_share": plan.mask_tissue_share,
            },
            "grid": {"columns": plan.grid_columns, "rows": plan.grid_rows},
            "patch_tissue_fraction": [round(float(f), 4) for f in plan.tissue_fraction],
            # The configured parameters first, then what was actually done: a slide with at
            # most n_clusters embeddings is "identity" whatever method is configured.
            "clustering": {
                **self._params["kmeans"],
                "configured_method": self._params["kmeans"]["method"],
                "method": result.clusters.method,
                "random_state": result.clusters.random_state,
            },
            "parameters": self._params,
            "hashing": self._hashing,
            "parameter_hash": self._hash,
            "pipeline_version": self._pipeline_version,
            "idc_version": record.idc_version,
            "run_id": self._run_id,
        }
        metadata = artifacts.build_metadata(
            identity={
                "instance_uuid": record.instance_uuid,
                "instance_hash": plan.instance_md5,
                "instance_pixeldata_SHA512_hash": plan.pixeldata_sha512,
                "study_instance_uid": record.study_instance_uid,
                "series_instance_uid": record.series_instance_uid,
                "sop_instance_uid": record.sop_instance_uid,
            },
            paths=paths,
            model_name=self._model.name,
            model_version=self._model.version,
            dataset_version=self._dataset_version,
            embedding_count=len(result.embeddings),
            number_of_centroids=len(result.clusters.centroids),
            patch_size=self._params["patch_size"],
            level_width=choice.source_width,
            level_height=choice.source_height,
            extra=extra,
            slide_extra={
                "source_license": record.source_license,
                "source_doi": record.source_doi,
                "embeddings_license": EMBEDDINGS_LICENSE,
            },
        )
        files = {
            paths.metadata: artifacts.json_bytes(metadata),
            paths.thumbnail: plan.thumbnail_jpeg,
            paths.thumbnail_mask: plan.thumbnail_mask_jpeg,
            paths.embeddings: artifacts.npy_bytes(result.embeddings.astype(np.float32)),
            paths.coordinates: artifacts.npy_bytes(plan.coords.astype(np.int64)),
            paths.centroids: artifacts.npy_bytes(result.clusters.centroids.astype(np.float32)),
            paths.labels: artifacts.npy_bytes(result.clusters.labels.astype(np.int64)),
        }
        now = datetime.datetime.now(datetime.UTC)
        marker = {
            "parameter_hash": self._hash,
            "instance_hash": plan.instance_md5,
            "run_id": self._run_id,
            "embedding_count": len(result.embeddings),
            "time": now.isoformat(),
        }
        with _timed("write"):
            artifacts.write_artifacts(paths, files, marker, self._run_id)
        self._written.inc()
        self._embedded.inc(len(result.embeddings))
        _LOG.info(
            "wrote %s: %d embeddings, %d centroids -> %s",
            record.instance_uuid,
            len(result.embeddings),
            len(result.clusters.centroids),
            paths.directory,
        )
        identity = {
            "instance_uuid": record.instance_uuid,
            "StudyInstanceUID": record.study_instance_uid,
            "SeriesInstanceUID": record.series_instance_uid,
            "SOPInstanceUID": record.sop_instance_uid,
        }
        yield {
            **identity,
            "collection": record.collection,
            "instance_hash": plan.instance_md5,
            "metadata_uri": paths.metadata,
            "thumbnail_uri": paths.thumbnail,
            "thumbnail_mask_uri": paths.thumbnail_mask,
            "embeddings_uri": paths.embeddings,
            "coordinates_uri": paths.coordinates,
            "centroids_uri": paths.centroids,
            "labels_uri": paths.labels,
            "embedding_count": len(result.embeddings),
            "number_of_centroids": len(result.clusters.centroids),
            "slide_pyramid_level_width": choice.source_width,
            "slide_pyramid_level_height": choice.source_height,
            "native_level_width": choice.embedding.width,
            "native_level_height": choice.embedding.height,
            "native_pixel_spacing_row_mm": choice.embedding.spacing.row_mm,
            "native_pixel_spacing_column_mm": choice.embedding.spacing.column_mm,
            "downsample": choice.downsample,
            "mask_pixel_spacing_mm": choice.mask.spacing.mm,
            "model_name": self._model.name,
            "model_version": self._model.version,
            "model_is_stand_in": self._model.is_stand_in,
            "idc_version": record.idc_version,
            "pipeline_version": self._pipeline_version,
            "parameter_hash": self._hash,
            "run_id": self._run_id,
            "created_time": now,
            "clustering_method": result.clusters.method,
            "clustering_parameters": json.dumps(
                self._params["kmeans"], sort_keys=True, separators=(",", ":")
            ),
            "clustering_random_state": result.clusters.random_state,
            "source_license": record.source_license,
            "source_doi": record.source_doi,
            "instance_pixeldata_SHA512_hash": plan.pixeldata_sha512,
        }
        for k, centroid in enumerate(result.clusters.centroids):
            yield beam.pvalue.TaggedOutput(
                "search",
                {
                    **identity,
                    "centroid_index": k,
                    "cluster_size": int(result.clusters.cluster_sizes[k]),
                    "embedding": centroid.astype(np.float64).tolist(),
                },
            )


def _identity(element: Any) -> tuple[str | None, str | None]:
    """(instance_uuid, SeriesInstanceUID) of whatever element a stage failed on."""
    if isinstance(element, SlideRecord):
        return element.instance_uuid, element.series_instance_uid
    if isinstance(element, FolderFailure):
        return element.instance_uuid, element.series_instance_uid
    if isinstance(element, PatchChunk):
        return _identity(element.record)
    if isinstance(element, SlideResult):
        return _identity(element.plan.record)
    if isinstance(element, tuple) and element and isinstance(element[0], str):
        return element[0], None  # (uuid, grouped) after GroupByKey
    return None, None


def failure_row(element: Any, stage: str, reason: str, message: str, run_id: str) -> dict:
    instance_uuid, series_uid = _identity(element)
    return {
        "instance_uuid": instance_uuid,
        "SeriesInstanceUID": series_uid,
        "stage": stage,
        "reason_code": reason,
        "message": message,
        "run_id": run_id,
        "time": datetime.datetime.now(datetime.UTC),
    }


def dead_letter_row(dead_letter: tuple, stage: str, run_id: str) -> dict:
    """Beam's (element, (exc_type, repr, traceback)) dead letter -> failure row."""
    element, (exc_type, exc_repr, trace) = dead_letter
    if isinstance(exc_type, type) and issubclass(exc_type, SlideError):
        # SlideError's str() is "reason_code: message"; the exception object is not kept.
        text = trace[-1].split(": ", 1)[-1].strip()
        reason, _, message = text.partition(": ")
    else:
        reason, message = (
            ReasonCode.INTERNAL_ERROR.value,
            f"{exc_repr} at {''.join(trace[-3:-1]).strip()}",
        )
    row = failure_row(element, stage, reason, message, run_id)
    _LOG.warning("slide %s failed at %s: %s: %s", row["instance_uuid"], stage, reason, message)
    Metrics.counter(NAMESPACE, "failures").inc()
    Metrics.counter(NAMESPACE, f"{FAILURES_BY_REASON}{reason}").inc()
    return row


def folder_failure_row(failure: FolderFailure, run_id: str) -> dict:
    row = failure_row(
        failure, "enumerate", failure.error.reason.value, failure.error.message, run_id
    )
    _LOG.warning("slide %s failed at enumerate: %s", failure.instance_uuid, failure.error)
    Metrics.counter(NAMESPACE, "failures").inc()
    Metrics.counter(NAMESPACE, f"{FAILURES_BY_REASON}{failure.error.reason.value}").inc()
    return row
