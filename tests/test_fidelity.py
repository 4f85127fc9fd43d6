"""Fidelity to the published dataset (issue 16), the parts that need no pipeline run: source
licenses and DOIs from IDC's BigQuery rows and from the offline index, search results that show
them and carry the seed's output column names, and clustering provenance in the schema."""

from __future__ import annotations

import collections
import json

import numpy as np
import pyarrow as pa

from tests.test_sources_idc import RECORDED_ROWS
from transforms.outputs.tables import RESOURCE
from transforms.search import ranking
from transforms.sources import idc


def test_bigquery_rows_carry_the_series_license_and_doi():
    licensed = [
        {**row, "license_short_name": "CC BY 4.0", "source_DOI": f"10.7937/doi-{n}"}
        for n, row in enumerate(RECORDED_ROWS[:2])
    ]
    records = list(idc.records_from_rows(licensed, idc_version="v20"))
    assert [r.source_license for r in records] == ["CC BY 4.0", "CC BY 4.0"]
    assert [r.source_doi for r in records] == ["10.7937/doi-0", "10.7937/doi-1"]
    # Rows without them (a query that does not select them) give None, not a guess.
    (bare,) = idc.records_from_rows(RECORDED_ROWS[1:2], idc_version="v20")
    assert bare.source_license is None and bare.source_doi is None


def test_the_offline_index_gives_every_sm_series_a_license_and_a_doi():
    series = idc.sm_series()
    licenses = collections.Counter(s.license_short_name for s in series)
    assert set(licenses) <= {"CC BY 4.0", "CC BY 3.0", "CC BY-NC 4.0", "CC BY-NC 3.0"}, licenses
    assert licenses["CC BY 4.0"] > 0 and sum(licenses.values()) == len(series)
    assert all(s.source_doi and s.source_doi.startswith("10.") for s in series)


def _slides(licenses: list[str | None]) -> pa.Table:
    n = len(licenses)
    return pa.table(
        {
            "instance_uuid": [f"{k:08x}-0000-4000-8000-000000000000" for k in range(n)],
            "StudyInstanceUID": [f"2.25.{k}" for k in range(n)],
            "SeriesInstanceUID": [f"2.25.{k}.1" for k in range(n)],
            "collection": ["c"] * n,
            "thumbnail_uri": [None] * n,
            "source_license": licenses,
            "source_doi": [f"10.1/{k}" if lic else None for k, lic in enumerate(licenses)],
        }
    )


def test_search_results_show_the_source_license_and_the_seed_column_names():
    slides = _slides(["CC BY 4.0", "CC BY 3.0", None])
    hits = ranking.Hits(
        query_index=np.array([0, 0, 1, 1, 1]),
        slide=np.array([0, 1, 0, 1, 2]),
        centroid_index=np.zeros(5, np.int64),
        similarity=np.array([0.9, 0.5, 0.8, 0.4, 0.3]),
    )
    matches = ranking.rank_slides(hits, slides, ranking.SearchParams())
    assert [(m.source_license, m.source_doi) for m in matches] == [
        ("CC BY 4.0", "10.1/0"),
        ("CC BY 3.0", "10.1/1"),
        (None, None),
    ]
    rows = ranking.matches_as_rows(matches, "sum")
    assert [r["SumCosineSimilarity"] for r in rows] == [m.score for m in matches]
    assert rows[0]["SumCosineSimilarity"] == 0.9 + 0.8
    assert all(r["CollectionName"] == "c" and r["ProtocolName"] is None for r in rows)
    # With max, the score is not a sum: the seed's column is left empty rather than misnamed.
    maxed = ranking.rank_slides(hits, slides, ranking.SearchParams(aggregate="max"))
    assert all(r["SumCosineSimilarity"] is None for r in ranking.matches_as_rows(maxed, "max"))


def test_search_cli_json_and_csv_offer_the_seed_names_and_the_license(tmp_path, capsys):
    import argparse

    from pipeline import search_cli

    slides = _slides(["CC BY 4.0"])
    hits = ranking.Hits(np.array([0]), np.array([0]), np.array([0]), np.array([0.7]))
    params = ranking.SearchParams()
    matches = ranking.rank_slides(hits, slides, params)
    query = ranking.SlideQuery(
        centroids=np.zeros((1, 4)), study_instance_uid="2.25.9", series_instance_uid="2.25.9.1"
    )
    for form in ("json", "csv", "table"):
        args = argparse.Namespace(json=form == "json", csv=form == "csv", backend="exact")
        search_cli._print_matches(args, query, params, matches)
        out = capsys.readouterr().out
        if form == "json":
            (row,) = json.loads(out)["results"]
            assert row["SumCosineSimilarity"] == 0.7 and row["CollectionName"] == "c"
            assert "ProtocolName" in row and row["source_license"] == "CC BY 4.0"
        elif form == "csv":
            header, line = out.strip().splitlines()
            assert {"SumCosineSimilarity", "CollectionName", "ProtocolName"} <= set(
                header.split(",")
            )
            assert "CC BY 4.0" in line
        else:
            assert "source_license" in out and "CC BY 4.0" in out


def test_the_resource_table_records_clustering_license_and_pixel_hash():
    names = [c.name for c in RESOURCE]
    for column in (
        "clustering_method", "clustering_parameters", "clustering_random_state",
        "source_license", "source_doi", "instance_pixeldata_SHA512_hash",
    ):  # fmt: skip
        assert column in names


def test_an_s3_etag_is_an_md5_only_for_a_single_part_upload():
    from transforms.dicom_io.byte_ranges import _etag_md5

    assert _etag_md5('"9E107D9D372BB6826BD81D3542A419D6"') == "9e107d9d372bb6826bd81d3542a419d6"
    assert _etag_md5('"9e107d9d372bb6826bd81d3542a419d6-12"') is None  # multipart: not the MD5
    assert _etag_md5(None) is None
