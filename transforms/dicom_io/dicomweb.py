"""DICOMweb: list a store's slides (QIDO-RS) and read their pixels through ez-wsi-dicomweb.

Works with Google Cloud Healthcare API stores (IDC's, with Application Default Credentials) and
generic servers without auth (Orthanc + DICOMweb plugin in the tests). Slides are built from
WADO-RS series metadata (`/studies/{s}/series/{se}/metadata`), not from ez-wsi's QIDO instance
query: Orthanc's QIDO and metadata omit TransferSyntaxUID, which ez-wsi needs, so a missing
one is learned from the Content-Type of one frame request per instance.

Frames are fetched in batches: before a region is assembled, every frame it needs is loaded
into ez-wsi's frame cache with one WADO-RS request per instance (`frames/1,2,3...`, up to 400
per request in ez-wsi). Orthanc re-reads the whole file for each frame request, so one frame per
request would be slow. Frames per request and bytes are logged and counted.

A slide's instances are addressed by their WADO-RS URLs,
`{base}/studies/{study}/series/{series}/instances/{sop}`, which is what `SlideRecord.files` holds
for this source.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import pydicom
import requests
from ez_wsi_dicomweb import (
    credential_factory,
    dicom_slide,
    dicom_web_interface,
    ez_wsi_errors,
    ez_wsi_logging_factory,
    local_dicom_slide_cache_types,
)
from ez_wsi_dicomweb.ml_toolkit import dicom_path
from requests_toolbelt.multipart import decoder

from transforms import metrics, urls
from transforms.dicom_io import retry
from transforms.dicom_io.byte_ranges import level_frames_by_instance, log_fetch
from transforms.dicom_io.frames import FrameGrid
from transforms.errors import SlideError
from transforms.records import validate_uid

_LOG = logging.getLogger(__name__)
_EZ_WSI_LOGGER = "ez_wsi_dicomweb.frame_cache"  # ez-wsi logs every cache fill at INFO
logging.getLogger(_EZ_WSI_LOGGER).setLevel(logging.WARNING)

QIDO_PAGE = 500
FRAME_CACHE_BYTES = 512 * 1024 * 1024
_INSTANCE_URL = re.compile(
    r"^(?P<base>https?://.+?)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)"
    r"/instances/(?P<sop>[0-9.]+)$"
)
_TRANSFER_SYNTAX_UID = "00020010"
_OPTICAL_PATH_SEQUENCE = "00480105"
_ICC_PROFILE = "00282000"


def is_instance_url(uri: str) -> bool:
    return bool(_INSTANCE_URL.fullmatch(uri))


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base.rstrip('/')}/studies/{study}/series/{series}/instances/{sop}"


def parse_instance_url(uri: str) -> tuple[str, str, str, str]:
    """(base URL, study, series, SOP instance UID) of a WADO-RS instance URL."""
    match = _INSTANCE_URL.fullmatch(uri)
    if not match:
        raise ValueError(f"{uri!r} is not a DICOMweb instance URL")
    return match["base"], match["study"], match["series"], match["sop"]


def credentials_for(base_url: str, auth: str = "auto"):
    """ez-wsi credential factory: `google` (Application Default Credentials) or `none`.
    `auto` uses Google credentials for https stores on a `.googleapis.com` host (dot
    boundary) and none elsewhere; `google` refuses any URL that is not https without
    user-info, so a token never travels in clear text. Which store a record may name at all
    is checked when it is enumerated (sources/enumeration.py, against source.dicomweb_url)."""
    if auth == "auto":
        auth = "google" if urls.google_credentials_allowed(base_url) else "none"
    if auth == "google":
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "https" or parts.username or parts.password:
            raise ValueError(
                f"Google credentials go only over https to the store's host, not to "
                f"{urls.redact_url(base_url)}"
            )
        return credential_factory.CredentialFactory()
    if auth == "none":
        return credential_factory.NoAuthCredentialsFactory()
    raise ValueError(f"unknown DICOMweb auth {auth!r} (auto, google, none)")


class DicomWebClient:
    """The few DICOMweb calls the sources need, with ez-wsi's credentials."""

    def __init__(self, base_url: str, auth: str = "auto"):
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.dwi = RetryingDicomWebInterface(credentials_for(self.base_url, auth))
        self._session = retry.http_session()

    def __getstate__(self):
        return {"base_url": self.base_url, "auth": self.auth}

    def __setstate__(self, state):
        self.__init__(state["base_url"], state["auth"])

    def _get(self, path: str, accept: str, **params: Any) -> requests.Response:
        headers = {"Accept": accept}
        self.dwi.credentials().apply(headers)
        url = f"{self.base_url}/{path}"
        try:
            response = self._session.get(url, headers=headers, params=params or None)
        except requests.RequestException as exc:  # retries spent (connection, timeout)
            raise retry.transient_http(f"DICOMweb GET {url}", exc) from exc
        return retry.raise_for_status(response, f"DICOMweb GET {url}")

    def search_series(self, modality: str = "SM", page: int = QIDO_PAGE) -> Iterator[dict]:
        """QIDO-RS series of a modality, paged with limit/offset, each series once.

        A server may return fewer rows than `limit` (its own page cap) with more to come, so
        paging stops only at an empty page. A server that ignores `offset` returns the same
        rows again: paging stops at a page with nothing new, with a warning, since the listing
        may then be incomplete. Rows without valid Study/Series UIDs are yielded as they are;
        `series_of` refuses them before any UID reaches a URL path.
        """
        offset, seen = 0, set()
        while True:
            response = self._get(
                "series", "application/dicom+json", Modality=modality, limit=page, offset=offset
            )
            found = response.json() if response.status_code != 204 and response.content else []
            if not isinstance(found, list) or not found:
                return
            new = 0
            for row in found:
                key = (
                    (_uid(row, "0020000D"), _uid(row, "0020000E"))
                    if isinstance(row, dict)
                    else None
                )
                if key is not None and key in seen:
                    continue
                if key is not None:
                    seen.add(key)
                    new += 1
                yield row
            if not new:
                _LOG.warning(
                    "DICOMweb %s returned the same series again at offset %d (it ignores "
                    "`offset`?): stopped listing after %d series; the listing may be incomplete",
                    urls.redact_url(self.base_url),
                    offset,
                    len(seen),
                )
                metrics.counter(metrics.QIDO_OFFSET_IGNORED).inc()
                return
            offset += len(found)

    def series_metadata(self, study: str, series: str) -> list[dict]:
        """WADO-RS metadata of every instance of a series (DICOM JSON)."""
        path = f"studies/{study}/series/{series}/metadata"
        return self._get(path, "application/dicom+json").json()

    def stored_transfer_syntax(self, study: str, series: str, sop: str) -> str:
        """The transfer syntax a server stores an instance in, from one untranscoded frame."""
        response = self._get(
            f"studies/{study}/series/{series}/instances/{sop}/frames/1",
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        )
        for part in decoder.MultipartDecoder.from_response(response).parts:
            content_type = part.headers.get(b"Content-Type", b"").decode()
            match = re.search(r"transfer-syntax=\"?([0-9.]+)", content_type)
            if match:
                return match.group(1)
            if "application/octet-stream" in content_type:
                return pydicom.uid.ExplicitVRLittleEndian
        raise ValueError(f"server did not say the transfer syntax of instance {sop}")

    def bulk_data(self, uri: str) -> bytes:
        """The value behind a BulkDataURI of this server, asked for as the standard's multipart
        response (PS3.18 8.7.3.5; Orthanc offers only that, ez-wsi asks for a single part)."""
        if not uri.startswith(self.base_url + "/"):
            raise ValueError(f"bulk data URI outside the store {self.base_url}: {uri}")
        response = self._get(
            uri.removeprefix(self.base_url + "/"),
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
        )
        if not response.headers.get("Content-Type", "").startswith("multipart/"):
            return response.content
        (part, *_) = decoder.MultipartDecoder.from_response(response).parts
        return part.content


def _uid(tags: dict, tag: str) -> str | None:
    value = tags.get(tag, {}).get("Value")
    return str(value[0]) if value else None


def series_of(qido_row: dict) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) of a QIDO-RS series result, both validated
    (they become URL path segments: `../` or `?` from a server must never get there)."""
    study, series = _uid(qido_row, "0020000D"), _uid(qido_row, "0020000E")
    if not (study and series):
        raise ValueError("QIDO result without Study/Series UIDs")
    return validate_uid(study), validate_uid(series)


def icc_profile_of(tags: dict) -> bytes | str | None:
    """An instance's ICC profile in DICOM JSON: bytes (inline), its BulkDataURI, or None."""
    for item in tags.get(_OPTICAL_PATH_SEQUENCE, {}).get("Value", []):
        icc = item.get(_ICC_PROFILE)
        if icc and "InlineBinary" in icc:
            return base64.b64decode(icc["InlineBinary"])
        if icc and "BulkDataURI" in icc:
            return icc["BulkDataURI"]
    return None


def metadata_dataset(tags: dict) -> pydicom.Dataset:
    """A pydicom header from DICOM JSON (bulk data such as ICC profiles left out)."""
    return pydicom.Dataset.from_json(tags, bulk_data_uri_handler=lambda *_: b"")


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


class RetryingDicomWebInterface(dicom_web_interface.DicomWebInterface):
    """ez-wsi's DICOMweb interface with this project's retry policy on its frame requests.

    ez-wsi sends frame requests with `requests.get` and no timeout, and its frame cache gives
    up on a failed batch silently; the two methods below are where all frame bytes of a
    slide come from, so they go through `retry.http_session()` instead. A batch that still
    fails is left to ez-wsi (it reads the frames again one by one); a single frame that still
    fails ends the read with `transient_http` (429/5xx/connection/timeout) or ez-wsi's HTTP
    error (404, ...: permanent, `read_error`).
    """

    _FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._session = retry.http_session()

    def _get_retrying(self, url: str, accept: str) -> requests.Response:
        headers = {"Accept": accept}
        self.credentials().apply(headers)
        try:
            response = self._session.get(url, headers=headers)
        except requests.RequestException as exc:
            raise retry.transient_http(f"DICOMweb GET {url}", exc) from exc
        try:
            return retry.raise_for_status(response, f"DICOMweb GET {url}")
        except requests.HTTPError as exc:
            ez_wsi_errors.raise_ez_wsi_http_exception(f"DICOMweb GET {url}", exc)

    def _get_download_instance_frame_list_untranscoded_core_request(self, query: str):
        try:
            return self._get_retrying(query, self._FRAMES_ACCEPT)
        except SlideError as exc:  # ez-wsi's cache thread catches only its own errors
            raise ez_wsi_errors.HttpError(str(exc)) from exc

    def download_instance(
        self, instance_path, transfer_syntax: str, output_stream, chunk_size=None, retry=True
    ) -> None:
        """A whole instance (ez-wsi's cache reads small instances so)."""
        accept = f"application/dicom; transfer-syntax={transfer_syntax}"
        try:
            output_stream.write(self._get_retrying(instance_path.complete_url, accept).content)
        except SlideError as exc:  # ez-wsi's cache thread catches only its own errors
            raise ez_wsi_errors.HttpError(str(exc)) from exc

    def get_frame_image(self, instance_path, frame_index: int, transcode_frame) -> bytes:
        url = self._make_api_url(instance_path, f"frames/{frame_index}")
        accept = (
            'multipart/related; type="application/octet-stream"; '
            f"transfer-syntax={transcode_frame.value}"
        )
        response = self._get_retrying(url, accept)
        parts = decoder.MultipartDecoder.from_response(response).parts
        if len(parts) != 1:
            raise ez_wsi_errors.HttpError(f"{url}: {len(parts)} parts, expected one frame")
        return parts[0].content


class BatchedDicomSlide(dicom_slide.DicomSlide):
    """ez-wsi DicomSlide that loads the frames a chunk or region needs in batched WADO-RS
    requests (`frames/1,2,...`) into its frame cache before they are decoded one by one.
    Its ICC profile comes from the series metadata already fetched (`icc_profile`)."""

    icc_profile: bytes | str | None = None  # icc_profile_of(); a URI is fetched when first used
    client: DicomWebClient | None = None

    def get_icc_profile_bytes(self) -> bytes:
        cached = self._level_map.get_cached_icc_profile_bytes()
        if cached is None:
            cached = self.icc_profile or b""
            if isinstance(cached, str):
                cached = self.client.bulk_data(cached)
            self._level_map.set_icc_profile_bytes(cached)
        return cached

    def _prefetch(self, by_instance: dict[str, list[int]], what: str) -> None:
        cache = self.slide_frame_cache
        stats = cache._cache_stats  # ez-wsi keeps its counters there
        before = (
            stats.number_of_frame_blocks_read,
            stats.number_of_frames_read_in_frame_blocks,
            stats.number_of_frame_bytes_read_in_frame_blocks,
        )
        # Not preload_patches_in_frame_cache: it calls get_patch, i.e. this class again.
        cache.preload_instance_frame_numbers(by_instance)
        cache.block_until_frames_are_loaded()
        requests_ = stats.number_of_frame_blocks_read - before[0]
        frames = stats.number_of_frames_read_in_frame_blocks - before[1]
        bytes_ = stats.number_of_frame_bytes_read_in_frame_blocks - before[2]
        if requests_:
            metrics.counter(metrics.PIXEL_SOURCE_REQUESTS).inc(requests_)
            metrics.counter(metrics.PIXEL_FRAMES_READ).inc(frames)
            metrics.counter(metrics.PIXEL_SOURCE_BYTES_READ).inc(bytes_)
        log_fetch(
            what, str(self.path), frames, requests_, bytes_,
            (stats.number_of_frame_bytes_read_in_frame_blocks, stats.number_of_frame_blocks_read),
        )  # fmt: skip

    def prefetch_frames(self, level, frame_numbers) -> None:
        self._prefetch(level_frames_by_instance(level, frame_numbers), "DICOMweb frames of")

    def get_patch(self, level, x, y, width, height, require_fully_in_source_image=False):
        frames = FrameGrid.of(level).region_numbers(x, y, width, height)
        what = f"DICOMweb frames for a {width}x{height} region of"
        self._prefetch(level_frames_by_instance(level, frames), what)
        return super().get_patch(level, x, y, width, height, require_fully_in_source_image)


def open_dicomweb_slide(uris: Sequence[str], auth: str = "auto") -> BatchedDicomSlide:
    """The slide made of these WADO-RS instance URLs (one series), frame cache ready."""
    parsed = [parse_instance_url(u) for u in uris]
    bases = {(b, st, se) for b, st, se, _ in parsed}
    if len(bases) != 1:
        raise ValueError(f"instances of one slide span several series or servers: {bases}")
    ((base, study, series),) = bases
    wanted = {sop for *_, sop in parsed}
    client = DicomWebClient(base, auth)
    series_path = dicom_path.FromString(f"{base}/studies/{study}/series/{series}")
    instances, icc_profile = [], None
    for tags in client.series_metadata(study, series):
        sop = _uid(tags, "00080018")
        if sop not in wanted:
            continue
        icc_profile = icc_profile or icc_profile_of(tags)
        if _TRANSFER_SYNTAX_UID not in tags:  # Orthanc: not in QIDO nor in metadata
            syntax = client.stored_transfer_syntax(study, series, sop)
            tags[_TRANSFER_SYNTAX_UID] = {"vr": "UI", "Value": [syntax]}
        instances.append(
            dicom_web_interface._build_dicom_object(dicom_path.Type.INSTANCE, series_path, tags)
        )
    missing = wanted - {i.sop_instance_uid for i in instances}
    if missing:
        raise ValueError(f"instances not in the store's series metadata: {sorted(missing)}")
    slide = BatchedDicomSlide(
        client.dwi,
        series_path,
        instances=instances,
        logging_factory=ez_wsi_logging_factory.BasePythonLoggerFactory(_EZ_WSI_LOGGER),
    )
    slide.icc_profile, slide.client = icc_profile, client
    cache = slide.init_slide_frame_cache(
        max_cache_frame_memory_lru_cache_size_bytes=FRAME_CACHE_BYTES,
        optimization_hint=local_dicom_slide_cache_types.CacheConfigOptimizationHint.MINIMIZE_DICOM_STORE_QPM,
    )
    # The cache makes its own plain DicomWebInterface from the credentials; give it ours.
    cache._dicom_web_interface = RetryingDicomWebInterface(client.dwi.credential_factory)
    return slide
