"""Enumerate: every source kind as one Beam transform, picked from a table by source.kind.

- dicom_folder: WSI files under a folder, gs:// or s3:// prefix (headers by range reads);
  pixels from the same files (sources/dicom_files.py).
- manifest: the slide records of a JSONL/CSV manifest (sources/manifest.py).
- idc_index: SM series of the offline idc-index-data index, resolved by reading their headers
  from the IDC bucket; pixels from the bucket or a DICOMweb store (sources/idc.py).
- bigquery: transforms/sql/idc_slides.sql over `dicom_all` of a pinned release; pixels from
  gcs_url, aws_url or a DICOMweb store (sources/idc.py).
- dicomweb: QIDO-RS series with Modality SM, levels from WADO-RS series metadata; pixels from
  the same store (sources/dicomweb.py).

Every kind yields SlideRecords (main output) and FolderFailures ('failed'). Listing runs in one
element; per-series work (header or metadata reads) is spread out after a Reshuffle.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms import bigquery, metrics, urls
from transforms.dicom_io.dicomweb import is_instance_url, parse_instance_url
from transforms.errors import ReasonCode, SlideError
from transforms.levels import LevelRule
from transforms.records import FolderFailure, SlideRecord, requested_keys
from transforms.sources import dicomweb, idc
from transforms.sources.dicom_files import enumerate_dicom_folder
from transforms.sources.manifest import format_rows, parse_manifest
from transforms.urls import is_remote

_LOG = logging.getLogger(__name__)


def _tagged(
    item,
    uuids: frozenset[str],
    dicomweb_auth: str,
    dicomweb_url: str | None = None,
    manifest: bool = False,
) -> Iterator[object]:
    """A found slide on the main output (its DICOMweb reads set to authenticate as
    source.dicomweb_auth says), a failure on 'failed'; counted either way. A slide whose URLs
    the source configuration does not allow (see `bound_to_source`) becomes an
    `untrusted_url` failure.

    When slides were asked for (`uuids`, e.g. a rerun of a failures table), only those pass,
    slides and failures alike, matched by their UUID or by any UUID an earlier failure row of
    the same series carried (`records.requested`): a slide that failed at enumeration and
    enumerates now is processed, one that fails again gets a new failure row. The asked-for
    UUIDs found are counted (REQUESTED_FOUND), so the summary can say how many were not."""
    metrics.counter(metrics.SLIDES_FOUND).inc()
    if not isinstance(item, FolderFailure):
        try:
            item = bound_to_source(item, dicomweb_auth, dicomweb_url, manifest)
        except ValueError as exc:
            item = FolderFailure(
                item.instance_uuid, item.series_instance_uid,
                SlideError(ReasonCode.UNTRUSTED_URL, str(exc)), item.failure_keys,
            )  # fmt: skip
    if uuids:
        found = requested_keys(item, uuids)
        if not found:
            return
        metrics.counter(metrics.REQUESTED_FOUND).inc(len(found))
    if not isinstance(item, FolderFailure):
        yield item
    else:
        metrics.counter(metrics.ENUMERATE_FAILURES).inc()
        yield beam.pvalue.TaggedOutput("failed", item)


def bound_to_source(
    record: SlideRecord, auth: str, dicomweb_url: str | None, manifest: bool
) -> SlideRecord:
    """The record with the source's DICOMweb auth mode, or ValueError when it names URLs the
    source configuration does not allow.

    Credentials are bound to the configured store: a record whose WADO-RS URLs lie elsewhere
    (a manifest row naming its own `dicomweb_url`) is refused when a store is configured and
    read without credentials when none is; `none` means none for every record, with or
    without a `dicomweb_url`. Manifest `files` must be local paths, gs://, s3:// or https://
    objects, or instance URLs under the configured store (transforms.urls.check_manifest_uri).
    """
    if manifest:
        for _, uri in record.files:
            urls.check_manifest_uri(uri, dicomweb_url, is_instance_url)
    bases = {parse_instance_url(uri)[0] for _, uri in record.files if is_instance_url(uri)}
    if record.dicomweb_url:
        bases.add(record.dicomweb_url.rstrip("/"))
    mode = auth if bases else record.dicomweb_auth  # no DICOMweb URL: the mode is unused
    if bases:
        store = dicomweb_url.rstrip("/") if dicomweb_url else None
        if store is not None and bases != {store}:
            shown = ", ".join(sorted(urls.redact_url(b) for b in bases))
            raise ValueError(f"DICOMweb store {shown} is not the configured store")
        if store is None:
            mode = "none"  # no store configured: nobody's credentials go to a row's host
    if auth == "none":
        mode = "none"
    if mode != record.dicomweb_auth:
        record = dataclasses.replace(record, dicomweb_auth=mode)
    return record


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every source kind is given besides its config: the level rule, the slides asked
    for, the IDC release to record, and (bigquery) the query rendered in the driver."""

    rule: LevelRule
    uuids: frozenset[str]
    idc_version: str | None
    query: bigquery.Query | None


def _folder(pbegin, src, run: _Run):
    return (
        pbegin
        | "Folder" >> beam.Create([src.input])
        | "ReadHeaders" >> beam.FlatMap(
            lambda folder: itertools.islice(enumerate_dicom_folder(folder, run.rule), src.limit)
        )
    )  # fmt: skip


def _manifest(pbegin, src, run: _Run):
    return (
        pbegin
        | "Manifest" >> beam.Create([src.input])
        | "ReadManifest" >> beam.FlatMap(
            lambda path: itertools.islice(parse_manifest(path), src.limit)
        )
    )  # fmt: skip


def _idc_index(pbegin, src, run: _Run):
    series = idc.sm_series(src.collections, src.limit, src.sample)
    _LOG.info("idc-index-data %s: %d SM series to resolve", idc.index_version(), len(series))
    bucket = idc.DEFAULT_BUCKET if src.read_from == "aws" else src.idc_bucket
    version = run.idc_version or idc.index_version()
    found = (
        pbegin
        | "IdcIndexSeries" >> beam.Create(series)
        | "SpreadSeries" >> beam.Reshuffle()
        | "ReadSeriesHeaders"
        >> beam.Map(
            # DICOMweb reads place frames by index: TILED_SPARSE levels are refused then.
            idc.series_record,
            bucket,
            version,
            run.rule,
            src.read_from != "dicomweb",
        )
    )
    if src.read_from != "dicomweb":
        return found
    url = src.dicomweb_url
    return found | "ReadThroughDicomWeb" >> beam.Map(
        lambda r: idc.with_dicomweb(r, url) if isinstance(r, SlideRecord) else r
    )


def _bigquery(pbegin, src, run: _Run):
    version = run.idc_version or idc.idc_version_of_table(src.bigquery_table)
    read_from = {"bucket": "gcs", "aws": "aws", "dicomweb": "dicomweb"}[src.read_from]
    return pbegin | "Query" >> beam.Create([run.query]) | "RunQuery" >> beam.FlatMap(
        lambda q: idc.records_from_rows(
            bigquery.query_rows(q, src.bigquery_project), idc_version=version,
            read_from=read_from, dicomweb_url=src.dicomweb_url, rule=run.rule,
        )
    )  # fmt: skip


def _dicomweb(pbegin, src, run: _Run):
    url, auth = src.dicomweb_url, src.dicomweb_auth
    return (
        pbegin
        | "Store" >> beam.Create([url])
        | "QidoSeries" >> beam.FlatMap(dicomweb.list_series, auth, src.limit)
        | "SpreadSeries" >> beam.Reshuffle()
        | "SeriesMetadata" >> beam.FlatMap(dicomweb.series_records, url, auth, run.rule)
    )


SOURCES = {
    "dicom_folder": _folder,
    "manifest": _manifest,
    "idc_index": _idc_index,
    "bigquery": _bigquery,
    "dicomweb": _dicomweb,
}


class EnumerateSlides(beam.PTransform):
    """source config -> SlideRecords (main) and FolderFailures ('failed'), any source kind."""

    def __init__(
        self,
        source,  # pipeline.config.SourceConfig
        rule: LevelRule,
        uuids: frozenset[str] = frozenset(),
        idc_version: str | None = None,
    ):
        super().__init__()
        source.validate()
        query = None
        if source.kind == "bigquery":  # render (and validate) in the driver
            query = idc.render_slides_query(
                source.bigquery_table, source.collections, sorted(uuids), source.limit,
                source.bigquery_mutable_table,
            )  # fmt: skip
        self._source = source
        self._run = _Run(rule, uuids, idc_version, query)

    def expand(self, pbegin):
        src = self._source
        found = SOURCES[src.kind](pbegin, src, self._run)
        outputs = found | "Split" >> beam.FlatMap(
            _tagged, self._run.uuids, src.dicomweb_auth, src.dicomweb_url, src.kind == "manifest"
        ).with_outputs("failed", main="slides")
        if src.manifest_out:
            _ = outputs.slides | "WriteManifest" >> _WriteManifest(src.manifest_out)
        return outputs


class _WriteManifest(beam.PTransform):
    """The enumerated slides as one .jsonl/.csv manifest file, sorted by series."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, slides):
        csv_format = self._path.lower().endswith(".csv")
        return (
            slides
            | "ManifestKey" >> beam.Map(lambda r: (None, r))
            | "ManifestGroup" >> beam.GroupByKey()
            | "Write" >> beam.Map(
                lambda kv: _write_text(self._path, format_rows(
                    sorted(kv[1], key=lambda r: r.series_instance_uid), csv_format
                ))
            )
        )  # fmt: skip


def _write_text(path: str, text: str) -> None:
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileSystems.create(path) as handle:
        handle.write(text.encode())
    _LOG.info("wrote manifest %s (%d lines)", path, text.count("\n"))
