"""One writer per slide (transforms/outputs/lease.py): two runs contending for one slide, on a
local folder and on gs:// (gcp-storage-emulator with the real google-cloud-storage client), many
processes racing for one lease, and write_artifacts' cleanup sparing a live run's temporaries.

Expiry is never waited for: a run that acquires with ttl_s=0 holds a lease that is expired at
once, which is what a run that died without renewing leaves behind.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import uuid
from pathlib import Path

import pytest
from apache_beam.io.filesystems import FileSystems

from tests import servers
from transforms.outputs import artifacts, layout, lease

SLIDE = str(uuid.uuid5(uuid.NAMESPACE_URL, "pathembed-test-lease"))
BUCKET = "pathembed-lease"
TTL = 600.0


# -- where the slide lives: a local folder, or a prefix of a bucket in the emulator ------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs-lease")) as url:
        servers.upload(BUCKET, {})
        yield url


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("emulator")
    return f"gs://{BUCKET}/{uuid.uuid4().hex}"  # a fresh output root per test


def _paths(root: str) -> layout.ArtifactPaths:
    return layout.ArtifactPaths.for_slide(root, SLIDE)


def _lease_document(paths: layout.ArtifactPaths) -> dict | None:
    if not FileSystems.exists(paths.lease):
        return None
    with FileSystems.open(paths.lease) as handle:
        return json.loads(handle.read())


def _names(paths: layout.ArtifactPaths) -> list[str]:
    found = FileSystems.match([FileSystems.join(paths.directory, "*")])[0].metadata_list
    return sorted(m.path.rsplit("/", 1)[-1] for m in found)


# -- two runs, one slide ---------------------------------------------------------------------


def test_of_two_runs_exactly_one_acquires_and_the_other_is_told_who_holds_it(root, caplog):
    paths = _paths(root)
    first = lease.acquire(paths, "run-a", TTL)
    with caplog.at_level("WARNING", logger="transforms.outputs.lease"):
        second = lease.acquire(paths, "run-b", TTL)
    assert first is not None and first.enforced
    assert second is None
    assert lease.live_holder(paths) == "run-a"
    assert "run-a" in caplog.text and "run-b leaves it" in caplog.text
    document = _lease_document(paths)
    assert document["run_id"] == "run-a" and isinstance(document["pid"], int)
    assert document["expires"] > document["acquired"]  # ISO-8601 UTC strings sort as times
    assert paths.lease not in paths.files()


def test_an_expired_lease_is_taken_over_and_its_old_holder_loses_it(root):
    paths = _paths(root)
    dead = lease.acquire(paths, "run-dead", 0)  # expired at once: a run that never renewed
    assert dead is not None
    assert lease.live_holder(paths) is None  # expired: it protects nobody
    taker = lease.acquire(paths, "run-b", TTL)
    assert taker is not None
    assert lease.live_holder(paths) == "run-b"
    with pytest.raises(lease.LeaseLost, match="run-b"):
        dead.renew()
    dead.release()  # not its lease any more: nothing is removed
    assert lease.live_holder(paths) == "run-b"
    assert lease.acquire(paths, "run-c", TTL) is None


def test_release_lets_the_other_run_in_and_leaves_no_file(root):
    paths = _paths(root)
    first = lease.acquire(paths, "run-a", TTL)
    assert lease.acquire(paths, "run-b", TTL) is None
    first.release()
    assert not FileSystems.exists(paths.lease)
    assert lease.live_holder(paths) is None
    second = lease.acquire(paths, "run-b", TTL)
    assert second is not None and lease.live_holder(paths) == "run-b"
    assert lease.acquire(paths, "run-a", TTL) is None


def test_the_same_run_re_enters_its_own_lease(root):
    paths = _paths(root)
    attempt = lease.acquire(paths, "run-a", TTL)
    retry = lease.acquire(paths, "run-a", TTL)  # Beam retrying the bundle within the run
    assert attempt is not None and retry is not None
    attempt.renew()  # still the run's own lease after the retry rewrote it
    assert lease.live_holder(paths) == "run-a"
    assert lease.acquire(paths, "run-b", TTL) is None
    retry.release()
    assert lease.live_holder(paths) is None


def test_renew_makes_a_lapsed_lease_live_again_while_nobody_took_it(root):
    paths = _paths(root)
    held = lease.acquire(paths, "run-a", 0)
    assert lease.live_holder(paths) is None
    held.ttl_s = TTL
    held.renew()
    assert lease.live_holder(paths) == "run-a"
    assert lease.acquire(paths, "run-b", TTL) is None
    assert _lease_document(paths)["expires"] > _lease_document(paths)["acquired"]


def test_renew_after_release_says_the_lease_is_lost(root):
    paths = _paths(root)
    held = lease.acquire(paths, "run-a", TTL)
    held.release()
    with pytest.raises(lease.LeaseLost, match="nobody"):
        held.renew()


def test_held_releases_on_leaving_also_on_an_exception_and_yields_none_when_taken(root):
    paths = _paths(root)
    with lease.held(paths, "run-a", TTL) as held:
        assert held is not None and lease.live_holder(paths) == "run-a"
        with lease.held(paths, "run-b", TTL) as other:
            assert other is None
    assert lease.live_holder(paths) is None
    with pytest.raises(RuntimeError, match="boom"), lease.held(paths, "run-a", TTL):
        raise RuntimeError("boom")
    assert not FileSystems.exists(paths.lease)


def test_a_lease_file_that_is_not_one_protects_nobody(root, caplog):
    paths = _paths(root)
    with FileSystems.create(paths.lease) as handle:
        handle.write(b'{"run_id": "half')  # a writer that died mid-write
    assert lease.live_holder(paths) is None
    taker = lease.acquire(paths, "run-b", TTL)
    assert taker is not None and lease.live_holder(paths) == "run-b"
    assert "not a lease file" in caplog.text


def test_schemes_without_conditional_create_get_an_unenforced_lease(tmp_path, caplog):
    paths = dataclasses.replace(_paths(str(tmp_path)), lease="s3://bucket/x/_LEASE.json")
    with caplog.at_level("WARNING", logger="transforms.outputs.lease"):
        first = lease.acquire(paths, "run-a", TTL)
        second = lease.acquire(paths, "run-b", TTL)
    assert first is not None and second is not None
    assert not first.enforced and not second.enforced
    first.renew()
    first.release()
    assert lease.live_holder(paths) is None
    assert "not enforced" in caplog.text


def test_a_negative_ttl_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ttl_s"):
        lease.acquire(_paths(str(tmp_path)), "run-a", -1)


# -- write_artifacts' cleanup of other runs' temporaries -------------------------------------


def _temporary(paths: layout.ArtifactPaths, name: str, run_id: str) -> str:
    uri = FileSystems.join(paths.directory, f"{name}.tmp-{run_id}")
    with FileSystems.create(uri) as handle:
        handle.write(b"half")
    return uri


def test_cleanup_keeps_the_temporaries_of_a_live_lease_holder_and_removes_a_dead_runs(root):
    paths = _paths(root)
    assert lease.acquire(paths, "run-live", TTL) is not None
    _temporary(paths, "slide_embedding.npy", "run-live")
    _temporary(paths, "metadata.json", "run-live")
    _temporary(paths, "slide_embedding.npy", "run-dead")
    artifacts.write_artifacts(paths, {paths.embeddings: b"x", paths.metadata: b"{}"}, {}, "run-r")
    assert _names(paths) == sorted([
        "slide_embedding.npy", "metadata.json", layout.COMPLETE_MARKER, layout.LEASE_FILE,
        "slide_embedding.npy.tmp-run-live", "metadata.json.tmp-run-live",
    ])  # fmt: skip


def test_cleanup_removes_the_temporaries_of_a_run_whose_lease_expired(root):
    paths = _paths(root)
    assert lease.acquire(paths, "run-dead", 0) is not None
    _temporary(paths, "slide_embedding.npy", "run-dead")
    artifacts.write_artifacts(paths, {paths.embeddings: b"x", paths.metadata: b"{}"}, {}, "run-r")
    assert _names(paths) == sorted([
        "slide_embedding.npy", "metadata.json", layout.COMPLETE_MARKER, layout.LEASE_FILE,
    ])  # fmt: skip


# -- many processes, one lease (local) --------------------------------------------------------


def _race(paths, run_id, barrier, results) -> None:
    barrier.wait()
    held = lease.acquire(paths, run_id, TTL)
    barrier.wait()  # every racer tries while the winner is alive (a dead holder frees it)
    results.put((run_id, held is not None))


def _race_processes(paths: layout.ArtifactPaths, count: int) -> list[str]:
    """`count` processes acquire at once (past one barrier); the run_ids that got the lease."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(count), context.Queue()
    workers = [
        context.Process(target=_race, args=(paths, f"run-{k}", barrier, results))
        for k in range(count)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    return [run_id for run_id, won in outcomes if won]


def test_eight_processes_race_for_a_free_lease_and_exactly_one_wins(tmp_path):
    paths = _paths(str(tmp_path))
    winners = _race_processes(paths, 8)
    assert len(winners) == 1
    assert _holder(paths) == winners[0]


def _holder(paths) -> str:
    return json.loads(Path(paths.lease).read_text())["run_id"]


def test_a_lease_of_a_process_of_this_host_that_is_gone_is_free_at_once(tmp_path):
    """A run killed on this machine (SIGKILL: it released nothing) does not hold its slides
    until the expiry: the next run takes them over."""
    paths = _paths(str(tmp_path))
    context = multiprocessing.get_context("fork")
    worker = context.Process(target=lease.acquire, args=(paths, "run-killed", TTL))
    worker.start()
    worker.join(timeout=60)
    assert _holder(paths) == "run-killed" and lease.live_holder(paths) is None
    assert lease.acquire(paths, "run-next", TTL) is not None
    assert lease.live_holder(paths) == "run-next"


def test_eight_processes_race_to_take_over_an_expired_lease_and_exactly_one_wins(tmp_path):
    paths = _paths(str(tmp_path))
    assert lease.acquire(paths, "run-dead", 0) is not None
    winners = _race_processes(paths, 8)
    assert len(winners) == 1
    assert _holder(paths) == winners[0]
    assert not [p for p in Path(paths.directory).iterdir() if p.name != layout.LEASE_FILE]
