"""Completion markers vouch for files (issue 15): sizes and SHA-256 of the seven files are
recorded; SkipDone redoes a slide whose files changed; readers (SlideArtifacts, fetch, show)
read only complete slides and check every file; a rerun with another n_clusters leaves no
stale cluster files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.search_cli import fetch_command
from transforms.outputs import archive, artifacts, layout, lease
from transforms.records import SlideRecord
from transforms.sources.dicom_files import enumerate_dicom_folder
from transforms.stages import SkipDoneOrUnrequested

RUN = "run-1"
HASH = "p" * 16


@pytest.fixture(scope="module")
def base_record(sample_slides) -> SlideRecord:
    (found,) = enumerate_dicom_folder(sample_slides / "small-40x")
    return found


def _write_slide(
    root, instance_uuid: str, n_clusters: int = 500, n: int = 30
) -> layout.ArtifactPaths:
    rng = np.random.default_rng(0)
    paths = layout.ArtifactPaths.for_slide(str(root), instance_uuid, "v1", n_clusters)
    embeddings = rng.normal(size=(n, 384)).astype(np.float32)
    jpeg = cv2.imencode(".jpeg", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()
    metadata = artifacts.build_metadata(
        identity={"instance_uuid": instance_uuid, "instance_hash": None,
                  "instance_pixeldata_SHA512_hash": None, "study_instance_uid": "1.2",
                  "series_instance_uid": "1.2.3", "sop_instance_uid": "1.2.3.4"},
        paths=paths, model_name="stub", model_version="0", dataset_version="v1",
        embedding_count=n, number_of_centroids=min(n, n_clusters), patch_size=224,
        level_width=2240, level_height=2240, extra={},
    )  # fmt: skip
    files = {
        paths.metadata: artifacts.json_bytes(metadata),
        paths.thumbnail: jpeg,
        paths.thumbnail_mask: jpeg,
        paths.embeddings: artifacts.npy_bytes(embeddings),
        paths.coordinates: artifacts.npy_bytes(np.zeros((n, 2), np.int64)),
        paths.centroids: artifacts.npy_bytes(embeddings[: min(n, n_clusters)]),
        paths.labels: artifacts.npy_bytes(np.arange(n, dtype=np.int64) % n_clusters),
    }
    marker = {"parameter_hash": HASH, "instance_hash": None, "run_id": RUN}
    artifacts.write_artifacts(paths, files, marker, RUN)
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / f"{RUN}.json").write_text("{}")  # the run committed its tables
    return paths


def _skip_done(root, **kw) -> SkipDoneOrUnrequested:
    return SkipDoneOrUnrequested(
        output_root=str(root), dataset_version="v1", n_clusters=500, parameter_hash=HASH,
        uuids=frozenset(), force=False, **kw,
    )  # fmt: skip


def test_the_marker_records_size_and_sha256_of_the_seven_files(tmp_path):
    paths = _write_slide(tmp_path, str(uuid.uuid4()))
    marker = json.loads(Path(paths.complete_marker).read_text())
    assert len(marker["files"]) == 7
    for name, entry in marker["files"].items():
        data = Path(f"{paths.directory}/{name}").read_bytes()
        assert entry["size"] == len(data)
        artifacts.check_file(marker, name, data)  # does not raise


def test_skip_done_redoes_a_slide_whose_files_are_missing_or_changed(tmp_path, base_record):
    record = dataclasses.replace(base_record, instance_uuid=str(uuid.uuid4()))
    paths = _write_slide(tmp_path, record.instance_uuid)
    assert list(_skip_done(tmp_path).process(record)) == []  # complete: skipped
    # same size, other bytes: found by checksums only
    data = bytearray(Path(paths.embeddings).read_bytes())
    data[-1] ^= 0xFF
    Path(paths.embeddings).write_bytes(bytes(data))
    assert list(_skip_done(tmp_path).process(record)) == []
    assert list(_skip_done(tmp_path, verify_checksums=True).process(record)) == [record]
    # a deleted file is found by the sizes, always
    os.remove(paths.embeddings)
    assert list(_skip_done(tmp_path).process(record)) == [record]


def test_a_rerun_with_another_n_clusters_leaves_no_old_cluster_files(tmp_path):
    instance = str(uuid.uuid4())
    _write_slide(tmp_path, instance, n_clusters=500)
    paths = _write_slide(tmp_path, instance, n_clusters=8)
    names = sorted(p.name for p in (tmp_path / instance / "path_foundation" / "v1").iterdir())
    assert "embeddings_8_cluster_centroid.npy" in names
    assert not [n for n in names if n.startswith("embeddings_500")]
    assert len(json.loads(Path(paths.complete_marker).read_text())["files"]) == 7


def test_readers_refuse_an_incomplete_slide(tmp_path):
    instance = str(uuid.uuid4())
    paths = _write_slide(tmp_path, instance)
    assert archive.SlideArtifacts.open(str(tmp_path), instance).embeddings().shape == (30, 384)
    os.remove(paths.complete_marker)  # e.g. a slide being rewritten
    with pytest.raises(archive.SlideNotFoundError, match="not complete"):
        archive.SlideArtifacts.open(str(tmp_path), instance)
    with pytest.raises(SystemExit, match="not complete"):
        fetch_command(
            argparse.Namespace(output_root=str(tmp_path), uuid=instance, anonymous=False,
                               out=tmp_path / "fetched"), [],
        )  # fmt: skip


def test_readers_check_every_file_against_the_marker(tmp_path):
    instance = str(uuid.uuid4())
    paths = _write_slide(tmp_path, instance)
    np.save(paths.labels, np.zeros(30, np.int64), allow_pickle=False)  # tampered
    slide = archive.SlideArtifacts.open(str(tmp_path), instance)
    assert slide.coordinates().shape == (30, 2)
    with pytest.raises(ValueError, match="does not match its completion marker"):
        slide.labels()
    with pytest.raises(SystemExit, match="does not match"):
        fetch_command(
            argparse.Namespace(output_root=str(tmp_path), uuid=instance, anonymous=False,
                               out=tmp_path / "fetched"), [],
        )  # fmt: skip


def test_a_pickled_array_is_never_loaded(tmp_path):
    instance = str(uuid.uuid4())
    paths = _write_slide(tmp_path, instance)
    # an object array (a pickle) where an embedding file is, with a matching marker
    np.save(paths.embeddings, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    marker = json.loads(Path(paths.complete_marker).read_text())
    data = Path(paths.embeddings).read_bytes()
    marker["files"]["slide_embedding.npy"] = artifacts.file_digests({paths.embeddings: data})[
        "slide_embedding.npy"
    ]
    Path(paths.complete_marker).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="allow_pickle"):
        archive.SlideArtifacts.open(str(tmp_path), instance).embeddings()


def test_a_marker_from_before_sizes_vouches_only_for_present_files(tmp_path, base_record):
    record = dataclasses.replace(base_record, instance_uuid=str(uuid.uuid4()))
    paths = _write_slide(tmp_path, record.instance_uuid)
    marker = json.loads(Path(paths.complete_marker).read_text())
    del marker["files"]  # as written by an older version
    Path(paths.complete_marker).write_text(json.dumps(marker))
    assert list(_skip_done(tmp_path).process(record)) == []  # not redone on upgrade
    Path(paths.labels).write_bytes(b"")
    assert list(_skip_done(tmp_path).process(record)) == [record]


def test_a_slide_another_live_run_is_writing_is_skipped_and_taken_once_it_is_free(
    tmp_path, base_record
):
    """One writer per slide: SkipDone takes the slide's lease for its run; a concurrent run
    finds the lease live and leaves the slide to it; once released, the next run takes it."""
    record = dataclasses.replace(base_record, instance_uuid=str(uuid.uuid4()))
    first, second = _skip_done(tmp_path, run_id="run-a"), _skip_done(tmp_path, run_id="run-b")
    assert list(first.process(record)) == [record]
    paths = layout.ArtifactPaths.for_slide(str(tmp_path), record.instance_uuid)
    assert lease.live_holder(paths) == "run-a"
    assert list(second.process(record)) == []  # in use by run-a
    assert list(first.process(record)) == [record]  # a retry of run-a's bundle: re-entrant
    lease.acquire(paths, "run-a", 60).release()  # run-a wrote (or failed) the slide
    assert list(second.process(record)) == [record]
    assert lease.live_holder(paths) == "run-b"
