"""The BigQuery table sink: the run's row files loaded into per-run staging tables, then merged.

Every slide's rows are files under the output root the moment it is done
(tables/{table}/{run_id}/{key}.parquet: outputs/sinks.py), so a job that dies loses no
finished slide. When the job ends (or with `pathembed launch --merge-only RUN_ID`, for a job
that died), `merge_run` loads the run's files into its staging tables `{table}_staging_{run}`
(load jobs from Parquet, `load_jobs`) and then replaces, in one transaction
(transforms/sql/merge_run.sql), the resource and search rows of every slide the run wrote and
the failure rows of that run, and drops the staging tables. The merge is idempotent: merging
a run twice leaves the same rows. Runs whose merge never happened (no run summary
`runs/{run_id}.json`, which is written after a merge) are merged first, oldest first, so the
slides a dead job finished (and that later runs skip as done) reach the tables too.

Schemas come from transforms/outputs/tables.py (the same definition as the Parquet files); so
do the CREATE TABLE statements (`tables_ddl`, checked in as transforms/sql/tables.sql).
Staging tables expire after STAGING_DAYS; the row files stay, so a late merge still merges.
"""

from __future__ import annotations

import datetime
import posixpath
import re
from dataclasses import dataclass
from typing import Any

from apache_beam.io.filesystems import FileSystems

from transforms.bigquery import client, render_sql, run_script, validate_table_id
from transforms.outputs.layout import run_rows_dir, run_summary_uri, table_dir
from transforms.outputs.tables import (
    SCHEMAS,
    TABLES,
    Column,
    bigquery_ddl_columns,
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
    """A row as BigQuery's JSON takes it: timestamps as ISO 8601 strings."""
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


def row_file_patterns(output_root: str, run_id: str) -> dict[str, str]:
    """{table: wildcard URI of the run's row files} (one load job each)."""
    return {
        kind: FileSystems.join(run_rows_dir(output_root, kind, run_id), "*.parquet")
        for kind in TABLE_KINDS
    }


def load_job_config() -> Any:
    """Parquet load jobs appending to a staging table: LIST columns load as REPEATED
    (`enable_list_inference`: the search table's `embedding`), timestamps as TIMESTAMP."""
    from google.cloud import bigquery

    parquet = bigquery.ParquetOptions()
    parquet.enable_list_inference = True
    config = bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        create_disposition=bigquery.CreateDisposition.CREATE_NEVER,
    )
    config.parquet_options = parquet
    return config


def load_jobs(output_root: str, run: RunTables, run_id: str) -> dict[str, str]:
    """{staging table: wildcard URI} for each table with row files in run `run_id`."""
    jobs = {}
    for kind, pattern in row_file_patterns(output_root, run_id).items():
        if FileSystems.match([pattern])[0].metadata_list:
            jobs[run.staging[kind]] = pattern
    return jobs


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


def unmerged_runs(output_root: str, run_id: str) -> list[str]:
    """Run `run_id` and, before it, every run with row files but no run summary (its job died
    before its merge), oldest first (run ids start with their start time)."""
    runs = {run_id}
    for kind in TABLE_KINDS:
        pattern = FileSystems.join(table_dir(output_root, kind), "*", "*.parquet")
        for found in FileSystems.match([pattern])[0].metadata_list:
            runs.add(posixpath.basename(posixpath.dirname(found.path)))
    done = {r for r in runs if r != run_id and FileSystems.exists(run_summary_uri(output_root, r))}
    return sorted(runs - done)


def merge_run(
    tables_cfg: Any, run_id: str, output_root: str, project: str | None = None, bq: Any = None
) -> list[str]:
    """After the job: loads the row files of run `run_id` (and of earlier runs never merged)
    into staging tables, merges them into the final ones and drops them, one run after
    another. Needs BigQuery credentials (or `bq`, a client). Returns the runs it merged."""
    bq = bq or client(project)
    merged = unmerged_runs(output_root, run_id)
    for run_id_ in merged:
        run = RunTables.of(tables_cfg, run_id_)
        bq.query(prepare_sql(run)).result()
        for table_id, pattern in load_jobs(output_root, run, run_id_).items():
            bq.load_table_from_uri(pattern, table_id, job_config=load_job_config()).result()
        bq.query(merge_sql(run)).result()
    return merged
