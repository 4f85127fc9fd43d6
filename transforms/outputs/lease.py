"""One writer per slide: a lease file in the slide's folder names the run that writes it now.

`{slide directory}/_LEASE.json` (ArtifactPaths.lease) holds {run_id, host, pid, acquired,
expires} (UTC, ISO-8601). A run acquires the lease before it writes a slide, renews it between
long steps and releases it once the slide is written. A run that finds a live lease of another
run (not yet expired) leaves the slide alone; a lease past its expiry is a dead run's and is
taken over. A lease of the same run_id is re-entrant: Beam retries a bundle within the same run,
and the retry (or a first attempt still running beside it) is the same writer. write_artifacts
never deletes the temporaries (`*.tmp-{run_id}`) of the run that holds a live lease.

How creation and take-over are made atomic, per scheme:

- local paths: the lease is created with O_CREAT|O_EXCL, so only one creator wins; every
  read-decide-write (take-over, re-entry, renew, release) runs under an exclusive flock of the
  slide directory, so two processes never both take over one expired lease. flock holds between
  the processes of one host (on a shared file system only where the kernel honours it there).
- gs://: the google-cloud-storage client's generation preconditions: `if_generation_match=0`
  creates the object only if there is none; take-over, renew and release match the generation
  that was read, and lose (and read again) when another writer came first. Beam's FileSystems has
  no conditional create (GCSFileSystem.create overwrites whatever is there), hence the client
  here (byte_ranges.gcs_client, which honours STORAGE_EMULATOR_HOST). Reading a lease
  (live_holder) needs no precondition and goes through FileSystems like every other output read.
- other schemes (s3://, http(s)://, ...): leases are not enforced. acquire returns a lease with
  enforced=False whose renew and release do nothing, live_holder returns None, and a warning says
  so once per scheme.

Expiry compares the wall clocks of different hosts: ttl_s must be far above their skew (minutes,
not seconds). A ttl_s of 0 gives a lease that is expired at once (anyone may take it over).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from apache_beam.io.filesystems import FileSystems

from transforms.outputs.layout import ArtifactPaths
from transforms.urls import is_remote

_LOG = logging.getLogger(__name__)

# gs://: read-decide-write rounds lost to other writers before acquire gives up (returns None).
_ATTEMPTS = 8
_WARNED_SCHEMES: set[str] = set()


class LeaseLost(RuntimeError):
    """renew() found the slide's lease held by another run, or gone: stop writing the slide."""


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """The content of a lease file."""

    run_id: str
    host: str
    pid: int
    acquired: float  # epoch seconds
    expires: float

    def live(self, now: float) -> bool:
        """Not expired, and not held by a process of this host that is gone (a run killed on
        this machine frees its slides at once, without waiting for the expiry)."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False
        return now < self.expires

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": self.host,
                "pid": self.pid,
                "acquired": _iso(self.acquired),
                "expires": _iso(self.expires),
            },
            indent=1,
        ).encode()

    @classmethod
    def parse(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for anything that is not one (a truncated or foreign file)."""
        try:
            doc = json.loads(data)
            return cls(
                run_id=str(doc["run_id"]),
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                acquired=datetime.datetime.fromisoformat(doc["acquired"]).timestamp(),
                expires=datetime.datetime.fromisoformat(doc["expires"]).timestamp(),
            )
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat()


def _record(run_id: str, ttl_s: float, acquired: float | None = None) -> LeaseRecord:
    now = time.time()
    acquired = now if acquired is None else acquired
    return LeaseRecord(run_id, socket.gethostname(), os.getpid(), acquired, now + ttl_s)


# What a decision does with the lease it read: write this record, delete it, or leave it.
_DELETE = object()
_KEEP = object()
Decision = Callable[[LeaseRecord | None], Any]


class _Contended(Exception):
    """gs://: every round was lost to another writer."""


class _LocalStore:
    """A lease file on a local file system: O_EXCL creation, flock of the slide directory."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.directory = os.path.dirname(uri)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield  # closing the descriptor unlocks
        finally:
            os.close(fd)

    def _read(self) -> LeaseRecord | None:
        try:
            with open(self.uri, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        record = LeaseRecord.parse(data)
        if record is None:
            # Writers hold the lock while they write: this is a file whose writer died
            # mid-write, or a foreign one. It protects nobody.
            _LOG.warning("%s is not a lease file: it is treated as expired", self.uri)
        return record

    def read(self) -> LeaseRecord | None:
        if not os.path.isdir(self.directory):
            return None
        with self._locked(exclusive=False):
            return self._read()

    def transact(self, decide: Decision, create_directory: bool) -> tuple[LeaseRecord | None, bool]:
        if create_directory:
            os.makedirs(self.directory, exist_ok=True)
        elif not os.path.isdir(self.directory):
            decide(None)  # nothing to change; the decision still sees "no lease"
            return None, False
        with self._locked(exclusive=True):
            exists = os.path.lexists(self.uri)
            current = self._read() if exists else None
            action = decide(current)
            if action is _KEEP:
                return current, False
            if action is _DELETE:
                os.unlink(self.uri)
                return current, True
            data = action.to_bytes()
            if not exists:
                # O_EXCL: the file is created only if there is none, whoever else writes here
                # without the lock (FileExistsError then reaches the caller).
                fd = os.open(self.uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:  # take-over, re-entry or renewal: replaced whole, never seen half-written
                temporary = f"{self.uri}.new-{uuid.uuid4().hex}"  # no ".tmp-": not a temporary
                with open(temporary, "wb") as handle:  # of write_artifacts, nor its cleanup's
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(temporary, self.uri)
            return current, True


class _GcsStore:
    """A lease object on GCS, changed only under generation preconditions."""

    def __init__(self, uri: str) -> None:
        from transforms.dicom_io.byte_ranges import split_bucket_uri

        self.uri = uri
        self.bucket_name, self.name = split_bucket_uri(uri)

    def _bucket(self):
        # Credentials (the output bucket is private), or the emulator in tests.
        from transforms.dicom_io.byte_ranges import gcs_write_client

        return gcs_write_client().bucket(self.bucket_name)

    def read(self) -> LeaseRecord | None:
        # An object is never seen half-written: a plain read (with Beam's credentials) suffices.
        try:
            with FileSystems.open(self.uri) as handle:
                data = handle.read()
        except Exception as exc:  # Beam's GCS filesystem names a missing object in many ways
            if FileSystems.exists(self.uri):
                raise OSError(f"cannot read the lease {self.uri}: {exc}") from exc
            return None
        record = LeaseRecord.parse(data)
        if record is None:
            _LOG.warning("%s is not a lease file: it is treated as expired", self.uri)
        return record

    def transact(self, decide: Decision, create_directory: bool) -> tuple[LeaseRecord | None, bool]:
        from google.api_core import exceptions

        bucket = self._bucket()
        for _ in range(_ATTEMPTS):
            blob = bucket.get_blob(self.name)
            generation = blob.generation if blob is not None else 0
            try:
                current = None
                if blob is not None:
                    data = blob.download_as_bytes(if_generation_match=generation)
                    current = LeaseRecord.parse(data)
                    if current is None:
                        _LOG.warning("%s is not a lease file: it is treated as expired", self.uri)
                action = decide(current)
                if action is _KEEP:
                    return current, False
                if action is _DELETE:
                    bucket.blob(self.name).delete(if_generation_match=generation)
                    return current, True
                # if_generation_match=0: only if there is no object; else only if it is still
                # the generation that was read (nobody took it over or renewed it meanwhile).
                bucket.blob(self.name).upload_from_string(
                    action.to_bytes(),
                    content_type="application/json",
                    if_generation_match=generation,
                )
                return current, True
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue  # another writer came first: read again and decide again
        raise _Contended(self.uri)


def _store(uri: str) -> _LocalStore | _GcsStore | None:
    """The lease store of `uri`, or None where leases are not enforced."""
    if not is_remote(uri):
        return _LocalStore(uri)
    scheme = uri.split("://", 1)[0].lower()
    if scheme == "gs":
        return _GcsStore(uri)
    if scheme not in _WARNED_SCHEMES:
        _WARNED_SCHEMES.add(scheme)
        _LOG.warning(
            "%s:// has no atomic conditional create: slide leases are not enforced there, so "
            "two runs over the same output root may write one slide at once",
            scheme,
        )
    return None


class Lease:
    """A run's hold on one slide's folder. enforced=False: a scheme without leases (no-op)."""

    def __init__(
        self, paths: ArtifactPaths, run_id: str, ttl_s: float, expires: float, enforced: bool
    ) -> None:
        self.paths = paths
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.expires = expires  # epoch seconds, as of the last acquire or renew
        self.enforced = enforced
        self.released = False

    def __repr__(self) -> str:
        return f"Lease({self.paths.lease!r}, run_id={self.run_id!r}, expires={_iso(self.expires)})"

    def renew(self) -> None:
        """Pushes the expiry ttl_s past now. LeaseLost when the lease is no longer this run's
        (it expired and another run took it over, or it was released)."""
        store = _store(self.paths.lease)
        if store is None:
            self.expires = time.time() + self.ttl_s
            return
        renewed: list[LeaseRecord] = []

        def decide(current: LeaseRecord | None) -> Any:
            renewed.clear()
            if current is None or current.run_id != self.run_id:
                return _KEEP
            renewed.append(_record(self.run_id, self.ttl_s, current.acquired))
            return renewed[0]

        try:
            current, _ = store.transact(decide, create_directory=False)
        except _Contended:
            raise LeaseLost(f"{self.paths.lease}: contended, not renewed") from None
        if not renewed:
            holder = f"run {current.run_id}" if current else "nobody"
            raise LeaseLost(
                f"{self.paths.lease} is no longer run {self.run_id}'s ({holder} holds it)"
            )
        self.expires = renewed[0].expires

    def release(self) -> None:
        """Removes the lease if it is still this run's (else there is nothing of ours to free)."""
        if self.released:
            return
        self.released = True
        store = _store(self.paths.lease)
        if store is None:
            return

        def decide(current: LeaseRecord | None) -> Any:
            return _DELETE if current is not None and current.run_id == self.run_id else _KEEP

        try:
            current, deleted = store.transact(decide, create_directory=False)
        except _Contended:
            _LOG.warning("%s: contended, not released (it expires by itself)", self.paths.lease)
            return
        if not deleted:
            _LOG.warning(
                "%s was no longer run %s's at release (%s)",
                self.paths.lease, self.run_id, f"run {current.run_id}" if current else "gone",
            )  # fmt: skip
        elif isinstance(store, _LocalStore):
            _remove_empty_folders(self.paths.directory)


def _remove_empty_folders(directory: str) -> None:
    """A slide that failed leaves no empty {uuid}/path_foundation/v1 behind its lease (a slide
    folder means artifacts); folders that hold anything stay."""
    for folder in (
        directory,
        os.path.dirname(directory),
        os.path.dirname(os.path.dirname(directory)),
    ):
        try:
            os.rmdir(folder)
        except OSError:
            return


def acquire(paths: ArtifactPaths, run_id: str, ttl_s: float) -> Lease | None:
    """This run's lease on the slide of `paths`, or None while another run holds a live one.

    Free, expired (a dead run's) and this run's own lease are taken: the expiry is set to
    ttl_s from now. Where the scheme has no leases, a no-op Lease (enforced=False)."""
    if ttl_s < 0:
        raise ValueError(f"ttl_s must be >= 0, not {ttl_s}")
    store = _store(paths.lease)
    if store is None:
        return Lease(paths, run_id, ttl_s, time.time() + ttl_s, enforced=False)
    written: list[LeaseRecord] = []

    def decide(current: LeaseRecord | None) -> Any:
        written.clear()
        if current is not None and current.run_id != run_id and current.live(time.time()):
            return _KEEP
        same_run = current is not None and current.run_id == run_id
        written.append(_record(run_id, ttl_s, current.acquired if same_run else None))
        return written[0]

    try:
        current, _ = store.transact(decide, create_directory=True)
    except (_Contended, FileExistsError):
        _LOG.warning("%s: contended by other writers; run %s leaves the slide", paths.lease, run_id)
        return None
    if not written:
        _LOG.warning(
            "%s: run %s (host %s, pid %s) holds the slide until %s; run %s leaves it",
            paths.lease, current.run_id, current.host, current.pid, _iso(current.expires), run_id,
        )  # fmt: skip
        return None
    if current is not None and current.run_id != run_id:
        _LOG.info(
            "%s: run %s took over the expired lease of run %s (expired %s)",
            paths.lease, run_id, current.run_id, _iso(current.expires),
        )  # fmt: skip
    return Lease(paths, run_id, ttl_s, written[0].expires, enforced=True)


@contextlib.contextmanager
def held(paths: ArtifactPaths, run_id: str, ttl_s: float) -> Iterator[Lease | None]:
    """`with held(paths, run_id, ttl_s) as lease:` the Lease (released on leaving, also on an
    exception) or None when another live run holds the slide."""
    lease = acquire(paths, run_id, ttl_s)
    try:
        yield lease
    finally:
        if lease is not None:
            lease.release()


def release(paths: ArtifactPaths, run_id: str) -> None:
    """Frees the slide if run `run_id` holds its live lease (a slide that failed), else
    leaves it alone."""
    if live_holder(paths) == run_id:
        Lease(paths, run_id, 0.0, 0.0, enforced=True).release()


def live_holder(paths: ArtifactPaths) -> str | None:
    """The run_id of the live lease on the slide, or None (no lease, an expired one, or a
    scheme without leases)."""
    store = _store(paths.lease)
    if store is None:
        return None
    record = store.read()
    return record.run_id if record is not None and record.live(time.time()) else None
