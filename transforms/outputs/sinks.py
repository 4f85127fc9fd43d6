"""Table sinks behind one interface, chosen by config (tables.sink): `WriteTable`.

parquet (local runs): one Parquet file per table and run under {output_root}/tables/.
bigquery (the full archive): this run's staging tables, merged afterwards
(transforms/outputs/bigquery_sink.py). Both check every row against the one schema in
transforms/outputs/tables.py before writing it.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.outputs.bigquery_sink import WriteBigQueryTable, checked_row
from transforms.outputs.layout import table_dir
from transforms.outputs.tables import TABLES, arrow_schema


class WriteParquetTable(beam.PTransform):
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


class WriteTable(beam.PTransform):
    """Rows of `table` (resource | search | failures) -> the configured sink.

    `tables_cfg`: pipeline.config.TablesConfig (sink, and the BigQuery dataset and names).
    """

    def __init__(self, table: str, tables_cfg: Any, output_root: str, run_id: str):
        super().__init__()
        tables_cfg.validate()
        self._table = table
        if tables_cfg.sink == "bigquery":
            self._sink = WriteBigQueryTable(table, tables_cfg, run_id)
        else:
            self._sink = WriteParquetTable(table, output_root, run_id)

    def expand(self, rows):
        checked = rows | "CheckSchema" >> beam.Map(checked_row, self._table)
        return checked | type(self._sink).__name__ >> self._sink
