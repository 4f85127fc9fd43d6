"""Reruns and release updates: reading failures and resource tables back, the failed-share
threshold, the retry policy against a real local HTTP server, and `--only-new` end to end."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from pipeline import summary
from pipeline.cli import main
from pipeline.summary import failure_threshold_exceeded
from tests import bad_slides
from tests.bad_slides import TINY
from transforms import metrics, patches
from transforms.dicom_io import retry
from transforms.dicom_io.byte_ranges import HttpSource
from transforms.errors import SlideError
from transforms.outputs import layout
from transforms.outputs.reruns import (
    failed_slides,
    is_bigquery_table,
    is_unchanged,
    known_instances,
)
from transforms.records import local_instance_uuid, requested, requested_keys
from transforms.samples.slides import SampleSpec, write_slide
from transforms.sources import manifest
from transforms.sources.dicom_files import enumerate_dicom_folder
from transforms.sources.enumeration import _tagged
from transforms.stages import SkipDoneOrUnrequested

A = "6fa459ea-ee8a-3ca4-894e-db77e160355e"
B = "0d8e4f4c-9c1e-4b53-8a7e-2f0c5b0d9e11"


def _failures(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_failed_slides_are_the_distinct_valid_uuids_of_the_failure_rows(tmp_path):
    folder = tmp_path / "tables" / "failures"
    row = {"stage": "plan", "message": "m", "time": None}
    _failures(folder / "r1.parquet", [
        {**row, "instance_uuid": A, "run_id": "r1", "reason_code": "transient_http"},
        {**row, "instance_uuid": A, "run_id": "r1", "reason_code": "incomplete_slide"},
        {**row, "instance_uuid": None, "run_id": "r1", "reason_code": "malformed_manifest_row"},
        {**row, "instance_uuid": "../x", "run_id": "r1", "reason_code": "invalid_uuid"},
    ])  # fmt: skip
    _failures(folder / "r2.parquet", [
        {**row, "instance_uuid": B, "run_id": "r2", "reason_code": "no_tissue"},
    ])  # fmt: skip
    found = failed_slides(str(folder))
    assert found.uuids == tuple(sorted([A, B])) and found.rejected == ("../x",)
    assert failed_slides(str(folder), run_id="r2").uuids == (B,)
    assert failed_slides(str(folder), reasons=["transient_http"]).uuids == (A,)
    assert failed_slides(str(folder / "r2.parquet")).uuids == (B,)
    with pytest.raises(FileNotFoundError):
        failed_slides(str(tmp_path / "nowhere"))


def test_table_ids_are_told_from_paths_by_their_grammar(tmp_path):
    assert is_bigquery_table("my-project.pathembed.failures")
    assert not is_bigquery_table(str(tmp_path))
    assert not is_bigquery_table("out/tables/failures")
    assert not is_bigquery_table("p.d.t; DROP TABLE x")
    assert not is_bigquery_table("project.dataset.t`x")


def test_known_instances_and_unchanged_slides(tmp_path):
    table = tmp_path / "resource.parquet"
    pq.write_table(
        pa.Table.from_pylist([
            {"instance_uuid": A, "instance_hash": "h1"},
            {"instance_uuid": B, "instance_hash": None},
            {"instance_uuid": "nope", "instance_hash": "h"},
        ]),
        table,
    )  # fmt: skip
    known = known_instances(str(table))
    assert known == {A: "h1", B: None}
    assert is_unchanged(known, A, "h1") and is_unchanged(known, A, None)
    assert not is_unchanged(known, A, "h2")
    assert is_unchanged(known, B, "anything")
    assert not is_unchanged(known, "11111111-2222-3333-4444-555555555555", "h1")


def test_the_failed_share_threshold():
    counters = {"slides_to_process": 30, "enumerate_failures": 0, "slides_written": 10}
    message = failure_threshold_exceeded(counters, 0.5, 20)
    assert message and "20 of 30 slides failed" in message
    assert failure_threshold_exceeded(counters, 0.7, 20) is None
    assert failure_threshold_exceeded(counters, None, 20) is None
    assert failure_threshold_exceeded(counters, 0.5, 31) is None  # too few slides to judge


# --- retries against a real HTTP server on 127.0.0.1 ---------------------------------------


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves BODY with Range support; `plan` says what each request gets."""

    BODY = bytes(range(256)) * 64
    plan: ClassVar[list[str]] = []
    seen: ClassVar[list[str]] = []
    paths: ClassVar[list[str]] = []
    auth: ClassVar[list[str | None]] = []

    def log_message(self, *args):
        pass

    def _answer(self, head: bool) -> None:
        action = self.plan.pop(0) if self.plan else "ok"
        self.seen.append(action)
        self.paths.append(self.path)
        self.auth.append(self.headers.get("Authorization"))
        if action.startswith("sleep"):
            time.sleep(float(action[5:]))
        if action in ("307", "301"):  # to the same file under another path
            self.send_response(int(action))
            self.send_header("Location", "/moved/slide.dcm")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if action == "short":  # promises the range, sends half of it, hangs up
            self.send_response(206)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(self.BODY[:50])
            return
        if action.isdigit():
            self.send_response(int(action))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.BODY
        status = 200
        if "Range" in self.headers and action != "norange":
            start, end = self.headers["Range"].removeprefix("bytes=").split("-")
            body, status = body[int(start) : int(end) + 1], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(self.BODY) if head else len(body)))
        self.end_headers()
        if not head:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)

    def do_GET(self):
        self._answer(False)

    def do_HEAD(self):
        self._answer(True)


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setattr(retry, "READ_TIMEOUT_SECONDS", 0.5)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Flaky.plan, _Flaky.seen, _Flaky.auth, _Flaky.paths = [], [], [], []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/slide.dcm"
    finally:
        server.shutdown()
        server.server_close()


def test_transient_statuses_and_timeouts_are_retried(flaky):
    _Flaky.plan = ["503", "429", "sleep1.5", "502"]
    source = HttpSource(flaky)
    assert source.read(100, 200) == _Flaky.BODY[100:200]
    assert _Flaky.seen == ["503", "429", "sleep1.5", "502", "ok"]


def test_retries_are_bounded_and_end_in_transient_http(flaky):
    _Flaky.plan = ["503"] * 20
    with pytest.raises(SlideError) as failure:
        HttpSource(flaky).read(0, 10)
    assert failure.value.reason == "transient_http"
    assert "HTTP 503" in failure.value.message
    assert len(_Flaky.seen) == retry.RETRIES + 1


def test_a_permanent_error_is_not_retried(flaky):
    _Flaky.plan = ["404", "ok"]
    with pytest.raises(OSError, match="HTTP 404"):
        HttpSource(flaky).read(0, 10)
    assert _Flaky.seen == ["404"]


def test_a_body_cut_short_is_retried_and_a_range_never_ignored(flaky):
    _Flaky.plan = ["short", "ok"]
    assert HttpSource(flaky).read(100, 200) == _Flaky.BODY[100:200]
    assert _Flaky.seen == ["short", "ok"]
    _Flaky.plan = ["norange"]
    with pytest.raises(OSError, match="ignored the Range header"):
        HttpSource(flaky).read(100, 200)
    # a patch is never built from such bytes: the chunk's read fails the slide at `read`
    with pytest.raises(SlideError) as failure, patches.slide_errors("reading frame 1"):
        _Flaky.plan = ["norange"]
        HttpSource(flaky).read(100, 200)
    assert failure.value.reason == "read_error"


def test_redirects_are_followed_and_a_permanent_one_is_kept(flaky):
    source = HttpSource(flaky)
    _Flaky.plan = ["307", "503"]  # a temporary redirect, then a transient fault there
    assert source.read(100, 200) == _Flaky.BODY[100:200]
    assert _Flaky.seen == ["307", "503", "ok"]
    assert _Flaky.paths == ["/slide.dcm", "/moved/slide.dcm", "/moved/slide.dcm"]
    _Flaky.plan, _Flaky.seen, _Flaky.paths = ["301"], [], []
    source.read(0, 10)
    source.read(10, 20)  # straight to where the file moved
    assert _Flaky.paths == ["/slide.dcm", "/moved/slide.dcm", "/moved/slide.dcm"]


def test_a_proxy_in_the_environment_is_used_for_range_reads(flaky, monkeypatch):
    """HTTP_PROXY names the flaky server: a host that does not resolve is read through it."""
    monkeypatch.setenv("HTTP_PROXY", flaky.rsplit("/", 1)[0])
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    source = HttpSource("http://slides.invalid/slide.dcm")
    assert source.read(100, 200) == _Flaky.BODY[100:200]
    _Flaky.plan = ["404"]
    with pytest.raises(OSError, match="HTTP 404"):
        HttpSource("http://slides.invalid/slide.dcm").read(0, 10)


def test_a_refused_connection_is_transient(monkeypatch):
    from tests.servers import free_port

    monkeypatch.setattr(retry, "BACKOFF_SECONDS", 0.01)
    with pytest.raises(SlideError) as failure:
        HttpSource(f"http://127.0.0.1:{free_port()}/x.dcm").read(0, 10)
    assert failure.value.reason == "transient_http"


# --- new IDC release ---------------------------------------------------------------------


@pytest.mark.e2e
def test_only_new_processes_new_and_changed_slides(tmp_path):
    """Release 1 has slides A and C; release 2 has A with a new instance hash, C unchanged
    and a new slide B. `--only-new` embeds A and B and skips C."""
    slides = tmp_path / "slides"
    records = {}
    for name, seed in [("a", 1), ("b", 2), ("c", 3)]:
        (records[name],) = enumerate_dicom_folder(bad_slides.tiny_slide(slides, name, seed))

    def release(path: Path, hashes: dict[str, str]) -> str:
        rows = [
            type(records[n])(**{**records[n].__dict__, "instance_hash": h})
            for n, h in hashes.items()
        ]
        manifest.write_manifest(rows, str(path))
        return str(path)

    out = tmp_path / "out"

    def run(listed: str, *flags: str) -> dict:
        patches.open_slide.cache_clear()
        before = set((out / "runs").glob("*.json")) if (out / "runs").exists() else set()
        code = main([
            "run", "--source", "manifest", "--input", listed, "--output-root", str(out),
            "--model", "stub-tiny", "--set", f"model.cache_dir={tmp_path / 'models'}",
            "--log-level", "WARNING", *flags,
        ])  # fmt: skip
        assert code == 0
        (new,) = set((out / "runs").glob("*.json")) - before
        return json.loads(new.read_text())["counters"]

    first = run(release(tmp_path / "v1.jsonl", {"a": "a1", "c": "c1"}))
    assert first["slides_written"] == 2
    second = run(release(tmp_path / "v2.jsonl", {"a": "a2", "b": "b1", "c": "c1"}), "--only-new")
    assert second["slides_written"] == 2 and second["slides_skipped_complete"] == 1
    resource = pq.read_table(out / "tables" / "resource").to_pylist()
    rows = sorted((r["instance_uuid"], r["instance_hash"]) for r in resource)
    uuid = {n: r.instance_uuid for n, r in records.items()}
    assert rows == sorted([
        (uuid["a"], "a1"), (uuid["c"], "c1"), (uuid["a"], "a2"), (uuid["b"], "b1"),
    ])  # fmt: skip
    marker = json.loads((out / uuid["a"] / "path_foundation" / "v1" / "_COMPLETE.json").read_text())
    assert marker["instance_hash"] == "a2"
    # Without --only-new, the markers say the same: A is redone only when its hash changes.
    third = run(release(tmp_path / "v3.jsonl", {"a": "a2", "b": "b1", "c": "c1"}))
    assert third["slides_written"] == 0 and third["slides_skipped_complete"] == 3
    assert np.load(
        out / uuid["b"] / "path_foundation" / "v1" / "slide_embedding.npy", allow_pickle=False
    ).size


def test_gcs_errors_after_retries_are_transient_or_permanent():
    from google.api_core import exceptions

    from transforms.dicom_io.byte_ranges import _gcs_error

    transient = _gcs_error("gs://b/o", exceptions.ServiceUnavailable("down"))
    assert isinstance(transient, SlideError) and transient.reason == "transient_http"
    assert isinstance(_gcs_error("gs://b/o", exceptions.TooManyRequests("slow down")), SlideError)
    permanent = _gcs_error("gs://b/o", exceptions.NotFound("gone"))
    assert isinstance(permanent, OSError) and "gs://b/o" in str(permanent)


def test_a_stale_temporary_of_a_killed_run_is_removed(tmp_path):
    from transforms.outputs import artifacts

    paths = layout.ArtifactPaths.for_slide(str(tmp_path), A, "v1", 500)
    Path(paths.directory).mkdir(parents=True)
    Path(f"{paths.embeddings}.tmp-killed-run").write_bytes(b"half")
    artifacts.write_artifacts(paths, {paths.embeddings: b"x", paths.metadata: b"{}"}, {}, "r2")
    assert sorted(p.name for p in Path(paths.directory).iterdir()) == sorted(
        ["slide_embedding.npy", "metadata.json", layout.COMPLETE_MARKER]
    )


def test_credentials_are_sent_but_never_written_to_messages_or_logs(flaky, monkeypatch, caplog):
    from ez_wsi_dicomweb import credential_factory

    from transforms.dicom_io import dicomweb

    secret = "ya29.SECRET-TOKEN"
    monkeypatch.setattr(
        dicomweb, "credentials_for",
        lambda *_: credential_factory.TokenPassthroughCredentialFactory(secret),
    )  # fmt: skip
    _Flaky.plan = ["503"] * 20
    client = dicomweb.DicomWebClient(flaky.removesuffix("/slide.dcm"), "google")
    with caplog.at_level("DEBUG"), pytest.raises(SlideError) as failure:
        client.series_metadata("1.2.3", "1.2.3.4")
    assert _Flaky.auth[0] == f"Bearer {secret}"
    assert failure.value.reason == "transient_http"
    assert secret not in str(failure.value) and secret not in caplog.text


# --- reruns of slides that failed at enumeration -------------------------------------------


def _tiny_40x(root: Path, name: str, seed: int) -> Path:
    """A tiny 40x slide with a 20x level: the level embedded (20x) is not the finest (40x),
    whose UUID a failure row of the whole series carries."""
    write_slide(root, SampleSpec(name, TINY.native_spacing_mm / 2, TINY.width * 2,
                                 TINY.height * 2, (1, 2, 8), seed))  # fmt: skip
    return root / name


def _rewrite(slide: Path, change) -> dict[Path, bytes]:
    """Applies `change(ds, level)` to each level file of `slide` in place; returns the
    original bytes (to restore the slide: "the file got fixed")."""
    originals = {}
    for level, path in enumerate(sorted(slide.glob("level-*.dcm"))):
        originals[path] = path.read_bytes()
        ds = pydicom.dcmread(path)
        change(ds, level)
        ds.save_as(path, enforce_file_format=True)
    return originals


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.e2e
def test_rerun_finds_slides_that_failed_at_enumeration(tmp_path, caplog):
    """Three slides fail at enumeration; rerun by the failure rows' UUIDs (one reason code):
    - fixed: a malformed StudyInstanceUID (a row under its 40x level's UUID), repaired since:
      processed, and complete under its 20x level's UUID;
    - broken: two optical paths (a row under its 40x level's UUID) and its 20x file with a
      malformed SeriesInstanceUID (a row under that file's UUID); only the latter is asked
      for, the series UID is repaired, the optical paths are not: a new failure row;
    - gone: a malformed StudyInstanceUID, its files deleted since: reported as not found."""
    slides = tmp_path / "slides"
    fixed = _tiny_40x(slides, "fixed", 7)
    broken = _tiny_40x(slides, "broken", 8)
    gone = _tiny_40x(slides, "gone", 9)
    (good_fixed,) = enumerate_dicom_folder(fixed)
    fixed_40x, fixed_20x = (_sop(p) for p in sorted(fixed.glob("level-*.dcm"))[:2])
    assert good_fixed.sop_instance_uid == fixed_20x  # embedded from the 20x level
    originals = _rewrite(fixed, bad_slides.set_attribute("StudyInstanceUID", "1.2.x"))
    _rewrite(gone, bad_slides.set_attribute("StudyInstanceUID", "1.2.x"))
    broken_20x_file = sorted(broken.glob("level-*.dcm"))[1]
    broken_series = pydicom.dcmread(broken_20x_file, stop_before_pixels=True).SeriesInstanceUID

    def two_paths_and_a_bad_series(ds: pydicom.Dataset, level: int) -> None:
        bad_slides.second_optical_path(ds, level)
        if level == 1:
            ds.SeriesInstanceUID = "1.2.y"

    _rewrite(broken, two_paths_and_a_bad_series)
    out = tmp_path / "out"

    def cli(*args: str) -> dict:
        patches.open_slide.cache_clear()
        before = set((out / "runs").glob("*.json")) if (out / "runs").exists() else set()
        code = main([
            *args, "--input", str(slides), "--output-root", str(out), "--model", "stub-tiny",
            "--set", f"model.cache_dir={tmp_path / 'models'}",
        ])  # fmt: skip
        assert code == 0
        (new,) = set((out / "runs").glob("*.json")) - before
        return json.loads(new.read_text())["counters"]

    first = cli("run")
    assert first["slides_written"] == 0 and first["enumerate_failures"] == 4
    rows = pq.read_table(out / "tables" / "failures").to_pylist()
    by_uuid = {r["instance_uuid"]: r["reason_code"] for r in rows}
    assert by_uuid[local_instance_uuid(fixed_40x)] == "malformed_header"
    assert local_instance_uuid(fixed_20x) not in by_uuid  # the row's UUID is not the record's
    assert by_uuid[local_instance_uuid(_sop(broken_20x_file))] == "malformed_header"

    for path, data in originals.items():  # fixed repaired
        path.write_bytes(data)
    ds = pydicom.dcmread(broken_20x_file)  # broken: the series UID repaired, not the paths
    ds.SeriesInstanceUID = broken_series
    ds.save_as(broken_20x_file, enforce_file_format=True)
    for path in gone.glob("*.dcm"):
        path.unlink()

    with caplog.at_level("INFO"):
        second = cli(
            "rerun", "--failures", str(out / "tables" / "failures"), "--reason", "malformed_header"
        )
    assert second["slides_written"] == 1 and second["slides_to_process"] == 1
    assert (out / good_fixed.instance_uuid / "path_foundation" / "v1" / "_COMPLETE.json").exists()
    assert second["enumerate_failures"] == 1  # broken: failed again, counted as failed
    assert summary.failed_slides(second) == (1, 2)
    assert second["requested_not_found"] == 1  # gone
    assert "1 requested slides were not found in the source" in caplog.text
    rerun_rows = [
        r for r in pq.read_table(out / "tables" / "failures").to_pylist()
        if r["instance_uuid"] not in by_uuid or r["reason_code"] == "multiple_planes"
    ]  # fmt: skip
    assert {r["reason_code"] for r in rerun_rows} == {"multiple_planes"}


def test_a_series_answers_every_uuid_its_failure_rows_could_carry(tmp_path):
    """The record of a 40x slide is its 20x level's UUID; a failure row of the same series
    carried its 40x level's (or one file's) UUID. Asking for any of those finds the record, in
    enumeration and in SkipDone alike; asking for another slide's does not."""
    slide = _tiny_40x(tmp_path / "slides", "s", 7)
    sops = [_sop(p) for p in sorted(slide.glob("level-*.dcm"))]
    (record,) = enumerate_dicom_folder(slide)
    level_uuids = {local_instance_uuid(sop) for sop in sops}
    assert record.instance_uuid == local_instance_uuid(sops[1])
    assert level_uuids <= record.failure_keys
    finest = frozenset({local_instance_uuid(sops[0])})
    other = frozenset({A})
    assert requested(record, finest) and requested(record, frozenset())
    assert not requested(record, other)
    assert requested_keys(record, finest | other) == finest

    (tagged,) = _tagged(record, finest, "auto")
    assert tagged.instance_uuid == record.instance_uuid
    assert list(_tagged(record, other, "auto")) == []
    skip = SkipDoneOrUnrequested(
        output_root=str(tmp_path / "out"), dataset_version="v1", n_clusters=500,
        parameter_hash="h", uuids=finest, force=False,
    )  # fmt: skip
    assert list(skip.process(record)) == [record]
    skip._uuids = other
    assert list(skip.process(record)) == []


def test_a_series_that_fails_again_answers_the_uuids_of_its_earlier_rows(tmp_path):
    """A failure row under one file's UUID (a malformed SeriesInstanceUID); once that file
    joins its series and the series fails as a whole (under its finest level's UUID), a
    rerun asking for the file's UUID gets the series' failure, not silence."""
    slide = _tiny_40x(tmp_path / "slides", "s", 8)
    files = sorted(slide.glob("level-*.dcm"))
    series = str(pydicom.dcmread(files[1], stop_before_pixels=True).SeriesInstanceUID)

    def bad_series(ds: pydicom.Dataset, level: int) -> None:
        bad_slides.second_optical_path(ds, level)
        if level == 1:
            ds.SeriesInstanceUID = "1.2.y"

    _rewrite(slide, bad_series)
    by_reason = {f.error.reason.value: f for f in enumerate_dicom_folder(slide)}
    file_row = by_reason["malformed_header"]
    assert file_row.instance_uuid == local_instance_uuid(_sop(files[1]))
    ds = pydicom.dcmread(files[1])
    ds.SeriesInstanceUID = series
    ds.save_as(files[1], enforce_file_format=True)
    (again,) = enumerate_dicom_folder(slide)
    assert again.error.reason.value == "multiple_planes"
    assert again.instance_uuid == local_instance_uuid(_sop(files[0]))  # another UUID
    asked = frozenset({file_row.instance_uuid})
    (out,) = _tagged(again, asked, "auto")
    assert out.tag == "failed" and out.value is again


def test_the_summary_says_how_many_requested_slides_were_not_found(caplog):
    counters = {name: 0 for name in metrics.COUNTERS} | {metrics.REQUESTED_FOUND: 2}
    with caplog.at_level("WARNING"):
        summary.note_requested(counters, 5, "r1")
    assert counters["requested_not_found"] == 3
    assert "3 requested slides were not found in the source" in caplog.text
    text = summary.render({"counters": counters, "stage_seconds": {}}, "out", 1.0)
    assert "3 requested slides were not found in the source (of 5" in text
    counters[metrics.REQUESTED_FOUND] = 5
    summary.note_requested(counters, 5, "r1")
    text = summary.render({"counters": counters, "stage_seconds": {}}, "out", 1.0)
    assert counters["requested_not_found"] == 0 and "not found" not in text


def test_a_forked_child_opens_its_own_connections(flaky):
    """Kept-alive range connections are per thread; a forked child starts without its
    parent's (two processes on one socket would read each other's answers)."""
    import os

    from transforms.dicom_io import range_get

    source = HttpSource(flaky)
    _Flaky.protocol_version = "HTTP/1.1"  # connections kept alive
    try:
        assert source.read(0, 10) == _Flaky.BODY[:10]
        assert range_get._LOCAL.connections  # kept by this thread
        pid = os.fork()
        if pid == 0:  # the child: no connection of the parent's, and a read works
            ok = not getattr(range_get._LOCAL, "connections", None)
            ok = ok and source.read(10, 20) == _Flaky.BODY[10:20]
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert source.read(20, 30) == _Flaky.BODY[20:30]
    finally:
        _Flaky.protocol_version = "HTTP/1.0"
