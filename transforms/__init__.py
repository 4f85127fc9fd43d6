"""The DAG's steps and the domain rules, read top to bottom.

Domain rules (plain functions, no Beam): errors.py (reason codes), records.py (what travels
the DAG before planning; UID/UUID rules), levels.py (level choice), tissue.py (mask and grid),
patches.py (patch assembly), plan.py (one slide's plan), clustering.py (k-means), bigquery.py
(table ids, SQL rendering, query parameters), metrics.py (counter names), urls.py.

Rooms: sources/ (where slides come from), dicom_io/ (how bytes and frames are read),
outputs/ (what a run writes and reads back), search/ (slide similarity), samples/ (synthetic
sample slides), sql/ (the SQL the pipeline runs, package data).

DAG glue: stages.py (every DoFn, each thin) and failures.py (failure rows and the breaker).
"""
