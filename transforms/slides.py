"""Slide records and the DICOM-folder slide source.

A `SlideRecord` is what every source yields and what every later stage keys on: the
instance UUID, the DICOM UIDs, the chosen levels and where to read them. Every source (DICOM
folder or bucket prefix, manifest, idc-index, BigQuery, DICOMweb) builds it with
`build_record` / `record_from_headers`, so the level rule (transforms/levels.py) is applied
the same way everywhere. The folder source groups VL Whole Slide Microscopy files by
SeriesInstanceUID (one series = one slide) and chooses the levels from the headers alone
(range reads for gs:// and s3:// prefixes), so slides can be filtered before any pixel is read.

Where to read a level: `files` pairs each level's SOPInstanceUID with a URI, one of
- a local path (read with ez-wsi's LocalDicomSlide),
- gs://bucket/object, s3://bucket/key, http(s):// file (byte-range reads, transforms/bucket.py),
- a WADO-RS instance URL `{base}/studies/{s}/series/{se}/instances/{sop}` (DICOMweb through
  ez-wsi, transforms/dicomweb.py); `dicomweb_url` then holds `{base}`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from transforms.errors import ReasonCode, SlideError
from transforms.levels import LevelChoice, LevelInfo, PixelSpacing, choose_levels

_LOG = logging.getLogger(__name__)

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
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


def validate_uuid(value: str) -> str:
    """The canonical lowercase form of a UUID, or SlideError(invalid_uuid) before any path use."""
    try:
        parsed = uuid.UUID(str(value))
    except ValueError:
        raise SlideError(ReasonCode.INVALID_UUID, f"{value!r} is not a UUID") from None
    if str(parsed) != str(value).lower():
        raise SlideError(ReasonCode.INVALID_UUID, f"{value!r} is not a canonical UUID")
    return str(parsed)


def validate_uid(value: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters), or ValueError."""
    if not (isinstance(value, str) and len(value) <= 64 and _UID_RE.match(value)):
        raise ValueError(f"{value!r} is not a DICOM UID")
    return value


def local_instance_uuid(sop_instance_uid: str) -> str:
    """Stable UUID for a slide from outside IDC: uuid5 in the OID namespace of its SOP UID."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, validate_uid(sop_instance_uid)))


@dataclass(frozen=True)
class SlideRecord:
    """One slide to embed: identity, chosen levels, and where each pyramid level is read."""

    instance_uuid: str  # of the embedding-level instance (IDC crdc_instance_uuid or uuid5)
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str  # the embedding-level instance
    levels: LevelChoice
    files: tuple[tuple[str, str], ...]  # (SOPInstanceUID, URI) of every pyramid level
    collection: str | None = None
    idc_version: str | None = None
    instance_hash: str | None = None  # IDC's MD5 of the instance, when the source knows it
    dicomweb_url: str | None = None  # DICOMweb base URL when `files` are WADO-RS URLs
    # How WADO-RS reads authenticate (source.dicomweb_auth: auto, google, none); a mode,
    # never a credential: credentials come from ADC on the worker that reads.
    dicomweb_auth: str = "auto"
    # The series' license and DOI as IDC lists them (idc-index `license_short_name`,
    # `source_DOI`; BigQuery dicom_all the same), None where the source does not know them.
    source_license: str | None = None
    source_doi: str | None = None

    def __repr__(self) -> str:
        return f"SlideRecord({self.instance_uuid}, series={self.series_instance_uid})"

    @property
    def embedding_file(self) -> str:
        return dict(self.files)[self.sop_instance_uid]

    @property
    def is_local(self) -> bool:
        """True when every level is a local file (hashes are computed only then)."""
        return not any("://" in uri for _, uri in self.files)


def spacing_of(ds: pydicom.Dataset) -> PixelSpacing | None:
    try:
        row, col = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return PixelSpacing(float(row), float(col))
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None


_spacing = spacing_of  # the folder source's old name


@dataclass(frozen=True)
class FolderFailure:
    """A series found by a source that cannot become a SlideRecord (UUID and series UID are
    None when the source did not give valid ones, e.g. a malformed manifest row)."""

    instance_uuid: str | None
    series_instance_uid: str | None
    error: SlideError


SourceFailure = FolderFailure


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
    target_spacing_mm: float = 0.0005,
    tolerance: float = 0.15,
    mask_spacing_mm: float = 0.005,
    instance_uuids: Mapping[str, str] | None = None,
    instance_hashes: Mapping[str, str] | None = None,
    collection: str | None = None,
    idc_version: str | None = None,
    dicomweb_url: str | None = None,
    source_license: str | None = None,
    source_doi: str | None = None,
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
        fallback_uuid = uuid_of(fallback_sop) if fallback_sop else local_instance_uuid("0")
        choice = choose_levels(levels, target_spacing_mm, tolerance, mask_spacing_mm)
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
            source_license=source_license,
            source_doi=source_doi,
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
    target_spacing_mm: float = 0.0005,
    tolerance: float = 0.15,
    mask_spacing_mm: float = 0.005,
    **extra,
) -> SlideRecord | FolderFailure:
    """The record of one series from its instances' (URI, header) pairs; non-VOLUME
    instances (label, overview, thumbnail) are ignored."""
    known_uuids = extra.get("instance_uuids") or {}

    def failure_uuid(sop: str) -> str:
        """The UUID a failure row of this series carries: the source's (IDC) or uuid5."""
        if sop in known_uuids:
            return validate_uuid(known_uuids[sop])
        return local_instance_uuid(sop) if _UID_RE.match(sop) else local_instance_uuid("0")

    volume = [(uri, ds) for uri, ds in instances if is_volume(ds)]
    try:
        levels = [level_info(ds) for _, ds in volume]
    except (AttributeError, TypeError, ValueError) as exc:
        return FolderFailure(
            failure_uuid(str(instances[0][1].get("SOPInstanceUID", "0"))),
            series_uid,
            SlideError(ReasonCode.READ_ERROR, f"incomplete WSI header: {exc}"),
        )
    study_uid = str((volume or instances)[0][1].StudyInstanceUID)
    if not levels:
        kinds = sorted({"/".join(map(str, ds.get("ImageType", []))) for _, ds in instances})
        return FolderFailure(
            failure_uuid(str(instances[0][1].SOPInstanceUID)),
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
        return FolderFailure(failure_uuid(finest), series_uid, unsupported)
    return build_record(
        study_uid=study_uid,
        series_uid=series_uid,
        levels=levels,
        files=[(str(ds.SOPInstanceUID), uri) for uri, ds in volume],
        target_spacing_mm=target_spacing_mm,
        tolerance=tolerance,
        mask_spacing_mm=mask_spacing_mm,
        **extra,
    )


def _read_header(uri: str) -> pydicom.Dataset | None:
    """The header of a DICOM file (local or by range reads), or None if it is not DICOM."""
    try:
        if "://" in uri:
            from transforms.bucket import read_header

            return read_header(uri)[0]
        return pydicom.dcmread(uri, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError):
        return None  # not DICOM: README, thumbnails, ...


def enumerate_dicom_folder(
    folder: str | Path,
    target_spacing_mm: float = 0.0005,
    tolerance: float = 0.15,
    mask_spacing_mm: float = 0.005,
) -> Iterator[SlideRecord | FolderFailure]:
    """Yields one SlideRecord (or FolderFailure) per WSI series found under `folder`: a local
    folder (scanned recursively) or a gs:// / s3:// prefix (headers read by byte ranges)."""
    from transforms.bucket import list_uris

    where = str(folder)
    if "://" not in where and not Path(where).is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    series: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    for uri in list_uris(where):
        ds = _read_header(uri)
        if ds is None or ds.get("SOPClassUID") != VL_WSI_SOP_CLASS:
            continue
        series[str(ds.SeriesInstanceUID)].append((uri, ds))
    _LOG.info("found %d slide series under %s", len(series), folder)
    for series_uid, instances in sorted(series.items()):
        yield record_from_headers(
            series_uid, instances, target_spacing_mm, tolerance, mask_spacing_mm
        )
