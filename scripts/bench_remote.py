"""Bench part `remote`: patch assembly from a bucket 50 ms away vs from a local file.

The sample slide medium-20x is uploaded to gcp-storage-emulator (started here, on 127.0.0.1)
and read through `DelayProxy`, a TCP proxy (threads, in a child process) that holds every request
50 ms before passing it on, so each range request waits a round trip as it would to a bucket. The
slide's chunks are read as the pipeline's EmbedSlide step reads them (`stages.embed_plan`: its
reader threads, chunks queued ahead, a remote slide's frames fetched FETCH_LEAD chunks further;
no model) from the local file and from gs:// through the proxy: patches/s of both and their
ratio (target: bucket >= 0.7 x local); also with no fetch lead. For comparison, the same chunks
assembled one at a time (`patches.read_patches`): patches/s, requests and bytes per chunk, for
several merge gaps. Then an
instance without offset table (the same level rewritten without its Basic Offset Table): the
requests its frame index takes (target: <= size / 8 MiB + 2), and again in the same process
(0: the index is kept per process).

The emulator is gcp-storage-emulator as the tests run it, with two changes made by its launcher
below, both to the emulator, not to what is measured: its HTTP server handles requests in
threads and keeps connections alive (as Cloud Storage does; the stock emulator serves one
request at a time, one connection per request), and an object's bytes are kept after the first
read (the stock emulator copies the whole object
out of its memory file system for every range request: ~10 ms per request for this 64 MB
level, which GCS does not spend).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames

from models.signature import EMBEDDING_DIM
from tests import servers
from transforms import patches, stages
from transforms.dicom_io import byte_ranges

DELAY_S = 0.05
BUCKET = "bench-remote"
GAPS = (0, 64 * 1024, 128 * 1024, 1024 * 1024)
MIB = 1024 * 1024

_EMULATOR = """
import functools, sys
from http import server
from gcp_storage_emulator import server as emulator, storage

emulator.server.HTTPServer = server.ThreadingHTTPServer  # concurrent requests, as GCS
emulator.RequestHandler.protocol_version = "HTTP/1.1"  # kept-alive connections, as GCS
emulator.RequestHandler.disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls
_get_file = storage.Storage.get_file

@functools.wraps(_get_file)
def get_file(self, bucket_name, file_name, show_error=True):
    kept = self.__dict__.setdefault("_bench_kept", {})
    key = (bucket_name, file_name)
    if key not in kept:
        kept[key] = _get_file(self, bucket_name, file_name, show_error)
    return kept[key]

storage.Storage.get_file = get_file
emulator.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()
"""


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds every request `delay` seconds: the first bytes a
    client sends on a connection, and again after each response, wait before they go on
    (a thread per connection and direction). `requests` counts the requests held."""

    def __init__(self, upstream: tuple[str, int], delay: float = DELAY_S):
        self.upstream, self.delay = upstream, delay
        self.requests = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        answered = threading.Event()  # the server has sent bytes since the last request
        answered.set()
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        for end in (client, server):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def back() -> None:
            with contextlib.suppress(OSError):
                while data := server.recv(1 << 16):
                    answered.set()
                    client.sendall(data)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)

        reverse = threading.Thread(target=back, daemon=True)
        reverse.start()
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                if answered.is_set():  # a new request: one round trip
                    answered.clear()
                    with self._lock:
                        self.requests += 1
                    time.sleep(self.delay)
                server.sendall(data)
            server.shutdown(socket.SHUT_WR)
        reverse.join(timeout=30)
        client.close()
        server.close()

    def close(self) -> None:
        self._listener.close()


def serve_proxy(upstream_port: int, delay: float) -> None:
    """A DelayProxy in its own process (`delay_proxy` starts it): its threads then take no
    CPU time from the process being measured, as a bucket's network path does not. Prints
    its port, serves until killed."""
    proxy = DelayProxy(("127.0.0.1", upstream_port), delay)
    print(proxy.port, flush=True)
    threading.Event().wait()


@contextlib.contextmanager
def delay_proxy(upstream_port: int, delay: float = DELAY_S) -> Iterator[int]:
    """serve_proxy in a child process; yields its port."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); from scripts.bench_remote import serve_proxy; "
        f"serve_proxy({upstream_port}, {delay})"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def emulator(workdir: pathlib.Path) -> Iterator[int]:
    """gcp-storage-emulator (threaded, objects kept) on 127.0.0.1; yields its port."""
    port = servers.free_port()
    args = [sys.executable, "-c", _EMULATOR, str(port)]
    ready = f"http://127.0.0.1:{port}/storage/v1/b"
    with servers.server_process(args, ready, workdir / "gcs-emulator.log"):
        yield port


def _upload(port: int, objects: dict[str, pathlib.Path]) -> None:
    """Through the proxy at `port` (the emulator's objects' mediaLink, which the client
    downloads from, names the host they were uploaded through)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        client = storage.Client(project="bench", credentials=AnonymousCredentials())
        bucket = client.lookup_bucket(BUCKET) or client.create_bucket(BUCKET)
        for name, path in objects.items():
            bucket.blob(name).upload_from_filename(str(path))
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous


def _without_offset_table(src: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    if out.exists():
        return out
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    ds.PixelData = encapsulate(frames, has_bot=False)
    ds.save_as(out, enforce_file_format=True)
    return out


def _open(open_slide: Callable[[], Any]) -> tuple[Any, float]:
    """A slide opened with its instances' frame indexes read, and the seconds that took."""
    t0 = time.perf_counter()
    slide = open_slide()
    for reader in slide._files._readers.values():
        reader._ensure_index()
    return slide, time.perf_counter() - t0


def _timed(slide, opened: float, chunks: int, read_all: Callable[[], int], decodes) -> dict:
    """Wall and CPU seconds of `read_all` (it returns the patches read), the requests and
    bytes the slide read meanwhile."""
    before = (slide.io.requests, slide.io.bytes)
    wall, cpu = time.perf_counter(), time.process_time()
    n = read_all()
    return {
        "patches": n,
        "chunks": chunks,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "open_s": opened,
        "requests": slide.io.requests - before[0],
        "bytes": slide.io.bytes - before[1],
        "decodes": decodes(),
    }


def _assemble(uris: list[str], sop: str, chunks, downsample: float) -> dict:
    """Opens the slide (headers, frame index of the level), then assembles every chunk, one
    at a time: wall and CPU seconds of the chunks, requests and bytes they took."""
    slide, opened = _open(lambda: byte_ranges.open_range_slide(uris))
    level = patches.level_of(slide, sop)
    cache = patches.FrameCache()

    def read_all() -> int:
        return sum(
            len(patches.read_patches(slide, level, c.coords, downsample, 224, cache))
            for c in chunks
        )

    return _timed(slide, opened, len(chunks), read_all, lambda: cache.decodes)


def _through_reader(record, uris: list[str], chunks, fetch_lead: int | None = None) -> dict:
    """The EmbedSlide step's reading of the slide as the pipeline does it (stages.embed_plan:
    its reader threads, chunks queued ahead, a remote slide's frames fetched `fetch_lead`
    chunks further, default stages.FETCH_LEAD), with no model: wall and CPU seconds once the
    slide is open."""
    files = tuple((sop, uri) for (sop, _), uri in zip(record.files, uris, strict=True))
    record = dataclasses.replace(record, files=files)
    chunks = [dataclasses.replace(c, record=record) for c in chunks]
    plan = types.SimpleNamespace(coords=np.concatenate([c.coords for c in chunks]), chunks=chunks)
    patches.open_slide.cache_clear()
    patches.FRAMES.clear()
    # (opened under the key read_chunk uses, so that embed_plan reads this slide)
    slide, opened = _open(lambda: patches.open_slide(files, record.dicomweb_auth))

    def no_model(pixels: np.ndarray) -> np.ndarray:
        return np.zeros((len(pixels), EMBEDDING_DIM), np.float32)

    def read_all() -> int:
        lead = stages.FETCH_LEAD
        stages.FETCH_LEAD = lead if fetch_lead is None else fetch_lead
        try:
            return len(stages.embed_plan(plan, no_model))
        finally:
            stages.FETCH_LEAD = lead

    result = _timed(slide, opened, len(chunks), read_all, lambda: patches.FRAMES.decodes)
    patches.open_slide.cache_clear()
    return result


def _client_cpu(port: int, name: str, requests_: int = 200, threads: int = 8) -> dict:
    """CPU ms of this process per 160 KB range request to the emulator at `port` (no proxy),
    `threads` at once, by each client a range read could use: range_get (the project's),
    a requests Session, and google-cloud-storage's Blob.download_as_bytes."""
    from transforms.dicom_io import range_get, retry

    url = f"http://127.0.0.1:{port}/download/storage/v1/b/{BUCKET}/o/{name.replace('/', '%2F')}"
    url += "?alt=media"
    size = 160_000
    session = retry.http_session(pool_size=threads)
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    byte_ranges._gcs_client.cache_clear()
    blob = byte_ranges.gcs_client().bucket(BUCKET).blob(name)
    reader = range_get.RangeReader(url)
    clients = {
        "range_get": reader.read,
        "requests Session": lambda a, b: (
            session.get(url, headers={"Range": f"bytes={a}-{b - 1}"}).content
        ),
        "Blob.download_as_bytes": lambda a, b: blob.download_as_bytes(
            start=a, end=b - 1, checksum=None
        ),
    }
    out = {}
    try:
        for label, read in clients.items():

            def one(k: int, read=read) -> None:
                start = k * size
                assert len(read(start, start + size)) == size

            cpu = time.process_time()
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(requests_)))
            out[label] = (time.process_time() - cpu) / requests_ * 1e3
    finally:
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        byte_ranges._gcs_client.cache_clear()
    return out


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["wall_s"])


def _index_requests(uri: str) -> tuple[int, int]:
    """(requests, bytes) the frame index of an instance takes once its header is read."""
    reader = byte_ranges.DicomInstanceReader(uri)
    before = (reader.stats.requests, reader.stats.bytes)
    reader._ensure_index()
    return reader.stats.requests - before[0], reader.stats.bytes - before[1]


def bench_remote(record, chunks, workdir: pathlib.Path, rounds: int) -> dict:
    """Local file vs gs:// through the 50 ms proxy, same chunks; see the module docstring."""
    files = [pathlib.Path(uri) for _, uri in record.files]
    local_uris = [str(p) for p in files]
    names = {p: f"medium-20x/{p.name}" for p in files}
    no_bot = _without_offset_table(
        pathlib.Path(record.embedding_file), workdir / "medium-20x-level-0-no-bot.dcm"
    )
    sop, d = record.sop_instance_uid, record.levels.downsample
    saved = (os.environ.get("STORAGE_EMULATOR_HOST"), byte_ranges.REMOTE_MERGE_GAP)
    with emulator(workdir) as port, delay_proxy(port) as proxy_port:
        _upload(proxy_port, {**{names[p]: p for p in files}, "no-bot/level-0.dcm": no_bot})
        client_cpu_ms = _client_cpu(port, names[pathlib.Path(record.embedding_file)])
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{proxy_port}"
        byte_ranges._gcs_client.cache_clear()
        byte_ranges._INDEX_CACHE.clear()
        remote_uris = [f"gs://{BUCKET}/{names[p]}" for p in files]
        try:
            local, remote = [], {gap: [] for gap in GAPS}
            reader = {"local": [], "remote": [], "remote_no_lead": []}
            for _ in range(rounds):
                reader["local"].append(_through_reader(record, local_uris, chunks))
                reader["remote"].append(_through_reader(record, remote_uris, chunks))
                reader["remote_no_lead"].append(
                    _through_reader(record, remote_uris, chunks, fetch_lead=0)
                )
                local.append(_assemble(local_uris, sop, chunks, d))
                for gap in GAPS:
                    byte_ranges.REMOTE_MERGE_GAP = gap
                    remote[gap].append(_assemble(remote_uris, sop, chunks, d))
                byte_ranges.REMOTE_MERGE_GAP = saved[1]
            # As before issue 14: one range after another, and a non-concurrent source's 16 KiB
            # merge gap (ByteSource.merge_gap); today's range client (one round).
            byte_ranges.GcsSource.concurrent = False
            try:
                one_by_one = _assemble(remote_uris, sop, chunks, d)
            finally:
                byte_ranges.GcsSource.concurrent = True
            no_bot_uri = f"gs://{BUCKET}/no-bot/level-0.dcm"
            index_first = _index_requests(no_bot_uri)
            index_again = _index_requests(no_bot_uri)
            with_bot = _index_requests(remote_uris[0])
        finally:
            byte_ranges.REMOTE_MERGE_GAP = saved[1]
            byte_ranges._gcs_client.cache_clear()
            if saved[0] is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = saved[0]
    n_frames = int(pydicom.dcmread(no_bot, stop_before_pixels=True).NumberOfFrames)
    size = no_bot.stat().st_size
    best_local = _best(local)
    best_remote = {gap: _best(runs) for gap, runs in remote.items()}
    default = best_remote[saved[1]]
    best = {name: _best(runs) for name, runs in reader.items()}
    return {
        "delay_s": DELAY_S,
        "client_cpu_ms_per_request": client_cpu_ms,
        "reader": {
            **best,
            "ratio": best["local"]["wall_s"] / best["remote"]["wall_s"],
            "ratio_no_lead": best["local"]["wall_s"] / best["remote_no_lead"]["wall_s"],
            "fetch_lead": stages.FETCH_LEAD,
            "rounds": reader,
        },
        "local": best_local,
        "remote_by_gap": {str(g): r for g, r in best_remote.items()},
        "default_gap": saved[1],
        "remote_one_by_one": one_by_one,
        "ratio": (default["patches"] / default["wall_s"])
        / (best_local["patches"] / best_local["wall_s"]),
        "requests_per_chunk": default["requests"] / default["chunks"],
        "index_no_offset_table": {
            "instance_bytes": size,
            "frames": n_frames,
            "requests": index_first[0],
            "bytes": index_first[1],
            "bound": size / (8 * MIB) + 2,
            "requests_again_same_process": index_again[0],
            "per_frame_walk_requests": n_frames + 2,
        },
        "index_basic_offset_table_requests": with_bot[0],
        "equal_patch_counts": len({r["patches"] for r in [best_local, *best_remote.values()]}) == 1,
        "decodes": sorted({r["decodes"] for r in [best_local, *best_remote.values()]}),
        "rate_local": best_local["patches"] / best_local["wall_s"],
        "rate_remote": default["patches"] / default["wall_s"],
    }


def summary_lines(info: dict) -> list[str]:
    lines = []
    for gap, r in info["remote_by_gap"].items():
        lines.append(
            f"  gap {int(gap) // 1024:>3} KiB: {r['patches'] / r['wall_s']:,.0f} patches/s, "
            f"{r['requests'] / r['chunks']:.1f} requests/chunk, "
            f"{r['bytes'] / r['chunks'] / MIB:.2f} MiB/chunk, open {r['open_s']:.2f} s"
        )
    r = info["remote_one_by_one"]
    lines.append(
        f"  one range after another (before): {r['patches'] / r['wall_s']:,.0f} patches/s, "
        f"{r['requests'] / r['chunks']:.1f} requests/chunk"
    )
    local = info["local"]
    lines.append(
        f"  local: {local['patches'] / local['wall_s']:,.0f} patches/s "
        f"({local['requests'] / local['chunks']:.1f} reads/chunk); ratio {info['ratio']:.2f}"
    )
    r = info["reader"]
    lines.append(
        f"  through the pipeline's reader (stages.embed_plan, no model): local "
        f"{r['local']['patches'] / r['local']['wall_s']:,.0f}, gs:// "
        f"{r['remote']['patches'] / r['remote']['wall_s']:,.0f} patches/s; ratio "
        f"{r['ratio']:.2f} (fetch lead {r['fetch_lead']}; {r['ratio_no_lead']:.2f} with none)"
    )
    idx = info["index_no_offset_table"]
    lines.append(
        f"  index without offset table ({idx['frames']} frames, {idx['instance_bytes'] / MIB:.1f}"
        f" MiB): {idx['requests']} requests (bound {idx['bound']:.1f}; one per frame: "
        f"{idx['per_frame_walk_requests']}), again in the same process: "
        f"{idx['requests_again_same_process']}; with its Basic Offset Table: "
        f"{info['index_basic_offset_table_requests']}"
    )
    return lines
