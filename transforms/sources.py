"""Slide sources as Beam transforms, and the filter that skips done or unrequested slides.

`EnumerateSlides` is the DAG's Enumerate step for every source kind (source.kind):

- dicom_folder: WSI files under a folder, gs:// or s3:// prefix (headers by range reads);
  pixels from the same files.
- manifest: the slide records of a JSONL/CSV manifest (transforms/manifest.py).
- idc_index: SM series of the offline idc-index-data index, resolved by reading their headers
  from the IDC bucket; pixels from the bucket or a DICOMweb store.
- bigquery: scripts/bigquery/idc_slides.sql over `dicom_all` of a pinned release; pixels from
  gcs_url, aws_url or a DICOMweb store.
- dicomweb: QIDO-RS series with Modality SM, levels from WADO-RS series metadata; pixels from
  the same store.

Every kind yields SlideRecords (main output) and FolderFailures ('failed'). Listing runs in one
element; per-series work (header or metadata reads) is spread out after a Reshuffle.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import artifacts, urls
from transforms.slides import FolderFailure, SlideRecord, enumerate_dicom_folder, validate_uid

_LOG = logging.getLogger(__name__)


def _tagged(
    item,
    uuids: frozenset[str],
    dicomweb_auth: str,
    dicomweb_url: str | None = None,
    manifest: bool = False,
) -> Iterator[object]:
    """A found slide on the main output (its DICOMweb reads set to authenticate as
    source.dicomweb_auth says), a failure on 'failed' (unless other slides were asked for);
    counted either way. A slide whose URLs the source configuration does not allow (see
    `bound_to_source`) becomes an `untrusted_url` failure."""
    Metrics.counter("pathembed", "slides_found").inc()
    if not isinstance(item, FolderFailure):
        try:
            item = bound_to_source(item, dicomweb_auth, dicomweb_url, manifest)
        except ValueError as exc:
            from transforms.errors import ReasonCode, SlideError

            item = FolderFailure(
                item.instance_uuid, item.series_instance_uid,
                SlideError(ReasonCode.UNTRUSTED_URL, str(exc)),
            )  # fmt: skip
    if not isinstance(item, FolderFailure):
        yield item
    elif not uuids or item.instance_uuid in uuids:
        Metrics.counter("pathembed", "enumerate_failures").inc()
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
    from transforms.dicomweb import is_instance_url, parse_instance_url

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


def _dicomweb_series(
    base_url: str, auth: str, limit: int | None
) -> Iterator[tuple[str, str] | FolderFailure]:
    """(study, series) of every SM series the store lists; a row whose UIDs are not valid
    becomes a failure (they would otherwise reach URL paths)."""
    from transforms.dicomweb import DicomWebClient, series_of
    from transforms.errors import ReasonCode, SlideError

    for n, row in enumerate(DicomWebClient(base_url, auth).search_series("SM")):
        if limit is not None and n >= limit:
            return
        try:
            yield series_of(row)
        except ValueError as exc:
            yield FolderFailure(None, None, SlideError(ReasonCode.READ_ERROR, f"QIDO row: {exc}"))


def _series_failure(series_uid: str, exc: Exception) -> FolderFailure:
    """A series whose headers could not be read: a failure row, and the run goes on."""
    from transforms.errors import ReasonCode, SlideError
    from transforms.slides import local_instance_uuid

    try:
        fallback = local_instance_uuid(series_uid)
    except ValueError:
        fallback = local_instance_uuid("0")
    if isinstance(exc, SlideError):  # e.g. transient_http once the retries are spent
        error = SlideError(exc.reason, f"reading the series' headers: {exc.message}")
    else:
        error = SlideError(ReasonCode.READ_ERROR, f"reading the series' headers: {exc!r}")
    return FolderFailure(fallback, series_uid, error)


def _dicomweb_record(series: tuple[str, str], base_url: str, auth: str, levels: tuple):
    from transforms.dicomweb import DicomWebClient, instance_url, metadata_dataset
    from transforms.slides import VL_WSI_SOP_CLASS, record_from_headers

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
        yield _series_failure(series_uid, exc)
        return
    if not instances:
        return
    yield record_from_headers(series_uid, instances, *levels, dicomweb_url=base_url.rstrip("/"))


def _idc_record(series, bucket: str, version: str | None, levels: tuple):
    from transforms import idc

    try:
        return idc.resolve_series(series, bucket, version, *levels)
    except Exception as exc:  # one unreadable series must not stop the run
        return _series_failure(series.series_instance_uid, exc)


class EnumerateSlides(beam.PTransform):
    """source config -> SlideRecords (main) and FolderFailures ('failed'), any source kind."""

    def __init__(
        self,
        source,  # pipeline.config.SourceConfig
        target_spacing_mm: float,
        tolerance: float,
        mask_spacing_mm: float,
        uuids: frozenset[str] = frozenset(),
        idc_version: str | None = None,
    ):
        super().__init__()
        source.validate()
        self._source = source
        self._levels = (target_spacing_mm, tolerance, mask_spacing_mm)
        self._uuids = uuids
        self._idc_version = idc_version
        if source.kind == "bigquery":  # render (and validate) in the driver
            from transforms.idc import render_slides_query

            self._query = render_slides_query(
                source.bigquery_table, source.collections, sorted(uuids), source.limit,
                source.bigquery_mutable_table,
            )  # fmt: skip

    def expand(self, pbegin):
        src = self._source
        levels, limit = self._levels, self._source.limit
        if src.kind == "dicom_folder":
            found = (
                pbegin
                | "Folder" >> beam.Create([src.input])
                | "ReadHeaders" >> beam.FlatMap(
                    lambda folder: itertools.islice(enumerate_dicom_folder(folder, *levels), limit)
                )
            )  # fmt: skip
        elif src.kind == "manifest":
            from transforms.manifest import parse_manifest

            found = (
                pbegin
                | "Manifest" >> beam.Create([src.input])
                | "ReadManifest" >> beam.FlatMap(
                    lambda path: itertools.islice(parse_manifest(path), limit)
                )
            )  # fmt: skip
        elif src.kind == "idc_index":
            from transforms import idc

            series = idc.sm_series(src.collections, src.limit, src.sample)
            _LOG.info(
                "idc-index-data %s: %d SM series to resolve", idc.index_version(), len(series)
            )
            bucket = "s3://idc-open-data" if src.read_from == "aws" else src.idc_bucket
            version = self._idc_version or idc.index_version()
            found = (
                pbegin
                | "IdcIndexSeries" >> beam.Create(series)
                | "SpreadSeries" >> beam.Reshuffle()
                | "ReadSeriesHeaders" >> beam.Map(_idc_record, bucket, version, levels)
            )  # fmt: skip
        elif src.kind == "bigquery":
            from transforms import idc

            query, project = self._query, src.bigquery_project
            version = self._idc_version or idc.idc_version_of_table(src.bigquery_table)
            read_from = {"bucket": "gcs", "aws": "aws", "dicomweb": "dicomweb"}[src.read_from]
            found = pbegin | "Query" >> beam.Create([query]) | "RunQuery" >> beam.FlatMap(
                lambda q: idc.records_from_rows(
                    idc.run_slides_query(q, project), idc_version=version, read_from=read_from,
                    dicomweb_url=src.dicomweb_url, target_spacing_mm=levels[0],
                    tolerance=levels[1], mask_spacing_mm=levels[2],
                )
            )  # fmt: skip
        else:  # dicomweb
            url, auth = src.dicomweb_url, src.dicomweb_auth
            found = (
                pbegin
                | "Store" >> beam.Create([url])
                | "QidoSeries" >> beam.FlatMap(_dicomweb_series, auth, limit)
                | "SpreadSeries" >> beam.Reshuffle()
                | "SeriesMetadata" >> beam.FlatMap(_dicomweb_record, url, auth, levels)
            )
        if src.kind == "idc_index" and src.read_from == "dicomweb":
            from transforms.idc import with_dicomweb

            url = src.dicomweb_url
            found = found | "ReadThroughDicomWeb" >> beam.Map(
                lambda r: with_dicomweb(r, url) if isinstance(r, SlideRecord) else r
            )
        outputs = found | "Split" >> beam.FlatMap(
            _tagged, self._uuids, src.dicomweb_auth, src.dicomweb_url, src.kind == "manifest"
        ).with_outputs("failed", main="slides")
        if src.manifest_out:
            from transforms.manifest import format_rows

            csv_format = src.manifest_out.lower().endswith(".csv")
            out = src.manifest_out
            (
                outputs.slides
                | "ManifestKey" >> beam.Map(lambda r: (None, r))
                | "ManifestGroup" >> beam.GroupByKey()
                | "WriteManifest" >> beam.Map(
                    lambda kv: _write_text(out, format_rows(
                        sorted(kv[1], key=lambda r: r.series_instance_uid), csv_format
                    ))
                )
            )  # fmt: skip
        return outputs


def _write_text(path: str, text: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileSystems.create(path) as handle:
        handle.write(text.encode())
    _LOG.info("wrote manifest %s (%d lines)", path, text.count("\n"))


class SkipDoneOrUnrequested(beam.DoFn):
    """Keeps slides that were asked for and are not complete with these parameters.

    Complete: the completion marker is present, its parameter hash is this run's, its
    instance hash is the record's (when both are known), the run that wrote it finished
    (its tables hold the slide's rows), and the files it records are there with their recorded
    sizes (and SHA-256 checksums with `verify_checksums`). With `resource_table` (new-release
    mode) slides in that table with an unchanged instance hash are skipped without looking
    at their markers; the table is read once per worker, in `setup`.
    """

    def __init__(
        self,
        *,
        output_root: str,
        dataset_version: str,
        n_clusters: int,
        parameter_hash: str,
        uuids: frozenset[str],
        force: bool,
        resource_table: str | None = None,
        run_id: str | None = None,
        verify_checksums: bool = False,
    ):
        self._verify_checksums = verify_checksums
        self._root = output_root
        self._version = dataset_version
        self._n_clusters = n_clusters
        self._hash = parameter_hash
        self._uuids = uuids
        self._force = force
        self._resource_table = resource_table
        self._run_id = run_id
        self._known: dict[str, str | None] = {}
        self._committed: dict[str, bool] = {}
        self._skipped = Metrics.counter("pathembed", "slides_skipped_complete")
        self._to_process = Metrics.counter("pathembed", "slides_to_process")

    def setup(self) -> None:
        if self._resource_table:
            from transforms.reruns import known_instances

            self._known = known_instances(self._resource_table)
            _LOG.info("%d slides already in %s", len(self._known), self._resource_table)

    def _run_committed(self, run_id: str | None) -> bool:
        if run_id not in self._committed:
            self._committed[run_id] = artifacts.run_committed(self._root, run_id)
        return self._committed[run_id]

    def process(self, record: SlideRecord) -> Iterator[SlideRecord]:
        if self._uuids and record.instance_uuid not in self._uuids:
            return
        if self._resource_table:
            from transforms.reruns import is_unchanged

            if is_unchanged(self._known, record.instance_uuid, record.instance_hash):
                self._skipped.inc()
                return
        if not self._force:
            paths = artifacts.ArtifactPaths.for_slide(
                self._root, record.instance_uuid, self._version, self._n_clusters
            )
            marker = artifacts.completion_marker(paths)
            if (
                marker is not None
                and marker.get("parameter_hash") == self._hash
                and (
                    record.instance_hash is None
                    or marker.get("instance_hash") in (None, record.instance_hash)
                )
                and self._run_committed(marker.get("run_id"))
            ):
                # The marker vouches for the files only if they are still the ones it recorded.
                problem = artifacts.marker_problem(paths, marker, self._verify_checksums)
                if problem is None:
                    self._skipped.inc()
                    return
                _LOG.warning("slide %s is redone: %s", record.instance_uuid, problem)
        self._to_process.inc()
        if self._run_id:
            from transforms import breaker

            breaker.note_tried(self._run_id)
        yield record
