"""QIDO-RS paging against a real HTTP server on 127.0.0.1 that misbehaves as real servers do:
it caps pages below the requested limit, ignores `offset`, repeats series across pages, and
returns UIDs that are not UIDs (issue 15)."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from transforms.dicom_io import dicomweb
from transforms.levels import DEFAULT_RULE
from transforms.records import FolderFailure
from transforms.sources import dicomweb as dicomweb_source


def _row(study: str, series: str) -> dict:
    return {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
    }


@contextlib.contextmanager
def qido_server(rows: list[dict], cap: int, honour_offset: bool = True) -> Iterator[str]:
    requests_seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            requests_seen.append(query)
            offset = int(query.get("offset", 0)) if honour_offset else 0
            limit = min(int(query.get("limit", 100)), cap)
            body = json.dumps(rows[offset : offset + limit]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", requests_seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _listed(url: str) -> list[tuple[str, str]]:
    client = dicomweb.DicomWebClient(url, "none")
    return [dicomweb.series_of(r) for r in client.search_series("SM")]


def test_a_server_capping_pages_below_the_limit_is_listed_whole():
    rows = [_row("1.1", f"1.1.{n}") for n in range(1, 8)]
    with qido_server(rows, cap=3) as (url, seen):
        listed = _listed(url)
    assert listed == [("1.1", f"1.1.{n}") for n in range(1, 8)]
    assert [int(q["offset"]) for q in seen] == [0, 3, 6, 7]  # until an empty page


def test_a_server_ignoring_offset_ends_the_listing_instead_of_looping(caplog):
    rows = [_row("1.1", f"1.1.{n}") for n in range(1, 4)]
    with qido_server(rows, cap=500, honour_offset=False) as (url, seen):
        listed = _listed(url)
    assert listed == [("1.1", "1.1.1"), ("1.1", "1.1.2"), ("1.1", "1.1.3")]
    assert len(seen) == 2
    assert "ignores `offset`" in caplog.text


def test_series_repeated_across_pages_are_listed_once():
    rows = [_row("1.1", "1.1.1"), _row("1.1", "1.1.2"), _row("1.1", "1.1.2"), _row("1.1", "1.1.3")]
    with qido_server(rows, cap=2) as (url, _):
        assert _listed(url) == [("1.1", "1.1.1"), ("1.1", "1.1.2"), ("1.1", "1.1.3")]


@pytest.mark.parametrize("bad", ["1.2/../../admin", "1.2?x=1", "1.2.3\n"])
def test_uids_from_qido_are_validated_before_any_url_path(bad):
    rows = [_row("1.1", "1.1.1"), _row("1.1", bad)]
    with qido_server(rows, cap=500) as (url, seen):
        found = list(dicomweb_source.list_series(url, "none", None))
        (failure,) = [f for f in found if isinstance(f, FolderFailure)]
        assert failure.error.reason.value == "read_error"
        # the bad row's series is not requested: the failure passes through the next step
        records = dicomweb_source.series_records(failure, url, "none", DEFAULT_RULE)
        assert list(records) == [failure]
    assert found[0] == ("1.1", "1.1.1")
    assert all("admin" not in json.dumps(q) for q in seen)
