"""Slide records and the DICOM-folder slide source.

A `SlideRecord` is what every source yields and what every later stage keys on: the
instance UUID, the DICOM UIDs, the chosen levels and where to read them. The folder source
groups VL Whole Slide Microscopy files by SeriesInstanceUID (one series = one slide) and
chooses the levels from the headers alone, so slides can be filtered before any pixel is read.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
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
    """One slide to embed: identity, chosen levels, and the files that hold its pyramid."""

    instance_uuid: str  # of the embedding-level instance (IDC crdc_instance_uuid or uuid5)
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str  # the embedding-level instance
    levels: LevelChoice
    files: tuple[tuple[str, str], ...]  # (SOPInstanceUID, path) of every pyramid level
    collection: str | None = None
    idc_version: str | None = None
    instance_hash: str | None = None  # IDC's MD5 of the instance, when the source knows it

    def __repr__(self) -> str:
        return f"SlideRecord({self.instance_uuid}, series={self.series_instance_uid})"

    @property
    def embedding_file(self) -> str:
        return dict(self.files)[self.sop_instance_uid]


def _spacing(ds: pydicom.Dataset) -> PixelSpacing | None:
    try:
        row, col = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return PixelSpacing(float(row), float(col))
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


@dataclass(frozen=True)
class FolderFailure:
    """A series found in the folder that cannot become a SlideRecord."""

    instance_uuid: str
    series_instance_uid: str
    error: SlideError


def enumerate_dicom_folder(
    folder: str | Path,
    target_spacing_mm: float = 0.0005,
    tolerance: float = 0.15,
    mask_spacing_mm: float = 0.005,
) -> Iterator[SlideRecord | FolderFailure]:
    """Yields one SlideRecord (or FolderFailure) per WSI series found under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    series: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    files = [Path(d, f) for d, _, names in os.walk(folder, followlinks=True) for f in names]
    for path in sorted(files):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue  # not DICOM: README, thumbnails, ...
        if ds.get("SOPClassUID") != VL_WSI_SOP_CLASS:
            continue
        series[str(ds.SeriesInstanceUID)].append((str(path), ds))
    _LOG.info("found %d slide series under %s", len(series), folder)
    for series_uid, instances in sorted(series.items()):
        yield _record_from_series(
            series_uid, instances, target_spacing_mm, tolerance, mask_spacing_mm
        )


def _record_from_series(
    series_uid: str,
    instances: list[tuple[str, pydicom.Dataset]],
    target_spacing_mm: float,
    tolerance: float,
    mask_spacing_mm: float,
) -> SlideRecord | FolderFailure:
    volume = [(p, ds) for p, ds in instances if "VOLUME" in list(ds.get("ImageType", []))]
    levels = [
        LevelInfo(
            width=int(ds.TotalPixelMatrixColumns),
            height=int(ds.TotalPixelMatrixRows),
            spacing=_spacing(ds),
            sop_instance_uid=str(ds.SOPInstanceUID),
            frame_width=int(ds.Columns),
            frame_height=int(ds.Rows),
        )
        for _, ds in volume
    ]
    finest = max(levels, key=lambda lv: lv.width * lv.height, default=None)
    fallback_uuid = local_instance_uuid(
        finest.sop_instance_uid if finest else str(instances[0][1].SOPInstanceUID)
    )
    try:
        choice = choose_levels(levels, target_spacing_mm, tolerance, mask_spacing_mm)
    except SlideError as error:
        return FolderFailure(fallback_uuid, series_uid, error)
    study_uid = str(volume[0][1].StudyInstanceUID)
    return SlideRecord(
        instance_uuid=local_instance_uuid(choice.embedding.sop_instance_uid),
        study_instance_uid=validate_uid(study_uid),
        series_instance_uid=validate_uid(series_uid),
        sop_instance_uid=choice.embedding.sop_instance_uid,
        levels=choice,
        files=tuple((str(ds.SOPInstanceUID), p) for p, ds in volume),
    )
