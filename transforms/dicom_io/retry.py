"""Retries for remote reads: one policy for DICOMweb, HTTP(S) byte ranges and GCS.

Transient faults (HTTP 429, 500, 502, 503, 504, refused or reset connections, timeouts) are
retried with exponential backoff, a bounded number of times; permanent ones (404, 403, a frame
that does not decode) are not. Every request has a connect and a read timeout. When the retries
are spent the slide fails with `transient_http`, and a rerun of the failures picks it up.

The retrying itself is the ecosystem's: urllib3 `Retry` on a requests `Session` (DICOMweb,
HTTP(S) files' metadata) and google-api-core `Retry` for google-cloud-storage. The frame range
reads of bucket and HTTP(S) files go through `range_get`, which applies these constants itself
(a requests Session cost 2-4 ms of CPU per range there, see range_get). Not for credentials:
they come from Application Default Credentials or the environment and never pass through here.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from transforms.errors import ReasonCode, SlideError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
RETRIES = 4  # attempts after the first, per request
BACKOFF_SECONDS = 0.5  # sleeps 0, 1, 2, 4 s between attempts (urllib3: factor * 2 ** (n - 1))
MAX_BACKOFF_SECONDS = 20.0
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 120.0
GCS_DEADLINE_SECONDS = 120.0  # google-api-core bounds GCS retries by total time


def url_retry(retries: int | None = None, backoff: float | None = None) -> Retry:
    """urllib3 Retry for idempotent reads: transient statuses and connection faults only."""
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_SECONDS if backoff is None else backoff
    return Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        backoff_factor=backoff,
        backoff_max=MAX_BACKOFF_SECONDS,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=True,
        raise_on_status=False,  # hand back the last response, so its status is reported
    )


class _TimeoutAdapter(HTTPAdapter):
    """An adapter that gives every request (connect, read) timeouts unless one is passed."""

    def __init__(self, timeout: tuple[float, float], **kwargs: Any):
        self._timeout = timeout
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def http_session(
    retries: int | None = None,
    backoff: float | None = None,
    timeout: tuple[float, float] | None = None,
    pool_size: int | None = None,
) -> requests.Session:
    """A requests Session that retries transient faults and never waits without a timeout
    (defaults: the module's constants, read when the session is made); `pool_size`: the
    connections kept per host (requests' default 10), for sessions used by more threads."""
    timeout = timeout or (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)
    session = requests.Session()
    pool = {} if pool_size is None else {"pool_maxsize": pool_size}
    adapter = _TimeoutAdapter(timeout, max_retries=url_retry(retries, backoff), **pool)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def gcs_retry():
    """google-api-core Retry for google-cloud-storage reads: its transient errors, bounded."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(GCS_DEADLINE_SECONDS)


def is_transient(exc: BaseException) -> bool:
    """True for faults a later attempt may not see: 429/5xx, connection faults, timeouts."""
    if isinstance(exc, SlideError):
        return exc.reason == ReasonCode.TRANSIENT_HTTP
    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and exc.response.status_code in RETRY_STATUS
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True  # includes urllib3's MaxRetryError once connection retries are spent
    try:
        from google.api_core import exceptions as google_exceptions
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, google_exceptions.RetryError):
        return True
    if isinstance(exc, google_exceptions.GoogleAPICallError):
        return exc.code in RETRY_STATUS
    return False


def transient_http(what: str, exc: BaseException) -> SlideError:
    """The slide failure for a transient fault that outlasted its retries."""
    return SlideError(
        ReasonCode.TRANSIENT_HTTP,
        f"{what}: {_describe(exc)} (after {RETRIES} retries with backoff; rerun the failures)",
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason} from {exc.response.url}"
    return f"{type(exc).__name__}: {exc}"


def raise_for_status(response: requests.Response, what: str) -> requests.Response:
    """The response, or SlideError(transient_http) for a transient status that outlasted its
    retries, or requests.HTTPError for a permanent one (404, 403, ...)."""
    try:
        response.raise_for_status()
    except requests.HTTPError as exc:
        if is_transient(exc):
            raise transient_http(what, exc) from exc
        raise
    return response
