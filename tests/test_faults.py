"""Fault injection with real parts: Orthanc stopped in the middle of a run and restarted for a
rerun; a proxy in front of Orthanc that answers 503 and responds slowly (or too slowly); a
`pathembed run` process killed while it writes artifacts, then run again."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from pipeline.cli import main
from tests import servers
from tests.bad_slides import tiny_slide
from transforms import patches, stages
from transforms.dicom_io import retry
from transforms.dicom_io.dicomweb import instance_url
from transforms.outputs import archive
from transforms.outputs.layout import COMPLETE_MARKER
from transforms.sources import manifest
from transforms.sources.dicom_files import enumerate_dicom_folder

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = [
    "metadata.json", "slide_thumbnail.jpeg", "slide_thumbnail_mask.jpeg", "slide_embedding.npy",
    "slide_embedding_coord.npy", "embeddings_500_cluster_centroid.npy", "embeddings_500_labels.npy",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def quick_retries(monkeypatch):
    """The retry policy with short sleeps and timeouts, so the tests spend seconds, not minutes."""
    monkeypatch.setattr(retry, "BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(retry, "READ_TIMEOUT_SECONDS", 2.0)


def cli(model_cache: Path, output: Path, *args: str) -> tuple[int, dict]:
    patches.open_slide.cache_clear()
    before = set((output / "runs").glob("*.json")) if (output / "runs").exists() else set()
    code = main([
        *args, "--output-root", str(output), "--model", "stub-tiny", "--log-level", "WARNING",
        "--set", f"model.cache_dir={model_cache}",
    ])  # fmt: skip
    new = set((output / "runs").glob("*.json")) - before
    return code, (json.loads(new.pop().read_text())["counters"] if new else {})


def assert_complete(output: Path, instance_uuid: str) -> dict[str, np.ndarray]:
    """The slide has its seven artifacts, its marker, and arrays that agree with each other."""
    directory = output / instance_uuid / "path_foundation" / "v1"
    assert sorted(p.name for p in directory.iterdir()) == sorted([*ARTIFACTS, COMPLETE_MARKER])
    marker = json.loads((directory / COMPLETE_MARKER).read_text())
    arrays = {
        name: np.load(directory / name, allow_pickle=False)
        for name in ARTIFACTS
        if name.endswith(".npy")
    }
    coords = arrays["slide_embedding_coord.npy"]
    assert len(coords) == marker["embedding_count"] == len(arrays["slide_embedding.npy"]) > 0
    assert len(np.unique(coords, axis=0)) == len(coords)  # no duplicate patches
    return arrays


def web_records(slide_dirs: list[Path], base_url: str):
    """The slides' records with their levels addressed by WADO-RS URLs at `base_url`."""
    records = []
    for slide in slide_dirs:
        (record,) = enumerate_dicom_folder(slide)
        study, series = record.study_instance_uid, record.series_instance_uid
        files = tuple((sop, instance_url(base_url, study, series, sop)) for sop, _ in record.files)
        records.append(
            type(record)(**{**record.__dict__, "files": files, "dicomweb_url": base_url})
        )
    return records


def test_orthanc_stopped_mid_run_fails_its_slides_and_a_rerun_completes_them(
    tmp_path, model_cache, quick_retries, monkeypatch
):
    slides = tmp_path / "slides"
    local = tiny_slide(slides, "local", 11)
    web = [tiny_slide(slides, f"web-{i}", 20 + i) for i in (1, 2)]
    port, workdir = servers.free_port(), tmp_path / "orthanc"
    base = f"http://127.0.0.1:{port}/dicom-web"
    (local_record,) = enumerate_dicom_folder(local)
    remote = web_records(web, base)
    listed = tmp_path / "slides.jsonl"
    manifest.write_manifest([local_record, *remote], str(listed))
    flags = ["--source", "manifest", "--input", str(listed)]
    out = tmp_path / "out"

    with contextlib.ExitStack() as orthanc:
        assert orthanc.enter_context(servers.orthanc(workdir, port)) == base
        servers.stow(base, sorted(p for slide in web for p in slide.glob("*.dcm")))
        read_chunk = stages.read_chunk

        def stop_orthanc_then_read(chunk, *args):
            orthanc.close()  # the first slide to be read stops the server for the rest
            return read_chunk(chunk, *args)

        monkeypatch.setattr(stages, "read_chunk", stop_orthanc_then_read)
        code, counters = cli(model_cache, out, "run", *flags)
        monkeypatch.undo()
    assert code == 0
    assert counters["slides_written"] == 1
    assert_complete(out, local_record.instance_uuid)
    failures = pq.read_table(out / "tables" / "failures").to_pylist()
    for record in remote:
        # One row per slide: planned before the server went (then failing its read) or after
        # (failing its plan), each slide stops at its first failure.
        (row,) = [r for r in failures if r["instance_uuid"] == record.instance_uuid]
        assert row["stage"] in ("plan", "read") and row["reason_code"] == "transient_http", row
        assert base in row["message"] and "retries" in row["message"]
        assert not (
            out / record.instance_uuid / "path_foundation" / "v1" / COMPLETE_MARKER
        ).exists()
    assert {r["instance_uuid"] for r in failures} == {r.instance_uuid for r in remote}

    with servers.orthanc(workdir, port):
        code, counters = cli(
            model_cache, out, "rerun", "--failures", str(out / "tables" / "failures"), *flags
        )
    assert code == 0
    assert counters["slides_to_process"] == 2 and counters["slides_written"] == 2
    for record in [local_record, *remote]:
        assert_complete(out, record.instance_uuid)
    resource = pq.read_table(out / "tables" / "resource").to_pylist()
    assert sorted(r["instance_uuid"] for r in resource) == sorted(
        [local_record.instance_uuid, *(r.instance_uuid for r in remote)]
    )


class _FaultyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards GETs to Orthanc; every 3rd request gets a 503, every 4th is slow and one in
    ten is slower than the client's read timeout."""

    upstream = ""
    count = itertools.count()
    injected: ClassVar[list[str]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        n = next(self.count)
        if n % 3 == 1:
            self.injected.append("503")
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if n % 10 == 5:
            self.injected.append("timeout")
            time.sleep(retry.READ_TIMEOUT_SECONDS + 1)
        elif n % 4 == 0:
            self.injected.append("slow")
            time.sleep(0.3)
        upstream = requests.get(
            self.upstream + self.path, headers={"Accept": self.headers.get("Accept", "*/*")},
            timeout=60,
        )  # fmt: skip
        self.send_response(upstream.status_code)
        self.send_header("Content-Type", upstream.headers.get("Content-Type", ""))
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(upstream.content)


def test_503s_and_slow_responses_are_retried_without_losing_or_duplicating_patches(
    tmp_path, model_cache, quick_retries
):
    slide = tiny_slide(tmp_path / "slides", "proxied", 31)
    code, _ = cli(model_cache, tmp_path / "local", "run", "--input", str(slide.parent))
    assert code == 0
    (uuid,) = [p.name for p in (tmp_path / "local").glob("*-*-*-*-*")]
    expected = assert_complete(tmp_path / "local", uuid)
    with servers.orthanc(tmp_path / "orthanc") as base:
        servers.stow(base, sorted(slide.glob("*.dcm")))
        _FaultyProxy.upstream = base.removesuffix("/dicom-web")
        _FaultyProxy.count, _FaultyProxy.injected = itertools.count(), []
        proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FaultyProxy)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web"
            code, counters = cli(
                model_cache, tmp_path / "out", "run", "--source", "dicomweb", "--dicomweb-url", url
            )
        finally:
            proxy.shutdown()
            proxy.server_close()
    assert code == 0 and counters["slides_written"] == 1
    assert {"503", "slow", "timeout"} <= set(_FaultyProxy.injected)
    got = assert_complete(tmp_path / "out", uuid)
    for name, array in expected.items():
        assert np.array_equal(got[name], array), name


def test_a_run_killed_halfway_keeps_its_finished_slides_and_the_rerun_does_only_the_rest(
    tmp_path, model_cache, capsys
):
    """SIGKILL once half the slides are complete: every slide finished before the kill keeps
    its files and its table rows (search reads them), nothing partial is marked complete, and
    the rerun embeds exactly the slides that were not finished."""
    slides, total = tmp_path / "slides", 10
    for i in range(total):
        tiny_slide(slides, f"slide-{i}", 40 + i)
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "pipeline", "run", "--input", str(slides), "--output-root", str(out),
        "--model", "stub-tiny", "--set", f"model.cache_dir={model_cache}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its worker processes die with it
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob(f"*/path_foundation/v1/{COMPLETE_MARKER}"))) < total // 2:
            assert process.poll() is None, "the run ended before half its slides were done"
            assert time.monotonic() < deadline, "half the slides not done after 300 s"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    complete = {
        d.parts[-3] for d in out.glob("*/path_foundation/v1") if (d / COMPLETE_MARKER).exists()
    }
    assert 0.4 * total <= len(complete) < total  # the kill cut the run short
    for uuid in complete:
        assert_complete(out, uuid)  # every file there and as its marker records
    # Their rows are committed with them: the archive lists them and search finds them.
    assert complete <= set(archive.newest_resources(str(out))["instance_uuid"].to_pylist())
    query = sorted(complete)[0]
    capsys.readouterr()
    assert main(["search", query, "--output-root", str(out), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["query"]["centroids"] >= 1  # the query's centroids: its search rows
    found = {r["instance_uuid"] for r in document["results"]}
    assert found and found <= complete - {query}  # only finished slides can match

    code, counters = cli(model_cache, out, "run", "--input", str(slides))
    assert code == 0
    assert counters["slides_skipped_complete"] == len(complete)
    assert counters["slides_written"] == total - len(complete)
    resource = pq.read_table(out / "tables" / "resource").to_pylist()
    assert sorted(r["instance_uuid"] for r in resource) == sorted(
        d.parts[-3] for d in out.glob("*/path_foundation/v1")
    )  # one row per slide: none written twice
    assert len(resource) == total
