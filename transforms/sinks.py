"""Table sinks. Locally: one Parquet file per table and run under {output_root}/tables/."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.tables import TABLES, arrow_schema


def table_dir(output_root: str, table: str) -> str:
    return FileSystems.join(output_root.rstrip("/"), "tables", table)


class WriteTable(beam.PTransform):
    """Writes row dicts to {output_root}/tables/{table}/{run_id}.parquet."""

    def __init__(self, table: str, output_root: str, run_id: str):
        super().__init__()
        self._table = table
        self._prefix = FileSystems.join(table_dir(output_root, table), run_id)

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(
            self._prefix,
            arrow_schema(TABLES[self._table]),
            file_name_suffix=".parquet",
            num_shards=1,
            shard_name_template="",
        )
