"""Remote listing and byte-range reads against a real S3-like HTTP server on 127.0.0.1 (issue
15): objects that cannot be read become failure rows of their series, listings and bodies are
retried, crafted headers are bounded."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from transforms.dicom_io import byte_ranges, retry
from transforms.errors import SlideError
from transforms.records import FolderFailure, SlideRecord
from transforms.sources import manifest
from transforms.sources.dicom_files import enumerate_dicom_folder

BUCKET = "idc-like"


class S3Like:
    """Objects from a local folder; per key a status to answer with, or a number of bodies
    to cut short; the listing can answer 503 a number of times first."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.status: dict[str, int] = {}
        self.cut_bodies: dict[str, int] = {}
        self.list_failures = 0
        self.requests: list[str] = []


@contextlib.contextmanager
def s3_server(state: S3Like, monkeypatch) -> Iterator[None]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _key(self) -> str:
            path = urllib.parse.urlsplit(self.path).path
            return urllib.parse.unquote(path.removeprefix(f"/{BUCKET}/"))

        def _answer(self, status: int, body: bytes = b"", headers: dict | None = None):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            state.requests.append(f"{self.command} {self.path}")
            url = urllib.parse.urlsplit(self.path)
            if url.path == f"/{BUCKET}/":
                if state.list_failures:
                    state.list_failures -= 1
                    return self._answer(503, b"<Error><Code>SlowDown</Code></Error>")
                prefix = dict(urllib.parse.parse_qsl(url.query)).get("prefix", "")
                keys = sorted(
                    str(p.relative_to(state.folder)) for p in state.folder.rglob("*") if p.is_file()
                )
                items = "".join(
                    f"<Contents><Key>{k}</Key></Contents>" for k in keys if k.startswith(prefix)
                )
                xml = (
                    '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    f"{items}<IsTruncated>false</IsTruncated></ListBucketResult>"
                )
                return self._answer(200, xml.encode())
            key = self._key()
            if key in state.status:
                return self._answer(state.status[key])
            path = state.folder / key
            if not path.is_file():
                return self._answer(404)
            data = path.read_bytes()
            if self.command == "HEAD":
                return self._answer(200, data)
            start, end = 0, len(data) - 1
            if "Range" in self.headers:
                first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                start, end = int(first), min(int(last), len(data) - 1)
            body = data[start : end + 1]
            if state.cut_bodies.get(key):
                state.cut_bodies[key] -= 1
                self.send_response(206)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._answer(206, body, {"Content-Range": f"bytes {start}-{end}/{len(data)}"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(byte_ranges, "S3_ENDPOINT", base + "/{bucket}/{key}")
    monkeypatch.setattr(byte_ranges, "_S3_LIST", base + "/{bucket}/")
    monkeypatch.setattr(retry, "BACKOFF_SECONDS", 0.0)
    byte_ranges._list_session.cache_clear()
    try:
        yield
    finally:
        byte_ranges._list_session.cache_clear()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def store(sample_slides, tmp_path) -> S3Like:
    """Two slides in IDC's layout: {series folder}/{instance}.dcm."""
    folder = tmp_path / "bucket"
    for name in ("small-40x", "medium-20x"):
        shutil.copytree(sample_slides / name, folder / name)
    return S3Like(folder)


def _levels(store: S3Like, slide: str) -> list[str]:
    return sorted(str(p.relative_to(store.folder)) for p in (store.folder / slide).glob("*.dcm"))


def test_a_forbidden_level_fails_its_series_instead_of_vanishing(store, monkeypatch):
    store.status[_levels(store, "small-40x")[1]] = 403
    with s3_server(store, monkeypatch):
        found = list(enumerate_dicom_folder(f"s3://{BUCKET}/"))
    records = [r for r in found if isinstance(r, SlideRecord)]
    failures = [f for f in found if isinstance(f, FolderFailure)]
    assert len(records) == 1 and len(failures) == 1
    assert failures[0].error.reason.value == "read_error"
    assert failures[0].series_instance_uid is not None and failures[0].instance_uuid
    assert "403" in failures[0].error.message


def test_a_whole_unreadable_slide_is_a_failure_row(store, monkeypatch):
    for key in _levels(store, "medium-20x"):
        store.status[key] = 404
    with s3_server(store, monkeypatch):
        found = list(enumerate_dicom_folder(f"s3://{BUCKET}/"))
    (failure,) = [f for f in found if isinstance(f, FolderFailure)]
    assert failure.error.reason.value == "read_error" and "medium-20x" in failure.error.message
    assert len([r for r in found if isinstance(r, SlideRecord)]) == 1


def test_a_transient_error_after_retries_fails_the_series_not_the_enumeration(store, monkeypatch):
    monkeypatch.setattr(retry, "RETRIES", 1)
    store.status[_levels(store, "small-40x")[0]] = 503
    with s3_server(store, monkeypatch):
        found = list(enumerate_dicom_folder(f"s3://{BUCKET}/"))
    (failure,) = [f for f in found if isinstance(f, FolderFailure)]
    assert failure.error.reason.value == "transient_http"
    assert len([r for r in found if isinstance(r, SlideRecord)]) == 1


def test_s3_listing_is_retried(store, monkeypatch):
    store.list_failures = 2
    with s3_server(store, monkeypatch):
        uris = byte_ranges.list_uris(f"s3://{BUCKET}/")
    assert len(uris) == len(_levels(store, "small-40x")) + len(_levels(store, "medium-20x"))


def test_a_body_cut_short_is_read_again(store, monkeypatch):
    key = _levels(store, "small-40x")[2]
    data = (store.folder / key).read_bytes()
    store.cut_bodies[key] = 2
    with s3_server(store, monkeypatch):
        source = byte_ranges.open_source(f"s3://{BUCKET}/{key}")
        assert source.read(0, 4096) == data[:4096]
    assert store.cut_bodies[key] == 0


def test_crafted_number_of_frames_is_refused_before_allocating(store, monkeypatch):
    key = _levels(store, "small-40x")[2]
    path = store.folder / key
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2**31 - 1
    ds.save_as(path)
    with s3_server(store, monkeypatch):
        reader = byte_ranges.DicomInstanceReader(f"s3://{BUCKET}/{key}")
        with pytest.raises(SlideError, match="oversized_header"):
            reader.frame_bytes(1)


def test_a_header_without_pixel_data_is_not_read_whole(tmp_path, monkeypatch):
    big = tmp_path / "bucket" / "annotations" / "huge.dcm"
    big.parent.mkdir(parents=True)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.91.1"  # annotations
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    # a large private element and no PixelData
    ds.add_new(0x00091001, "OB", b"\0" * (3 * 1024 * 1024))
    ds.save_as(big, enforce_file_format=True)
    state = S3Like(tmp_path / "bucket")
    with s3_server(state, monkeypatch), pytest.raises(SlideError, match="oversized_header"):
        byte_ranges.read_header_from(
            byte_ranges.open_source(f"s3://{BUCKET}/annotations/huge.dcm"), limit=256 * 1024
        )
    gets = [r for r in state.requests if r.startswith("GET")]
    assert len(gets) <= 3  # 64 + 128 + 64 KiB (doubling, up to the limit), then refused


def test_a_large_header_is_read_in_few_requests(store, monkeypatch):
    key = _levels(store, "small-40x")[1]
    path = store.folder / key
    ds = pydicom.dcmread(path)
    ds.add_new(0x00091001, "OB", b"\1" * (2 * 1024 * 1024))  # e.g. a large ICC profile
    ds.save_as(path)
    with s3_server(store, monkeypatch):
        header, pixel_data_at = byte_ranges.read_header(f"s3://{BUCKET}/{key}")
    assert header.SOPInstanceUID == ds.SOPInstanceUID and pixel_data_at > 2 * 1024 * 1024
    gets = [r for r in store.requests if r.startswith("GET")]
    assert len(gets) <= 7  # 64 KiB blocks, doubling: not 2 MiB / 64 KiB = 32 requests


@pytest.mark.parametrize("downsample", ["1e-9", "0", "-2", "nan", "inf", "1e6"])
def test_a_manifest_downsample_out_of_range_is_a_failure(sample_slides, tmp_path, downsample):
    (record,) = enumerate_dicom_folder(sample_slides / "small-40x")
    row = manifest.record_to_row(record)
    row["downsample"] = float(downsample)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (failure,) = manifest.parse_manifest(str(path))
    assert isinstance(failure, FolderFailure)
    assert failure.error.reason.value == "malformed_manifest_row"
