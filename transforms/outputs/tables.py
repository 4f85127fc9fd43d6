"""Table schemas (defined once) and the rows a run produces: resource, search, failures.

Each schema is a list of `Column`s from which both the Parquet (pyarrow) schema and the
BigQuery schema (WriteToBigQuery's TableSchema and transforms/sql/tables.sql) are derived.
Rows are plain dicts; `row_errors` checks one against a schema the way BigQuery would.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from models.signature import EMBEDDING_DIM


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # STRING, INT64, FLOAT64, BOOL, TIMESTAMP
    nullable: bool = True
    repeated: bool = False
    length: int | None = None  # repeated: every row holds exactly this many values


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
    # How the centroids were made: "identity" (N <= n_clusters: the embeddings themselves),
    # "lloyd" or "minibatch_kmeans"; the configured parameters as canonical JSON.
    Column("clustering_method", "STRING"),
    Column("clustering_parameters", "STRING"),
    Column("clustering_random_state", "INT64"),
    # The source image's license and DOI as IDC lists them (per series); null when unknown
    # (local slides). The embeddings themselves are published under CC BY 4.0.
    Column("source_license", "STRING"),
    Column("source_doi", "STRING"),
    Column("instance_pixeldata_SHA512_hash", "STRING"),
]

SEARCH = [
    *_UIDS,
    Column("centroid_index", "INT64", nullable=False),
    Column("cluster_size", "INT64", nullable=False),
    Column("embedding", "FLOAT64", nullable=False, repeated=True, length=EMBEDDING_DIM),
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

# Resource rows retired because a newer run embedded the same series under another instance
# UUID (IDC re-issues the UUID of every changed instance in a new release): kept here, with
# what replaced them, so the old UUID stays findable while search and lookups see one slide.
RESOURCE_HISTORY = [
    *RESOURCE,
    Column("superseded_by_instance_uuid", "STRING", nullable=False),
    Column("superseded_by_run_id", "STRING", nullable=False),
]

TABLES = {"resource": RESOURCE, "search": SEARCH, "failures": FAILURES}  # what a run writes
# Every table's schema, the history table included (only the BigQuery merge writes it).
SCHEMAS = {**TABLES, "resource_history": RESOURCE_HISTORY}


def arrow_schema(columns: list[Column]) -> pa.Schema:
    fields = []
    for col in columns:
        arrow_type = _ARROW[col.type]
        if col.repeated:
            arrow_type = pa.list_(pa.field("element", arrow_type, nullable=False))
        fields.append(pa.field(col.name, arrow_type, nullable=col.nullable))
    return pa.schema(fields)


def parquet_bytes(table: str, rows: list[dict[str, Any]]) -> bytes:
    """`rows` of `table` as one Parquet file (a slide's row file: outputs/layout.py row_file)."""
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(TABLES[table])), buffer)
    return buffer.getvalue()


def bigquery_fields(columns: list[Column]) -> list[dict[str, str]]:
    """BigQuery TableFieldSchema dicts: REQUIRED when not nullable, REPEATED for arrays.

    BigQuery arrays are never NULL and hold no NULLs, so a repeated column is REPEATED (a
    NULL array loads as empty, which `row_errors` rejects for the embedding).
    """
    return [
        {
            "name": col.name,
            "type": col.type,
            "mode": "REPEATED" if col.repeated else "NULLABLE" if col.nullable else "REQUIRED",
        }
        for col in columns
    ]


def bigquery_schema(columns: list[Column]) -> dict[str, list[dict[str, str]]]:
    """The `{"fields": [...]}` schema WriteToBigQuery takes."""
    return {"fields": bigquery_fields(columns)}


def bigquery_ddl_columns(columns: list[Column]) -> str:
    """The column list of a CREATE TABLE statement, one column a line."""
    lines = []
    for col in columns:
        kind = f"ARRAY<{col.type}>" if col.repeated else col.type
        lines.append(f"  {col.name} {kind}{'' if col.nullable or col.repeated else ' NOT NULL'}")
    return ",\n".join(lines)


_PYTHON = {
    "STRING": (str,),
    "INT64": (int,),
    "FLOAT64": (float, int),
    "BOOL": (bool,),
    "TIMESTAMP": (datetime.datetime, str),
}


def _value_error(col: Column, value: Any) -> str | None:
    if col.type != "BOOL" and isinstance(value, bool):
        return f"{col.name}: bool where {col.type} is expected"
    if not isinstance(value, _PYTHON[col.type]):
        return f"{col.name}: {type(value).__name__} where {col.type} is expected"
    if col.type == "FLOAT64" and not math.isfinite(value):
        return f"{col.name}: {value!r} is NaN or infinite, not a finite number"
    if col.type == "TIMESTAMP" and isinstance(value, datetime.datetime) and value.tzinfo is None:
        return f"{col.name}: naive datetime (no time zone)"
    return None


def row_errors(row: dict[str, Any], columns: list[Column]) -> list[str]:
    """What is wrong with `row` under `columns` (empty when it loads as is): unknown or missing
    columns, NULLs in REQUIRED columns, wrong Python types (numpy scalars included), NULL or
    NaN array elements, and arrays of the wrong length."""
    known = {col.name for col in columns}
    errors = [f"{name}: not a column" for name in sorted(set(row) - known)]
    for col in columns:
        value = row.get(col.name)
        if col.repeated:
            if not isinstance(value, list):
                errors.append(f"{col.name}: {type(value).__name__} where an array is expected")
                continue
            if col.length is not None and len(value) != col.length:
                errors.append(f"{col.name}: {len(value)} values, expected {col.length}")
            if any(v is None for v in value):
                errors.append(f"{col.name}: NULL array element")
                continue
            errors += sorted({e for v in value if (e := _value_error(col, v))})
        elif value is None:
            if not col.nullable:
                errors.append(f"{col.name}: NULL in a REQUIRED column")
        elif error := _value_error(col, value):
            errors.append(error)
    return errors
