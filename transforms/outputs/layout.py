"""Every path a run writes, in one place: the published per-slide layout, the tables and the
run summaries.

{output_root}/
  {instance_uuid}/path_foundation/v1/   the published files of one slide (ArtifactPaths),
                                        plus _COMPLETE.json, written last, and
                                        _LEASE.json while a run writes the slide
                                        (outputs/lease.py: one writer per slide)
  tables/{resource,search,failures}/{run_id}/{key}.parquet
                                        the rows of one slide (key: its instance UUID; a
                                        failure row: UUID-stage-digest), written with the slide:
                                        a slide's rows are durable the moment it is done
  tables/{resource,search,failures}/{run_id}.parquet
                                        one file per run (runs before per-slide rows)
  runs/{run_id}.todo                    {"slides": N}: the slides this run has to do
                                        (after SkipDone), for progress and ETA
  runs/{run_id}.json                    the summary of a finished run (BigQuery: its rows
                                        were merged)

`output_root` is a local path or gs://bucket/prefix; paths are joined with Beam's FileSystems.
"""

from __future__ import annotations

from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems

from transforms.records import validate_uuid

MODEL_DIR = "path_foundation"
DATASET_VERSION = "v1"  # the published layout: {uuid}/path_foundation/v1/
DEFAULT_N_CLUSTERS = 500  # the published k-means files: embeddings_500_*.npy
COMPLETE_MARKER = "_COMPLETE.json"
LEASE_FILE = "_LEASE.json"  # the run that writes the slide now (outputs/lease.py)
TABLES_DIR = "tables"
RUNS_DIR = "runs"


def slide_directory(output_root: str, instance_uuid: str, version: str = DATASET_VERSION) -> str:
    """{output_root}/{instance_uuid}/path_foundation/{version}, the UUID validated first."""
    return FileSystems.join(
        output_root.rstrip("/"), validate_uuid(instance_uuid), MODEL_DIR, version
    )


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
    lease: str  # not an artifact: present only while a run holds the slide

    @classmethod
    def for_slide(
        cls,
        output_root: str,
        instance_uuid: str,
        version: str = DATASET_VERSION,
        n_clusters: int = DEFAULT_N_CLUSTERS,
    ) -> ArtifactPaths:
        directory = slide_directory(output_root, instance_uuid, version)

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
            lease=at(LEASE_FILE),
        )

    def files(self) -> list[str]:
        """The URIs of the seven artifact files (not the marker, not the lease)."""
        return [
            self.metadata, self.thumbnail, self.thumbnail_mask, self.embeddings,
            self.coordinates, self.centroids, self.labels,
        ]  # fmt: skip


def table_dir(output_root: str, table: str) -> str:
    """The folder of one local table (resource, search or failures)."""
    return FileSystems.join(output_root.rstrip("/"), TABLES_DIR, table)


def table_file(output_root: str, table: str, run_id: str) -> str:
    """The Parquet file run `run_id` wrote for `table`."""
    return FileSystems.join(table_dir(output_root, table), f"{run_id}.parquet")


def row_file(output_root: str, table: str, run_id: str, key: str) -> str:
    """tables/{table}/{run_id}/{key}.parquet: one slide's rows of `table`."""
    return FileSystems.join(table_dir(output_root, table), run_id, f"{key}.parquet")


def run_rows_dir(output_root: str, table: str, run_id: str) -> str:
    """tables/{table}/{run_id}: the per-slide row files run `run_id` wrote."""
    return FileSystems.join(table_dir(output_root, table), run_id)


def todo_uri(output_root: str, run_id: str) -> str:
    """runs/{run_id}.todo: {"slides": N}, written once SkipDone has seen every slide."""
    return FileSystems.join(output_root.rstrip("/"), RUNS_DIR, f"{run_id}.todo")


def run_summary_uri(output_root: str, run_id: str) -> str:
    """{output_root}/runs/{run_id}.json: written when the run finished."""
    return FileSystems.join(output_root.rstrip("/"), RUNS_DIR, f"{run_id}.json")
