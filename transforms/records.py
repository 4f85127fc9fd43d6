"""What travels the DAG before planning: slide records, source failures, and the identifiers
they carry (UID and UUID validation, and the one rule for the UUID of a failure row).

A `SlideRecord` is what every source yields and what every later stage keys on: the instance
UUID, the DICOM UIDs, the chosen levels and where to read them. `files` pairs each level's
SOPInstanceUID with a URI, one of
- a local path,
- gs://bucket/object, s3://bucket/key, http(s):// file (byte-range reads, transforms/dicom_io/),
- a WADO-RS instance URL `{base}/studies/{s}/series/{se}/instances/{sop}` (DICOMweb);
  `dicomweb_url` then holds `{base}`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from transforms.errors import ReasonCode, SlideError
from transforms.levels import LevelChoice
from transforms.urls import is_remote

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


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
    if not (isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value)):
        raise ValueError(f"{value!r} is not a DICOM UID")
    return value


def local_instance_uuid(sop_instance_uid: str) -> str:
    """Stable UUID for a slide from outside IDC: uuid5 in the OID namespace of its SOP UID."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, validate_uid(sop_instance_uid)))


def failure_uuid(uid: object, known_uuids: Mapping[str, str] | None = None, where: str = "") -> str:
    """The UUID a failure row carries for the instance (or series) `uid`, never raising: the
    source's own UUID for it when it has a valid one (IDC's crdc_instance_uuid), else
    `local_instance_uuid` of a valid UID (what the slide gets once it is processed); for a
    malformed or missing UID, uuid5 of that raw value (else of `where`, e.g. the file's URI) in
    the URL namespace. Deterministic, so a rerun of the same input finds the same UUID."""
    if known_uuids and uid in known_uuids:
        try:
            return validate_uuid(known_uuids[uid])
        except SlideError:
            pass
    raw = "" if uid is None else str(uid).strip()
    try:
        return local_instance_uuid(raw)
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pathembed:malformed:{raw or where}"))


def failure_keys(
    instances: Iterable[tuple[object, str]],
    series_uid: object = None,
    known_uuids: Mapping[str, str] | None = None,
) -> frozenset[str]:
    """Every UUID a failure row of this series could carry, from its instances' (UID, URI)
    pairs: `failure_uuid` of each instance (as a row of the series, or of that file alone),
    and of the series (a series whose headers could not be read). A rerun names slides by
    their failure rows' UUIDs, while a slide that enumerates is the UUID of its embedding
    level: these keys are how the one finds the other (`requested`)."""
    keys = {failure_uuid(uid, known_uuids, where=where) for uid, where in instances}
    if series_uid is not None:
        keys.add(failure_uuid(series_uid))
    return frozenset(keys)


def requested(item: SlideRecord | FolderFailure, uuids: frozenset[str]) -> bool:
    """True when a run asked for no UUIDs, or for the item's UUID or one its failure rows
    carried in an earlier run (`failure_keys`)."""
    return not uuids or item.instance_uuid in uuids or not uuids.isdisjoint(item.failure_keys)


def requested_keys(item: SlideRecord | FolderFailure, uuids: frozenset[str]) -> frozenset[str]:
    """The asked-for UUIDs this item answers (to tell which were never found)."""
    return frozenset(uuids & ({item.instance_uuid} | item.failure_keys))


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
    # The UUIDs a failure row of this series may have carried in an earlier run (the finest
    # level's, a single file's: `failure_keys`), so a rerun of those rows finds the slide.
    # Bookkeeping, not identity: not compared (a manifest does not store them).
    failure_keys: frozenset[str] = field(default=frozenset(), compare=False)

    def __repr__(self) -> str:
        return f"SlideRecord({self.instance_uuid}, series={self.series_instance_uid})"

    @property
    def embedding_file(self) -> str:
        return dict(self.files)[self.sop_instance_uid]

    @property
    def is_local(self) -> bool:
        """True when every level is a local file (hashes are computed only then)."""
        return not any(is_remote(uri) for _, uri in self.files)


@dataclass(frozen=True)
class FolderFailure:
    """A series found by a source that cannot become a SlideRecord (UUID and series UID are
    None when the source did not give valid ones, e.g. a malformed manifest row)."""

    instance_uuid: str | None
    series_instance_uid: str | None
    error: SlideError
    # Other UUIDs the same series' failure rows may carry (`failure_keys`): a rerun asking
    # for any of them gets this failure's row.
    failure_keys: frozenset[str] = field(default=frozenset(), compare=False)
