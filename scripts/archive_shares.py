"""The IDC pathology archive's shares by codec and by magnification, for sizing (docs/cloud.md).

    .venv/bin/python scripts/archive_shares.py
    .venv/bin/python scripts/archive_shares.py --sm-index sm_index.parquet   # + magnification
    .venv/bin/python scripts/archive_shares.py --decode-rates ../shared/testdata/real

Offline, from the installed `idc-index-data` (its `idc_index.parquet`: one row per series,
`TransferSyntaxUID` = the syntaxes of the series' instances, comma-joined, `series_size_MB`):
SM series and their bytes per codec of the tiles. A series is counted under its compressed
syntax (its Explicit VR Little Endian instances are thumbnails, labels or overviews);
"uncompressed" = no compressed syntax at all.

Magnification and pixels are not in that file: they are in IDC's `sm_index` table
(`min_PixelSpacing_2sf` in mm, `max_TotalPixelMatrixColumns/Rows`, `ObjectiveLensPower`),
which idc-index-data ships only as SQL (`sm_index.sql`, run in BigQuery) and the `idc-index`
package downloads as `sm_index.parquet`. Given it (`--sm-index`), each series is binned by
its finest pixel spacing: 40x = spacing < 0.35 um, 20x = 0.35-0.575 um (the pipeline's 0.5 um
target with its 15% tolerance: configs/local.yaml `levels`), coarser = above; a series
without a spacing falls back to ObjectiveLensPower (>= 40: 40x, 20-39: 20x). Pixels = the
finest level's matrix; patches = those pixels at 0.5 um / 224^2 (whole slide, before the
tissue mask, so only the shares are meaningful).

`--decode-rates DIR` times the raw decode of the Camelyon frames under DIR (cv2 JPEG baseline,
imagecodecs and cv2 JPEG 2000), one thread, frames per CPU second.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

JPEG = "1.2.840.10008.1.2.4.50"
CODECS = {  # transfer syntax -> codec row, compressed syntaxes only
    JPEG: "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.201": "HTJ2K",
    "1.2.840.10008.1.2.4.202": "HTJ2K",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.4.80": "JPEG-LS",
    "1.2.840.10008.1.2.4.81": "JPEG-LS",
}
UNCOMPRESSED = "uncompressed"
FORTY_X_UM = 0.35  # finer than this: 40x
TWENTY_X_UM = 0.5 * 1.15  # up to this: 20x (levels.target_spacing_um * (1 + tolerance))
PATCH = 224


def codec_of(transfer_syntaxes: str | None) -> str:
    """The codec row of a series from its comma-joined TransferSyntaxUIDs."""
    found = {
        CODECS[uid.strip()] for uid in (transfer_syntaxes or "").split(",") if uid.strip() in CODECS
    }
    if not found:
        return UNCOMPRESSED
    return " + ".join(sorted(found))


def magnification_of(spacing_mm: float | None, objective: int | None) -> str:
    if spacing_mm:
        um = spacing_mm * 1000
        return "40x" if um < FORTY_X_UM else "20x" if um <= TWENTY_X_UM else "coarser"
    if objective:
        return "40x" if objective >= 40 else "20x" if objective >= 20 else "coarser"
    return "unknown"


def sm_series(index: Path) -> dict[str, dict]:
    """SeriesInstanceUID -> {codec, bytes} for every SM series of the index."""
    import pyarrow.parquet as pq

    table = pq.read_table(
        index,
        columns=["SeriesInstanceUID", "Modality", "TransferSyntaxUID", "series_size_MB"],
        filters=[("Modality", "=", "SM")],
    ).to_pydict()
    return {
        uid: {"codec": codec_of(ts), "bytes": (mb or 0.0) * 1e6}
        for uid, ts, mb in zip(
            table["SeriesInstanceUID"],
            table["TransferSyntaxUID"],
            table["series_size_MB"],
            strict=True,
        )
    }


def add_sm_index(series: dict[str, dict], sm_index: Path) -> int:
    """Adds magnification, pixels and patches from an sm_index table; returns rows matched."""
    import pyarrow.parquet as pq

    columns = [
        "SeriesInstanceUID",
        "min_PixelSpacing_2sf",
        "max_TotalPixelMatrixColumns",
        "max_TotalPixelMatrixRows",
        "ObjectiveLensPower",
    ]
    table = pq.read_table(sm_index, columns=columns).to_pydict()
    matched = 0
    for uid, spacing, cols, rows, objective in zip(*(table[c] for c in columns), strict=True):
        entry = series.get(uid)
        if entry is None:
            continue
        matched += 1
        pixels = (cols or 0) * (rows or 0)
        scale = (spacing * 1000 / 0.5) ** 2 if spacing else 1.0
        entry.update(
            magnification=magnification_of(spacing, objective),
            pixels=pixels,
            patches=pixels * scale / PATCH**2,
        )
    return matched


def shares(series: dict[str, dict], by: tuple[str, ...]) -> list[dict]:
    """Rows {key..., slides, slide_share, TB, byte_share[, pixel_share, patch_share]}."""
    totals = collections.Counter()
    groups: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in series.values():
        key = tuple(entry.get(name, "unknown") for name in by)
        for measure in ("slides", "bytes", "pixels", "patches"):
            value = 1 if measure == "slides" else entry.get(measure, 0)
            groups[key][measure] += value
            totals[measure] += value
    rows = []
    for key, sums in sorted(groups.items(), key=lambda kv: -kv[1]["slides"]):
        row = dict(zip(by, key, strict=True))
        row.update(slides=sums["slides"], slide_share=sums["slides"] / totals["slides"])
        row.update(TB=sums["bytes"] / 1e12, byte_share=sums["bytes"] / max(totals["bytes"], 1))
        if totals["pixels"]:
            row.update(
                pixel_share=sums["pixels"] / totals["pixels"],
                patch_share=sums["patches"] / totals["patches"],
            )
        rows.append(row)
    return rows


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        cells = [f"{v:8.1%}" if k.endswith("_share") else f"{v:.2f}" if k == "TB" else str(v)
                 for k, v in row.items()]  # fmt: skip
        print("  " + " | ".join(f"{k}={c.strip()}" for k, c in zip(row, cells, strict=True)))


def decode_rates(folder: Path, seconds: float = 3.0) -> dict[str, float]:
    """Raw frame decodes per CPU second of the Camelyon JPEG and JPEG 2000 files (one thread)."""
    import cv2
    import imagecodecs
    import numpy as np
    import pydicom
    from pydicom.encaps import generate_frames

    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

    def frames(name: str) -> list[bytes]:
        ds = pydicom.dcmread(folder / name)
        return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))

    def rate(decode, items) -> float:
        n, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            for item in items:
                decode(item)
                n += 1
        return n / (time.process_time() - start)

    def cv2_decode(data: bytes):
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)

    jpeg = frames("camelyon_jpeg_multiframe.dcm")
    j2k = frames("camelyon_jpeg2000_multiframe.dcm")
    return {
        "cv2 JPEG baseline, 256 px frames": rate(cv2_decode, jpeg),
        "imagecodecs JPEG 2000 lossless, 256 px frames": rate(imagecodecs.jpeg2k_decode, j2k),
        "cv2 JPEG 2000 lossless, 256 px frames": rate(cv2_decode, j2k),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, help="idc_index.parquet (default: idc-index-data's)")
    parser.add_argument("--sm-index", type=Path, help="IDC sm_index table as Parquet")
    parser.add_argument("--decode-rates", type=Path, metavar="DIR", help="Camelyon test files")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.index is None:
        import idc_index_data

        args.index = Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
        print(f"idc-index-data {idc_index_data.__version__}: {args.index}")
    series = sm_series(args.index)
    out: dict = {"series": len(series)}
    print(f"SM series: {len(series)}, {sum(e['bytes'] for e in series.values()) / 1e12:.2f} TB")
    out["by_codec"] = shares(series, ("codec",))
    print_rows("by codec of the tiles", out["by_codec"])
    if args.sm_index:
        matched = add_sm_index(series, args.sm_index)
        print(f"\nsm_index rows matched: {matched} of {len(series)} series")
        out["by_magnification"] = shares(series, ("magnification",))
        out["by_codec_and_magnification"] = shares(series, ("codec", "magnification"))
        print_rows("by magnification (finest level)", out["by_magnification"])
        print_rows("by codec and magnification", out["by_codec_and_magnification"])
    else:
        print("\nmagnification, pixels, patches: not in idc_index.parquet; pass --sm-index")
    if args.decode_rates:
        out["decode_rates_per_cpu_s"] = decode_rates(args.decode_rates)
        print("\nraw frame decode, frames per CPU second (one thread):")
        for name, value in out["decode_rates_per_cpu_s"].items():
            print(f"  {name:<48} {value:8.0f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
