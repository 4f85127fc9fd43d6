"""scripts/archive_shares.py: codec and magnification shares of the IDC SM archive."""

from __future__ import annotations

import json
import pathlib
import sys

import idc_index_data
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from scripts import archive_shares as shares


def test_codec_of_a_series_is_its_compressed_syntax():
    assert shares.codec_of("1.2.840.10008.1.2.1,1.2.840.10008.1.2.4.50") == "JPEG baseline"
    assert shares.codec_of("1.2.840.10008.1.2.4.91") == "JPEG 2000"
    assert shares.codec_of("1.2.840.10008.1.2.1, 1.2.840.10008.1.2.4.90") == "JPEG 2000 lossless"
    assert shares.codec_of("1.2.840.10008.1.2.1") == shares.UNCOMPRESSED
    assert shares.codec_of(None) == shares.UNCOMPRESSED


@pytest.mark.parametrize(
    "spacing_mm,objective,expected",
    [
        (0.00025, None, "40x"),
        (0.00034, 20, "40x"),  # the spacing decides when present
        (0.00035, None, "20x"),
        (0.0005, None, "20x"),
        (0.00057, None, "20x"),
        (0.001, 40, "coarser"),
        (None, 40, "40x"),
        (None, 20, "20x"),
        (None, None, "unknown"),
    ],
)
def test_magnification_bins(spacing_mm, objective, expected):
    assert shares.magnification_of(spacing_mm, objective) == expected


def test_shares_of_the_installed_index_and_an_sm_index(tmp_path, capsys):
    series = shares.sm_series(pathlib.Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH))
    assert len(series) == 76300  # idc-index-data 25.0.5
    rows = {r["codec"]: r for r in shares.shares(series, ("codec",))}
    assert sum(r["slides"] for r in rows.values()) == len(series)
    assert sum(r["byte_share"] for r in rows.values()) == pytest.approx(1.0)
    assert 0.8 < rows["JPEG baseline"]["slide_share"] < 0.9
    assert 0.1 < rows["JPEG 2000"]["slide_share"] < 0.2
    # an sm_index with three of its series: 40x, 20x and one without spacing or power
    jpeg = sorted(u for u, e in series.items() if e["codec"] == "JPEG baseline")[:2]
    j2k = sorted(u for u, e in series.items() if e["codec"] == "JPEG 2000")[:1]
    sm = tmp_path / "sm_index.parquet"
    pq.write_table(
        pa.table({
            "SeriesInstanceUID": [*jpeg, *j2k],
            "min_PixelSpacing_2sf": [0.00025, 0.0005, None],
            "max_TotalPixelMatrixColumns": [4000, 2000, 1000],
            "max_TotalPixelMatrixRows": [4000, 2000, 1000],
            "ObjectiveLensPower": [40, 20, None],
        }),
        sm,
    )  # fmt: skip
    out = tmp_path / "shares.json"
    assert shares.main(["--sm-index", str(sm), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    by_mag = {r["magnification"]: r for r in result["by_magnification"]}
    assert by_mag["40x"]["slides"] == 1 and by_mag["20x"]["slides"] == 1
    # pixels: 16e6 / 4e6 / 1e6; patches at 0.5 um: 4e6 / 4e6 / 1e6 (no spacing: taken as is)
    assert by_mag["40x"]["pixel_share"] == pytest.approx(16 / 21)
    assert by_mag["40x"]["patch_share"] == pytest.approx(4 / 9)
    assert "sm_index rows matched: 3 of 76300" in capsys.readouterr().out
