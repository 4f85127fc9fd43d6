"""Model provenance (issue 16 item 7): the run records the model the driver resolved, and each
worker refuses to embed with a different snapshot. Checked with the project's stand-in
SavedModels, as a local directory and as Hugging Face cache snapshots read by the real
`huggingface_hub.snapshot_download` (offline), the handler pickled as Beam ships it."""

from __future__ import annotations

import pathlib
import pickle
import shutil

import numpy as np
import pytest

from models import stubs
from models.handler import ModelSnapshotMismatchError, PathFoundationModelHandler
from pipeline.config import load_config
from pipeline.launch import check_dataflow_config
from tests.test_models import REPO, _hf_offline

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return stubs.build_stub("stub-tiny", tmp_path_factory.mktemp("models") / "stub-tiny")


def _shipped(handler: PathFoundationModelHandler) -> PathFoundationModelHandler:
    """The handler as a worker gets it: recorded on the driver, then pickled."""
    handler.model_info()
    return pickle.loads(pickle.dumps(handler))


def _patches() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), np.uint8)


def test_a_worker_with_the_recorded_local_model_embeds_and_a_changed_one_refuses(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    handler = PathFoundationModelHandler(str(model), batch_size=2)
    worker = _shipped(handler)
    embedder = worker.load_model()
    assert embedder(_patches()).shape == (2, 384)
    assert worker.model_info() == handler.model_info()

    # The directory changes under the run (another snapshot baked at the same path).
    later = _shipped(handler)
    with open(model / "variables" / "variables.index", "ab") as index:
        index.write(b"\0")
    with pytest.raises(ModelSnapshotMismatchError, match="the run records"):
        later.load_model()


def _snapshot(hub: pathlib.Path, tiny_dir: pathlib.Path, commit: str) -> None:
    repo = hub / "models--google--path-foundation"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(
        tiny_dir, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("assets.extra")
    )


def test_hugging_face_main_moved_between_driver_and_worker_is_refused(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver_hub = _hf_offline(monkeypatch, tmp_path / "driver")
    _snapshot(driver_hub, tiny_dir, COMMIT_A)
    unpinned = _shipped(PathFoundationModelHandler(REPO, batch_size=2))
    assert unpinned.model_info().version == COMMIT_A  # what the outputs will record

    # The worker image baked another snapshot as `main`.
    worker_hub = _hf_offline(monkeypatch, tmp_path / "worker")
    _snapshot(worker_hub, tiny_dir, COMMIT_B)
    with pytest.raises(ModelSnapshotMismatchError, match=COMMIT_B):
        unpinned.load_model()


def test_a_pinned_revision_loads_that_commit_whatever_main_is(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _hf_offline(monkeypatch, tmp_path / "hf")
    _snapshot(hub, tiny_dir, COMMIT_A)
    _snapshot(hub, tiny_dir, COMMIT_B)  # main now points at B
    pinned = _shipped(PathFoundationModelHandler(REPO, revision=COMMIT_A, batch_size=2))
    assert pinned.model_info().version == COMMIT_A
    assert pinned.load_model()(_patches()).shape == (2, 384)
    assert pinned.model_info().version == COMMIT_A


def test_launch_requires_a_commit_pinned_revision_for_a_hugging_face_model(tmp_path) -> None:
    base = {
        "output_root": "gs://b/out",
        "dataflow.temp_location": "gs://b/tmp",
        "dataflow.project": "my-project",
    }
    cfg = load_config(ROOT / "configs" / "idc.yaml", base)
    assert cfg.model.name == REPO
    with pytest.raises(SystemExit, match="model revision pinned to a 40-hex commit"):
        check_dataflow_config(cfg)
    for branch in ("main", "v1.0"):
        moving = load_config(ROOT / "configs" / "idc.yaml", {**base, "model.revision": branch})
        with pytest.raises(SystemExit, match="40-hex commit"):
            check_dataflow_config(moving)
    pinned = load_config(ROOT / "configs" / "idc.yaml", {**base, "model.revision": COMMIT_A})
    check_dataflow_config(pinned)  # nothing missing
    stub = load_config(ROOT / "configs" / "idc.yaml", {**base, "model.name": "stub-tiny"})
    check_dataflow_config(stub)  # stand-ins have no revision
