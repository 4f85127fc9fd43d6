"""What a run writes and reads back: the layout of every path, per-slide artifacts, tables and
their sinks (Parquet, BigQuery), and the archive readers (lookup, fetch, reruns)."""
