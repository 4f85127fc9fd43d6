"""Tests of models/: stand-in SavedModels, model resolution (Hugging Face offline), the embedder
and the Beam model handler in a real (in-process FnApiRunner) pipeline."""

from __future__ import annotations

import os
import pathlib
import shutil

import apache_beam as beam
import httpx2
import huggingface_hub.constants
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from models import path_foundation, stubs
from models.handler import PathFoundationModelHandler
from models.path_foundation import ModelAccessError, ModelInfo, load_embedder, resolve_model

REPO = "google/path-foundation"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return stubs.build_stub("stub-tiny", tmp_path_factory.mktemp("models") / "stub-tiny")


@pytest.fixture(scope="module")
def embedder(tiny_dir: pathlib.Path) -> path_foundation.Embedder:
    return load_embedder(tiny_dir)


def _solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (224, 224, 3)).copy()


def _pink_texture(seed: int) -> np.ndarray:
    """Pink 'stroma' with purple 'nuclei' and noise, a bit like H&E."""
    rng = np.random.default_rng(seed)
    img = _solid((230, 150, 190)).astype(np.float32)
    yy, xx = np.mgrid[0:224, 0:224]
    for cy, cx in rng.uniform(0, 224, (40, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (90, 40, 120)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _hf_offline(monkeypatch: pytest.MonkeyPatch, home: pathlib.Path) -> pathlib.Path:
    """Offline Hugging Face with its cache under `home`; returns the hub cache dir.

    huggingface_hub reads these variables when imported, so its constants are patched too.
    """
    hub = home / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


# --- stand-in models -------------------------------------------------------------------------


def test_stub_signature_matches_path_foundation(tiny_dir: pathlib.Path) -> None:
    fn = tf.saved_model.load(str(tiny_dir)).signatures["serving_default"]
    args, kwargs = fn.structured_input_signature
    assert args == ()
    assert list(kwargs) == ["inputs"]
    assert kwargs["inputs"].shape.as_list() == [None, 224, 224, 3]
    assert kwargs["inputs"].dtype == tf.float32
    assert list(fn.structured_outputs) == ["output_0"]
    assert fn.structured_outputs["output_0"].shape.as_list() == [None, 384]
    out = fn(inputs=tf.zeros([2, 224, 224, 3]))["output_0"]
    assert out.shape == (2, 384) and out.dtype == tf.float32


def test_independent_builds_give_identical_outputs(
    tiny_dir: pathlib.Path, embedder: path_foundation.Embedder, tmp_path: pathlib.Path
) -> None:
    # resolve_model builds the stub into an empty cache: a second, independent build.
    model_dir, info = resolve_model("stub-tiny", cache_dir=tmp_path)
    assert model_dir == tmp_path / "stub-tiny" and model_dir != tiny_dir
    assert info == path_foundation.stub_info("stub-tiny")
    patches = _random_patches(4)
    np.testing.assert_array_equal(load_embedder(model_dir)(patches), embedder(patches))


def test_build_into_existing_stub_keeps_it_and_leaves_no_temp_dirs(tiny_dir: pathlib.Path) -> None:
    graph = tiny_dir / "saved_model.pb"
    before = graph.stat().st_mtime_ns
    # What a process that lost a build race does: its rename fails, the existing copy stays.
    assert stubs.build_stub("stub-tiny", tiny_dir) == tiny_dir
    assert graph.stat().st_mtime_ns == before
    assert sorted(p.name for p in tiny_dir.parent.iterdir()) == ["stub-tiny"]


def test_stub_embeddings_depend_on_content(embedder: path_foundation.Embedder) -> None:
    white, white2 = _solid((245, 245, 245)), _solid((240, 242, 244))
    pink, pink2 = _pink_texture(1), _pink_texture(2)
    emb = embedder(np.stack([white, white2, pink, pink2, _solid((0, 0, 0))]))
    assert np.isfinite(emb).all()
    assert _cosine(emb[0], emb[2]) < 0.9  # white vs pink tissue: clearly different
    assert _cosine(emb[2], emb[3]) > 0.7  # two pink textures: alike
    assert _cosine(emb[0], emb[1]) > 0.95  # two whites: nearly the same
    assert (emb.std(axis=0) > 1e-3).all()  # no constant (saturated or dead) dimension


def test_vit_stub_builds_with_the_signature(tmp_path: pathlib.Path) -> None:
    # Only built and inspected: one batch costs seconds on a CPU (it is for benchmarks).
    model_dir = stubs.build_stub("stub-vit-s16", tmp_path / "vit")
    fn = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    assert fn.structured_input_signature[1]["inputs"].shape.as_list() == [None, 224, 224, 3]
    assert fn.structured_outputs["output_0"].shape.as_list() == [None, 384]
    assert path_foundation.local_info(model_dir).is_stand_in


def test_build_stub_rejects_unknown_name(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="stub-tiny"):
        stubs.build_stub("stub-huge", tmp_path / "x")


# --- embedder --------------------------------------------------------------------------------


def test_embedder_uint8_equals_signature_on_float_input(
    tiny_dir: pathlib.Path, embedder: path_foundation.Embedder
) -> None:
    patches = _random_patches(3, seed=7)
    fn = tf.saved_model.load(str(tiny_dir)).signatures["serving_default"]
    expected = fn(inputs=tf.constant(patches.astype(np.float32) / 255.0))["output_0"].numpy()
    got = embedder(patches)
    assert got.dtype == np.float32 and got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_embedder_validates_input(embedder: path_foundation.Embedder) -> None:
    with pytest.raises(ValueError, match="uint8"):
        embedder(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        embedder(np.zeros((1, 112, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        embedder(np.zeros((224, 224, 3), np.uint8))
    assert embedder(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 384)


# --- resolving models ------------------------------------------------------------------------


def test_resolve_cached_stub_does_not_rebuild(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    shutil.copytree(tiny_dir, tmp_path / "stub-tiny")
    before = (tmp_path / "stub-tiny" / "saved_model.pb").stat().st_mtime_ns
    model_dir, info = resolve_model("stub-tiny", cache_dir=tmp_path)
    assert model_dir == tmp_path / "stub-tiny"
    assert (model_dir / "saved_model.pb").stat().st_mtime_ns == before
    assert info.is_stand_in and info.version.startswith("stub-tiny-v1 ")
    assert "NOT Path Foundation" in info.version


def test_resolve_local_dir(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # A stub directory passed by path is still labelled a stand-in.
    _, info = resolve_model(str(tiny_dir))
    assert info.is_stand_in and info.name == "stub-tiny" and info.source == str(tiny_dir)
    # Any other SavedModel: named after the directory (or by the caller), versioned by content.
    plain = tmp_path / "my-model"
    shutil.copytree(tiny_dir, plain, ignore=shutil.ignore_patterns("assets.extra"))
    model_dir, info = resolve_model(str(plain))
    assert model_dir == plain
    assert info.name == "my-model" and not info.is_stand_in and info.source == str(plain)
    assert info.version.startswith("sha256:") and len(info.version) == len("sha256:") + 16
    assert resolve_model(str(plain), name="pf-v1")[1] == ModelInfo(
        "pf-v1", info.version, str(plain), False
    )


def test_resolve_rejects_what_is_no_model(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="neither a stub"):
        resolve_model("no-such-model")
    with pytest.raises(FileNotFoundError, match=r"saved_model\.pb"):
        resolve_model(str(tmp_path))


def test_resolve_hugging_face_from_offline_cache(
    tiny_dir: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = _hf_offline(monkeypatch, tmp_path / "hf")
    repo = hub / "models--google--path-foundation"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_dir, snapshot, ignore=shutil.ignore_patterns("assets.extra"))

    model_dir, info = resolve_model(REPO)  # the real huggingface_hub.snapshot_download
    assert model_dir.resolve() == snapshot.resolve()
    assert info == ModelInfo("path-foundation", COMMIT, REPO, is_stand_in=False)
    assert resolve_model(REPO, revision=COMMIT)[1].version == COMMIT
    assert load_embedder(model_dir)(_random_patches(1)).shape == (1, 384)


def _assert_access_help(message: str) -> None:
    assert "https://huggingface.co/google/path-foundation" in message
    assert "hf auth login" in message
    assert "HF_TOKEN" in message
    assert "--model stub-tiny" in message
    assert "stand-in" in message


def test_hugging_face_offline_and_uncached_raises_access_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hf_offline(monkeypatch, tmp_path / "hf")
    with pytest.raises(ModelAccessError) as err:
        resolve_model(REPO)
    _assert_access_help(str(err.value))
    assert isinstance(err.value, RuntimeError)


@pytest.mark.parametrize(
    ("error_cls", "status", "is_access_error"),
    [(GatedRepoError, 403, True), (HfHubHTTPError, 401, True), (HfHubHTTPError, 500, False)],
)
def test_hugging_face_http_errors(
    monkeypatch: pytest.MonkeyPatch,
    error_cls: type[HfHubHTTPError],
    status: int,
    is_access_error: bool,
) -> None:
    url = f"https://huggingface.co/api/models/{REPO}"
    response = httpx2.Response(status, request=httpx2.Request("GET", url))

    def fail(*args: object, **kwargs: object) -> str:
        raise error_cls(f"{status} Client Error", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelAccessError if is_access_error else HfHubHTTPError) as err:
        resolve_model(REPO)
    if is_access_error:
        _assert_access_help(str(err.value))
    else:
        assert not isinstance(err.value, ModelAccessError)


# --- Beam model handler ----------------------------------------------------------------------


def test_handler_describes_model_without_loading_it(tmp_path: pathlib.Path) -> None:
    handler = PathFoundationModelHandler("stub-tiny", cache_dir=tmp_path, batch_size=16)
    assert handler.model_info() == path_foundation.stub_info("stub-tiny")
    assert not os.listdir(tmp_path)  # nothing built
    assert handler.batch_elements_kwargs() == {"min_batch_size": 1, "max_batch_size": 1}
    assert handler.get_metrics_namespace() == "pathembed"
    assert handler.get_num_bytes([np.stack([_solid((0, 0, 0))] * 2)]) == 2 * 224 * 224 * 3
    assert not handler.share_model_across_processes()
    with pytest.raises(ValueError):
        handler.validate_inference_args({"x": 1})
    with pytest.raises(ValueError):
        PathFoundationModelHandler("stub-tiny", batch_size=0)


def test_handler_in_beam_pipeline(
    tiny_dir: pathlib.Path, embedder: path_foundation.Embedder, tmp_path: pathlib.Path
) -> None:
    shutil.copytree(tiny_dir, tmp_path / "stub-tiny")  # a warm cache: no build on the worker
    chunks = {"slide-1/0": _random_patches(10, seed=3), "slide-1/1": _random_patches(3, seed=4)}
    # Expected: the same model calls the handler makes (batches of 4 within each chunk).
    expected = {
        key: np.concatenate([embedder(c[i : i + 4]) for i in range(0, len(c), 4)])
        for key, c in chunks.items()
    }
    handler = PathFoundationModelHandler("stub-tiny", cache_dir=tmp_path, batch_size=4)

    def check(results: list[tuple[str, PredictionResult]]) -> None:
        assert sorted(key for key, _ in results) == sorted(chunks)
        for key, result in results:
            assert result.model_id == "stub-tiny"
            assert result.inference.dtype == np.float32
            assert result.inference.shape == (len(chunks[key]), 384)
            # Same calls, same process: bit-identical, which reruns rely on.
            np.testing.assert_array_equal(result.inference, expected[key])

    with beam.Pipeline(runner=FnApiRunner()) as p:
        results = p | beam.Create(list(chunks.items())) | RunInference(KeyedModelHandler(handler))
        assert_that(results, check)


# --- run options: XLA, mixed precision, threads -------------------------------------------------


@pytest.fixture(scope="module")
def slide_patches(sample_slides: pathlib.Path) -> np.ndarray:
    """24 tissue patches of the medium sample slide, read as the pipeline reads them."""
    from transforms import patches as patch_io
    from transforms.plan import PlanParams, plan_slide
    from transforms.sources.dicom_files import enumerate_dicom_folder

    (record,) = list(enumerate_dicom_folder(sample_slides / "medium-20x"))
    chunks = plan_slide(record, PlanParams()).chunks
    slide = patch_io.open_slide(record.files)
    level = patch_io.level_of(slide, record.sop_instance_uid)
    return patch_io.read_patches(slide, level, chunks[len(chunks) // 2].coords[:24], 1.0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_xla_matches_float32_on_the_sample_slide(
    tiny_dir: pathlib.Path, embedder: path_foundation.Embedder, slide_patches: np.ndarray
) -> None:
    xla = load_embedder(tiny_dir, path_foundation.EmbedderOptions(jit_compile=True))
    reference = embedder(slide_patches)
    compiled = xla(slide_patches)
    assert compiled.shape == reference.shape and compiled.dtype == np.float32
    assert _cosines(compiled, reference).min() >= 0.999


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("model", ["stub-tiny", "stub-vit-s16"])
def test_reduced_precision_matches_float32_on_the_sample_slide(
    precision: str, model: str, slide_patches: np.ndarray, tmp_path_factory
) -> None:
    """The check that must pass on the device that runs a reduced precision before it may be
    switched on (configs/local.yaml: model.precision). TensorFlow applies the rewrite only
    where the device supports it (float16: a GPU; bfloat16: a CPU with AVX512-BF16 or AMX);
    elsewhere the outputs are bit-identical and there is nothing to check."""
    model_dir, _ = resolve_model(model, tmp_path_factory.getbasetemp() / "precision-models")
    pixels = slide_patches[:4] if model == "stub-vit-s16" else slide_patches
    reference = load_embedder(model_dir)(pixels)  # before the process-wide rewrite is on
    rewrite = path_foundation.PRECISIONS[precision]
    try:
        reduced = load_embedder(model_dir, path_foundation.EmbedderOptions(precision=precision))
        got = reduced(pixels)
    finally:
        tf.config.optimizer.set_experimental_options({rewrite: False})
    # Where TensorFlow left the graph as it is, the outputs are identical (cosine 1).
    assert got.dtype == np.float32 and got.shape == reference.shape
    assert _cosines(got, reference).min() >= 0.999


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="precision"):
        path_foundation.EmbedderOptions(precision="int8")
    with pytest.raises(ValueError, match="thread counts"):
        path_foundation.configure_threads(-1)


def test_threads_after_tensorflow_started_are_logged_not_fatal(
    embedder: path_foundation.Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    current = tf.config.threading.get_intra_op_parallelism_threads()
    path_foundation.configure_threads(
        current, tf.config.threading.get_inter_op_parallelism_threads()
    )
    assert not caplog.records  # unchanged settings: nothing to do
    path_foundation.configure_threads(current + 3)
    assert "already initialized" in caplog.text
    assert tf.config.threading.get_intra_op_parallelism_threads() == current


def test_handler_loads_with_its_options(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    shutil.copytree(tiny_dir, tmp_path / "stub-tiny")
    options = path_foundation.EmbedderOptions(jit_compile=True)
    handler = PathFoundationModelHandler(
        "stub-tiny", cache_dir=tmp_path, batch_size=4, options=options
    )
    model = handler.load_model()
    assert model.options == options
    [result] = handler.run_inference([_random_patches(5)], model)
    assert result.inference.shape == (5, 384)
    assert "jit_compile=True" in repr(handler)


def test_a_model_whose_output_is_not_384_wide_is_refused_at_load(tmp_path: pathlib.Path) -> None:
    """A real SavedModel with Path Foundation's input but a 383-wide output_0: refused once,
    when loaded, with a sentence naming the width, instead of misshapen rows later."""

    class Narrow(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.float32)])
        def serve(self, inputs):
            return {"output_0": tf.reduce_mean(inputs, axis=[1, 2])[:, :1] * tf.ones([1, 383])}

    module = Narrow()
    tf.saved_model.save(
        module, str(tmp_path / "narrow"), signatures={"serving_default": module.serve}
    )
    with pytest.raises(ValueError, match=r"has 383 values per patch.*have 384"):
        load_embedder(tmp_path / "narrow")
