"""The DICOM-folder slide source, and the header rules every source shares.

Every source (DICOM folder or bucket prefix, manifest, idc-index, BigQuery, DICOMweb) builds
its records with `build_record` / `record_from_headers`, so the level rule (transforms/levels.py)
and the header checks (transforms/dicom_io/geometry.py) are applied the same way everywhere.
The folder source groups VL Whole Slide Microscopy files by SeriesInstanceUID (one series = one
slide) and chooses the levels from the headers alone (range reads for gs:// and s3:// prefixes),
so slides can be filtered before any pixel is read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pydicom
import requests

from transforms import metrics
from transforms.dicom_io import geometry
from transforms.dicom_io.byte_ranges import list_uris, read_header
from transforms.dicom_io.pixel_data import stored_frames_problem
from transforms.errors import ReasonCode, SlideError
from transforms.levels import DEFAULT_RULE, LevelInfo, LevelRule, PixelSpacing, choose_levels
from transforms.records import (
    FolderFailure,
    SlideRecord,
    failure_keys,
    failure_uuid,
    local_instance_uuid,
    validate_uid,
    validate_uuid,
)
from transforms.urls import is_remote, redact_url

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
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "PhotometricInterpretation",
    "DimensionOrganizationType",
    "ConcatenationUID",
    "InConcatenationNumber",
]
# pydicom warns about an invalid UID (over 64 characters, ...) every time the element is read,
# ~11 times per slide; the headers are checked here instead (dicom_io/geometry.py), and the
# problem goes into the slide's failure row, so pydicom's own reading validation is off.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def spacing_of(ds: pydicom.Dataset) -> PixelSpacing | None:
    try:
        row, col = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return PixelSpacing(float(row), float(col))
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None


def is_volume(ds: pydicom.Dataset) -> bool:
    return "VOLUME" in [str(v).upper() for v in ds.get("ImageType", None) or []]


def _without_image_type(ds: pydicom.Dataset) -> bool:
    return not ds.get("ImageType", None)


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
    source_license: str | None = None,
    source_doi: str | None = None,
    unusable: Mapping[str, SlideError] | None = None,
    concatenations: Mapping[str, str] | None = None,
) -> SlideRecord | FolderFailure:
    """Chooses the levels of one series (DESIGN.md §3) and makes its record (or failure).

    `unusable` maps SOPInstanceUIDs to header problems (dicom_io/geometry.py): those levels
    are left out, and sink the slide only if it needs them (`levels.choose_levels`).

    `instance_uuids` maps SOPInstanceUIDs to IDC crdc_instance_uuids; without one, the UUID is
    uuid5 of the SOPInstanceUID. `files` must name every level in `levels`.
    """
    uuids = instance_uuids or {}

    def uuid_of(sop: str) -> str:
        return validate_uuid(uuids[sop]) if sop in uuids else local_instance_uuid(sop)

    finest = max(levels, key=lambda lv: lv.width * lv.height, default=None)
    fallback_sop = finest.sop_instance_uid if finest else (files[0][0] if files else None)
    # Computed before anything can fail, and never raising: the failure row needs it.
    fallback_uuid = failure_uuid(fallback_sop, uuids, where=series_uid)
    keys = failure_keys(files, series_uid, uuids)
    try:
        choice = choose_levels(levels, rule, unusable, concatenations)
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
            failure_keys=keys,
        )
    except SlideError as error:
        return FolderFailure(fallback_uuid, series_uid, error, keys)
    except ValueError as error:  # malformed UIDs
        return FolderFailure(
            fallback_uuid,
            series_uid,
            SlideError(ReasonCode.MALFORMED_HEADER, f"series {series_uid}: {error}"),
            keys,
        )


def _sparse_without_positions(ds: pydicom.Dataset) -> bool:
    organization = str(ds.get("DimensionOrganizationType", "") or "").upper()
    return organization == geometry.TILED_SPARSE and "PerFrameFunctionalGroupsSequence" not in ds


def record_from_headers(
    series_uid: str,
    instances: Sequence[tuple[str, pydicom.Dataset]],
    rule: LevelRule = DEFAULT_RULE,
    **extra,
) -> SlideRecord | FolderFailure:
    """`_record_from_headers`, carrying the UUIDs any failure row of the series may have had
    (`records.failure_keys`: of every instance, labels and overviews included), so a rerun
    that names one of them finds the series whatever it becomes now."""
    keys = _instance_keys(series_uid, instances, extra.get("instance_uuids"))
    item = _record_from_headers(series_uid, instances, rule, **extra)
    return dataclasses.replace(item, failure_keys=item.failure_keys | keys)


def _instance_keys(
    series_uid: object,
    instances: Sequence[tuple[str, pydicom.Dataset]],
    known_uuids: Mapping[str, str] | None = None,
) -> frozenset[str]:
    return failure_keys(
        ((ds.get("SOPInstanceUID"), uri) for uri, ds in instances), series_uid, known_uuids
    )


def _record_from_headers(
    series_uid: str,
    instances: Sequence[tuple[str, pydicom.Dataset]],
    rule: LevelRule = DEFAULT_RULE,
    **extra,
) -> SlideRecord | FolderFailure:
    """The record of one series from its instances' (URI, header) pairs; non-VOLUME
    instances (label, overview, thumbnail) are ignored. Instances without any ImageType (older
    converters) count as pyramid levels when no instance of the series says VOLUME.

    Every pyramid instance's header is checked first (transforms/dicom_io/geometry.py: UIDs, pixel
    format, tiling, frame grid; for local files also the frames stored in PixelData); a level
    with a problem is left out, and fails the slide only if the slide needs it."""
    known_uuids = extra.get("instance_uuids") or {}
    # TILED_SPARSE is read by position only by the byte-range reader, not through DICOMweb.
    sparse_ok = extra.pop("sparse_ok", not extra.get("dicomweb_url"))

    def uuid_for_failure(sop: object, where: str = "") -> str:
        return failure_uuid(sop, known_uuids, where=where or series_uid)

    volume = [(uri, ds) for uri, ds in instances if is_volume(ds)]
    if not volume:
        volume = [(uri, ds) for uri, ds in instances if _without_image_type(ds)]
        for uri, _ in volume:
            _LOG.info("%s has no ImageType; read as a pyramid level", uri)
    levels: list[LevelInfo] = []
    files: list[tuple[str, str]] = []
    problems: dict[str, SlideError] = {}
    broken: list[tuple[str, SlideError]] = []  # (uri, problem) of instances with no level
    concatenations: dict[str, str] = {}
    for uri, ds in volume:
        where = f"instance {ds.get('SOPInstanceUID', '?')} ({uri})"
        if _sparse_without_positions(ds) and not is_remote(uri):
            # The listing reads only the tags it needs; a sparse level's frame positions are
            # read (locally) only for sparse levels, whose per-frame sequence can be large.
            ds = pydicom.dcmread(uri, stop_before_pixels=True)
        problem = geometry.header_problem(ds, where, sparse_ok=sparse_ok)
        if problem is None and not is_remote(uri):
            problem = stored_frames_problem(uri, int(ds.get("NumberOfFrames", 1) or 1))
        try:
            level = level_info(ds)
        except (AttributeError, TypeError, ValueError) as exc:
            broken.append((uri, problem or SlideError(
                ReasonCode.MALFORMED_HEADER, f"{where} has an incomplete WSI header: {exc!r}"
            )))  # fmt: skip
            continue
        if any(sop == level.sop_instance_uid for sop, _ in files):
            _LOG.warning("%s repeats instance %s; ignored", uri, level.sop_instance_uid)
            continue
        levels.append(level)
        files.append((level.sop_instance_uid, uri))
        if ds.get("ConcatenationUID"):
            concatenations[level.sop_instance_uid] = str(ds.ConcatenationUID)
        if problem is not None:
            problems[level.sop_instance_uid] = problem
    first = (volume or instances)[0]
    if not levels:
        if broken:
            uri, problem = broken[0]
            sop = first[1].get("SOPInstanceUID")
            return FolderFailure(uuid_for_failure(sop, uri), series_uid, problem)
        kinds = sorted({"/".join(map(str, ds.get("ImageType", None) or [])) for _, ds in instances})
        return FolderFailure(
            uuid_for_failure(first[1].get("SOPInstanceUID"), first[0]),
            series_uid,
            SlideError(
                ReasonCode.NO_PYRAMID,
                f"the series has no pyramid (VOLUME) levels, only image types {kinds} "
                "(e.g. a label or overview series)",
            ),
        )
    finest = max(levels, key=lambda lv: lv.width * lv.height).sop_instance_uid
    good = [ds for uri, ds in volume if str(ds.get("SOPInstanceUID")) not in problems]
    unsupported = _unsupported(good)
    if unsupported is not None:
        return FolderFailure(uuid_for_failure(finest), series_uid, unsupported)
    if len(problems) == len(levels):  # nothing usable: the largest level's problem says why
        return FolderFailure(uuid_for_failure(finest), series_uid, problems[finest])
    study_uid = str(first[1].get("StudyInstanceUID", "") or "")
    return build_record(
        study_uid=study_uid,
        series_uid=series_uid,
        levels=levels,
        files=files,
        rule=rule,
        unusable=problems,
        concatenations=concatenations,
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
    """The header of a DICOM file (local or by range reads), or None if it is not DICOM.

    A remote object that cannot be read (403, 404, retries spent) is not "not DICOM": it
    raises SlideError (read_error or transient_http), so the listing can turn it into a
    failure row for its series instead of letting a level or a slide silently disappear.
    """
    remote = is_remote(uri)
    try:
        if remote:
            return read_header(uri)[0]
        return pydicom.dcmread(uri, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (requests.RequestException, OSError) as exc:
        if not remote:
            return None  # an unreadable local file: not a slide file (as before)
        raise SlideError(ReasonCode.READ_ERROR, f"reading {redact_url(uri)}: {exc}") from exc
    except (pydicom.errors.InvalidDicomError, EOFError, ValueError):
        return None  # not DICOM: README, thumbnails, ...


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def _pixels(ds: pydicom.Dataset) -> int:
    try:
        return int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(
            ds.get("TotalPixelMatrixRows", 0) or 0
        )
    except (TypeError, ValueError):
        return 0


def _uuid_in_name(uri: str) -> str | None:
    """IDC names objects `{crdc_series_uuid}/{crdc_instance_uuid}.dcm`: that UUID, if any."""
    stem = uri.rsplit("/", 1)[-1].split(".", 1)[0]
    try:
        return validate_uuid(stem)
    except SlideError:
        return None


def _unreadable_error(lost: list[tuple[str, SlideError]], where: str) -> SlideError:
    """One failure for the objects of a series that could not be read (transient_http when
    every one of them outlasted its retries, so a rerun of transient failures picks it up)."""
    reason = (
        ReasonCode.TRANSIENT_HTTP
        if all(e.reason == ReasonCode.TRANSIENT_HTTP for _, e in lost)
        else ReasonCode.READ_ERROR
    )
    first_uri, first = lost[0]
    return SlideError(
        reason,
        f"{len(lost)} object(s) {where} could not be read, e.g. {redact_url(first_uri)}: "
        f"{first.message}".replace("  ", " "),
    )


def _file_failure(uri: str, ds: pydicom.Dataset | None, error: SlideError) -> FolderFailure:
    """One file that cannot join a series: a failure row of its own."""
    sop = ds.get("SOPInstanceUID") if ds is not None else None
    series = ds.get("SeriesInstanceUID") if ds is not None else None
    series_uid = str(series) if series and geometry.uid_problem(series, "", "") is None else None
    return FolderFailure(failure_uuid(sop, where=uri), series_uid, error)


def enumerate_dicom_folder(
    folder: str | Path,
    rule: LevelRule = DEFAULT_RULE,
) -> Iterator[SlideRecord | FolderFailure]:
    """Yields one SlideRecord (or FolderFailure) per WSI series found under `folder`: a local
    folder (scanned recursively) or a gs:// / s3:// prefix (headers read by byte ranges).

    Each file and each series is isolated: any exception while reading or interpreting one
    header becomes a failure row for that file or series, and the listing goes on. (Not Beam's
    with_exception_handling: the whole listing is one element, so its dead letter would be the
    whole folder.) Files that are not VL Whole Slide Microscopy images are ignored, each with a
    log line."""
    where = str(folder)
    if not is_remote(where) and not Path(where).is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    series: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
    unreadable: dict[str, list[tuple[str, SlideError]]] = defaultdict(list)  # by parent
    for uri in list_uris(where):
        ds = None
        try:
            try:
                ds = _read_header(uri)
            except SlideError as exc:  # remote object that could not be read: decided below
                unreadable[_parent(uri)].append((uri, exc))
                continue
            if ds is None:
                _LOG.info("ignored %s: not a DICOM file", uri)
                continue
            sop_class = ds.get("SOPClassUID")
            if sop_class != VL_WSI_SOP_CLASS:
                _LOG.warning(
                    "ignored %s: not a whole-slide image (SOP class %s, %s)",
                    uri, sop_class, getattr(sop_class, "name", "unknown"),
                )  # fmt: skip
                metrics.counter(metrics.FILES_IGNORED).inc()
                continue
            series_problem = geometry.uid_problem(
                ds.get("SeriesInstanceUID"), "SeriesInstanceUID", f"file {uri}"
            )
            if series_problem:
                error = SlideError(ReasonCode.MALFORMED_HEADER, series_problem)
                yield _file_failure(uri, ds, error)
                continue
            series[str(ds.SeriesInstanceUID)].append((uri, ds))
        except Exception as exc:  # one unreadable header must not stop the listing
            error = exc if isinstance(exc, SlideError) else SlideError(
                ReasonCode.MALFORMED_HEADER, f"the header of {uri} could not be read: {exc!r}"
            )  # fmt: skip
            yield _file_failure(uri, ds, error)
    _LOG.info("found %d slide series under %s", len(series), redact_url(str(folder)))
    claimed: set[str] = set()
    for series_uid, instances in sorted(series.items()):
        parents = {_parent(uri) for uri, _ in instances}
        lost = [item for parent in sorted(parents) for item in unreadable.get(parent, [])]
        if lost:
            # An object beside this series' instances could not be read: it may be one of
            # its levels, so the series fails rather than being embedded from what is left.
            claimed |= parents
            sop = max(instances, key=lambda i: _pixels(i[1]))[1].get("SOPInstanceUID")
            yield FolderFailure(
                failure_uuid(sop, where=series_uid),
                series_uid,
                _unreadable_error(lost, f"beside the series' {len(instances)} instances"),
                _instance_keys(series_uid, instances),
            )
            continue
        try:
            yield record_from_headers(series_uid, instances, rule)
        except Exception as exc:  # one series' odd header is that series' failure row
            uri, ds = instances[0]
            failure = _file_failure(uri, ds, SlideError(
                ReasonCode.MALFORMED_HEADER,
                f"series {series_uid} ({len(instances)} files, first {uri}) could not be "
                f"interpreted: {exc!r}",
            ))  # fmt: skip
            try:
                keys = _instance_keys(series_uid, instances)
            except Exception:  # failure_keys never raises; an odd header object might
                keys = frozenset()
            yield dataclasses.replace(failure, failure_keys=keys)
    for parent, lost in sorted(unreadable.items()):
        if parent not in claimed:  # a whole series (or slide) that could not be read
            yield FolderFailure(_uuid_in_name(lost[0][0]), None, _unreadable_error(lost, ""))
