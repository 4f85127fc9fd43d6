"""IDC sources offline: the BigQuery query (rendered text, parameters, the level rule on rows
in the query's output shape) and the idc-index-data series index (the real one, no network)."""

from __future__ import annotations

import uuid

import pytest

from transforms import bigquery
from transforms.errors import SlideError
from transforms.records import FolderFailure, SlideRecord, validate_uid, validate_uuid
from transforms.sources import idc

# -- BigQuery: rendering ----------------------------------------------------------------------


def test_rendered_query_names_only_the_validated_table_and_uses_parameters():
    query = idc.render_slides_query(
        "bigquery-public-data.idc_v20.dicom_all",
        collections=["tcga_luad", "cptac_ccrcc"],
        uuids=["0b7f3cd9-2d1e-4a5b-9f6c-1a2b3c4d5e6f"],
        limit=25,
    )
    assert query.sql == bigquery.sql_text("idc_slides.sql").replace(
        "${dicom_all}", "bigquery-public-data.idc_v20.dicom_all"
    ).replace("${mutable_metadata}", idc.DEFAULT_MUTABLE_TABLE)
    assert "${" not in query.sql
    assert "FROM `bigquery-public-data.idc_v20.dicom_all`" in query.sql
    assert f"LEFT JOIN `{idc.DEFAULT_MUTABLE_TABLE}`" in query.sql
    for name in ("@collections", "@uuids", "@max_slides"):
        assert name in query.sql
    # Nothing a user chose is in the text: it travels as parameters.
    assert "tcga_luad" not in query.sql and "0b7f3cd9" not in query.sql
    assert query.parameters == (
        ("collections", "ARRAY<STRING>", ("tcga_luad", "cptac_ccrcc")),
        ("uuids", "ARRAY<STRING>", ("0b7f3cd9-2d1e-4a5b-9f6c-1a2b3c4d5e6f",)),
        ("max_slides", "INT64", 25),
    )
    # What the SQL does with rows is executed in tests/test_sql.py (DuckDB).


def test_query_parameters_become_a_bigquery_job_config():
    from google.cloud import bigquery

    config = idc.render_slides_query(collections=["tcga_brca"]).job_config()
    assert isinstance(config, bigquery.QueryJobConfig) and config.use_legacy_sql is False
    params = {p.name: p for p in config.query_parameters}
    assert isinstance(params["collections"], bigquery.ArrayQueryParameter)
    assert params["collections"].array_type == "STRING"
    assert params["collections"].values == ["tcga_brca"]
    assert params["uuids"].values == []
    assert params["max_slides"].type_ == "INT64" and params["max_slides"].value == idc.MAX_SLIDES


@pytest.mark.parametrize(
    "table",
    [
        "bigquery-public-data.idc_v20.dicom_all`; DROP TABLE x; --",
        "idc_v20.dicom_all",
        "bigquery-public-data.idc_v20.dicom all",
        "`bigquery-public-data.idc_v20.dicom_all`",
        "",
    ],
)
def test_a_table_id_that_is_not_an_identifier_is_refused(table):
    with pytest.raises(ValueError, match="not a BigQuery table id"):
        idc.render_slides_query(table)


def test_bad_uuid_and_limit_are_refused():
    with pytest.raises(SlideError, match="invalid_uuid"):
        idc.render_slides_query(uuids=["../../etc/passwd"])
    with pytest.raises(ValueError, match="positive"):
        idc.render_slides_query(limit=0)


def test_idc_version_comes_from_the_table_name():
    assert idc.idc_version_of_table("bigquery-public-data.idc_v20.dicom_all") == "v20"
    assert idc.idc_version_of_table("my-project.mirror.dicom_all") is None


# -- BigQuery: rows -> records (the level rule) ----------------------------------------------


def _level(sop, width, spacing_mm, instance_uuid, col_spacing=None, frame=256):
    return {
        "SOPInstanceUID": sop,
        "crdc_instance_uuid": instance_uuid,
        "gcs_url": f"gs://idc-open-data/0d1f8b4e-6e0f-4e2a-9d57-3c4c3a1b2f10/{instance_uuid}.dcm",
        "aws_url": f"s3://idc-open-data/0d1f8b4e-6e0f-4e2a-9d57-3c4c3a1b2f10/{instance_uuid}.dcm",
        "instance_hash": "9e107d9d372bb6826bd81d3542a419d6",
        "instance_size": 123456,
        "TransferSyntaxUID": "1.2.840.10008.1.2.4.50",
        "width": width,
        "height": width * 3 // 4,
        "frame_width": frame,
        "frame_height": frame,
        "spacing_row_mm": spacing_mm,
        "spacing_column_mm": spacing_mm if col_spacing is None else col_spacing,
    }


def _uuid(n: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pathembed-recorded-{n}"))


# Rows in the query's output shape: one per slide, levels finest first.
RECORDED_ROWS = [
    {  # 40x scanner pyramid: embedding level is 40x (downsampled), mask level ~5 µm
        "collection_id": "tcga_luad",
        "StudyInstanceUID": "2.25.1001",
        "SeriesInstanceUID": "2.25.1001.1",
        "levels": [
            _level("2.25.1001.1.1", 98304, 0.000247, _uuid(1)),
            _level("2.25.1001.1.2", 24576, 0.000988, _uuid(2)),
            _level("2.25.1001.1.3", 6144, 0.003952, _uuid(3)),
            _level("2.25.1001.1.4", 1536, 0.015808, _uuid(4)),
        ],
    },
    {  # 20x pyramid: the 20x level itself
        "collection_id": "cptac_ccrcc",
        "StudyInstanceUID": "2.25.1002",
        "SeriesInstanceUID": "2.25.1002.1",
        "levels": [
            _level("2.25.1002.1.1", 50000, 0.000502, _uuid(5)),
            _level("2.25.1002.1.2", 12500, 0.002008, _uuid(6)),
            _level("2.25.1002.1.3", 3125, 0.008032, _uuid(7)),
        ],
    },
    {  # only 10x and coarser: no ~20x level
        "collection_id": "tcga_luad",
        "StudyInstanceUID": "2.25.1003",
        "SeriesInstanceUID": "2.25.1003.1",
        "levels": [
            _level("2.25.1003.1.1", 20000, 0.001, _uuid(8)),
            _level("2.25.1003.1.2", 5000, 0.004, _uuid(9)),
        ],
    },
    {  # non-square pixels (as in some collections)
        "collection_id": "htan_wustl",
        "StudyInstanceUID": "2.25.1004",
        "SeriesInstanceUID": "2.25.1004.1",
        "levels": [_level("2.25.1004.1.1", 40000, 0.0005, _uuid(10), col_spacing=0.00025)],
    },
    {  # spacing missing from the header
        "collection_id": "tcga_luad",
        "StudyInstanceUID": "2.25.1005",
        "SeriesInstanceUID": "2.25.1005.1",
        "levels": [{**_level("2.25.1005.1.1", 40000, 0.0005, _uuid(11)), "spacing_row_mm": None}],
    },
]


def test_recorded_rows_become_records_by_the_level_rule():
    out = list(idc.records_from_rows(RECORDED_ROWS, idc_version="v20"))
    forty, twenty, low, non_square, no_spacing = out
    assert isinstance(forty, SlideRecord)
    assert forty.levels.embedding.sop_instance_uid == "2.25.1001.1.1"
    assert forty.levels.downsample == pytest.approx(0.0005 / 0.000247)
    assert forty.levels.mask.sop_instance_uid == "2.25.1001.1.3"  # 3.95 µm is nearest 5 µm
    assert forty.instance_uuid == _uuid(1)  # IDC's crdc_instance_uuid of the embedding level
    assert forty.instance_hash == "9e107d9d372bb6826bd81d3542a419d6"
    assert forty.collection == "tcga_luad" and forty.idc_version == "v20"
    assert dict(forty.files)["2.25.1001.1.1"].startswith("gs://idc-open-data/")
    assert twenty.levels.embedding.sop_instance_uid == "2.25.1002.1.1"
    assert twenty.levels.downsample == 1.0
    assert twenty.levels.mask.sop_instance_uid == "2.25.1002.1.3"
    reasons = [f.error.reason.value for f in (low, non_square, no_spacing)]
    assert all(isinstance(f, FolderFailure) for f in (low, non_square, no_spacing))
    assert reasons == ["no_high_resolution_level", "non_square_pixels", "no_pixel_spacing"]
    assert low.instance_uuid == _uuid(8)  # failures name the IDC UUID of the finest level


def test_rows_can_be_read_from_aws_or_a_dicomweb_store():
    (aws,) = idc.records_from_rows(RECORDED_ROWS[1:2], idc_version="v20", read_from="aws")
    assert all(uri.startswith("s3://idc-open-data/") for _, uri in aws.files)
    store = "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
    (web,) = idc.records_from_rows(
        RECORDED_ROWS[1:2], idc_version="v20", read_from="dicomweb", dicomweb_url=store
    )
    assert web.dicomweb_url == store
    assert dict(web.files)["2.25.1002.1.1"] == (
        f"{store}/studies/2.25.1002/series/2.25.1002.1/instances/2.25.1002.1.1"
    )
    assert idc.with_dicomweb(aws, store).files == web.files


# -- idc-index-data ---------------------------------------------------------------------------


def test_the_offline_index_lists_tens_of_thousands_of_valid_sm_series():
    series = idc.sm_series()
    assert len(series) > 30_000
    assert idc.index_version().startswith("v") and int(idc.index_version()[1:]) >= 20
    assert len({s.series_instance_uid for s in series}) == len(series)
    for s in series:
        assert validate_uuid(s.crdc_series_uuid) == s.crdc_series_uuid
        validate_uid(s.series_instance_uid)
        validate_uid(s.study_instance_uid)
    collections = idc.summarize(series)
    assert len(collections) > 10
    assert sum(c["series"] for c in collections.values()) == len(series)


def test_the_index_filters_samples_and_limits():
    biggest = max(idc.summarize(idc.sm_series()).items(), key=lambda kv: kv[1]["series"])[0]
    one = idc.sm_series([biggest])
    assert one and {s.collection_id for s in one} == {biggest}
    sample = idc.sm_series(sample=20, seed=7)
    assert len(sample) == 20 and sample == idc.sm_series(sample=20, seed=7)
    assert sample != idc.sm_series(sample=20, seed=8)
    assert len(idc.sm_series(limit=5)) == 5
    prefix = idc.series_prefix(one[0], "s3://idc-open-data")
    assert prefix == f"s3://idc-open-data/{one[0].crdc_series_uuid}/"
