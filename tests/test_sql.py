"""Every SQL file of the project, executed: sqlglot parses each with the BigQuery dialect, and
idc_slides.sql, search.sql, lookup.sql and merge_run.sql are transpiled to DuckDB and run on
fixture tables shaped like IDC's dicom_all (nested SharedFunctionalGroupsSequence and
OpticalPathSequence, string-typed spacing and counts) and like the project's own tables."""

from __future__ import annotations

import datetime
import os
import re
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import sqlglot

from pipeline.config import SourceConfig, TablesConfig
from tests.sql_duckdb import render, run, to_duckdb
from transforms.outputs import bigquery_sink
from transforms.records import FolderFailure, SlideRecord
from transforms.search.ranking import SearchParams, exact_hits, rank_slides
from transforms.sources import idc

REPO = Path(__file__).resolve().parents[1]
WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
TABLE = "bigquery-public-data.idc_v25.dicom_all"
MUTABLE = "bigquery-public-data.idc_current.mutable_metadata"

# -- every .sql file parses as BigQuery -------------------------------------------------------


def _sql_files() -> list[Path]:
    return sorted(
        p for p in REPO.rglob("*.sql") if ".venv" not in p.parts and ".git" not in p.parts
    )


def test_there_are_sql_files_to_check():
    names = {p.name for p in _sql_files()}
    assert {"idc_slides.sql", "search.sql", "lookup.sql", "merge_run.sql"} <= names


@pytest.mark.parametrize("path", _sql_files(), ids=lambda p: p.name)
def test_every_sql_file_parses_as_bigquery(path):
    # placeholders are validated table ids or numbers when rendered (transforms/outputs/archive.py)
    text = re.sub(
        r"\$\{(\w+)\}",
        lambda m: "0.5" if m.group(1).startswith("fraction") else f"my-project.ds.{m.group(1)}",
        path.read_text(),
    )
    statements = [s for s in sqlglot.parse(text, read="bigquery", error_level="raise") if s]
    assert statements, f"{path} holds no statement"


# -- idc_slides.sql on dicom_all-shaped rows --------------------------------------------------

DICOM_ALL_DDL = """
CREATE TABLE dicom_all (
  collection_id VARCHAR, license_short_name VARCHAR, source_DOI VARCHAR,
  Modality VARCHAR, SOPClassUID VARCHAR,
  StudyInstanceUID VARCHAR, SeriesInstanceUID VARCHAR, SOPInstanceUID VARCHAR,
  crdc_instance_uuid VARCHAR, gcs_url VARCHAR, aws_url VARCHAR, instance_hash VARCHAR,
  instance_size BIGINT, TransferSyntaxUID VARCHAR, ImageType VARCHAR[],
  TotalPixelMatrixColumns BIGINT, TotalPixelMatrixRows BIGINT, "Columns" BIGINT, "Rows" BIGINT,
  SharedFunctionalGroupsSequence STRUCT(
    PixelMeasuresSequence STRUCT(PixelSpacing VARCHAR[], SliceThickness VARCHAR)[]
  )[],
  NumberOfOpticalPaths VARCHAR, TotalPixelMatrixFocalPlanes VARCHAR,
  OpticalPathSequence STRUCT(
    OpticalPathIdentifier VARCHAR,
    IlluminationTypeCodeSequence STRUCT(
      CodeValue VARCHAR, CodingSchemeDesignator VARCHAR, CodeMeaning VARCHAR
    )[]
  )[]
)"""
MUTABLE_DDL = (
    "CREATE TABLE mutable_metadata (crdc_instance_uuid VARCHAR, gcs_url VARCHAR, aws_url VARCHAR)"
)


def _illumination(*codes: str) -> list[dict]:
    return [
        {
            "OpticalPathIdentifier": str(n),
            "IlluminationTypeCodeSequence": [
                {"CodeValue": code, "CodingSchemeDesignator": "DCM", "CodeMeaning": "x"}
            ],
        }
        for n, code in enumerate(codes, start=1)
    ]


def _instance(series: str, n: int, width: int, spacing_mm: float, **over) -> dict:
    uid = f"{series}.{n}"
    row = {
        "collection_id": "tcga_luad",
        "license_short_name": "CC BY 3.0",
        "source_DOI": "10.7937/K9/TCIA.2016.JGNIHEP5",
        "Modality": "SM",
        "SOPClassUID": WSI,
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": series,
        "SOPInstanceUID": uid,
        "crdc_instance_uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, uid)),
        "gcs_url": f"gs://idc-pinned/{uid}.dcm",
        "aws_url": f"s3://idc-pinned/{uid}.dcm",
        "instance_hash": "ab" * 16,
        "instance_size": 1000,
        "TransferSyntaxUID": "1.2.840.10008.1.2.4.50",
        "ImageType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
        "TotalPixelMatrixColumns": width,
        "TotalPixelMatrixRows": width // 2,
        "Columns": 256,
        "Rows": 256,
        # IDC keeps DS values as strings
        "SharedFunctionalGroupsSequence": [
            {
                "PixelMeasuresSequence": [
                    {"PixelSpacing": [repr(spacing_mm), repr(spacing_mm)], "SliceThickness": None}
                ]
            }
        ],
        "NumberOfOpticalPaths": "1",
        "TotalPixelMatrixFocalPlanes": "1",
        "OpticalPathSequence": _illumination("111744"),
    }
    row.update(over)
    return row


def _pyramid(series: str, **over) -> list[dict]:
    """A 3-level pyramid (0.25, 2 and 8 µm/px) plus a LABEL image."""
    levels = [
        _instance(series, 1, 80000, 0.00025, **over),
        _instance(series, 2, 10000, 0.002, **over),
        _instance(series, 3, 2500, 0.008, **over),
    ]
    label = _instance(series, 9, 500, 0.01, **{**over, "ImageType": ["ORIGINAL", "LABEL"]})
    return [*levels, label]


EXPECTED = {  # series -> reason (None: a slide)
    "1.9.1": None,  # brightfield 111744
    "1.9.2": None,  # transmission illumination 111741 (Google-converted slides)
    "1.9.3": "not_brightfield",  # epifluorescence 111743
    "1.9.4": "multiple_planes",  # two optical paths
    "1.9.5": "multiple_planes",  # a z-stack
    "1.9.6": "no_pyramid",  # only LABEL / OVERVIEW images
    "1.9.7": "not_brightfield",  # no illumination code at all
    "1.9.8": "no_pyramid",  # VOLUME image type but not the VL WSI SOP class
}


def _fixture_rows() -> list[dict]:
    rows = [
        *_pyramid("1.9.1"),
        *_pyramid("1.9.2", OpticalPathSequence=_illumination("111741")),
        *_pyramid("1.9.3", OpticalPathSequence=_illumination("111743")),
        *_pyramid("1.9.4", NumberOfOpticalPaths="2",
                  OpticalPathSequence=_illumination("111744", "111744")),
        *_pyramid("1.9.5", TotalPixelMatrixFocalPlanes="3"),
        _instance("1.9.6", 1, 500, 0.01, ImageType=["ORIGINAL", "PRIMARY", "LABEL"]),
        _instance("1.9.6", 2, 900, 0.01, ImageType=["DERIVED", "PRIMARY", "OVERVIEW"]),
        *_pyramid("1.9.7", OpticalPathSequence=None, NumberOfOpticalPaths=None),
        *_pyramid("1.9.8", SOPClassUID="1.2.840.10008.5.1.4.1.1.77.1.2"),
        # out of scope: another modality, another collection
        _instance("1.9.20", 1, 512, 0.0005, Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
        *_pyramid("1.9.21", collection_id="cptac_ccrcc"),
    ]  # fmt: skip
    return rows


@pytest.fixture()
def idc_db():
    con = duckdb.connect()
    con.execute(DICOM_ALL_DDL)
    con.execute(MUTABLE_DDL)
    columns = [d[0] for d in con.execute("SELECT * FROM dicom_all LIMIT 0").description]
    for row in _fixture_rows():
        con.execute(
            f"INSERT INTO dicom_all VALUES ({', '.join('?' * len(columns))})",
            [row[c] for c in columns],
        )
    moved = _instance("1.9.1", 1, 0, 0)["crdc_instance_uuid"]
    con.execute(
        "INSERT INTO mutable_metadata VALUES (?, ?, ?)",
        [moved, "gs://idc-current/moved.dcm", "s3://idc-current/moved.dcm"],
    )
    yield con
    con.close()


def _slides_query(con, collections=("tcga_luad",), uuids=(), limit=None):
    query = idc.render_slides_query(TABLE, collections, uuids, limit, MUTABLE)
    params = {name: (list(value) if kind.startswith("ARRAY") else value)
              for name, kind, value in query.parameters}  # fmt: skip
    return run(con, query.sql, params)


def test_every_sm_series_in_scope_is_a_slide_or_a_reason(idc_db):
    rows = _slides_query(idc_db)
    got = {r["SeriesInstanceUID"]: r["reason"] for r in rows}
    assert got == EXPECTED  # each in-scope SM series exactly once, nothing out of scope
    assert len(rows) == len(EXPECTED)


def test_slide_rows_carry_volume_levels_parsed_from_string_spacing(idc_db):
    rows = {r["SeriesInstanceUID"]: r for r in _slides_query(idc_db)}
    levels = rows["1.9.2"]["levels"]
    assert [lv["width"] for lv in levels] == [80000, 10000, 2500]  # widest first, no LABEL
    assert [lv["spacing_row_mm"] for lv in levels] == pytest.approx([0.00025, 0.002, 0.008])
    # the current URL from mutable_metadata wins over the pinned release's
    first = rows["1.9.1"]["levels"][0]
    assert first["gcs_url"] == "gs://idc-current/moved.dcm"
    assert first["aws_url"] == "s3://idc-current/moved.dcm"
    assert rows["1.9.1"]["levels"][1]["gcs_url"].startswith("gs://idc-pinned/")


def test_without_a_mutable_table_the_release_urls_are_kept(idc_db):
    query = idc.render_slides_query(TABLE, ("tcga_luad",), (), None, None)
    assert f"LEFT JOIN `{TABLE}`" in query.sql
    params = {name: (list(value) if kind.startswith("ARRAY") else value)
              for name, kind, value in query.parameters}  # fmt: skip
    rows = {r["SeriesInstanceUID"]: r for r in run(idc_db, query.sql, params)}
    assert {s: r["reason"] for s, r in rows.items()} == EXPECTED
    assert all(lv["gcs_url"].startswith("gs://idc-pinned/") for lv in rows["1.9.1"]["levels"])


def test_parameters_filter_and_limit_series(idc_db):
    every = _slides_query(idc_db, collections=())
    assert len(every) == len(EXPECTED) + 1  # the other collection's slide too
    wanted = _instance("1.9.3", 2, 0, 0)["crdc_instance_uuid"]
    (row,) = _slides_query(idc_db, uuids=(wanted,))
    assert row["SeriesInstanceUID"] == "1.9.3" and row["reason"] == "not_brightfield"
    limited = _slides_query(idc_db, limit=3)
    assert [r["SeriesInstanceUID"] for r in limited] == sorted(EXPECTED)[:3]


def test_query_rows_become_records_and_failure_rows(idc_db):
    out = list(idc.records_from_rows(_slides_query(idc_db), idc_version="v25"))
    slides = {r.series_instance_uid for r in out if isinstance(r, SlideRecord)}
    failures = {
        f.series_instance_uid: f.error.reason.value for f in out if isinstance(f, FolderFailure)
    }
    assert slides == {s for s, reason in EXPECTED.items() if reason is None}
    assert failures == {s: reason for s, reason in EXPECTED.items() if reason is not None}
    by_series = {f.series_instance_uid: f for f in out if isinstance(f, FolderFailure)}
    # a failure row carries a valid instance UUID of the series (for reruns by UUID)
    assert by_series["1.9.3"].instance_uuid == _instance("1.9.3", 1, 0, 0)["crdc_instance_uuid"]
    assert by_series["1.9.6"].instance_uuid is not None
    # ... and answers a rerun naming any instance UUID of the row (records.failure_keys)
    other_level = _instance("1.9.3", 2, 0, 0)["crdc_instance_uuid"]
    assert other_level != by_series["1.9.3"].instance_uuid
    assert other_level in by_series["1.9.3"].failure_keys
    # the series' license and DOI as dicom_all lists them travel with each slide
    for record in (r for r in out if isinstance(r, SlideRecord)):
        assert (record.source_license, record.source_doi) == (
            "CC BY 3.0",
            "10.7937/K9/TCIA.2016.JGNIHEP5",
        )


def test_default_bigquery_release_is_the_offline_index_release():
    assert idc.idc_version_of_table(idc.DEFAULT_TABLE) == idc.index_version()
    assert SourceConfig().bigquery_table == idc.DEFAULT_TABLE
    assert SourceConfig().bigquery_mutable_table == idc.DEFAULT_MUTABLE_TABLE


# -- search.sql on the project's tables -------------------------------------------------------


def _search_fixture(rng: np.random.Generator):
    slides = []
    for s in range(6):
        slides.append(
            {
                "instance_uuid": str(uuid.UUID(int=s + 1)),
                "StudyInstanceUID": f"2.{s // 2}",  # two slides per study
                "SeriesInstanceUID": f"2.{s // 2}.{s}",
            }
        )
    search_rows = []
    for slide in slides:
        for k in range(int(rng.integers(2, 6))):
            search_rows.append(
                {**slide, "centroid_index": k, "embedding": rng.normal(size=8).tolist()}
            )
    return slides, search_rows


@pytest.mark.parametrize("aggregate", ["sum", "max"])
def test_search_sql_ranks_like_the_exact_local_search(aggregate):
    rng = np.random.default_rng(7)
    slides, rows = _search_fixture(rng)
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE search (instance_uuid VARCHAR, StudyInstanceUID VARCHAR, "
        "SeriesInstanceUID VARCHAR, centroid_index BIGINT, embedding DOUBLE[])"
    )
    con.executemany(
        "INSERT INTO search VALUES (?, ?, ?, ?, ?)",
        [[r[c] for c in ("instance_uuid", "StudyInstanceUID", "SeriesInstanceUID",
                         "centroid_index", "embedding")] for r in rows],
    )  # fmt: skip
    con.execute("CREATE TABLE resource AS SELECT DISTINCT instance_uuid, StudyInstanceUID, "
                "SeriesInstanceUID FROM search")  # fmt: skip
    con.execute(
        "CREATE TABLE dicom_all (StudyInstanceUID VARCHAR, SeriesInstanceUID VARCHAR, "
        "collection_name VARCHAR, ClinicalTrialProtocolName VARCHAR)"
    )
    con.execute("INSERT INTO dicom_all SELECT DISTINCT StudyInstanceUID, SeriesInstanceUID, "
                "'coll', 'proto' FROM search")  # fmt: skip
    query = rng.normal(size=(3, 8))
    params = SearchParams(top_k=4, limit=4, aggregate=aggregate)
    sql = render(
        "search.sql",
        {"search_table": "p-roject.d.search", "resource_table": "p-roject.d.resource",
         "idc_table": "p-roject.d.dicom_all"},
        {"fraction_lists_to_search": 0.5},
    )  # fmt: skip
    got = run(con, sql, {
        "query_study_uid": None, "query_series_uid": None,
        "query_embeddings": query.ravel().tolist(), "dimension": 8,
        "exclude_study_uid": "2.0", "top_k": params.top_k, "result_limit": params.limit,
        "aggregate": aggregate,
    })  # fmt: skip
    table = pa.Table.from_pylist(slides).sort_by("instance_uuid")
    batch = pa.RecordBatch.from_pylist(rows)
    expected = rank_slides(exact_hits([batch], table, query, params.top_k, "2.0"), table, params)
    assert [(r["SeriesInstanceUID"], r["hits"]) for r in got] == [
        (m.series_instance_uid, m.hits) for m in expected
    ]
    assert [r["score"] for r in got] == pytest.approx([m.score for m in expected])
    assert all(r["StudyInstanceUID"] != "2.0" for r in got)
    assert {r["collection"] for r in got} == {"coll"}
    # query by a slide already in the table: its own centroids are the query
    by_slide = run(con, sql, {
        "query_study_uid": "2.1", "query_series_uid": "2.1.2", "query_embeddings": [],
        "dimension": 1, "exclude_study_uid": "2.1", "top_k": 3, "result_limit": 10,
        "aggregate": "sum",
    })  # fmt: skip
    assert by_slide and all(r["StudyInstanceUID"] != "2.1" for r in by_slide)


# -- lookup.sql and merge_run.sql -------------------------------------------------------------


def test_lookup_sql_finds_a_slide_by_uuid_or_by_uids():
    con = duckdb.connect()
    con.execute("CREATE TABLE resource (instance_uuid VARCHAR, StudyInstanceUID VARCHAR, "
                "SeriesInstanceUID VARCHAR)")  # fmt: skip
    con.execute("INSERT INTO resource VALUES ('u1', '1.1', '1.1.1'), ('u2', '1.2', '1.2.1')")
    sql = render("lookup.sql", {"resource_table": "p-roject.d.resource"})
    by_uuid = run(con, sql, {"instance_uuid": "u2", "study_instance_uid": None,
                             "series_instance_uid": None})  # fmt: skip
    assert [r["SeriesInstanceUID"] for r in by_uuid] == ["1.2.1"]
    by_uids = run(con, sql, {"instance_uuid": None, "study_instance_uid": "1.1",
                             "series_instance_uid": "1.1.1"})  # fmt: skip
    assert [r["instance_uuid"] for r in by_uids] == ["u1"]
    assert run(con, sql, {"instance_uuid": "nope", "study_instance_uid": None,
                          "series_instance_uid": None}) == []  # fmt: skip


def _insert(con, table: str, **values) -> None:
    """One row with every NOT NULL column filled by a value of its type."""
    defaults = {"VARCHAR": "x", "BIGINT": 1, "DOUBLE": 1.0, "BOOLEAN": False}
    columns = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
        "ORDER BY ordinal_position", [table]
    ).fetchall()  # fmt: skip
    row = []
    for name, kind in columns:
        if name in values:
            row.append(values[name])
        elif kind.endswith("[]"):
            row.append([])
        elif kind.startswith("TIMESTAMP"):
            row.append(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
        else:
            row.append(defaults.get(kind))
    con.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(row))})", row)


def test_merge_run_sql_replaces_rewritten_slides_and_drops_staging():
    con = duckdb.connect()
    tables = bigquery_sink.RunTables.of(
        TablesConfig(sink="bigquery", bigquery_dataset="p-roject.d"), "r2"
    )
    final = {k: t.rsplit(".", 1)[1] for k, t in tables.final.items()}
    staging = {k: t.rsplit(".", 1)[1] for k, t in tables.staging.items()}
    run(con, render("tables.sql", {f"{k}_table": t for k, t in tables.final.items()}))
    for kind in staging:
        con.execute(f"CREATE TABLE {staging[kind]} AS SELECT * FROM {final[kind]} LIMIT 0")
    for table, uid, n in (
        (final["search"], "redone", 5),
        (final["search"], "untouched", 2),
        (staging["search"], "redone", 3),
        (staging["search"], "new", 1),
    ):
        for k in range(n):
            _insert(con, table, instance_uuid=uid, SeriesInstanceUID=uid, centroid_index=k)
    for table, uid in (
        (final["resource"], "redone"),
        (final["resource"], "untouched"),
        (staging["resource"], "redone"),
        (staging["resource"], "new"),
    ):
        _insert(con, table, instance_uuid=uid, SeriesInstanceUID=uid)  # one slide per series
    # A new IDC release re-issued one series' UUID: the old row is retired to the history.
    _insert(con, final["resource"], instance_uuid="old-release", SeriesInstanceUID="changed")
    _insert(con, final["search"], instance_uuid="old-release", SeriesInstanceUID="changed")
    _insert(con, staging["resource"], instance_uuid="new-release", SeriesInstanceUID="changed")
    for table, run_id in (
        (final["failures"], "r1"),
        (final["failures"], "r2"),
        (final["failures"], "r2"),
        (staging["failures"], "r2"),
    ):
        _insert(con, table, run_id=run_id)  # fmt: skip

    run(con, bigquery_sink.merge_sql(tables))

    count = dict(con.execute(
        f"SELECT instance_uuid, COUNT(*) FROM {final['search']} GROUP BY 1").fetchall()
    )  # fmt: skip
    assert count == {"redone": 3, "untouched": 2, "new": 1}
    resource = con.execute(f"SELECT instance_uuid FROM {final['resource']}").fetchall()
    assert sorted(r[0] for r in resource) == ["new", "new-release", "redone", "untouched"]
    history = con.execute(f"SELECT instance_uuid FROM {final['resource_history']}").fetchall()
    assert [r[0] for r in history] == ["old-release"]
    runs = con.execute(f"SELECT run_id FROM {final['failures']}").fetchall()
    assert sorted(r[0] for r in runs) == ["r1", "r2"]
    left = {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    assert left == set(final.values())  # staging tables dropped


# -- optional: a BigQuery dry run of each query, when credentials exist -----------------------


@pytest.mark.skipif(
    not os.environ.get("PATHEMBED_BIGQUERY_DRY_RUN_PROJECT"),
    reason="set PATHEMBED_BIGQUERY_DRY_RUN_PROJECT (and credentials) to dry-run against BigQuery",
)
def test_bigquery_dry_run_of_the_slides_query():
    from google.cloud import bigquery

    query = idc.render_slides_query(limit=1)
    config = query.job_config()
    config.dry_run = True
    client = bigquery.Client(project=os.environ["PATHEMBED_BIGQUERY_DRY_RUN_PROJECT"])
    job = client.query(query.sql, job_config=config)
    assert job.total_bytes_processed is not None


def test_the_duckdb_translation_is_not_empty():
    assert to_duckdb("SELECT 1")


def _row(table: str, **values) -> dict:
    """A row of `table` that fits its schema, every column filled by a value of its type."""
    from transforms.outputs.tables import TABLES

    defaults = {
        "STRING": "x", "INT64": 1, "FLOAT64": 1.0, "BOOL": False,
        "TIMESTAMP": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    }  # fmt: skip
    row = {}
    for col in TABLES[table]:
        value = [0.5] * col.length if col.repeated else defaults[col.type]
        row[col.name] = values.get(col.name, value)
    return row


def test_merge_only_loads_a_dead_runs_row_files_merges_them_and_commits_the_run(tmp_path):
    """A job died after finishing some slides: their row files are under the output root.
    `launch --merge-only RUN_ID` loads them into staging tables, merges them and writes the
    run's summary (the run is committed); merging again changes nothing."""
    from pipeline import launch
    from pipeline.config import PipelineConfig, SourceConfig
    from tests.sql_duckdb import DuckDBBigQuery
    from transforms.outputs import layout
    from transforms.outputs.tables import parquet_bytes

    root, run_id = str(tmp_path), "20260105T000000Z-dead01"
    rows = {"resource": [], "search": []}
    for uid in ("slide-a", "slide-b"):
        resource = _row("resource", instance_uuid=uid, SeriesInstanceUID=uid, run_id=run_id)
        search = [_row("search", instance_uuid=uid, SeriesInstanceUID=uid, centroid_index=k)
                  for k in range(3)]  # fmt: skip
        for table, table_rows in (("resource", [resource]), ("search", search)):
            path = Path(layout.row_file(root, table, run_id, uid))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(parquet_bytes(table, table_rows))
            rows[table] += table_rows
    cfg = PipelineConfig(
        source=SourceConfig(kind="bigquery"), output_root=root,
        tables=TablesConfig(sink="bigquery", bigquery_dataset="p-roject.d"),
    )  # fmt: skip
    bq = DuckDBBigQuery(duckdb.connect())
    search, resource = cfg.tables.search, cfg.tables.resource
    assert launch.merge_only(cfg, run_id, bq) == [run_id]
    assert len(bq.loads) == 2  # resource and search; no failure rows were written
    counts = dict(bq.con.execute(
        f"SELECT instance_uuid, COUNT(*) FROM {search} GROUP BY 1").fetchall()
    )  # fmt: skip
    assert counts == {"slide-a": 3, "slide-b": 3}
    assert Path(layout.run_summary_uri(root, run_id)).exists()  # committed
    assert bigquery_sink.unmerged_runs(root, "20260106T000000Z-next01") == [
        "20260106T000000Z-next01"
    ]  # the next run does not merge it again
    assert launch.merge_only(cfg, run_id, bq) == [run_id]  # asked again: idempotent
    assert bq.con.execute(f"SELECT COUNT(*) FROM {search}").fetchone()[0] == 6
    assert bq.con.execute(f"SELECT COUNT(*) FROM {resource}").fetchone()[0] == 2
