"""Real local servers for tests: Orthanc with its DICOMweb plugin, and gcp-storage-emulator.

Each is started as a subprocess bound to 127.0.0.1 on a free port, with private, temporary
storage, and stopped (by its process id) when its context manager exits. Orthanc comes from
Debian (`make system-deps` installs `orthanc` and `orthanc-dicomweb`); DIMSE is off and remote
access is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not start in {timeout} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def server_process(args: list[str], ready_url: str, log: Path, env=None) -> Iterator[None]:
    """Runs `args` (output to `log`) until `ready_url` answers; stops it on leaving."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait(ready_url, process, log)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def require_orthanc() -> None:
    if not (os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN)):
        pytest.skip(
            "Orthanc with the DICOMweb plugin is not installed "
            "(`make system-deps`: Debian packages orthanc, orthanc-dicomweb)"
        )


@contextlib.contextmanager
def orthanc(workdir: Path, port: int | None = None) -> Iterator[str]:
    """A private Orthanc; yields its DICOMweb base URL (http://127.0.0.1:PORT/dicom-web).
    Started again with the same workdir and port, it serves what was stored before."""
    require_orthanc()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = {
        "Name": "pathembed-test",
        "HttpPort": port,
        "HttpBindAddress": "127.0.0.1",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "StorageCompression": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "HttpThreadsCount": 8,
        "ConcurrentJobs": 1,
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    with server_process(
        [ORTHANC, str(path)], f"http://127.0.0.1:{port}/system", workdir / "log.txt"
    ):
        yield f"http://127.0.0.1:{port}/dicom-web"


def stow(base_url: str, files: Iterable[Path]) -> None:
    """Stores DICOM files with one STOW-RS request."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for path in files:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += Path(path).read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    response = requests.post(
        f"{base_url}/studies",
        data=bytes(body),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=120,
    )
    response.raise_for_status()


@contextlib.contextmanager
def gcs_emulator(workdir: Path) -> Iterator[str]:
    """gcp-storage-emulator in memory; yields its URL and sets STORAGE_EMULATOR_HOST meanwhile."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    exe = Path(sys.executable).with_name("gcp-storage-emulator")
    url = f"http://127.0.0.1:{port}"
    args = [str(exe), "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"]
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    with server_process(args, f"{url}/storage/v1/b", workdir / "gcs.log"):
        os.environ["STORAGE_EMULATOR_HOST"] = url
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous


def upload(bucket_name: str, objects: dict[str, Path]) -> None:
    """Creates a bucket in the emulator and uploads {object name: local file}."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    bucket = client.create_bucket(bucket_name)
    for name, path in objects.items():
        bucket.blob(name).upload_from_filename(str(path))
