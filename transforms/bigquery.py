"""BigQuery, in one place: the table-id grammar, SQL rendering, query parameters and the client.

Every SQL statement the project runs is a file of transforms/sql/ (package data, so a
non-editable install has them). Only validated table ids and finite numbers are rendered into
SQL text (where BigQuery needs a literal); every other value is a query parameter. The client
is imported only when a query runs, so nothing here needs credentials until then.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

# project (optionally domain-scoped) . dataset . table, as BigQuery spells them; nothing else
# (no backticks, spaces, wildcards or partitions) may reach the SQL text.
_TABLE_ID = re.compile(
    r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,28}[a-z0-9]\.[A-Za-z0-9_]{1,1024}\.[A-Za-z0-9_-]{1,1024}$"
)


def validate_table_id(table_id: str) -> str:
    """A fully qualified BigQuery table id `project.dataset.table`, or ValueError."""
    if not (isinstance(table_id, str) and _TABLE_ID.fullmatch(table_id)):
        raise ValueError(
            f"{table_id!r} is not a BigQuery table id of the form project.dataset.table"
        )
    return table_id


def is_table_id(spec: str) -> bool:
    """True when `spec` is a BigQuery table id (rather than, say, a local path)."""
    try:
        validate_table_id(spec)
    except ValueError:
        return False
    return True


def sql_text(name: str) -> str:
    """The text of transforms/sql/{name}, as shipped (placeholders unfilled)."""
    return resources.files("transforms").joinpath("sql", name).read_text()


def render_sql(
    name: str, tables: Mapping[str, str], numbers: Mapping[str, float] | None = None
) -> str:
    """transforms/sql/{name} with its ${...} placeholders filled by validated table ids and
    finite numbers."""
    values = {key: validate_table_id(table_id) for key, table_id in tables.items()}
    for key, number in (numbers or {}).items():
        if not math.isfinite(float(number)):
            raise ValueError(f"{key} must be a finite number, got {number!r}")
        values[key] = repr(float(number))
    return string.Template(sql_text(name)).substitute(values)


@dataclass(frozen=True)
class Query:
    """SQL text and its parameters as (name, type, value); types are BigQuery's, with
    ARRAY<T> for arrays. Built and checked without credentials."""

    sql: str
    parameters: tuple[tuple[str, str, Any], ...] = ()

    def job_config(self) -> Any:
        """The google-cloud-bigquery QueryJobConfig with these parameters."""
        from google.cloud import bigquery

        params = []
        for name, kind, value in self.parameters:
            if kind.startswith("ARRAY<"):
                params.append(bigquery.ArrayQueryParameter(name, kind[6:-1], list(value)))
            else:
                params.append(bigquery.ScalarQueryParameter(name, kind, value))
        return bigquery.QueryJobConfig(query_parameters=params, use_legacy_sql=False)


def client(project: str | None = None) -> Any:
    """A BigQuery client (Application Default Credentials), billed to `project`."""
    from google.cloud import bigquery

    return bigquery.Client(project=project)


def query_rows(query: Query, project: str | None = None, bq: Any = None) -> Iterator[dict]:
    """Rows of `query` as dicts (needs BigQuery credentials unless `bq` is given)."""
    bq = bq or client(project)
    for row in bq.query(query.sql, job_config=query.job_config()).result():
        yield dict(row.items())


def run_script(sql: str, project: str | None = None) -> None:
    """Runs a multi-statement script (DDL, the merge) and waits for it."""
    client(project).query(sql).result()
