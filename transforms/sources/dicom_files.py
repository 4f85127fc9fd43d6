"""The DICOM-folder slide source, and the header rules every source shares.

Every source (DICOM folder or bucket prefix, manifest, idc-index, BigQuery, DICOMweb) builds
its records with `build_record` / `record_from_headers`, so the level rule (transforms/levels.py)
is applied the same way everywhere. The folder source groups VL Whole Slide Microscopy files by
SeriesInstanceUID (one series = one slide) and chooses the levels from the headers alone
(range reads for gs:// and s3:// prefixes), so slides can be filtered before any pixel is read.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pydicom

from transforms.dicom_io.byte_ranges import list_uris, read_header
from transforms.errors import ReasonCode, SlideError
from transforms.levels import DEFAULT_RULE, LevelInfo, LevelRule, PixelSpacing, choose_levels
from transforms.records import (
    FolderFailure,
    SlideRecord,
    failure_uuid,
    local_instance_uuid,
    validate_uid,
    validate_uuid,
)
from transforms.urls import is_remote

_LOG = logging.getLogger(__name__)

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_HEADER_TAGS = [
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "ImageType",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "Rows",
    "Columns",
    "SharedFunctionalGroupsSequence",
    "ContainerIdentifier",
    "NumberOfOpticalPaths",
    "TotalPixelMatrixFocalPlanes",
    "OpticalPathSequence",
]


def spacing_of(ds: pydicom.Dataset) -> PixelSpacing | None:
    try:
        row, col = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return PixelSpacing(float(row), float(col))
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None


def is_volume(ds: pydicom.Dataset) -> bool:
    return "VOLUME" in [str(v).upper() for v in ds.get("ImageType", [])]


def level_info(ds: pydicom.Dataset) -> LevelInfo:
    return LevelInfo(
        width=int(ds.TotalPixelMatrixColumns),
        height=int(ds.TotalPixelMatrixRows),
        spacing=spacing_of(ds),
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_width=int(ds.Columns),
        frame_height=int(ds.Rows),
    )


def transfer_syntax_of(ds: pydicom.Dataset) -> str | None:
    """The instance's TransferSyntaxUID (file meta, or DICOMweb metadata), None if unknown."""
    meta = getattr(ds, "file_meta", None)
    value = (meta.get("TransferSyntaxUID") if meta is not None else None) or ds.get(
        "TransferSyntaxUID"
    )
    return str(value) if value else None


def _unsupported(volume: Sequence[pydicom.Dataset]) -> SlideError | None:
    """Why these pyramid instances cannot be read as one brightfield image, or None.

    Several optical paths (fluorescence channels) or focal planes (z-stacks) are rejected
    rather than guessed between; so is a transfer syntax ez-wsi cannot decode.
    """
    from ez_wsi_dicomweb import dicom_frame_decoder, local_dicom_slide_cache

    paths = set()
    for ds in volume:
        sop = ds.get("SOPInstanceUID")
        planes = int(ds.get("TotalPixelMatrixFocalPlanes", 1) or 1)
        n_paths = int(ds.get("NumberOfOpticalPaths", 1) or 1)
        if planes > 1 or n_paths > 1:
            return SlideError(
                ReasonCode.MULTIPLE_PLANES,
                f"instance {sop} has {n_paths} optical paths and {planes} focal planes; only "
                "single-plane brightfield pyramids are embedded",
            )
        paths.update(str(p.get("OpticalPathIdentifier")) for p in ds.get("OpticalPathSequence", []))
        syntax = transfer_syntax_of(ds)
        if not (
            syntax is None
            or syntax in local_dicom_slide_cache.UNENCAPSULATED_TRANSFER_SYNTAXES
            or dicom_frame_decoder.can_decompress_dicom_transfer_syntax(syntax)
        ):
            return SlideError(
                ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
                f"instance {sop} is stored in transfer syntax {syntax}, which the frame decoder "
                "(ez-wsi-dicomweb) cannot decode",
            )
    if len(paths) > 1:
        return SlideError(
            ReasonCode.MULTIPLE_PLANES,
            f"the series' pyramid instances hold {len(paths)} optical paths {sorted(paths)}; "
            "only single-plane brightfield pyramids are embedded",
        )
    return None


def build_record(
    *,
    study_uid: str,
    series_uid: str,
    levels: Sequence[LevelInfo],
    files: Sequence[tuple[str, str]],
    rule: LevelRule = DEFAULT_RULE,
    instance_uuids: Mapping[str, str] | None = None,
    instance_hashes: Mapping[str, str] | None = None,
    collection: str | None = None,
    idc_version: str | None = None,
    dicomweb_url: str | None = None,
) -> SlideRecord | FolderFailure:
    """Chooses the levels of one series (DESIGN.md §3) and makes its record (or failure).

    `instance_uuids` maps SOPInstanceUIDs to IDC crdc_instance_uuids; without one, the UUID is
    uuid5 of the SOPInstanceUID. `files` must name every level in `levels`.
    """
    uuids = instance_uuids or {}

    def uuid_of(sop: str) -> str:
        return validate_uuid(uuids[sop]) if sop in uuids else local_instance_uuid(sop)

    finest = max(levels, key=lambda lv: lv.width * lv.height, default=None)
    fallback_sop = finest.sop_instance_uid if finest else (files[0][0] if files else None)
    try:
        fallback_uuid = failure_uuid(fallback_sop, uuids)
        choice = choose_levels(levels, rule)
        sop = choice.embedding.sop_instance_uid
        where = dict(files)
        missing = {lv.sop_instance_uid for lv in levels} - set(where)
        if missing:
            raise SlideError(ReasonCode.READ_ERROR, f"no location for instances {sorted(missing)}")
        return SlideRecord(
            instance_uuid=uuid_of(sop),
            study_instance_uid=validate_uid(study_uid),
            series_instance_uid=validate_uid(series_uid),
            sop_instance_uid=sop,
            levels=choice,
            files=tuple((lv.sop_instance_uid, where[lv.sop_instance_uid]) for lv in levels),
            collection=collection,
            idc_version=idc_version,
            instance_hash=(instance_hashes or {}).get(sop),
            dicomweb_url=dicomweb_url,
        )
    except SlideError as error:
        return FolderFailure(fallback_uuid, series_uid, error)
    except ValueError as error:  # malformed UIDs
        return FolderFailure(
            fallback_uuid, series_uid, SlideError(ReasonCode.INTERNAL_ERROR, str(error))
        )


def record_from_headers(
    series_uid: str,
    instances: Sequence[tuple[str, pydicom.Dataset]],
    rule: LevelRule = DEFAULT_RULE,
    **extra,
) -> SlideRecord | FolderFailure:
    """The record of one series from its instances' (URI, header) pairs; non-VOLUME
    instances (label, overview, thumbnail) are ignored."""
    known_uuids = extra.get("instance_uuids") or {}

    volume = [(uri, ds) for uri, ds in instances if is_volume(ds)]
    try:
        levels = [level_info(ds) for _, ds in volume]
    except (AttributeError, TypeError, ValueError) as exc:
        return FolderFailure(
            failure_uuid(str(instances[0][1].get("SOPInstanceUID", "0")), known_uuids),
            series_uid,
            SlideError(ReasonCode.READ_ERROR, f"incomplete WSI header: {exc}"),
        )
    study_uid = str((volume or instances)[0][1].StudyInstanceUID)
    if not levels:
        kinds = sorted({"/".join(map(str, ds.get("ImageType", []))) for _, ds in instances})
        return FolderFailure(
            failure_uuid(str(instances[0][1].SOPInstanceUID), known_uuids),
            series_uid,
            SlideError(
                ReasonCode.NO_PYRAMID,
                f"the series has no pyramid (VOLUME) levels, only image types {kinds} "
                "(e.g. a label or overview series)",
            ),
        )
    unsupported = _unsupported([ds for _, ds in volume])
    if unsupported is not None:
        finest = max(levels, key=lambda lv: lv.width * lv.height).sop_instance_uid
        return FolderFailure(failure_uuid(finest, known_uuids), series_uid, unsupported)
    return build_record(
        study_uid=study_uid,
        series_uid=series_uid,
        levels=levels,
        files=[(str(ds.SOPInstanceUID), uri) for uri, ds in volume],
        rule=rule,
        **extra,
    )


def unreadable_series(series_uid: str, exc: Exception) -> FolderFailure:
    """A series whose headers could not be read: a failure row, and the run goes on."""
    if isinstance(exc, SlideError):  # e.g. transient_http once the retries are spent
        error = SlideError(exc.reason, f"reading the series' headers: {exc.message}")
    else:
        error = SlideError(ReasonCode.READ_ERROR, f"reading the series' headers: {exc!r}")
    return FolderFailure(failure_uuid(series_uid), series_uid, error)


def _read_header(uri: str) -> pydicom.Dataset | None:
    """The header of a DICOM file (local or by range reads), or None if it is not DICOM."""
    try:
        if is_remote(uri):
            return read_header(uri)[0]
        return pydicom.dcmread(uri, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
        return None  # not DICOM: README, thumbnails, ...


def enumerate_dicom_folder(
    folder: str | Path,
    rule: LevelRule = DEFAULT_RULE,
) -> Iterator[SlideRecord | FolderFailure]:
    """Yields one SlideRecord (or FolderFailure) per WSI series found under `folder`: a local
    folder (scanned recursively) or a gs:// / s3:// prefix (headers read by byte ranges)."""
    where = str(folder)
    if not is_remote(where) and not Path(where).is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    series: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    for uri in list_uris(where):
        ds = _read_header(uri)
        if ds is None or ds.get("SOPClassUID") != VL_WSI_SOP_CLASS:
            continue
        series[str(ds.SeriesInstanceUID)].append((uri, ds))
    _LOG.info("found %d slide series under %s", len(series), folder)
    for series_uid, instances in sorted(series.items()):
        yield record_from_headers(series_uid, instances, rule)
