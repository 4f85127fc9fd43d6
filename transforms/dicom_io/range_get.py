"""Range GETs for the frame fetch pool: kept-alive `http.client` connections, one per thread and
host, with the project's retry policy (retry.py).

Why not requests or google-cloud-storage for these reads: a worker's frame reads are many GETs
of ~100-500 KB, made by the fetch pool while the same process decodes frames. Measured against
gcp-storage-emulator on this project's 2-vCPU machine (160 KB ranges, 8 threads), a request
costs the process 2.3 ms of CPU through a requests Session, 1.6 ms through urllib3's pool and
0.4 ms here; through `Blob.download_as_bytes` (google-resumable-media on requests) a chunk's
reads cost the pipeline's reader 3.6 ms of CPU each, under the GIL that the decoders need to
hand their frames back. With those clients the bucket reader ran at half the local file's
patches/s even with no added latency (`scripts/bench.py --only remote` and docs/performance.md
"Remote reads"). Metadata (size, generation, ETag) still goes through google-cloud-storage and
requests: one request per instance. So do range reads behind an HTTP(S) proxy (HTTPS_PROXY and
the like, as requests reads them), which http.client does not speak to by itself. Certificates
are checked against certifi's bundle, as requests checks them, and redirects are followed (a
permanent one's address is kept for the next ranges).

The policy is retry.py's: transient statuses (429, 5xx), refused or reset connections, timeouts
(connect and read) and bodies cut short are retried with exponential backoff, RETRIES times;
then the slide fails with `transient_http`. A permanent status (403, 404, 416, ...) raises
OSError at once, and so does a server that ignores the Range header.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import threading
import time
import urllib.parse
import urllib.request

import certifi
import requests

from transforms import urls
from transforms.dicom_io import retry

_LOCAL = threading.local()  # {(scheme, host, port): HTTPConnection} of this thread
_TLS = ssl.create_default_context(cafile=certifi.where())
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5  # as many as a browser would follow, fewer than requests' 30


class PermanentHttpError(OSError):
    """A status that a retry will not change (403, 404, 416, ...)."""

    def __init__(self, status: int, reason: str, url: str):
        super().__init__(f"HTTP {status} {reason} from {urls.redact_url(url)}")
        self.status = status


def _forget_connections() -> None:
    global _LOCAL
    _LOCAL = threading.local()  # a forked child must not talk on its parent's sockets


os.register_at_fork(after_in_child=_forget_connections)


def _connection(parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
    key = (parts.scheme, parts.hostname, parts.port)
    connections = _LOCAL.__dict__.setdefault("connections", {})
    connection = connections.get(key)
    if connection is None:
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=_TLS)
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port)
        connections[key] = connection
    return connection


def _drop(parts: urllib.parse.SplitResult) -> None:
    connection = _LOCAL.__dict__.get("connections", {}).pop(
        (parts.scheme, parts.hostname, parts.port), None
    )
    if connection is not None:
        connection.close()


def proxied(parts: urllib.parse.SplitResult) -> bool:
    """Whether the environment sends requests to this host through a proxy."""
    proxies = urllib.request.getproxies_environment()
    if parts.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass_environment(parts.netloc, proxies)


@functools.cache
def _proxy_session() -> requests.Session:
    return retry.http_session(pool_size=32)  # room for every thread of the fetch pool


class RangeReader:
    """Range GETs of one resource (http or https): on this thread's kept-alive connection to
    its host, or through requests when the environment names a proxy for it."""

    def __init__(self, url: str):
        self._go_to(url)

    def _go_to(self, url: str) -> None:
        # One assignment: the fetch threads share this reader, and one that follows a
        # permanent redirect must never leave another with the new host and the old path.
        parts, target = _split(url)
        self._where = (url, parts, target, proxied(parts))  # proxied(): ~80 us, a request ~400

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the resource."""
        url, parts, target, through_proxy = self._where
        if through_proxy:
            return _through_requests(url, start, end)
        request_headers = {"Range": f"bytes={start}-{end - 1}"}
        attempt = redirects = 0
        while True:
            what = f"GET {urls.redact_url(url)} bytes {start}-{end - 1}"
            last = attempt == retry.RETRIES
            try:
                connection = _connection(parts)
                if connection.sock is None:  # connect within the connect timeout, then read's
                    connection.timeout = retry.CONNECT_TIMEOUT_SECONDS
                    connection.connect()
                    connection.sock.settimeout(retry.READ_TIMEOUT_SECONDS)
                connection.request("GET", target, headers=request_headers)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                _drop(parts)
                if last:
                    raise retry.transient_http(what, exc) from exc
                _sleep(attempt)
                attempt += 1
                continue
            if response.will_close:
                _drop(parts)
            status, location = response.status, response.getheader("Location")
            if status in _REDIRECTS and location and redirects < _MAX_REDIRECTS:
                redirects += 1
                url = urllib.parse.urljoin(url, location)
                parts, target = _split(url)
                if status in (301, 308):  # moved for good: the next ranges go there at once
                    self._go_to(url)
                if proxied(parts):
                    return _through_requests(url, start, end)
                continue
            if status in retry.RETRY_STATUS:
                if last:
                    raise retry.transient_http(what, OSError(f"HTTP {status} {response.reason}"))
                _sleep(attempt, response.getheader("Retry-After"))
                attempt += 1
                continue
            # (a body cut short raised http.client's IncompleteRead above)
            return _checked(url, start, end, status, response.reason, body)


def _split(url: str) -> tuple[urllib.parse.SplitResult, str]:
    """The URL's parts and its request target (path and query)."""
    parts = urllib.parse.urlsplit(url)
    return parts, parts.path + (f"?{parts.query}" if parts.query else "")


def _through_requests(url: str, start: int, end: int) -> bytes:
    """The same read through a requests Session (its proxies; urllib3 Retry on statuses and
    connections), the same checks on its answer."""
    what = f"GET {urls.redact_url(url)} bytes {start}-{end - 1}"
    try:
        response = _proxy_session().get(url, headers={"Range": f"bytes={start}-{end - 1}"})
    except requests.RequestException as exc:  # retries spent (connection, timeout)
        raise retry.transient_http(what, exc) from exc
    status = response.status_code
    if status in retry.RETRY_STATUS:
        raise retry.transient_http(what, OSError(f"HTTP {status} {response.reason}"))
    return _checked(url, start, end, status, response.reason, response.content)


def _checked(url: str, start: int, end: int, status: int, reason: str, body: bytes) -> bytes:
    """The body of a range answer, or OSError: a permanent status, or the whole resource when
    a range of it was asked for (a server that ignores Range)."""
    if status == 206 or (status == 200 and start == 0 and len(body) <= end):
        return body
    if status >= 400:
        raise PermanentHttpError(status, reason, url)
    raise OSError(f"{urls.redact_url(url)} ignored the Range header (HTTP {status})")


def _sleep(attempt: int, retry_after: str | None = None) -> None:
    """retry.py's backoff (0.5, 1, 2, 4 s by default), or the server's Retry-After seconds."""
    delay = min(retry.BACKOFF_SECONDS * 2**attempt, retry.MAX_BACKOFF_SECONDS)
    if retry_after is not None and retry_after.isdigit():
        delay = min(max(delay, float(retry_after)), retry.MAX_BACKOFF_SECONDS)
    time.sleep(delay)
