"""Per-slide artifacts in the published layout, metadata.json, and the completion marker.

Layout: {output_root}/{instance_uuid}/path_foundation/v1/{metadata.json, slide_thumbnail.jpeg,
slide_thumbnail_mask.jpeg, slide_embedding.npy, slide_embedding_coord.npy,
embeddings_500_cluster_centroid.npy, embeddings_500_labels.npy}. Files go through Beam
`FileSystems` (local paths now, gs:// later), each written under a temporary name and renamed;
the completion marker `_COMPLETE.json` is removed first and written last, so a slide is never
marked complete while any of its files is stale or half-written. A slide counts as done only
when the run named in its marker also committed its tables (`{output_root}/runs/{run_id}.json`,
written when a run finishes): a slide written by a run that was killed before its table rows
were written is done again, so every slide ends with one set of files and of rows.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.slides import validate_uuid

MODEL_DIR = "path_foundation"
COMPLETE_MARKER = "_COMPLETE.json"


@dataclass(frozen=True)
class ArtifactPaths:
    """URIs of one slide's artifacts."""

    directory: str
    metadata: str
    thumbnail: str
    thumbnail_mask: str
    embeddings: str
    coordinates: str
    centroids: str
    labels: str
    complete_marker: str

    @classmethod
    def for_slide(
        cls, output_root: str, instance_uuid: str, version: str, n_clusters: int
    ) -> ArtifactPaths:
        directory = FileSystems.join(
            output_root.rstrip("/"), validate_uuid(instance_uuid), MODEL_DIR, version
        )

        def at(name: str) -> str:
            return FileSystems.join(directory, name)

        return cls(
            directory=directory,
            metadata=at("metadata.json"),
            thumbnail=at("slide_thumbnail.jpeg"),
            thumbnail_mask=at("slide_thumbnail_mask.jpeg"),
            embeddings=at("slide_embedding.npy"),
            coordinates=at("slide_embedding_coord.npy"),
            centroids=at(f"embeddings_{n_clusters}_cluster_centroid.npy"),
            labels=at(f"embeddings_{n_clusters}_labels.npy"),
            complete_marker=at(COMPLETE_MARKER),
        )


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


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def write_artifacts(
    paths: ArtifactPaths, files: Mapping[str, bytes], marker: Mapping[str, Any], run_id: str
) -> None:
    """Writes `{uri: bytes}` atomically per file, then the completion marker."""
    if FileSystems.exists(paths.complete_marker):
        FileSystems.delete([paths.complete_marker])
    temporary = {uri: f"{uri}.tmp-{run_id}" for uri in files}
    for uri, data in files.items():
        _write(temporary[uri], data)
    FileSystems.rename(list(temporary.values()), list(temporary.keys()))
    _write(paths.complete_marker, json_bytes(marker))
    # Temporaries of a killed run would otherwise stay. This run's own names are left alone:
    # a concurrent attempt at the same bundle (a retry) may still be renaming them.
    found = FileSystems.match([FileSystems.join(paths.directory, "*.tmp-*")])[0].metadata_list
    stale = [m.path for m in found if not m.path.endswith(f".tmp-{run_id}")]
    if stale:
        FileSystems.delete(stale)


def completion_marker(paths: ArtifactPaths) -> dict[str, Any] | None:
    """The completion marker of a completed slide (parameter_hash, instance_hash, run_id, ...),
    or None when it is not complete."""
    if not FileSystems.exists(paths.complete_marker):
        return None
    with FileSystems.open(paths.complete_marker) as handle:
        return json.loads(handle.read())


def run_committed(output_root: str, run_id: str | None) -> bool:
    """True when run `run_id` finished and wrote its tables (its run summary exists)."""
    if not run_id:
        return False
    return FileSystems.exists(FileSystems.join(output_root.rstrip("/"), "runs", f"{run_id}.json"))


def completed_parameter_hash(paths: ArtifactPaths) -> str | None:
    """The parameter hash of a completed slide, or None when it is not complete."""
    marker = completion_marker(paths)
    return None if marker is None else marker.get("parameter_hash")
