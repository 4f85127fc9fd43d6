"""The BigQuery sink without BigQuery: schemas derived from the one definition in
transforms/outputs/tables.py, the row checks both sinks apply, the checked-in DDL, and the per-run
staging merge, whose SQL is executed on SQLite (stdlib; it reads BigQuery's backtick-quoted
ids and this script's DELETE / INSERT ... SELECT / transaction statements as they are) to
check that reruns replace rows instead of duplicating them."""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.io.gcp import bigquery_tools
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipeline.config import TablesConfig, load_config
from transforms.bigquery import render_sql
from transforms.outputs.bigquery_sink import (
    RunTables,
    bigquery_row,
    ddl_file_text,
    load_job_config,
    load_jobs,
    merge_sql,
    prepare_sql,
    tables_ddl,
    unmerged_runs,
)
from transforms.outputs.layout import row_file, run_summary_uri
from transforms.outputs.sinks import WriteFailureRowFn
from transforms.outputs.tables import (
    SCHEMAS,
    TABLES,
    arrow_schema,
    bigquery_schema,
    parquet_bytes,
    row_errors,
)

ROOT = Path(__file__).resolve().parents[1]
SQL = ROOT / "transforms" / "sql"
DATASET = "my-project.idc_metadata"


def test_bigquery_schemas_come_from_the_same_columns_as_parquet():
    for table, columns in TABLES.items():
        fields = bigquery_schema(columns)["fields"]
        # Beam parses it into the TableSchema a load job gets.
        parsed = bigquery_tools.get_bq_tableschema(bigquery_schema(columns))
        assert [f.name for f in parsed.fields] == [f["name"] for f in fields]
        assert [f["name"] for f in fields] == arrow_schema(columns).names, table
        for field, arrow_field in zip(fields, arrow_schema(columns), strict=True):
            if field["mode"] == "REPEATED":
                assert str(arrow_field.type).startswith("list<")
            else:
                assert (field["mode"] == "NULLABLE") == arrow_field.nullable, field
    embedding = {f["name"]: f for f in bigquery_schema(TABLES["search"])["fields"]}["embedding"]
    assert embedding == {"name": "embedding", "type": "FLOAT64", "mode": "REPEATED"}


def _search_row(**change):
    row = {
        "instance_uuid": "d814b342-e87b-5b7c-94ee-1cc5e2eaf9ad",
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
        "SOPInstanceUID": "1.2.3.4.5",
        "centroid_index": 0,
        "cluster_size": 3,
        "embedding": [0.5] * 384,
    }
    return {**row, **change}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"embedding": [0.5] * 383}, "383 values, expected 384"),
        ({"embedding": [0.5] * 383 + [None]}, "NULL array element"),
        ({"embedding": [np.float32(0.5)] * 384}, "float32 where FLOAT64"),
        ({"embedding": [0.5] * 383 + [float("nan")]}, "NaN"),
        ({"embedding": [0.5] * 383 + [float("inf")]}, "inf is NaN or infinite"),
        ({"embedding": [float("-inf")] + [0.5] * 383}, "-inf is NaN or infinite"),
        ({"embedding": None}, "NoneType where an array"),
        ({"centroid_index": np.int64(0)}, "int64 where INT64"),
        ({"cluster_size": True}, "bool where INT64"),
        ({"SOPInstanceUID": None}, "NULL in a REQUIRED column"),
        ({"extra": 1}, "extra: not a column"),
    ],
)
def test_row_checks_catch_what_a_load_job_would_reject(change, problem):
    assert row_errors(_search_row(), TABLES["search"]) == []
    errors = row_errors(_search_row(**change), TABLES["search"])
    assert any(problem in e for e in errors), errors


def test_timestamps_need_a_zone_and_load_as_iso_strings():
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    row = {
        "instance_uuid": None,
        "SeriesInstanceUID": None,
        "stage": "enumerate",
        "reason_code": "no_tissue",
        "message": "m",
        "run_id": "r",
        "time": now,
    }
    assert row_errors(row, TABLES["failures"]) == []
    assert bigquery_row(row, TABLES["failures"])["time"] == "2026-01-02T03:04:05+00:00"
    naive = {**row, "time": now.replace(tzinfo=None)}
    assert row_errors(naive, TABLES["failures"]) == ["time: naive datetime (no time zone)"]


def test_the_checked_in_ddl_is_generated_from_the_schemas():
    text = (SQL / "tables.sql").read_text()
    assert text == ddl_file_text(), (
        "stale: rewrite it from transforms.outputs.bigquery_sink.ddl_file_text()"
    )
    rendered = render_sql(
        "tables.sql",
        {f"{k}_table": f"{DATASET}.{k}" for k in SCHEMAS},
    )
    assert f"CREATE TABLE IF NOT EXISTS `{DATASET}.search` (" in rendered
    assert "  embedding ARRAY<FLOAT64>\n" in rendered
    for table, columns in SCHEMAS.items():
        block = rendered.split(f"`{DATASET}.{table}` (")[1].split(");")[0]
        assert [line.split()[0] for line in block.strip().splitlines()] == [c.name for c in columns]
    with pytest.raises(ValueError, match="not a BigQuery table id"):
        tables_ddl({"search": "my-project.ds.t`; DROP TABLE x; --"})


def test_vector_index_files_render_for_a_table():
    table = {"search_table": f"{DATASET}.path_foundation_500_embeddings"}
    ivf = render_sql("vector_index_ivf.sql", table)
    tree = render_sql("vector_index_treeah.sql", table)
    for sql, kind in ((ivf, "IVF"), (tree, "TREE_AH")):
        assert f"ON `{table['search_table']}`(embedding)" in sql
        assert f"index_type = '{kind}'" in sql and "distance_type = 'COSINE'" in sql
        assert "STORING (instance_uuid, StudyInstanceUID, SeriesInstanceUID)" in sql
    assert "When to prefer it" in tree
    # The search query sums similarity = 1 - cosine distance (DESIGN.md §5).
    assert "1 - distance AS similarity" in (SQL / "search.sql").read_text()


def test_staging_tables_are_named_per_run_and_validated():
    run = RunTables.of(TablesConfig(sink="bigquery", bigquery_dataset=DATASET), "20261127T01Z-ab12")
    assert run.final["search"] == f"{DATASET}.path_foundation_500_embeddings"
    assert (
        run.staging["search"]
        == f"{DATASET}.path_foundation_500_embeddings_staging_20261127T01Z_ab12"
    )
    with pytest.raises(ValueError, match="not a BigQuery table id"):
        RunTables.of(TablesConfig(sink="bigquery", bigquery_dataset="x`.y"), "r")
    idc = load_config(ROOT / "configs" / "idc.yaml")
    assert idc.tables.sink == "bigquery"
    assert idc.tables.resource == "pathology_embeddings_metadata"  # the published names
    assert idc.tables.search == "path_foundation_500_embeddings"


def _create(db: sqlite3.Connection, table_id: str, kind: str) -> None:
    columns = ", ".join(c.name for c in SCHEMAS[kind])
    db.execute(f"CREATE TABLE `{table_id}` ({columns})")


def _stage(
    db, run: RunTables, run_id: str, slides: dict[str, int], failures: int, series=None
) -> None:
    """Staging rows of one run: a resource row and `k` search rows per slide (`series`:
    {uuid: SeriesInstanceUID} where a slide's series is not its own)."""
    for kind in ("resource", "search", "failures"):
        _create(db, run.staging[kind], kind)
    for uuid, k in slides.items():
        values = {c.name: f"{c.name}-{uuid}" for c in TABLES["resource"]}
        values |= {"instance_uuid": uuid, "run_id": run_id, "number_of_centroids": k}
        values["SeriesInstanceUID"] = (series or {}).get(uuid, f"series-{uuid}")
        _insert(db, run.staging["resource"], "resource", values)
        for i in range(k):
            row = _search_row(instance_uuid=uuid, centroid_index=i, embedding=json.dumps([i]))
            _insert(db, run.staging["search"], "search", row)
    for n in range(failures):
        row = {c.name: f"{c.name}-{n}" for c in TABLES["failures"]} | {"run_id": run_id}
        _insert(db, run.staging["failures"], "failures", row)


def _insert(db, table_id: str, kind: str, values: dict) -> None:
    names = [c.name for c in TABLES[kind]]
    marks = ", ".join("?" for _ in names)
    db.execute(f"INSERT INTO `{table_id}` VALUES ({marks})", [values[n] for n in names])


def _rows(db, table_id: str, *columns: str) -> list[tuple]:
    return sorted(db.execute(f"SELECT {', '.join(columns)} FROM `{table_id}`").fetchall())


def test_merging_runs_replaces_slides_rows_instead_of_duplicating_them():
    cfg = TablesConfig(sink="bigquery", bigquery_dataset=DATASET)
    db = sqlite3.connect(":memory:")
    first, second = RunTables.of(cfg, "run1"), RunTables.of(cfg, "run2")
    for kind in first.final:
        _create(db, first.final[kind], kind)
    a, b = "aaaaaaaa-0000-4000-8000-000000000000", "bbbbbbbb-0000-4000-8000-000000000000"

    _stage(db, first, "run1", {a: 3, b: 2}, failures=1)
    db.executescript(merge_sql(first))
    assert _rows(db, first.final["resource"], "instance_uuid", "run_id") == [
        (a, "run1"),
        (b, "run1"),
    ]
    assert len(_rows(db, first.final["search"], "instance_uuid")) == 5

    # A rerun of slide a (fewer centroids now) and a rerun of the same merge changes nothing
    # else: a's rows are replaced, b's kept, the failure rows are per run.
    _stage(db, second, "run2", {a: 2}, failures=2)
    db.executescript(merge_sql(second))
    assert _rows(db, first.final["resource"], "instance_uuid", "run_id") == [
        (a, "run2"),
        (b, "run1"),
    ]
    search = _rows(db, first.final["search"], "instance_uuid", "centroid_index")
    assert search == [(a, 0), (a, 1), (b, 0), (b, 1)]
    assert [r[0] for r in _rows(db, first.final["failures"], "run_id")] == [
        "run1",
        "run2",
        "run2",
    ]
    # The staging tables are gone.
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert names == set(first.final.values())


def test_a_new_release_of_a_series_retires_the_old_uuid_into_the_history_table():
    """IDC re-issued the UUID of a changed instance: after the merge, the series has one
    resource row (the new UUID) and only its search rows; the old row is in the history table
    with what replaced it; a slide of another series is untouched."""
    cfg = TablesConfig(sink="bigquery", bigquery_dataset=DATASET)
    db = sqlite3.connect(":memory:")
    first, second = RunTables.of(cfg, "run1"), RunTables.of(cfg, "run2")
    for kind in first.final:
        _create(db, first.final[kind], kind)
    old, new, other = (f"{c * 8}-0000-4000-8000-000000000000" for c in "abc")
    _stage(db, first, "run1", {old: 3, other: 2}, failures=0, series={old: "1.2.3"})
    db.executescript(merge_sql(first))
    _stage(db, second, "run2", {new: 2}, failures=0, series={new: "1.2.3"})
    db.executescript(merge_sql(second))

    final = first.final
    assert _rows(db, final["resource"], "instance_uuid", "SeriesInstanceUID") == [
        (new, "1.2.3"),
        (other, f"series-{other}"),
    ]
    assert {r[0] for r in _rows(db, final["search"], "instance_uuid")} == {new, other}
    assert len(_rows(db, final["search"], "instance_uuid")) == 4
    history = _rows(
        db, final["resource_history"], "instance_uuid", "run_id",
        "superseded_by_instance_uuid", "superseded_by_run_id",
    )  # fmt: skip
    assert history == [(old, "run1", new, "run2")]
    # Merging the same run again retires nothing more.
    _stage(db, second, "run2", {new: 2}, failures=0, series={new: "1.2.3"})
    db.executescript(merge_sql(second))
    assert len(_rows(db, final["resource_history"], "instance_uuid")) == 1
    assert len(_rows(db, final["resource"], "instance_uuid")) == 2


def test_the_merge_sql_is_one_transaction_then_drops():
    run = RunTables.of(TablesConfig(sink="bigquery", bigquery_dataset=DATASET), "run9")
    sql = merge_sql(run)
    begin, commit = sql.index("BEGIN TRANSACTION;"), sql.index("COMMIT TRANSACTION;")
    assert all(begin < sql.index(f"INSERT INTO `{t}`") < commit for t in run.final.values())
    assert all(sql.index(f"DROP TABLE `{t}`") > commit for t in run.staging.values())
    assert "${" not in sql


def test_the_bigquery_sink_needs_a_dataset(tmp_path):
    from pipeline.cli import main

    with pytest.raises(SystemExit, match=r"tables\.bigquery_dataset"):
        main(["run", "--input", str(tmp_path), "--set", "tables.sink=bigquery"])
    with pytest.raises(SystemExit, match="parquet or bigquery"):
        main(["run", "--input", str(tmp_path), "--set", "tables.sink=csv"])


def test_before_the_job_the_staging_tables_are_made_to_expire():
    run = RunTables.of(TablesConfig(sink="bigquery", bigquery_dataset=DATASET), "run7")
    sql = prepare_sql(run)
    statements = sql.split(";")
    for kind in ("resource", "search", "failures"):
        (final,) = [s for s in statements if f"EXISTS `{run.final[kind]}` (" in s]
        (staging,) = [s for s in statements if f"EXISTS `{run.staging[kind]}` (" in s]
        assert "expiration_timestamp" not in final
        assert "INTERVAL 7 DAY" in staging
        # The staging table has the final table's columns, in order: INSERT ... SELECT * works.
        assert final.split("(", 1)[1].split(")")[0] == staging.split("(", 1)[1].split(")")[0]


def _search_rows(n: int) -> list[dict]:
    rng = np.random.default_rng(3)
    return [
        {
            "instance_uuid": f"00000000-0000-4000-8000-{k:012d}",
            "StudyInstanceUID": "1.2.3",
            "SeriesInstanceUID": "1.2.3.4",
            "SOPInstanceUID": "1.2.3.4.5",
            "centroid_index": k,
            "cluster_size": 7,
            "embedding": rng.normal(size=384).tolist(),
            **{c.name: None for c in TABLES["search"] if c.name not in {
                "instance_uuid", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                "centroid_index", "cluster_size", "embedding"}},
        }
        for k in range(n)
    ]  # fmt: skip


def _write_row_files(root: Path, run_id: str, uuids: list[str]) -> None:
    for uuid in uuids:
        for table, rows in (("resource", []), ("search", _search_rows(2))):
            path = Path(row_file(str(root), table, run_id, uuid))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(parquet_bytes(table, rows))


def test_the_load_jobs_take_the_run_row_files_as_parquet_with_lists(tmp_path):
    """One load job per table that has row files, from a wildcard over the run's folder, as
    Parquet with LIST inference (the embedding column loads as REPEATED FLOAT64)."""
    _write_row_files(tmp_path, "run9", ["a", "b"])
    run = RunTables.of(TablesConfig(sink="bigquery", bigquery_dataset=DATASET), "run9")
    jobs = load_jobs(str(tmp_path), run, "run9")
    assert jobs == {
        run.staging["resource"]: f"{tmp_path}/tables/resource/run9/*.parquet",
        run.staging["search"]: f"{tmp_path}/tables/search/run9/*.parquet",
    }  # no failures files: no failures load
    config = load_job_config()
    assert config.source_format == "PARQUET"
    assert config.parquet_options.enable_list_inference is True
    assert config.write_disposition == "WRITE_APPEND"
    # The files hold what the load needs: REQUIRED columns required, the embedding a list.
    schema = pq.read_schema(tmp_path / "tables" / "search" / "run9" / "a.parquet")
    assert schema.equals(arrow_schema(TABLES["search"]))


def test_runs_that_died_before_their_merge_are_merged_first_oldest_first(tmp_path):
    """A dead job's finished slides have row files but no run summary: the next merge takes
    them too (later runs skip those slides as done), before its own run; merged runs are not
    merged again."""
    for run_id in ("20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"):
        _write_row_files(tmp_path, run_id, ["a"])
    summary = Path(run_summary_uri(str(tmp_path), "20260101T000000Z-aaaaaa"))
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    assert unmerged_runs(str(tmp_path), "20260104T000000Z-dddddd") == [
        "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc", "20260104T000000Z-dddddd",
    ]  # fmt: skip


def test_a_failure_row_that_does_not_fit_fails_before_any_file_is_written(tmp_path):
    bad = {"instance_uuid": "u", "SeriesInstanceUID": None, "stage": "plan",
           "reason_code": None, "message": "m", "run_id": "r",
           "time": datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC)}  # fmt: skip
    with (
        pytest.raises(Exception, match=r"reason_code") as caught,
        beam.Pipeline(runner=FnApiRunner()) as p,
    ):
        _ = p | beam.Create([bad]) | beam.ParDo(WriteFailureRowFn(str(tmp_path), "run-1"))
    assert "reason_code: NULL in a REQUIRED column" in str(caught.value)
    assert not list(tmp_path.rglob("*.parquet"))


def test_before_the_job_older_final_tables_get_the_newer_nullable_columns():
    run = RunTables.of(TablesConfig(sink="bigquery", bigquery_dataset=DATASET), "run8")
    sql = prepare_sql(run)
    (alter,) = [s for s in sql.split(";") if f"ALTER TABLE `{run.final['resource']}`" in s]
    added = [line.split()[5] for line in alter.strip().splitlines()[1:]]
    nullable = [c.name for c in TABLES["resource"] if c.nullable]
    assert added == nullable
    assert "clustering_method" in added and "source_license" in added
    # The appended columns are the schema's last ones, so ALTER ADD keeps SELECT * in order.
    names = [c.name for c in TABLES["resource"]]
    assert names[-6:] == [
        "clustering_method", "clustering_parameters", "clustering_random_state",
        "source_license", "source_doi", "instance_pixeldata_SHA512_hash",
    ]  # fmt: skip
    assert not any(f"ALTER TABLE `{t}`" in sql for t in run.staging.values())
