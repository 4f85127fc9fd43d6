"""IDC as a slide source: the BigQuery `dicom_all` table, and the offline idc-index-data index.

BigQuery (production): one parameterised standard-SQL query, transforms/sql/idc_slides.sql,
over a pinned release (`bigquery-public-data.idc_v25.dicom_all` by default, the release of
the offline index idc-index-data 25.0.5, so both IDC sources see the same archive). Every SM
series in scope comes back as a slide or as a reason row (no_pyramid, multiple_planes,
not_brightfield), which becomes a failure row; object URLs come from
`idc_current.mutable_metadata` when it has them (a pinned release's URLs are never updated).
The table ids are validated identifiers; collections, UUIDs and the limit are query
parameters. A slide row holds all its VOLUME levels; `records_from_rows` chooses the levels
with `transforms.levels.choose_levels`, like every source. It runs with the google-cloud-bigquery
client (Beam's ReadFromBigQuery takes no query parameters) and needs credentials; rendering
and row conversion are pure functions, tested offline.

idc-index-data (offline): the package's series index (a Parquet file of the release its
version names, e.g. 25.0.5 -> IDC v25) lists every SM series with its collection, UIDs and
`crdc_series_uuid`, for planning, counting and sampling the archive without network. It has no
instance-level columns, so a series becomes a SlideRecord by reading its instances' headers
from the bucket (`{bucket}/{crdc_series_uuid}/{crdc_instance_uuid}.dcm`, byte ranges only).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transforms import bigquery
from transforms.dicom_io.byte_ranges import list_object_md5s, read_header
from transforms.dicom_io.dicomweb import instance_url
from transforms.errors import ReasonCode, SlideError
from transforms.levels import DEFAULT_RULE, LevelInfo, LevelRule, PixelSpacing
from transforms.records import FolderFailure, SlideRecord, failure_uuid, validate_uuid
from transforms.sources.dicom_files import build_record, record_from_headers, unreadable_series

DEFAULT_TABLE = "bigquery-public-data.idc_v25.dicom_all"
# Current gcs_url / aws_url of every instance (IDC updates these when objects move; a pinned
# release's dicom_all keeps the URLs of its publication).
DEFAULT_MUTABLE_TABLE = "bigquery-public-data.idc_current.mutable_metadata"
# Reason codes the query may return for an SM series that is not embedded.
QUERY_REASONS = ("no_pyramid", "multiple_planes", "not_brightfield")
DEFAULT_BUCKET = "s3://idc-open-data"
_RELEASE_RE = re.compile(r"\bidc_(v\d+)\b")
MAX_SLIDES = 2**62  # "no limit" for @max_slides


# ---------------------------------------------------------------------------------------------
# BigQuery
# ---------------------------------------------------------------------------------------------


def idc_version_of_table(table: str) -> str | None:
    """'v20' for bigquery-public-data.idc_v20.dicom_all; None when the name does not say."""
    match = _RELEASE_RE.search(table)
    return match.group(1) if match else None


def render_slides_query(
    table: str = DEFAULT_TABLE,
    collections: Sequence[str] = (),
    uuids: Sequence[str] = (),
    limit: int | None = None,
    mutable_table: str | None = DEFAULT_MUTABLE_TABLE,
) -> bigquery.Query:
    """The slides query for a release table, filtered by collections / instance UUIDs.
    `mutable_table`: where current object URLs come from; None keeps the release's own (the
    join is then onto the release table itself, which gives each instance its own URLs)."""
    sql = bigquery.render_sql(
        "idc_slides.sql", {"dicom_all": table, "mutable_metadata": mutable_table or table}
    )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return bigquery.Query(
        sql=sql,
        parameters=(
            ("collections", "ARRAY<STRING>", tuple(str(c) for c in collections)),
            ("uuids", "ARRAY<STRING>", tuple(validate_uuid(u) for u in uuids)),
            ("max_slides", "INT64", MAX_SLIDES if limit is None else limit),
        ),
    )


def _spacing(level: Mapping[str, Any]) -> PixelSpacing | None:
    row, col = level.get("spacing_row_mm"), level.get("spacing_column_mm")
    if row is None or col is None:
        return None
    return PixelSpacing(float(row), float(col))


def records_from_rows(
    rows: Iterable[Mapping[str, Any]],
    *,
    idc_version: str | None,
    read_from: str = "gcs",
    dicomweb_url: str | None = None,
    rule: LevelRule = DEFAULT_RULE,
) -> Iterator[SlideRecord | FolderFailure]:
    """Query rows (one per slide, `levels` = every VOLUME level) -> records or failures.

    `read_from`: `gcs` (gcs_url), `aws` (aws_url) or `dicomweb` (WADO-RS URLs under
    `dicomweb_url`, e.g. IDC's Google Healthcare DICOM store).
    """
    if read_from == "dicomweb" and not dicomweb_url:
        raise ValueError("read_from=dicomweb needs a DICOMweb base URL")
    for row in rows:
        study, series = str(row["StudyInstanceUID"]), str(row["SeriesInstanceUID"])
        if row.get("reason"):
            yield _reason_failure(row)
            continue
        levels, files, uuids, hashes = [], [], {}, {}
        for level in row["levels"]:
            sop = str(level["SOPInstanceUID"])
            levels.append(
                LevelInfo(
                    width=int(level["width"]),
                    height=int(level["height"]),
                    spacing=_spacing(level),
                    sop_instance_uid=sop,
                    frame_width=int(level["frame_width"] or 256),
                    frame_height=int(level["frame_height"] or 256),
                )
            )
            if read_from == "dicomweb":
                uri = instance_url(dicomweb_url, study, series, sop)
            elif read_from in ("gcs", "aws"):
                uri = level[f"{read_from}_url"]
            else:
                raise ValueError(f"read_from must be gcs, aws or dicomweb, not {read_from!r}")
            files.append((sop, str(uri)))
            if level.get("crdc_instance_uuid"):
                uuids[sop] = str(level["crdc_instance_uuid"])
            if level.get("instance_hash"):
                hashes[sop] = str(level["instance_hash"])
        yield build_record(
            study_uid=study,
            series_uid=series,
            levels=levels,
            files=files,
            rule=rule,
            instance_uuids=uuids,
            instance_hashes=hashes,
            collection=row.get("collection_id"),
            idc_version=idc_version,
            # dicom_all's per-series license and DOI, when the query selects them.
            source_license=row.get("license_short_name"),
            source_doi=row.get("source_DOI"),
            dicomweb_url=dicomweb_url if read_from == "dicomweb" else None,
        )


def _reason_failure(row: Mapping[str, Any]) -> FolderFailure:
    """The failure of an SM series the query says is not a slide (see idc_slides.sql)."""
    reason = str(row["reason"])
    code = ReasonCode(reason) if reason in QUERY_REASONS else ReasonCode.INTERNAL_ERROR
    levels = row.get("levels") or []
    candidates = [lv.get("crdc_instance_uuid") for lv in levels] + [row.get("any_instance_uuid")]
    valid = []  # the widest VOLUME level's first, else any instance's
    for candidate in candidates:
        try:
            valid.append(validate_uuid(str(candidate)) if candidate else None)
        except SlideError:
            continue
    valid = [v for v in valid if v]
    instance_uuid = valid[0] if valid else None
    details = {
        "no_pyramid": "no VOLUME instance of VL Whole Slide Microscopy Image Storage",
        "multiple_planes": (
            f"up to {row.get('max_optical_paths')} optical paths and "
            f"{row.get('max_focal_planes')} focal planes per level; only single-plane "
            "brightfield pyramids are embedded"
        ),
        "not_brightfield": (
            "a VOLUME level's optical path has no transmitted-light illumination code "
            "(accepted: DCM 111741 Transmission illumination, DCM 111744 Brightfield)"
        ),
    }
    message = f"BigQuery source, series {row.get('SeriesInstanceUID')}: " + details.get(
        reason, f"unknown query reason {reason!r}"
    )
    series = row.get("SeriesInstanceUID")
    # Every instance UUID of the row: a rerun naming any of them gets this series again.
    return FolderFailure(
        instance_uuid, str(series) if series else None, SlideError(code, message),
        frozenset(valid),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# idc-index-data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdcSeries:
    """One SM series of the offline index."""

    collection_id: str
    study_instance_uid: str
    series_instance_uid: str
    crdc_series_uuid: str
    instance_count: int
    series_size_mb: float
    transfer_syntax: str | None
    series_aws_url: str | None
    license_short_name: str | None = None
    source_doi: str | None = None


_INDEX_COLUMNS = {
    "collection_id": "collection_id",
    "StudyInstanceUID": "study_instance_uid",
    "SeriesInstanceUID": "series_instance_uid",
    "crdc_series_uuid": "crdc_series_uuid",
    "instanceCount": "instance_count",
    "series_size_MB": "series_size_mb",
    "TransferSyntaxUID": "transfer_syntax",
    "series_aws_url": "series_aws_url",
    "license_short_name": "license_short_name",
    "source_DOI": "source_doi",
}


def index_version() -> str:
    """IDC release of the installed idc-index-data, e.g. 'v25' for 25.0.5."""
    import idc_index_data

    return "v" + idc_index_data.__version__.split(".")[0]


@functools.cache
def _all_sm_series() -> tuple[IdcSeries, ...]:
    """Every SM series of the installed index, sorted by SeriesInstanceUID (read once)."""
    import idc_index_data
    import pyarrow.parquet as pq

    table = pq.read_table(
        idc_index_data.IDC_INDEX_PARQUET_FILEPATH,
        columns=["Modality", *_INDEX_COLUMNS],
        filters=[("Modality", "=", "SM")],
    ).sort_by("SeriesInstanceUID")
    columns = {_INDEX_COLUMNS[name]: table.column(name).to_pylist() for name in _INDEX_COLUMNS}
    names = list(columns)
    return tuple(
        IdcSeries(**dict(zip(names, values, strict=True)))
        for values in zip(*columns.values(), strict=True)
    )


def sm_series(
    collections: Sequence[str] = (),
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
) -> list[IdcSeries]:
    """SM series of the offline index, sorted by SeriesInstanceUID: optionally only some
    collections, a random sample of `sample` series (seeded), then at most `limit`."""
    wanted = set(collections)
    out = [s for s in _all_sm_series() if not wanted or s.collection_id in wanted]
    if sample is not None and sample < len(out):
        out = sorted(random.Random(seed).sample(out, sample), key=lambda s: s.series_instance_uid)
    return out[:limit] if limit is not None else out


def summarize(series: Iterable[IdcSeries]) -> dict[str, dict[str, float]]:
    """{collection: {series, instances, size_gb}} for planning a run."""
    out: dict[str, dict[str, float]] = {}
    for s in series:
        entry = out.setdefault(s.collection_id, {"series": 0, "instances": 0, "size_gb": 0.0})
        entry["series"] += 1
        entry["instances"] += s.instance_count or 0
        entry["size_gb"] += (s.series_size_mb or 0.0) / 1000
    return out


def series_prefix(series: IdcSeries, bucket: str) -> str:
    return f"{bucket.rstrip('/')}/{validate_uuid(series.crdc_series_uuid)}/"


def resolve_series(
    series: IdcSeries,
    bucket: str = DEFAULT_BUCKET,
    idc_version: str | None = None,
    rule: LevelRule = DEFAULT_RULE,
    sparse_ok: bool = True,
) -> SlideRecord | FolderFailure:
    """A series' record from its instances' headers in the bucket (range reads only).
    `sparse_ok`: False when the pixels will be read through DICOMweb (`with_dicomweb`), which
    cannot place TILED_SPARSE frames by position.

    IDC names each instance `{crdc_series_uuid}/{crdc_instance_uuid}.dcm`, so the instance
    UUIDs come from the object names (validated).
    """
    instances, uuids, hashes = [], {}, {}
    # The listing gives each object's MD5 as the store reports it: IDC's instance_hash is the
    # MD5 of the instance file, so --only-new can tell a changed instance from this source too.
    for uri, md5 in sorted(list_object_md5s(series_prefix(series, bucket)).items()):
        if not uri.endswith(".dcm"):
            continue
        header, _ = read_header(uri)
        sop = str(header.SOPInstanceUID)
        uuids[sop] = validate_uuid(uri.rsplit("/", 1)[-1][: -len(".dcm")])
        if md5:
            hashes[sop] = md5
        instances.append((uri, header))
    if not instances:
        return FolderFailure(
            failure_uuid(series.series_instance_uid),
            series.series_instance_uid,
            SlideError(
                ReasonCode.READ_ERROR, f"no instances under {series_prefix(series, bucket)}"
            ),
        )
    return record_from_headers(
        series.series_instance_uid,
        instances,
        rule,
        instance_uuids=uuids,
        instance_hashes=hashes,
        collection=series.collection_id,
        idc_version=idc_version or index_version(),
        sparse_ok=sparse_ok,
        source_license=series.license_short_name,
        source_doi=series.source_doi,
    )


def series_record(
    series: IdcSeries, bucket: str, idc_version: str | None, rule: LevelRule, sparse_ok: bool
) -> SlideRecord | FolderFailure:
    """`resolve_series`, with any error reading the series' headers as its failure."""
    try:
        return resolve_series(series, bucket, idc_version, rule, sparse_ok)
    except Exception as exc:  # one unreadable series must not stop the run
        return unreadable_series(series.series_instance_uid, exc)


def with_dicomweb(record: SlideRecord, base_url: str) -> SlideRecord:
    """The same record read through a DICOMweb store (e.g. IDC's) instead of its files."""
    files = tuple(
        (
            sop,
            instance_url(base_url, record.study_instance_uid, record.series_instance_uid, sop),
        )
        for sop, _ in record.files
    )
    return dataclasses.replace(record, files=files, dicomweb_url=base_url.rstrip("/"))
