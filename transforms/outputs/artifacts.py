"""Per-slide artifacts in the published layout, metadata.json, and the completion marker.

Layout: {output_root}/{instance_uuid}/path_foundation/v1/{metadata.json, slide_thumbnail.jpeg,
slide_thumbnail_mask.jpeg, slide_embedding.npy, slide_embedding_coord.npy,
embeddings_500_cluster_centroid.npy, embeddings_500_labels.npy}. Files go through Beam
`FileSystems` (local paths now, gs:// later), each written under a temporary name and renamed;
the completion marker `_COMPLETE.json` is removed first and written last, so a slide is never
marked complete while any of its files is stale or half-written. The slide's table rows are
written with its files, before the marker, as one Parquet file per table
(`tables/{table}/{run_id}/{uuid}.parquet`): a slide is committed the moment it is done, and a
run killed halfway keeps every slide it finished, files and rows. A slide counts as done when
its marker is there and the resource row file of the run the marker names (or, for runs from
before per-slide rows, that run's summary `runs/{run_id}.json`).

The marker records the size and SHA-256 of each of the seven files (`files`): SkipDone checks
the sizes of a complete slide (and, with run.verify_checksums, the checksums) and redoes a slide
whose files were deleted, truncated or changed; readers (outputs/archive.py SlideArtifacts)
check every file they read against it.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.errors import ReasonCode, SlideError
from transforms.outputs import lease
from transforms.outputs.layout import ArtifactPaths, row_file, run_summary_uri
from transforms.outputs.tables import TABLES, parquet_bytes, row_errors
from transforms.plan import SlideResult

_LOG = logging.getLogger(__name__)
# The license of the embeddings this pipeline publishes (as the seed's dataset: CC BY 4.0);
# the source images keep their own, recorded per slide as source_license.
EMBEDDINGS_LICENSE = "CC BY 4.0"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def json_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=1).encode()


def build_metadata(
    *,
    identity: Mapping[str, Any],
    paths: ArtifactPaths,
    model_name: str,
    model_version: str,
    dataset_version: str,
    embedding_count: int,
    number_of_centroids: int,
    patch_size: int,
    level_width: int,
    level_height: int,
    extra: Mapping[str, Any],
    slide_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """metadata.json: every published key, names exactly as in the public dataset, plus extras.

    `identity` holds instance_uuid, instance_hash, instance_pixeldata_SHA512_hash and the
    study/series/sop instance UIDs. `extra` goes into the embedding entry (how these embeddings
    were made); `slide_extra` at the top level, after the published keys (what holds for the
    slide whatever model embeds it: its source license and DOI).
    """
    return {
        "instance_uuid": identity["instance_uuid"],
        "instance_hash": identity["instance_hash"],
        "instance_pixeldata_SHA512_hash": identity["instance_pixeldata_SHA512_hash"],
        "study_instance_uid": identity["study_instance_uid"],
        "series_instance_uid": identity["series_instance_uid"],
        "sop_instance_uid": identity["sop_instance_uid"],
        "instance_patch_embeddings": [
            {
                "model_name": model_name,
                "model_version": model_version,
                "version": dataset_version,
                "embedding_count": embedding_count,
                "input_image_patch_width_px": patch_size,
                "input_image_patch_height_px": patch_size,
                "patch_embeddings_gs_path": paths.embeddings,
                "patch_coordinates_gs_path": paths.coordinates,
                "thumbnail_patch_sampling_mask_gs_path": paths.thumbnail_mask,
                "thumbnail_gs_path": paths.thumbnail,
                "slide_pyramid_level_width": level_width,
                "slide_pyramid_level_height": level_height,
                "kmeans_embeddings": [
                    {
                        "number_of_centroids": number_of_centroids,
                        "centroids_gs_path": paths.centroids,
                        "embedding_centroid_index_gs_path": paths.labels,
                    }
                ],
                **extra,
            }
        ],
        **(slide_extra or {}),
    }


@dataclass(frozen=True)
class RunContext:
    """What every slide of one run records about the run: where, which model, which parameters."""

    output_root: str
    model: Any  # models.path_foundation.ModelInfo
    parameter_hash: str
    params: dict
    dataset_version: str
    pipeline_version: str
    run_id: str
    hashing: dict | None = None  # hashing.* of the config (recorded in metadata)


@dataclass(frozen=True)
class SlideOutputs:
    """One slide's files (with their URIs), completion marker and table rows."""

    paths: ArtifactPaths
    files: dict[str, bytes]
    marker: dict[str, Any]
    resource_row: dict[str, Any]
    search_rows: list[dict[str, Any]]


def _level_metadata(result: SlideResult) -> dict[str, Any]:
    """metadata.json's extra keys on the levels, grid and tissue behind the coordinates."""
    plan, choice = result.plan, result.plan.record.levels
    return {
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
    }


def slide_outputs(result: SlideResult, run: RunContext) -> SlideOutputs:
    """Everything one finished slide writes: metadata.json and the six other files, the
    completion marker, its resource row and one search row per centroid."""
    plan, record = result.plan, result.plan.record
    paths = ArtifactPaths.for_slide(
        run.output_root,
        record.instance_uuid,
        run.dataset_version,
        run.params["kmeans"]["n_clusters"],
    )
    choice, model, clusters = record.levels, run.model, result.clusters
    extra = {
        "model_is_stand_in": model.is_stand_in,
        "model_source": model.source,
        **_level_metadata(result),
        # The configured parameters first, then what was actually done: a slide with at most
        # n_clusters embeddings is "identity" whatever method is configured.
        "clustering": {
            **run.params["kmeans"],
            "configured_method": run.params["kmeans"]["method"],
            "method": clusters.method,
            "random_state": clusters.random_state,
        },
        "parameters": run.params,
        "hashing": run.hashing,
        "parameter_hash": run.parameter_hash,
        "pipeline_version": run.pipeline_version,
        "idc_version": record.idc_version,
        "run_id": run.run_id,
    }
    metadata = build_metadata(
        identity={
            "instance_uuid": record.instance_uuid,
            "instance_hash": plan.instance_md5,
            "instance_pixeldata_SHA512_hash": plan.pixeldata_sha512,
            "study_instance_uid": record.study_instance_uid,
            "series_instance_uid": record.series_instance_uid,
            "sop_instance_uid": record.sop_instance_uid,
        },
        paths=paths,
        model_name=model.name,
        model_version=model.version,
        dataset_version=run.dataset_version,
        embedding_count=len(result.embeddings),
        number_of_centroids=len(clusters.centroids),
        patch_size=run.params["patch_size"],
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
        paths.metadata: json_bytes(metadata),
        paths.thumbnail: plan.thumbnail_jpeg,
        paths.thumbnail_mask: plan.thumbnail_mask_jpeg,
        paths.embeddings: npy_bytes(result.embeddings.astype(np.float32)),
        paths.coordinates: npy_bytes(plan.coords.astype(np.int64)),
        paths.centroids: npy_bytes(clusters.centroids.astype(np.float32)),
        paths.labels: npy_bytes(clusters.labels.astype(np.int64)),
    }
    now = datetime.datetime.now(datetime.UTC)
    marker = {
        "parameter_hash": run.parameter_hash,
        "instance_hash": plan.instance_md5,
        "run_id": run.run_id,
        "embedding_count": len(result.embeddings),
        "time": now.isoformat(),
    }
    identity = {
        "instance_uuid": record.instance_uuid,
        "StudyInstanceUID": record.study_instance_uid,
        "SeriesInstanceUID": record.series_instance_uid,
        "SOPInstanceUID": record.sop_instance_uid,
    }
    resource_row = {
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
        "number_of_centroids": len(clusters.centroids),
        "slide_pyramid_level_width": choice.source_width,
        "slide_pyramid_level_height": choice.source_height,
        "native_level_width": choice.embedding.width,
        "native_level_height": choice.embedding.height,
        "native_pixel_spacing_row_mm": choice.embedding.spacing.row_mm,
        "native_pixel_spacing_column_mm": choice.embedding.spacing.column_mm,
        "downsample": choice.downsample,
        "mask_pixel_spacing_mm": choice.mask.spacing.mm,
        "model_name": model.name,
        "model_version": model.version,
        "model_is_stand_in": model.is_stand_in,
        "clustering_method": clusters.method,
        "clustering_parameters": json.dumps(
            run.params["kmeans"], sort_keys=True, separators=(",", ":")
        ),
        "clustering_random_state": clusters.random_state,
        "source_license": record.source_license,
        "source_doi": record.source_doi,
        "instance_pixeldata_SHA512_hash": plan.pixeldata_sha512,
        "idc_version": record.idc_version,
        "pipeline_version": run.pipeline_version,
        "parameter_hash": run.parameter_hash,
        "run_id": run.run_id,
        "created_time": now,
    }
    search_rows = [
        {
            **identity,
            "centroid_index": k,
            "cluster_size": int(clusters.cluster_sizes[k]),
            "embedding": centroid.astype(np.float64).tolist(),
        }
        for k, centroid in enumerate(clusters.centroids)
    ]
    # The rows are checked before the slide is marked complete: a row the table would refuse
    # fails this slide here (a dead letter), never the run at the table sink, and never leaves
    # a complete slide without its rows.
    for table, rows in (("resource", [resource_row]), ("search", search_rows)):
        errors = sorted({e for row in rows for e in row_errors(row, TABLES[table])})
        if errors:
            raise SlideError(
                ReasonCode.INTERNAL_ERROR,
                f"the {table} rows of slide {record.instance_uuid} do not fit the table: "
                f"{'; '.join(errors)}",
            )
    return SlideOutputs(paths, files, marker, resource_row, search_rows)


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def write_files(files: Mapping[str, bytes], run_id: str) -> None:
    """Each file under a temporary name, then all renamed: no reader sees a half-written one."""
    temporary = {uri: f"{uri}.tmp-{run_id}" for uri in files}
    for uri, data in files.items():
        _write(temporary[uri], data)
    FileSystems.rename(list(temporary.values()), list(temporary.keys()))


def row_files(slide: SlideOutputs, run: RunContext) -> dict[str, bytes]:
    """{uri: Parquet bytes}: the slide's resource row and search rows, one file per table."""
    uuid = slide.resource_row["instance_uuid"]
    return {
        row_file(run.output_root, "resource", run.run_id, uuid): parquet_bytes(
            "resource", [slide.resource_row]
        ),
        row_file(run.output_root, "search", run.run_id, uuid): parquet_bytes(
            "search", slide.search_rows
        ),
    }


def write_artifacts(
    paths: ArtifactPaths,
    files: Mapping[str, bytes],
    marker: Mapping[str, Any],
    run_id: str,
    rows: Mapping[str, bytes] | None = None,
    held: lease.Lease | None = None,
) -> None:
    """Writes `{uri: bytes}` atomically per file, then the slide's table row files (`rows`,
    {uri: Parquet bytes}), then the completion marker (with every file's size and SHA-256).
    Cluster files of another n_clusters (`embeddings_K_*.npy` left by an earlier run) are
    deleted before the marker is written. The slide's lease (`held`) is released just before
    the marker, so that a run killed after its marker leaves no lease file among a complete
    slide's files (killed before, the slide is simply not done)."""
    if FileSystems.exists(paths.complete_marker):
        FileSystems.delete([paths.complete_marker])
    write_files(files, run_id)
    written = {posixpath.basename(uri) for uri in files}
    clusters = FileSystems.match([FileSystems.join(paths.directory, "embeddings_*.npy")])
    old_clusters = [
        m.path for m in clusters[0].metadata_list if posixpath.basename(m.path) not in written
    ]
    if old_clusters:
        FileSystems.delete(old_clusters)
    if rows:
        write_files(rows, run_id)
    marker = {**marker, "files": file_digests(files)}
    if held is not None:
        held.release()
    _write(paths.complete_marker, json_bytes(marker))
    # Temporaries of a killed run would otherwise stay. This run's own names are left alone:
    # a concurrent attempt at the same bundle (a retry) may still be renaming them; so are
    # those of a run holding a live lease on the slide (outputs/lease.py): it is writing them.
    found = FileSystems.match([FileSystems.join(paths.directory, "*.tmp-*")])[0].metadata_list
    others = [m.path for m in found if temporary_run(m.path) != run_id]
    holder = lease.live_holder(paths) if others else None
    stale = [path for path in others if temporary_run(path) != holder]
    if stale:
        FileSystems.delete(stale)


def temporary_run(uri: str) -> str:
    """The run_id of a temporary `{file}.tmp-{run_id}` (the artifact names hold no ".tmp-")."""
    return posixpath.basename(uri).split(".tmp-", 1)[1]


def file_digests(files: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """{file name: {size, sha256}} of the files a slide's marker vouches for."""
    return {
        posixpath.basename(uri): {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for uri, data in files.items()
    }


def check_file(marker: Mapping[str, Any] | None, name: str, data: bytes) -> None:
    """ValueError unless `data` is the file `name` the marker recorded (size and SHA-256).
    A marker from before checksums were recorded (no `files`) vouches for nothing more."""
    recorded = (marker or {}).get("files")
    if recorded is None:
        return
    entry = recorded.get(name)
    if entry is None:
        raise ValueError(f"{name} is not one of the files the completion marker records")
    if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ValueError(
            f"{name} does not match its completion marker (size {len(data)}, recorded "
            f"{entry.get('size')}): the file was changed or truncated after it was written"
        )


def marker_problem(paths: ArtifactPaths, marker: Mapping[str, Any], checksums: bool) -> str | None:
    """Why the files under a completion marker are not the ones it recorded, or None.
    Sizes come from one listing of the directory; checksums read every file."""
    listing = FileSystems.match([FileSystems.join(paths.directory, "*")])[0].metadata_list
    sizes = {posixpath.basename(m.path): m.size_in_bytes for m in listing}
    recorded = marker.get("files")
    if not recorded:
        # A marker written before sizes were recorded: the seven files must at least be
        # there and not empty (redoing a whole archive on upgrade would be the alternative).
        for name in (posixpath.basename(uri) for uri in paths.files()):
            if not sizes.get(name):
                return f"{name} is missing or empty"
        return None
    for name, entry in recorded.items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != entry.get("size"):
            return f"{name} has {sizes[name]} bytes, the marker recorded {entry.get('size')}"
    if checksums:
        for name in recorded:
            with FileSystems.open(FileSystems.join(paths.directory, name)) as handle:
                data = handle.read()
            try:
                check_file(marker, name, data)
            except ValueError as exc:
                return str(exc)
    return None


def completion_marker(paths: ArtifactPaths) -> dict[str, Any] | None:
    """The completion marker of a completed slide (parameter_hash, instance_hash, run_id, ...),
    or None when it is not complete."""
    if not FileSystems.exists(paths.complete_marker):
        return None
    with FileSystems.open(paths.complete_marker) as handle:
        text = handle.read()
    try:
        marker = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        marker = None
    if not isinstance(marker, dict):  # truncated or foreign: the slide is done again
        _LOG.warning(
            "%s is not a valid completion marker: the slide is redone", paths.complete_marker
        )
        return None
    return marker


def rows_committed(output_root: str, run_id: str | None, instance_uuid: str) -> bool:
    """True when run `run_id` wrote the slide's table rows: its resource row file (written just
    before the marker), or, for a run from before per-slide rows, the run's summary (written
    when its tables were)."""
    if not run_id:
        return False
    return FileSystems.exists(
        row_file(output_root, "resource", run_id, instance_uuid)
    ) or FileSystems.exists(run_summary_uri(output_root, run_id))
