"""Table rows are files, written the moment their slide is done or has failed:
tables/{table}/{run_id}/{key}.parquet (outputs/layout.py row_file).

A slide's resource and search rows are written with its artifacts, before its completion
marker (outputs/artifacts.py write_artifacts); a failure row is written as its own file here
(`WriteFailureRowFn`). Every row is checked against the one schema in outputs/tables.py first.

tables.sink = parquet (local runs): the files are the tables (readers: outputs/archive.py).
tables.sink = bigquery (the archive): the same files, under a gs:// output root, are loaded into
the run's staging tables and merged when the run ends, and by `pathembed launch --merge-only`
for a job that died (outputs/bigquery_sink.py merge_run). Why not WriteToBigQuery: its loads
happen when the whole PCollection is in, i.e. at the end of the job, so a job that died at 95%
would leave no rows for the slides it finished; files per slide make them durable at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import apache_beam as beam

from transforms.outputs import lease
from transforms.outputs.artifacts import write_files
from transforms.outputs.bigquery_sink import checked_row
from transforms.outputs.layout import ArtifactPaths, row_file
from transforms.outputs.tables import parquet_bytes


def failure_key(row: dict) -> str:
    """{instance_uuid or "unknown"}-{stage}-{digest of the series and message}: one file per
    distinct failure (two manifest lines may fail under one UUID), the same file when a Beam
    retry writes the same row again."""
    what = f"{row.get('SeriesInstanceUID')}|{row.get('message')}".encode()
    digest = hashlib.sha256(what).hexdigest()[:12]
    return f"{row.get('instance_uuid') or 'unknown'}-{row['stage']}-{digest}"


class WriteFailureRowFn(beam.DoFn):
    """Failure row -> tables/failures/{run_id}/{failure_key}.parquet; the slide's lease, if
    this run holds it, is released (the slide is free for the next run at once)."""

    def __init__(self, output_root: str, run_id: str):
        self._root = output_root
        self._run_id = run_id

    def process(self, row: dict) -> Iterator[str]:
        checked_row(row, "failures")
        uri = row_file(self._root, "failures", self._run_id, failure_key(row))
        write_files({uri: parquet_bytes("failures", [row])}, self._run_id)
        self._release(row)
        yield uri

    def _release(self, row: dict) -> None:
        if not row.get("instance_uuid") or row["stage"] == "enumerate":
            return  # no lease was taken
        try:
            paths = ArtifactPaths.for_slide(self._root, row["instance_uuid"])
        except ValueError:
            return
        lease.release(paths, self._run_id)
