"""Running the project's BigQuery SQL in DuckDB: sqlglot transpiles each statement from the
BigQuery dialect, table ids lose their project and dataset (the tests create one DuckDB table
per name), and VECTOR_SEARCH, which DuckDB does not have, becomes its exact brute-force
meaning (every base row against every query row, cosine distance, the top_k per query row).
Query parameters (@name) become DuckDB's $name and are passed by name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import expressions as exp

SQL_DIR = Path(__file__).resolve().parents[1] / "transforms" / "sql"
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def render(name: str, tables: Mapping[str, str], numbers: Mapping[str, float] = {}) -> str:
    """transforms/sql/{name} with its placeholders filled (as transforms.bigquery.render_sql)."""
    from transforms.bigquery import render_sql

    return render_sql(name, tables, numbers)


def _vector_search_subquery(node: exp.VectorSearch) -> exp.Expression:
    distance = node.args.get("distance_type")
    if distance is not None and distance.expression.name.upper() != "COSINE":
        raise NotImplementedError("only distance_type => 'COSINE' is emulated")
    column = node.args["column_to_search"].name
    query_column = node.args.get("query_column_to_search")
    query_column = query_column.name if query_column is not None else column
    top_k = node.args["top_k"].expression.sql("duckdb") if node.args.get("top_k") else "10"
    base = node.this.sql("duckdb")
    query = node.args["query_table"].sql("duckdb")
    cosine = f"1 - list_cosine_similarity(q.{query_column}, b.{column})"
    sql = f"""
      SELECT query, base, distance FROM (
        SELECT q AS query, b AS base, {cosine} AS distance,
          ROW_NUMBER() OVER (
            PARTITION BY q.__query_row ORDER BY {cosine}, b.instance_uuid, b.centroid_index
          ) AS __rank
        FROM (SELECT ROW_NUMBER() OVER () AS __query_row, * FROM {query}) AS q, {base} AS b
      ) WHERE __rank <= {top_k}"""
    return sqlglot.parse_one(sql, read="duckdb").subquery()


def _zero_based_offsets(tree: exp.Expression) -> None:
    """BigQuery's `UNNEST(...) WITH OFFSET AS pos` counts from 0; sqlglot writes DuckDB's
    `WITH ORDINALITY`, which counts from 1 (sqlglot 30.31). Every use of `pos` in the SELECT
    that unnests becomes `pos - 1`, so the translation means what BigQuery runs."""
    for unnest in list(tree.find_all(exp.Unnest)):
        offset = unnest.args.get("offset")
        select = unnest.find_ancestor(exp.Select)
        if not isinstance(offset, exp.Identifier) or select is None:
            continue
        for column in list(select.find_all(exp.Column)):
            if column.name == offset.name and not column.table:
                column.replace(
                    exp.paren(exp.Sub(this=column.copy(), expression=exp.Literal.number(1)))
                )


def to_duckdb(sql: str) -> list[str]:
    """DuckDB statements of a rendered BigQuery script."""
    statements = []
    for tree in sqlglot.parse(sql, read="bigquery"):
        if tree is None:
            continue
        _zero_based_offsets(tree)
        tables = list(tree.find_all(exp.Table))
        for table in tables:  # first every table id, also those inside VECTOR_SEARCH
            if table.args.get("db") is not None:
                table.set("catalog", None)
                table.set("db", None)
        for table in tables:
            if isinstance(table.this, exp.VectorSearch):
                table.replace(_vector_search_subquery(table.this))
        statements.append(tree.sql("duckdb"))
    return statements


def run(con: Any, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs every statement; the rows of the last one as dicts."""
    rows: list[dict[str, Any]] = []
    for statement in to_duckdb(sql):
        used = {k: v for k, v in (params or {}).items() if f"${k}" in statement}
        cursor = con.execute(statement, used) if used else con.execute(statement)
        if cursor.description:
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        else:
            rows = []
    return rows


class DuckDBBigQuery:
    """What merge_run asks of a BigQuery client, on a DuckDB connection: scripts (transpiled as
    above) and Parquet load jobs (a wildcard URI appended to an existing table by column
    name, as BigQuery's load matches Parquet columns to the table's). There is no local
    BigQuery to run them on; the SQL and the files are the project's own."""

    class _Done:
        def result(self) -> None:
            return None

    def __init__(self, con: Any):
        self.con = con
        self.loads: list[tuple[str, str]] = []

    def query(self, sql: str) -> _Done:
        run(self.con, _one_alter_action_each(sql))
        return self._Done()

    def load_table_from_uri(self, uri: str, table_id: str, job_config: Any = None) -> _Done:
        assert (
            job_config.source_format == "PARQUET" and job_config.write_disposition == "WRITE_APPEND"
        )
        table = table_id.rsplit(".", 1)[1]
        self.con.execute(
            f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet('{uri}', union_by_name=true)"
        )
        self.loads.append((uri, table))
        return self._Done()


def _one_alter_action_each(sql: str) -> str:
    """BigQuery's `ALTER TABLE t ADD COLUMN a ..., ADD COLUMN b ...;` as one ALTER per column
    (DuckDB takes one action per ALTER statement)."""

    def split(match: re.Match) -> str:
        table, actions = match.group(1), match.group(2)
        return "".join(f"ALTER TABLE {table} {action.strip()};" for action in actions.split(",\n"))

    return re.sub(r"ALTER TABLE (`[^`]+`)\s+(.*?);", split, sql, flags=re.S)
