"""IDC releases: retiring a slide whose series a newer run embedded under another UUID.

IDC re-issues the `crdc_instance_uuid` of every instance it changes in a release. After a
`--only-new` run over the new release, the series has resource and search rows under both the
old and the new UUID; search groups hits by Study/Series, so the slide would count twice, and a
lookup by Study/Series UIDs (the seed's `LIMIT 1`) could return the stale UUID.

`split_superseded` keeps, per SeriesInstanceUID, the resource row of the newest run (created
time, then run id: a run over a newer release is newer) as current; the others are history,
each with the UUID and run that replaced it. The local (Parquet) tables are append-only, one
file per run, so retirement is applied where they are read (outputs/archive.py): the old rows
stay in their run's file and are listed by `access.resource_history`. In BigQuery the merge does
the same once, physically (transforms/sql/merge_run.sql, table `{resource}_history`).
"""

from __future__ import annotations

import pyarrow as pa

from transforms.outputs.tables import RESOURCE_HISTORY, arrow_schema

SUPERSEDED_BY = ("superseded_by_instance_uuid", "superseded_by_run_id")


def split_superseded(resources: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(current rows sorted by instance UUID, superseded rows with what replaced them).

    `resources`: one row per instance UUID (access.newest_resources' rows before this step).
    """
    order = resources.sort_by([("created_time", "descending"), ("run_id", "descending")])
    current_of: dict[str, int] = {}
    current, superseded, replaced_by = [], [], []
    for index, series in enumerate(order["SeriesInstanceUID"].to_pylist()):
        if series not in current_of:
            current_of[series] = index
            current.append(index)
        else:
            superseded.append(index)
            replaced_by.append(current_of[series])
    history = order.take(pa.array(superseded, pa.int64()))
    history = history.append_column(
        SUPERSEDED_BY[0], order["instance_uuid"].take(pa.array(replaced_by, pa.int64()))
    ).append_column(SUPERSEDED_BY[1], order["run_id"].take(pa.array(replaced_by, pa.int64())))
    columns = [
        name for name in arrow_schema(RESOURCE_HISTORY).names if name in history.schema.names
    ]
    return order.take(pa.array(current, pa.int64())).sort_by("instance_uuid"), history.select(
        columns
    )
