"""The DICOMweb source: SM series found by QIDO-RS, each slide built from its WADO-RS series
metadata (Orthanc's QIDO answers lack what ez-wsi's `get_slide` needs), pixels from the same
store. The HTTP client itself is transforms/dicom_io/dicomweb.py."""

from __future__ import annotations

from collections.abc import Iterator

from transforms.dicom_io.dicomweb import DicomWebClient, instance_url, metadata_dataset, series_of
from transforms.errors import ReasonCode, SlideError
from transforms.levels import LevelRule
from transforms.records import FolderFailure, SlideRecord, validate_uid
from transforms.sources.dicom_files import VL_WSI_SOP_CLASS, record_from_headers, unreadable_series


def list_series(
    base_url: str, auth: str, limit: int | None
) -> Iterator[tuple[str, str] | FolderFailure]:
    """(StudyInstanceUID, SeriesInstanceUID) of the store's SM series, at most `limit`; a row
    whose UIDs are not valid becomes a failure (they would otherwise reach URL paths)."""
    for n, row in enumerate(DicomWebClient(base_url, auth).search_series("SM")):
        if limit is not None and n >= limit:
            return
        try:
            yield series_of(row)
        except ValueError as exc:
            yield FolderFailure(None, None, SlideError(ReasonCode.READ_ERROR, f"QIDO row: {exc}"))


def series_records(
    series: tuple[str, str], base_url: str, auth: str, rule: LevelRule
) -> Iterator[SlideRecord | FolderFailure]:
    """The record (or failure) of one series from its WADO-RS metadata; nothing for a series
    without WSI instances."""
    if isinstance(series, FolderFailure):
        yield series
        return
    study, series_uid = series
    instances = []
    try:
        for tags in DicomWebClient(base_url, auth).series_metadata(study, series_uid):
            ds = metadata_dataset(tags)
            if ds.get("SOPClassUID") == VL_WSI_SOP_CLASS:
                sop = validate_uid(str(ds.SOPInstanceUID))  # a URL path segment next
                uri = instance_url(base_url, study, series_uid, sop)
                instances.append((uri, ds))
    except Exception as exc:  # one unreadable series must not stop the run
        yield unreadable_series(series_uid, exc)
        return
    if not instances:
        return
    try:
        yield record_from_headers(series_uid, instances, rule, dicomweb_url=base_url.rstrip("/"))
    except Exception as exc:  # one series' odd metadata must not stop the run
        yield unreadable_series(series_uid, exc)
