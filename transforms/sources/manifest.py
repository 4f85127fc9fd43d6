"""Manifests: slide records as JSON Lines or CSV, one slide per line.

A manifest is what a run can start from instead of enumerating (source kind `manifest`), and
what any source can write (`source.manifest_out`), so a later run, or a rerun of some slides,
reads exactly the same slides, levels and locations. The levels in a manifest are already
chosen: reading one applies no level rule again.

Columns (flat, the same in both formats): instance_uuid, study_instance_uid,
series_instance_uid, sop_instance_uid, collection, idc_version, instance_hash, dicomweb_url,
source_license, source_doi, downsample, embedding_* and mask_* (sop_instance_uid, width,
height, spacing_row_mm, spacing_column_mm, frame_width, frame_height), files (JSON list of
[SOPInstanceUID, URI]).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from apache_beam.io.filesystems import FileSystems

from transforms import urls
from transforms.errors import ReasonCode, SlideError
from transforms.levels import LevelChoice, LevelInfo, PixelSpacing
from transforms.records import FolderFailure, SlideRecord, validate_uid, validate_uuid
from transforms.urls import is_remote

_LEVEL_FIELDS = (
    "sop_instance_uid",
    "width",
    "height",
    "spacing_row_mm",
    "spacing_column_mm",
    "frame_width",
    "frame_height",
)
COLUMNS = (
    "instance_uuid",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "collection",
    "idc_version",
    "instance_hash",
    "dicomweb_url",
    "source_license",
    "source_doi",
    "downsample",
    *(f"embedding_{f}" for f in _LEVEL_FIELDS),
    *(f"mask_{f}" for f in _LEVEL_FIELDS),
    "files",
)


MAX_DOWNSAMPLE = 16.0


def _level_row(prefix: str, level: LevelInfo) -> dict[str, Any]:
    spacing = level.spacing
    return {
        f"{prefix}_sop_instance_uid": level.sop_instance_uid,
        f"{prefix}_width": level.width,
        f"{prefix}_height": level.height,
        f"{prefix}_spacing_row_mm": spacing.row_mm if spacing else None,
        f"{prefix}_spacing_column_mm": spacing.column_mm if spacing else None,
        f"{prefix}_frame_width": level.frame_width,
        f"{prefix}_frame_height": level.frame_height,
    }


def record_to_row(record: SlideRecord) -> dict[str, Any]:
    """A flat, JSON-serialisable row of a record."""
    return {
        "instance_uuid": record.instance_uuid,
        "study_instance_uid": record.study_instance_uid,
        "series_instance_uid": record.series_instance_uid,
        "sop_instance_uid": record.sop_instance_uid,
        "collection": record.collection,
        "idc_version": record.idc_version,
        "instance_hash": record.instance_hash,
        "dicomweb_url": record.dicomweb_url,
        "source_license": record.source_license,
        "source_doi": record.source_doi,
        "downsample": record.levels.downsample,
        **_level_row("embedding", record.levels.embedding),
        **_level_row("mask", record.levels.mask),
        "files": [list(pair) for pair in record.files],
    }


def _blank(value: Any) -> Any:
    return None if value in ("", None) else value


def _level(row: dict[str, Any], prefix: str) -> LevelInfo:
    row_mm, col_mm = (
        _blank(row[f"{prefix}_spacing_row_mm"]),
        _blank(row[f"{prefix}_spacing_column_mm"]),
    )
    return LevelInfo(
        width=int(row[f"{prefix}_width"]),
        height=int(row[f"{prefix}_height"]),
        spacing=None if row_mm is None else PixelSpacing(float(row_mm), float(col_mm)),
        sop_instance_uid=validate_uid(str(row[f"{prefix}_sop_instance_uid"])),
        frame_width=int(row[f"{prefix}_frame_width"]),
        frame_height=int(row[f"{prefix}_frame_height"]),
    )


def record_from_row(row: dict[str, Any]) -> SlideRecord:
    """The record of a manifest row; raises SlideError / ValueError when it is malformed."""
    files = row["files"]
    if isinstance(files, str):
        files = json.loads(files)
    pairs = tuple((validate_uid(str(sop)), str(uri)) for sop, uri in files)
    embedding, mask = _level(row, "embedding"), _level(row, "mask")
    sops = {sop for sop, _ in pairs}
    if not {embedding.sop_instance_uid, mask.sop_instance_uid} <= sops:
        raise ValueError("files do not name the embedding and mask instances")
    if embedding.spacing is None or mask.spacing is None:
        raise SlideError(ReasonCode.NO_PIXEL_SPACING, "manifest row without pixel spacing")
    downsample = float(row["downsample"])
    # It sizes the resized image (level size / downsample): bounded like choose_levels'
    # (>= 1; 0.5 µm target over the finest plausible 0.05 µm spacing is 10).
    if not (math.isfinite(downsample) and 1.0 <= downsample <= MAX_DOWNSAMPLE):
        raise ValueError(f"downsample {row['downsample']!r} is not in [1, {MAX_DOWNSAMPLE}]")
    record = SlideRecord(
        instance_uuid=validate_uuid(str(row["instance_uuid"])),
        study_instance_uid=validate_uid(str(row["study_instance_uid"])),
        series_instance_uid=validate_uid(str(row["series_instance_uid"])),
        sop_instance_uid=validate_uid(str(row["sop_instance_uid"])),
        levels=LevelChoice(embedding, mask, downsample),
        files=pairs,
        collection=_blank(row.get("collection")),
        idc_version=_blank(row.get("idc_version")),
        instance_hash=_blank(row.get("instance_hash")),
        dicomweb_url=_blank(row.get("dicomweb_url")),
        source_license=_blank(row.get("source_license")),
        source_doi=_blank(row.get("source_doi")),
    )
    if record.sop_instance_uid != embedding.sop_instance_uid:
        raise ValueError("sop_instance_uid is not the embedding level's instance")
    return record


def _open(path: str, mode: str):
    if is_remote(path):
        raw = FileSystems.open(path) if mode == "r" else FileSystems.create(path)
        return io.TextIOWrapper(raw, encoding="utf-8", newline="")
    return open(path, mode, encoding="utf-8", newline="")


def _is_csv(path: str) -> bool:
    return path.lower().endswith(".csv")


def _json_rows(handle) -> Iterator[dict | Exception]:
    for line in handle:
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield exc
                continue
            yield row if isinstance(row, dict) else TypeError("a line is not a JSON object")


def _uuid_or_none(value: Any) -> str | None:
    try:
        return validate_uuid(str(value))
    except SlideError:
        return None  # never put an invalid value where a UUID goes (failure rows, paths)


def parse_manifest(path: str) -> Iterator[SlideRecord | FolderFailure]:
    """Records of a .jsonl (or .json lines) or .csv manifest; a bad line becomes a failure
    (invalid_uuid, no_pixel_spacing, or malformed_manifest_row) and the rest are read on."""
    with _open(path, "r") as handle:
        rows: Iterable[dict | Exception] = (
            csv.DictReader(handle) if _is_csv(path) else _json_rows(handle)
        )
        for number, row in enumerate(rows, start=1):
            where = f"manifest {path} line {number}"
            if isinstance(row, Exception):
                error = SlideError(ReasonCode.MALFORMED_MANIFEST_ROW, f"{where}: {row}")
                yield FolderFailure(None, None, error)
                continue
            try:
                yield record_from_row(row)
            except (SlideError, ValueError, KeyError, TypeError) as exc:
                if isinstance(exc, SlideError):
                    error = SlideError(exc.reason, f"{where}: {exc.message}")
                else:
                    error = SlideError(
                        ReasonCode.MALFORMED_MANIFEST_ROW,
                        f"{where}: {type(exc).__name__}: {exc}",
                    )
                series = row.get("series_instance_uid")
                yield FolderFailure(
                    _uuid_or_none(row.get("instance_uuid")),
                    str(series) if series else None,
                    error,
                )


def format_rows(records: Iterable[SlideRecord], csv_format: bool) -> str:
    """Manifest text of these records; URLs without user-info or signatures (a presigned
    URL is a credential: a written manifest must not carry it)."""
    rows = []
    for record in records:
        row = record_to_row(record)
        row["files"] = [[sop, urls.redact_url(uri)] for sop, uri in row["files"]]
        if row.get("dicomweb_url"):
            row["dicomweb_url"] = urls.redact_url(row["dicomweb_url"])
        rows.append(row)
    if not csv_format:
        return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "files": json.dumps(row["files"])})
    return out.getvalue()


def write_manifest(records: Iterable[SlideRecord], path: str) -> int:
    """Writes a .jsonl or .csv manifest; returns the number of records."""
    records = list(records)
    with _open(path, "w") as handle:
        handle.write(format_rows(records, _is_csv(path)))
    return len(records)
