"""Table schemas (defined once) and the rows a run produces: resource, search, failures.

Each schema is a list of `Column`s from which the Parquet (pyarrow) schema is derived; the
same definition is meant to give the BigQuery schema. Rows are plain dicts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # STRING, INT64, FLOAT64, BOOL, TIMESTAMP
    nullable: bool = True
    repeated: bool = False


_ARROW = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "FLOAT64": pa.float64(),
    "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}

_UIDS = [
    Column("instance_uuid", "STRING", nullable=False),
    Column("StudyInstanceUID", "STRING", nullable=False),
    Column("SeriesInstanceUID", "STRING", nullable=False),
    Column("SOPInstanceUID", "STRING", nullable=False),
]

RESOURCE = [
    *_UIDS,
    Column("collection", "STRING"),
    Column("instance_hash", "STRING"),
    Column("metadata_uri", "STRING", nullable=False),
    Column("thumbnail_uri", "STRING", nullable=False),
    Column("thumbnail_mask_uri", "STRING", nullable=False),
    Column("embeddings_uri", "STRING", nullable=False),
    Column("coordinates_uri", "STRING", nullable=False),
    Column("centroids_uri", "STRING", nullable=False),
    Column("labels_uri", "STRING", nullable=False),
    Column("embedding_count", "INT64", nullable=False),
    Column("number_of_centroids", "INT64", nullable=False),
    Column("slide_pyramid_level_width", "INT64", nullable=False),
    Column("slide_pyramid_level_height", "INT64", nullable=False),
    Column("native_level_width", "INT64", nullable=False),
    Column("native_level_height", "INT64", nullable=False),
    Column("native_pixel_spacing_row_mm", "FLOAT64", nullable=False),
    Column("native_pixel_spacing_column_mm", "FLOAT64", nullable=False),
    Column("downsample", "FLOAT64", nullable=False),
    Column("mask_pixel_spacing_mm", "FLOAT64", nullable=False),
    Column("model_name", "STRING", nullable=False),
    Column("model_version", "STRING", nullable=False),
    Column("model_is_stand_in", "BOOL", nullable=False),
    Column("idc_version", "STRING"),
    Column("pipeline_version", "STRING", nullable=False),
    Column("parameter_hash", "STRING", nullable=False),
    Column("run_id", "STRING", nullable=False),
    Column("created_time", "TIMESTAMP", nullable=False),
]

SEARCH = [
    *_UIDS,
    Column("centroid_index", "INT64", nullable=False),
    Column("cluster_size", "INT64", nullable=False),
    Column("embedding", "FLOAT64", nullable=False, repeated=True),
]

FAILURES = [
    Column("instance_uuid", "STRING"),
    Column("SeriesInstanceUID", "STRING"),
    Column("stage", "STRING", nullable=False),
    Column("reason_code", "STRING", nullable=False),
    Column("message", "STRING", nullable=False),
    Column("run_id", "STRING", nullable=False),
    Column("time", "TIMESTAMP", nullable=False),
]

TABLES = {"resource": RESOURCE, "search": SEARCH, "failures": FAILURES}


def arrow_schema(columns: list[Column]) -> pa.Schema:
    fields = []
    for col in columns:
        arrow_type = _ARROW[col.type]
        if col.repeated:
            arrow_type = pa.list_(pa.field("element", arrow_type, nullable=False))
        fields.append(pa.field(col.name, arrow_type, nullable=col.nullable))
    return pa.schema(fields)
