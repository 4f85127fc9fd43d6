"""Reading what runs wrote, from any output root: tables, slide identities, per-slide artifacts.

What it is for: resolving a slide (instance UUID <-> Study/Series UIDs) through the resource
table, locally (Parquet) or in BigQuery (a parameterised query); reading a slide's
metadata.json, embeddings, coordinates, centroids, labels and thumbnail from a local output
root, a `gs://` one (Beam `FileSystems`), or a public bucket with an anonymous client; and
streaming the search table in bounded blocks, one current row set per slide, for search.

Every UUID and UID is validated before it becomes part of a path or a query. Not for writing:
artifacts.py and sinks.py own the layout on the way out.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from transforms import bigquery
from transforms.dicom_io.byte_ranges import gcs_client
from transforms.outputs import releases
from transforms.outputs.artifacts import check_file
from transforms.outputs.layout import (
    COMPLETE_MARKER,
    DATASET_VERSION,
    TABLES_DIR,
    row_file,
    slide_directory,
    table_dir,
    table_file,
)
from transforms.records import validate_uid, validate_uuid

_LOG = logging.getLogger(__name__)

PUBLIC_OUTPUT_ROOT = "gs://healthai-us/encoded-data/idc/pathology"
PUBLISHED_RESOURCE_TABLE = "hai-cd3-foundations.idc_metadata.pathology_embeddings_metadata"
# The search table's columns that search reads.
SEARCH_COLUMNS = [
    "instance_uuid",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "centroid_index",
    "embedding",
]


class SlideNotFoundError(LookupError):
    """The slide is not in the resource table (or its artifacts are not where they should be)."""


def read_bytes(uri: str, anonymous: bool = False) -> bytes:
    """The bytes at a local path or gs:// URI; `anonymous`: a public bucket, no credentials."""
    if anonymous and uri.startswith("gs://"):
        from google.api_core.exceptions import NotFound

        bucket, _, name = uri[len("gs://") :].partition("/")
        try:
            return gcs_client().bucket(bucket).blob(name).download_as_bytes()
        except NotFound:
            raise FileNotFoundError(uri) from None
    with FileSystems.open(uri) as handle:
        return handle.read()


def table_files(output_root: str, table: str) -> list[str]:
    """The Parquet files of one table, oldest run first (run ids start with time): one per
    slide (tables/{table}/{run_id}/{key}.parquet), and one per run from runs before per-slide
    rows (tables/{table}/{run_id}.parquet)."""
    base = table_dir(output_root, table)
    patterns = [FileSystems.join(base, "*.parquet"), FileSystems.join(base, "*", "*.parquet")]
    found = [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]
    return sorted(set(found), key=lambda path: (run_id_of(path), path))


def run_id_of(table_file: str) -> str:
    """The run that wrote a table file: `{run_id}/{key}.parquet` or `{run_id}.parquet`."""
    parent = posixpath.dirname(table_file)
    if posixpath.basename(posixpath.dirname(parent)) == TABLES_DIR:  # tables/{table}/{file}
        return posixpath.basename(table_file).removesuffix(".parquet")
    return posixpath.basename(parent)


def _read_parquet(uri: str) -> pa.Table:
    with FileSystems.open(uri) as handle:
        return pq.ParquetFile(handle).read()


def newest_resources(output_root: str) -> pa.Table:
    """One resource row per instance UUID: the newest by created_time, then run id; and one
    slide per series: a UUID whose series a newer run embedded under another UUID (a new IDC
    release) is retired (outputs/releases.py; listed by `resource_history`).

    A slide rerun (with --force, or new parameters) has a row in several run files; only the
    newest describes the artifacts on disk and the search rows that count.
    """
    return releases.split_superseded(_newest_per_uuid(output_root))[0]


def resource_history(output_root: str) -> pa.Table:
    """The resource rows retired because a newer run embedded their series under another
    instance UUID, each with `superseded_by_instance_uuid` and `superseded_by_run_id`."""
    return releases.split_superseded(_newest_per_uuid(output_root))[1]


def _newest_per_uuid(output_root: str) -> pa.Table:
    files = table_files(output_root, "resource")
    if not files:
        raise SlideNotFoundError(
            f"no resource table at {table_dir(output_root, 'resource')}; run `pathembed run` "
            "first or check --output-root"
        )
    rows = pa.concat_tables([_read_parquet(f) for f in files], promote_options="default")
    rows = rows.sort_by([("created_time", "descending"), ("run_id", "descending")])
    _, first = np.unique(rows["instance_uuid"].to_numpy(zero_copy_only=False), return_index=True)
    return rows.take(np.sort(first)).sort_by("instance_uuid")


def find_resource(
    output_root: str,
    *,
    instance_uuid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    resources: pa.Table | None = None,
) -> dict[str, Any]:
    """The newest resource row of a slide, by instance UUID or by Study + Series UIDs."""
    where = _slide_condition(instance_uuid, study_instance_uid, series_instance_uid)
    if resources is None:
        resources = newest_resources(output_root)
    mask = None
    for column, value in where.items():
        match = pc.equal(resources[column], value)
        mask = match if mask is None else pc.and_(mask, match)
    found = resources.filter(mask).sort_by([("created_time", "descending")]).to_pylist()
    if not found and instance_uuid is not None:
        # A UUID retired by a newer release stays findable, saying what replaced it.
        history = resource_history(output_root)
        found = history.filter(pc.equal(history["instance_uuid"], where["instance_uuid"]))
        found = found.to_pylist()
    if not found:
        described = ", ".join(f"{k} {v}" for k, v in where.items())
        raise SlideNotFoundError(
            f"{described} is not in the resource table at "
            f"{table_dir(output_root, 'resource')}; run `pathembed run` first or check "
            "--output-root"
        )
    return found[0]


def _slide_condition(
    instance_uuid: str | None, study_instance_uid: str | None, series_instance_uid: str | None
) -> dict[str, str]:
    """{column: validated value} naming one slide, by UUID or by both UIDs."""
    if instance_uuid is not None:
        if study_instance_uid is not None or series_instance_uid is not None:
            raise ValueError("name the slide by instance UUID or by Study + Series UIDs, not both")
        return {"instance_uuid": validate_uuid(instance_uuid)}
    if study_instance_uid is None or series_instance_uid is None:
        raise ValueError("name the slide by instance UUID, or by both Study and Series UIDs")
    return {
        "StudyInstanceUID": validate_uid(study_instance_uid),
        "SeriesInstanceUID": validate_uid(series_instance_uid),
    }


def bigquery_lookup_job(
    resource_table: str,
    *,
    instance_uuid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> tuple[str, Any]:
    """(SQL, QueryJobConfig) finding a slide in a BigQuery resource table; values are parameters."""
    where = _slide_condition(instance_uuid, study_instance_uid, series_instance_uid)
    query = bigquery.Query(
        bigquery.render_sql("lookup.sql", {"resource_table": resource_table}),
        (
            ("instance_uuid", "STRING", where.get("instance_uuid")),
            ("study_instance_uid", "STRING", where.get("StudyInstanceUID")),
            ("series_instance_uid", "STRING", where.get("SeriesInstanceUID")),
        ),
    )
    return query.sql, query.job_config()


def bigquery_find_resource(client: Any, resource_table: str, **slide: str | None) -> dict:
    """{instance_uuid, StudyInstanceUID, SeriesInstanceUID} of a slide from BigQuery."""
    sql, config = bigquery_lookup_job(resource_table, **slide)
    rows = [dict(row.items()) for row in client.query(sql, job_config=config).result()]
    if not rows:
        described = ", ".join(f"{k} {v}" for k, v in slide.items() if v is not None)
        raise SlideNotFoundError(
            f"{described} is not in the BigQuery resource table {resource_table}; check the "
            "UIDs or --bq-resource-table"
        )
    return rows[0]


def search_table_batches(
    output_root: str, resources: pa.Table, block_rows: int = 8192
) -> Iterator[pa.RecordBatch]:
    """The search table's rows in blocks of at most `block_rows`, each slide's newest run only.

    A slide's search rows count only from the run its newest resource row names; rows from
    older runs of the same slide (superseded centroids) are dropped here, so a slide that was
    embedded twice is not found twice. Memory: one Parquet row group and one block.
    """
    run_of = dict(
        zip(resources["instance_uuid"].to_pylist(), resources["run_id"].to_pylist(), strict=True)
    )
    slides_of: dict[str, list[str]] = collections.defaultdict(list)  # run -> its newest slides
    for uuid, run in run_of.items():
        slides_of[run].append(uuid)
    for uri in table_files(output_root, "search"):
        run_id = run_id_of(uri)
        key = posixpath.basename(uri).removesuffix(".parquet")
        if key != run_id:  # one slide's row file: that slide, if this is its newest run
            if run_of.get(key) != run_id:
                continue
            current = pa.array([key], pa.string())
        else:  # a whole run's file (before per-slide rows): the slides it is newest for
            current = pa.array(slides_of.get(run_id, []), pa.string())
        if len(current) == 0:
            _LOG.info("search table file %s holds no slide's newest run; skipped", uri)
            continue
        with FileSystems.open(uri) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=block_rows, columns=SEARCH_COLUMNS
            ):
                yield batch.filter(pc.is_in(batch["instance_uuid"], value_set=current))


def slide_centroids(
    output_root: str, resource: Mapping[str, Any], block_rows: int = 8192
) -> np.ndarray:
    """A slide's centroids [K, D] in centroid order, as its newest run wrote the search table."""
    uri = row_file(output_root, "search", resource["run_id"], resource["instance_uuid"])
    if not FileSystems.exists(uri):  # a run from before per-slide rows
        uri = table_file(output_root, "search", resource["run_id"])
    columns = ["instance_uuid", "centroid_index", "embedding"]
    parts = []
    with contextlib.suppress(FileNotFoundError), FileSystems.open(uri) as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=block_rows, columns=columns):
            parts.append(batch.filter(pc.equal(batch["instance_uuid"], resource["instance_uuid"])))
    rows = [part for part in parts if part.num_rows]
    if not rows:
        raise SlideNotFoundError(
            f"{resource['instance_uuid']} has no search rows in {uri}; the tables of run "
            f"{resource['run_id']} are incomplete: rerun `pathembed run --force --uuids "
            f"{resource['instance_uuid']}`"
        )
    table = pa.Table.from_batches(rows).sort_by("centroid_index")
    return embedding_matrix(table["embedding"])


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An `embedding` list column as a float64 [rows, D] array; every row must have D values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) == 0:
        return np.zeros((0, 0))
    if lengths.min() != lengths.max():
        raise ValueError(f"embeddings of different lengths ({lengths.min()}..{lengths.max()})")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return values.reshape(len(column), int(lengths[0]))


@dataclass(frozen=True)
class SlideArtifacts:
    """One slide's published files under `{output_root}/{instance_uuid}/path_foundation/v1/`.

    File names come from metadata.json (their basenames), joined to the directory they were
    read from: metadata records the URIs at write time, which are stale once an output root is
    copied or mirrored, and names carry the run's n_clusters (`embeddings_500_...`).
    """

    instance_uuid: str
    directory: str
    metadata: dict[str, Any]
    anonymous: bool = False
    # The slide's _COMPLETE.json: every file read is checked against the size and SHA-256 it
    # records. None only for the published dataset, which has no markers.
    marker: dict[str, Any] | None = None

    @classmethod
    def open(
        cls,
        output_root: str,
        instance_uuid: str,
        *,
        version: str = DATASET_VERSION,
        anonymous: bool = False,
    ) -> SlideArtifacts:
        """The slide's artifacts; SlideNotFoundError unless its completion marker is there
        (a slide being written, or left half-written by a killed run, is not read), except
        under the published dataset's root, which has no markers."""
        directory = slide_directory(output_root, instance_uuid, version)
        uri = FileSystems.join(directory, "metadata.json")
        try:
            data = read_bytes(uri, anonymous)
        except FileNotFoundError:
            raise SlideNotFoundError(
                f"no metadata.json at {uri}; is {instance_uuid} embedded under this output "
                "root? run `pathembed run` first or check --output-root"
            ) from None
        marker = None
        if output_root.rstrip("/") != PUBLIC_OUTPUT_ROOT:
            marker_uri = FileSystems.join(directory, COMPLETE_MARKER)
            try:
                marker = json.loads(read_bytes(marker_uri, anonymous))
            except FileNotFoundError:
                raise SlideNotFoundError(
                    f"{instance_uuid} is not complete under this output root (no "
                    f"{COMPLETE_MARKER} at {marker_uri}); run `pathembed run` to finish it"
                ) from None
        check_file(marker, "metadata.json", data)
        metadata = json.loads(data)
        return cls(validate_uuid(instance_uuid), directory, metadata, anonymous, marker)

    def read(self, name: str) -> bytes:
        """The bytes of one of the slide's files, checked against its completion marker."""
        data = read_bytes(
            FileSystems.join(self.directory, posixpath.basename(name)), self.anonymous
        )
        check_file(self.marker, posixpath.basename(name), data)
        return data

    @property
    def embedding_entry(self) -> dict[str, Any]:
        """The metadata's first (Path Foundation) entry of instance_patch_embeddings."""
        return self.metadata["instance_patch_embeddings"][0]

    @property
    def patch_size(self) -> tuple[int, int]:
        entry = self.embedding_entry
        return entry["input_image_patch_width_px"], entry["input_image_patch_height_px"]

    @property
    def level_size(self) -> tuple[int, int]:
        """(width, height) of the patch-source frame that coordinates refer to."""
        entry = self.embedding_entry
        return entry["slide_pyramid_level_width"], entry["slide_pyramid_level_height"]

    def files(self) -> dict[str, str]:
        """{file name: URI} of metadata.json and every artifact it names."""
        entry = self.embedding_entry
        kmeans = entry["kmeans_embeddings"][0]
        recorded = [
            entry["thumbnail_gs_path"],
            entry["thumbnail_patch_sampling_mask_gs_path"],
            entry["patch_embeddings_gs_path"],
            entry["patch_coordinates_gs_path"],
            kmeans["centroids_gs_path"],
            kmeans["embedding_centroid_index_gs_path"],
        ]
        names = ["metadata.json", *(posixpath.basename(path) for path in recorded)]
        return {name: FileSystems.join(self.directory, name) for name in names}

    def _uri(self, recorded: str) -> str:
        return FileSystems.join(self.directory, posixpath.basename(recorded))

    def _npy(self, recorded: str) -> np.ndarray:
        return np.load(io.BytesIO(self.read(recorded)), allow_pickle=False)

    def embeddings(self) -> np.ndarray:
        return self._npy(self.embedding_entry["patch_embeddings_gs_path"])

    def coordinates(self) -> np.ndarray:
        return self._npy(self.embedding_entry["patch_coordinates_gs_path"])

    def centroids(self) -> np.ndarray:
        return self._npy(self.embedding_entry["kmeans_embeddings"][0]["centroids_gs_path"])

    def labels(self) -> np.ndarray:
        kmeans = self.embedding_entry["kmeans_embeddings"][0]
        return self._npy(kmeans["embedding_centroid_index_gs_path"])

    @property
    def thumbnail_uri(self) -> str:
        return self._uri(self.embedding_entry["thumbnail_gs_path"])

    def thumbnail_jpeg(self) -> bytes:
        return self.read(self.embedding_entry["thumbnail_gs_path"])

    def thumbnail(self) -> np.ndarray:
        """The slide thumbnail as RGB uint8 [h, w, 3]."""
        encoded = np.frombuffer(self.thumbnail_jpeg(), np.uint8)
        return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
