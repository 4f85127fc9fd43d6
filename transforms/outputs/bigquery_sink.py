"""The BigQuery table sink: per-run staging tables loaded by WriteToBigQuery, merged afterwards.

Why staging: a rerun (with --force, new parameters, or after a failed job) writes rows for
slides that already have rows. Each run therefore loads its rows with `WriteToBigQuery`
(method FILE_LOADS: load jobs, no streaming buffer, so DML can follow at once) into its own
tables `{table}_staging_{run}`, and `merge_run` then replaces, in one transaction
(transforms/sql/merge_run.sql), the resource and search rows of every slide the run wrote
and the failure rows of that run, and drops the staging tables. `prepare_run` creates the
staging tables, with an expiration of STAGING_DAYS, before the job starts: a run that dies
before the merge leaves the final tables untouched and its staging tables expire.

Schemas come from transforms/outputs/tables.py (the same definition as the Parquet sink); so do the
CREATE TABLE statements (`tables_ddl`, checked in as transforms/sql/tables.sql). Not for
local runs: FILE_LOADS needs a gs:// temp location and BigQuery credentials.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigquery_tools import FileFormat

from transforms.bigquery import render_sql, run_script, validate_table_id
from transforms.outputs.tables import (
    SCHEMAS,
    TABLES,
    Column,
    bigquery_ddl_columns,
    bigquery_schema,
    row_errors,
)

TABLE_KINDS = ("resource", "search", "failures")
HISTORY_KIND = "resource_history"
STAGING_DAYS = 7
_RUN_TOKEN = re.compile(r"[^A-Za-z0-9_]")


class RowSchemaError(ValueError):
    """A row the pipeline produced does not fit its table's schema (a bug, not a bad slide)."""


def checked_row(row: dict[str, Any], table: str) -> dict[str, Any]:
    """`row` unchanged when it fits the `table` schema, else RowSchemaError naming what is wrong.

    Both sinks check every row, so a row that would fail a BigQuery load fails a local run too.
    """
    errors = row_errors(row, TABLES[table])
    if errors:
        raise RowSchemaError(f"{table} row for {row.get('instance_uuid')}: {'; '.join(errors)}")
    return row


def bigquery_row(row: dict[str, Any], columns: list[Column]) -> dict[str, Any]:
    """A row as WriteToBigQuery's JSON file loads take it: timestamps as ISO 8601 strings
    (the sink loads Avro, which needs no conversion; kept for JSON loads and streaming)."""
    out = dict(row)
    for col in columns:
        value = out.get(col.name)
        if col.type == "TIMESTAMP" and isinstance(value, datetime.datetime):
            out[col.name] = value.isoformat()
    return out


@dataclass(frozen=True)
class RunTables:
    """The final and staging table ids of one run in one dataset (all validated)."""

    final: dict[str, str]
    staging: dict[str, str]

    @classmethod
    def of(cls, tables_cfg: Any, run_id: str) -> RunTables:
        """`tables_cfg`: pipeline.config.TablesConfig (bigquery_dataset and the three names)."""
        dataset = tables_cfg.bigquery_dataset
        token = _RUN_TOKEN.sub("_", run_id)
        final = {kind: f"{dataset}.{getattr(tables_cfg, kind)}" for kind in TABLE_KINDS}
        staging = {kind: f"{table}_staging_{token}" for kind, table in final.items()}
        # Superseded resource rows move here at merge time (no staging table: only the merge
        # writes it).
        final[HISTORY_KIND] = f"{final['resource']}_history"
        for table_id in [*final.values(), *staging.values()]:
            validate_table_id(table_id)
        return cls(final, staging)


class WriteBigQueryTable(beam.PTransform):
    """Row dicts -> this run's staging table of `table` (WriteToBigQuery, FILE_LOADS)."""

    def __init__(self, table: str, tables_cfg: Any, run_id: str):
        super().__init__()
        self._table = table
        self._table_id = RunTables.of(tables_cfg, run_id).staging[table]

    def expand(self, rows):
        columns = TABLES[self._table]
        return rows | "Load" >> beam.io.WriteToBigQuery(**load_arguments(self._table_id, columns))


def load_arguments(table_id: str, columns: list[Column]) -> dict[str, Any]:
    """WriteToBigQuery's arguments: FILE_LOADS through Avro temp files. Avro holds a FLOAT64
    in 8 bytes where JSON spells ~20 digits (the search table is 32.5M rows of 384 floats:
    tests/test_bigquery_sink.py measures the ratio), and takes datetimes as they are (no
    conversion to ISO strings, which JSON loads need: bigquery_row)."""
    return dict(
        table=table_id,
        schema=bigquery_schema(columns),
        method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
        temp_file_format=FileFormat.AVRO,
        # prepare_run created the table (with its expiration); appending keeps that.
        create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
        write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
    )


def _create_tables(names: dict[str, str], options: str = "") -> str:
    """CREATE TABLE IF NOT EXISTS per {kind: name as it goes between backticks}."""
    return (
        "\n\n".join(
            f"CREATE TABLE IF NOT EXISTS `{name}` (\n{bigquery_ddl_columns(SCHEMAS[kind])}\n)"
            f"{options};"
            for kind, name in names.items()
        )
        + "\n"
    )


def tables_ddl(tables: dict[str, str], staging_days: int | None = None) -> str:
    """CREATE TABLE IF NOT EXISTS for {kind: table id}, columns from transforms/outputs/tables.py.

    `staging_days`: the tables expire that many days after creation (staging tables).
    """
    options = ""
    if staging_days is not None:
        options = (
            "\nOPTIONS (expiration_timestamp = "
            f"TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {int(staging_days)} DAY))"
        )
    return _create_tables({k: validate_table_id(t) for k, t in tables.items()}, options)


def ddl_file_text() -> str:
    """transforms/sql/tables.sql: the final tables' DDL with ${...} table placeholders."""
    header = (
        "-- pathembed's tables (DESIGN.md §5), generated from\n"
        "-- transforms/outputs/tables.py by transforms.outputs.bigquery_sink.ddl_file_text();\n"
        "-- tests/test_bigquery_sink.py checks that this file is current.\n"
        "-- Render with transforms.bigquery.render_sql('tables.sql', ...):\n"
        "-- ${resource_table}, ${search_table}, ${failures_table} and ${resource_history_table}\n"
        "-- are validated table ids.\n"
        "-- `embedding` holds 384 FLOAT64 per row: BigQuery cannot declare an array's length,\n"
        "-- so both sinks check it (transforms/outputs/tables.py row_errors).\n\n"
    )
    kinds = (*TABLE_KINDS, HISTORY_KIND)
    return header + _create_tables({kind: f"${{{kind}_table}}" for kind in kinds})


def merge_sql(run: RunTables) -> str:
    """transforms/sql/merge_run.sql rendered for one run (validated table ids only)."""
    tables = {f"{kind}_table": table for kind, table in run.final.items()}
    tables |= {f"staging_{kind}": table for kind, table in run.staging.items()}
    return render_sql("merge_run.sql", tables)


def upgrade_sql(tables: dict[str, str]) -> str:
    """ALTER TABLE ... ADD COLUMN IF NOT EXISTS for every nullable column of the final tables.

    Final tables made by an older version lack the columns added since (clustering, license,
    pixel hash: all nullable and appended at the end of their schema), and the merge's
    `INSERT ... SELECT *` needs the staging table's columns, in order: adding the missing ones
    at the end restores that order. Existing columns are left alone.
    """
    statements = []
    for kind, table_id in tables.items():
        columns = [c for c in SCHEMAS[kind] if c.nullable and not c.repeated]
        if columns:
            clauses = ",\n".join(f"  ADD COLUMN IF NOT EXISTS {c.name} {c.type}" for c in columns)
            statements.append(f"ALTER TABLE `{validate_table_id(table_id)}`\n{clauses};")
    return "\n".join(statements) + "\n"


def prepare_sql(run: RunTables) -> str:
    """The final tables when missing (or missing newer columns), and the run's empty staging
    tables (which expire)."""
    return "\n".join(
        [tables_ddl(run.final), upgrade_sql(run.final), tables_ddl(run.staging, STAGING_DAYS)]
    )


def prepare_run(tables_cfg: Any, run_id: str, project: str | None = None) -> str:
    """Before the job: creates the tables it loads into (needs BigQuery credentials)."""
    sql = prepare_sql(RunTables.of(tables_cfg, run_id))
    run_script(sql, project)
    return sql


def merge_run(tables_cfg: Any, run_id: str, project: str | None = None) -> str:
    """After the job: merges the run's staging tables into the final ones and drops them.

    Needs BigQuery credentials. The CREATE ... IF NOT EXISTS of `prepare_sql` runs first again,
    so a run whose staging tables are gone or were never made merges as an empty run.
    Returns the SQL it ran.
    """
    run = RunTables.of(tables_cfg, run_id)
    sql = "\n".join([prepare_sql(run), merge_sql(run)])
    run_script(sql, project)
    return sql
