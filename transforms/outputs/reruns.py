"""What a rerun or a release update reads back: failed slides, and slides already embedded.

Both come from this project's own tables, given as a local Parquet file or folder (one file per
run under `{output_root}/tables/{failures,resource}/`) or as a BigQuery table
`project.dataset.table`. A table id is checked against its grammar before it is put into SQL,
every other value is a query parameter, and every UUID read back is validated before it is used
(a malformed row is reported, never turned into a path or a query).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from transforms import bigquery
from transforms.errors import SlideError
from transforms.records import validate_uuid

_LOG = logging.getLogger(__name__)


def is_bigquery_table(spec: str) -> bool:
    """True when `spec` names a BigQuery table rather than a local file or folder."""
    if os.path.exists(spec) or "/" in spec or os.sep in spec:
        return False
    return bigquery.is_table_id(spec)


def _local_rows(path: str, columns: Sequence[str]) -> list[dict]:
    import pyarrow.dataset as ds

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such Parquet file or folder (nor a BigQuery table)")
    # Beam's temporary shards of a run that did not finish are not part of the table.
    dataset = ds.dataset(
        path, format="parquet", exclude_invalid_files=True,
        ignore_prefixes=[".", "_", "beam-temp"],
    )  # fmt: skip
    present = [c for c in columns if c in dataset.schema.names]
    rows = dataset.to_table(columns=present).to_pylist()
    return [{c: row.get(c) for c in columns} for row in rows]


def local_failure_rows(
    path: str, run_id: str | None = None, reasons: Sequence[str] = ()
) -> list[dict]:
    """Rows of a local failures table (Parquet file or folder), oldest first."""
    columns = ["instance_uuid", "stage", "reason_code", "message", "run_id", "time"]
    rows = [
        row
        for row in _local_rows(path, columns)
        if (run_id is None or row["run_id"] == run_id)
        and (not reasons or row["reason_code"] in reasons)
    ]
    return sorted(rows, key=lambda r: (str(r["time"]), str(r["instance_uuid"])))


@dataclass(frozen=True)
class FailedSlides:
    """Distinct, valid instance UUIDs of failure rows, and the values that were not UUIDs."""

    uuids: tuple[str, ...]
    rejected: tuple[str, ...]


def failed_slides(
    spec: str, run_id: str | None = None, reasons: Sequence[str] = (), project: str | None = None
) -> FailedSlides:
    """The slides of a failures table (all runs, or one `run_id`; all or some reason codes)."""
    if is_bigquery_table(spec):
        query = bigquery.Query(
            bigquery.render_sql("failed_slides.sql", {"failures_table": spec}),
            (("run_id", "STRING", run_id), ("reasons", "ARRAY<STRING>", tuple(reasons))),
        )
        values = [row["instance_uuid"] for row in bigquery.query_rows(query, project)]
    else:
        rows = _local_rows(spec, ["instance_uuid", "run_id", "reason_code"])
        values = [
            row["instance_uuid"]
            for row in rows
            if (run_id is None or row["run_id"] == run_id)
            and (not reasons or row["reason_code"] in reasons)
        ]
    uuids, rejected = set(), set()
    for value in values:
        if value is None:
            continue  # a failure before any UUID was known (e.g. a manifest row without one)
        try:
            uuids.add(validate_uuid(value))
        except SlideError:
            rejected.add(str(value))
    if rejected:
        _LOG.warning("%d failure rows name no valid instance UUID; not rerun", len(rejected))
    return FailedSlides(tuple(sorted(uuids)), tuple(sorted(rejected)))


def known_instances(spec: str, project: str | None = None) -> dict[str, str | None]:
    """{instance_uuid: instance_hash} of a resource table: the slides already embedded."""
    if is_bigquery_table(spec):
        query = bigquery.Query(bigquery.render_sql("known_instances.sql", {"resource_table": spec}))
        rows = list(bigquery.query_rows(query, project))
    else:
        rows = _local_rows(spec, ["instance_uuid", "instance_hash"])
    known: dict[str, str | None] = {}
    for row in rows:
        try:
            instance_uuid = validate_uuid(row["instance_uuid"])
        except SlideError:
            continue
        known[instance_uuid] = row.get("instance_hash") or known.get(instance_uuid)
    return known


def is_unchanged(known: dict[str, str | None], instance_uuid: str, instance_hash: str | None):
    """True when a slide is in the resource table and its instance hash did not change (an
    unknown hash on either side counts as unchanged: IDC re-issues the UUID of a changed
    instance, so the UUID alone already tells new from old)."""
    if instance_uuid not in known:
        return False
    before = known[instance_uuid]
    return instance_hash is None or before is None or before == instance_hash
