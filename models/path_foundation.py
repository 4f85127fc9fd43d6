"""Finding, describing and loading the embedding model: Path Foundation or a stand-in.

`resolve_model()` turns the `--model` value into a local SavedModel directory plus a
`ModelInfo` that is recorded with every output, so embeddings made by a stand-in can never
pass for Path Foundation's:

* a stub name (`stub-tiny`, `stub-vit-s16`): built once into a cache directory;
* a local directory holding `saved_model.pb`;
* a Hugging Face repo id (`google/path-foundation`): fetched with `huggingface_hub`
  (gated: needs an accepted licence and a token, or an already cached snapshot).

`load_embedder()` loads the directory's `serving_default` signature as an `Embedder`, which
maps uint8 RGB patches [B, 224, 224, 3] to float32 embeddings [B, 384]. Options for GPUs
(`EmbedderOptions`): XLA compilation, and TensorFlow's automatic mixed precision (float16 on
GPUs, bfloat16 on CPUs with AVX512-BF16/AMX), a graph rewrite that TensorFlow applies to every
function of the process; both are off by default. `configure_threads()` sets TensorFlow's
intra-/inter-op thread pools, which only works before TensorFlow has run anything.

TensorFlow is imported only when a model is loaded, so describing a model is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from models import signature, stubs

if TYPE_CHECKING:
    import tensorflow as tf

PATH_FOUNDATION_REPO = "google/path-foundation"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/pathembed/models")
PATCH_SHAPE = (signature.PATCH_SIZE, signature.PATCH_SIZE, 3)

_LOG = logging.getLogger(__name__)
# precision -> TensorFlow's graph rewrite (grappler) that implements it
PRECISIONS: dict[str, str | None] = {
    "float32": None,
    "mixed_float16": "auto_mixed_precision",  # GPUs (compute capability >= 7.0)
    "mixed_bfloat16": "auto_mixed_precision_onednn_bfloat16",  # CPUs with AVX512-BF16 / AMX
}

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What produced an embedding; recorded in the outputs."""

    name: str
    version: str
    source: str
    is_stand_in: bool


class ModelAccessError(RuntimeError):
    """The Hugging Face model cannot be fetched: no access, no token, or offline and uncached."""


def stub_info(name: str) -> ModelInfo:
    """ModelInfo of a built-in stand-in model (no build needed)."""
    if name not in stubs.STUB_MODELS:
        raise ValueError(f"unknown stub model {name!r}; choose one of {sorted(stubs.STUB_MODELS)}")
    return ModelInfo(
        name=name, version=stubs.stub_version(name), source=f"builtin:{name}", is_stand_in=True
    )


def local_info(model_dir: pathlib.Path, name: str | None = None) -> ModelInfo:
    """ModelInfo of a SavedModel directory: version is a short sha256 of its graph and index.

    `variables/variables.index` holds a checksum of every weight tensor, so hashing it with
    `saved_model.pb` tells apart models that differ only in weights without reading them all.
    A directory built by `models.stubs` is still labelled as a stand-in.
    """
    model_dir = pathlib.Path(model_dir)
    graph = model_dir / "saved_model.pb"
    if not graph.is_file():
        raise FileNotFoundError(f"{model_dir} is not a TF SavedModel directory (no saved_model.pb)")
    digest = hashlib.sha256(graph.read_bytes())
    index = model_dir / "variables" / "variables.index"
    if index.is_file():
        digest.update(index.read_bytes())
    content = f"sha256:{digest.hexdigest()[:16]}"
    marker = stubs.read_marker(model_dir)
    if marker is not None:
        return ModelInfo(
            name=name or marker["name"],
            version=f"{marker['version']} {content}",
            source=str(model_dir),
            is_stand_in=True,
        )
    return ModelInfo(
        name=name or model_dir.name, version=content, source=str(model_dir), is_stand_in=False
    )


def access_help(repo_id: str) -> str:
    """How to get access to a gated Hugging Face model, or run without it."""
    return (
        f"Cannot get the model {repo_id!r} from Hugging Face. It is gated: request access at "
        f"https://huggingface.co/{repo_id}, then authenticate with `hf auth login` or the "
        "HF_TOKEN environment variable (a cached snapshot also works offline). To run without "
        "it, use `--model stub-tiny`: outputs are then labelled as a stand-in, not Path "
        "Foundation."
    )


def is_hf_repo_id(model: str) -> bool:
    """Whether `model` looks like `owner/name` and is not an existing local path."""
    return bool(_REPO_ID.fullmatch(model)) and not pathlib.Path(model).exists()


def _download(repo_id: str, revision: str | None) -> pathlib.Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,  # GatedRepoError is a subclass
    )

    try:
        return pathlib.Path(snapshot_download(repo_id, revision=revision))
    except (RepositoryNotFoundError, LocalEntryNotFoundError) as exc:
        raise ModelAccessError(f"{access_help(repo_id)}\nCause: {exc}") from exc
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise ModelAccessError(f"{access_help(repo_id)}\nCause: {exc}") from exc
        raise


def resolve_model(
    model: str,
    cache_dir: pathlib.Path | None = None,
    revision: str | None = None,
    *,
    name: str | None = None,
) -> tuple[pathlib.Path, ModelInfo]:
    """Returns a local SavedModel directory for `model` and the ModelInfo to record.

    Args:
      model: a stub name, a local SavedModel directory, or a Hugging Face repo id.
      cache_dir: where stubs are built (`<cache_dir>/<stub name>`); default
        ~/.cache/pathembed/models. Hugging Face models use the Hugging Face cache (HF_HOME).
      revision: Hugging Face branch, tag or commit; default `main`.
      name: the name to record for a local directory; default the directory's name.

    Raises:
      ModelAccessError: the Hugging Face model cannot be fetched (see `access_help`).
    """
    if model in stubs.STUB_MODELS:
        root = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
        model_dir = root / model
        if not (model_dir / "saved_model.pb").is_file():
            stubs.build_stub(model, model_dir)
        else:
            _check_stub_marker(model, model_dir)
        return model_dir, stub_info(model)
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return path, local_info(path, name)
    if is_hf_repo_id(model):
        snapshot = _download(model, revision)
        commit = snapshot.name if _COMMIT_HASH.fullmatch(snapshot.name) else None
        version = commit or local_info(snapshot).version
        info = ModelInfo(
            name=name or model.split("/")[-1], version=version, source=model, is_stand_in=False
        )
        return snapshot, info
    raise ValueError(
        f"--model {model!r} is neither a stub ({', '.join(stubs.STUB_MODELS)}), a local "
        "SavedModel directory, nor a Hugging Face repo id like google/path-foundation"
    )


def _check_stub_marker(name: str, model_dir: pathlib.Path) -> None:
    marker = stubs.read_marker(model_dir)
    if marker is None or marker.get("version") != stubs.stub_version(name):
        raise FileExistsError(
            f"{model_dir} holds a model that is not {stubs.stub_version(name)}; remove it to "
            "rebuild the stub"
        )


def describe_model(
    model: str, cache_dir: pathlib.Path | None = None, revision: str | None = None
) -> ModelInfo:
    """ModelInfo for `model` without building stubs; a Hugging Face model is resolved."""
    if model in stubs.STUB_MODELS:
        return stub_info(model)
    return resolve_model(model, cache_dir, revision)[1]


@dataclasses.dataclass(frozen=True)
class EmbedderOptions:
    """How the model is run; the defaults compute exactly what the SavedModel defines.

    precision: a key of PRECISIONS. Anything but float32 switches on TensorFlow's automatic
      mixed-precision rewrite for the whole process (one model per worker process); where the
      device cannot run it (float16 needs a GPU), TensorFlow leaves the graph as it is.
    jit_compile: compile the model with XLA.
    """

    precision: str = "float32"
    jit_compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}: {self.precision!r}")


def configure_threads(intra_op: int = 0, inter_op: int = 0) -> None:
    """Sets TensorFlow's thread pools (0 = TensorFlow's default, one thread per core).

    TensorFlow fixes them when it first runs an op; after that a different setting is logged
    and ignored.
    """
    import tensorflow as tf

    for value, setter, getter in (
        (intra_op, tf.config.threading.set_intra_op_parallelism_threads,
         tf.config.threading.get_intra_op_parallelism_threads),
        (inter_op, tf.config.threading.set_inter_op_parallelism_threads,
         tf.config.threading.get_inter_op_parallelism_threads),
    ):  # fmt: skip
        if value < 0:
            raise ValueError(f"thread counts must be >= 0, got {value}")
        if value == getter():
            continue
        try:
            setter(value)
        except RuntimeError:
            _LOG.warning(
                "TensorFlow is already initialized with %s = %d; cannot set %d in this process",
                getter.__name__.removeprefix("get_"), getter(), value,
            )  # fmt: skip


class Embedder:
    """A loaded `serving_default` signature: uint8 RGB patches in, float32 embeddings out."""

    def __init__(self, model_dir: pathlib.Path, options: EmbedderOptions | None = None) -> None:
        import tensorflow as tf

        self.options = options or EmbedderOptions()
        rewrite = PRECISIONS[self.options.precision]
        if rewrite is not None:
            tf.config.optimizer.set_experimental_options({rewrite: True})
        self.model_dir = pathlib.Path(model_dir)
        self._loaded = tf.saved_model.load(str(self.model_dir))  # keeps the variables alive
        self._fn = self._loaded.signatures["serving_default"]
        _, inputs = self._fn.structured_input_signature
        if len(inputs) != 1:
            raise ValueError(f"{model_dir}: expected one input, signature has {sorted(inputs)}")
        [(self.input_name, spec)] = inputs.items()
        if tuple(spec.shape[1:]) != PATCH_SHAPE or spec.dtype != tf.float32:
            raise ValueError(f"{model_dir}: input {spec} is not float32 [batch, 224, 224, 3]")
        outputs = self._fn.structured_outputs
        self.output_key = signature.OUTPUT_KEY if signature.OUTPUT_KEY in outputs else None
        if self.output_key is None:
            raise ValueError(f"{model_dir}: signature has no {signature.OUTPUT_KEY!r} output")
        dim = outputs[self.output_key].shape[-1]
        # Checked once here, with a clear error, rather than as a misshapen table row later.
        if dim != signature.EMBEDDING_DIM:
            raise ValueError(
                f"{model_dir}: output {signature.OUTPUT_KEY!r} has {dim} values per patch "
                f"({outputs[self.output_key]}); Path Foundation embeddings have "
                f"{signature.EMBEDDING_DIM}"
            )
        self.embedding_dim = int(dim)
        self._embed = self._traced_embed(tf)
        # Where the model runs: the device of its first output ("GPU:0", "CPU:0"), set by the
        # first call (TensorFlow places the graph on its first GPU when it sees one).
        self.device: str | None = None

    def _traced_embed(self, tf: Any) -> Any:
        """One graph for uint8 -> float32 / 255 and the model (faster than numpy or eager ops)."""
        fn, input_name, output_key = self._fn, self.input_name, self.output_key

        @tf.function(
            input_signature=[tf.TensorSpec([None, *PATCH_SHAPE], tf.uint8)],
            jit_compile=self.options.jit_compile,
        )
        def embed(patches: tf.Tensor) -> tf.Tensor:
            images = tf.cast(patches, tf.float32) / 255.0
            return fn(**{input_name: images})[output_key]

        return embed

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Embeds uint8 RGB patches [B, 224, 224, 3]; returns float32 [B, embedding_dim]."""
        if not isinstance(patches, np.ndarray) or patches.dtype != np.uint8:
            got = getattr(patches, "dtype", type(patches).__name__)
            raise ValueError(f"patches must be a uint8 numpy array, got {got}")
        if patches.ndim != 4 or patches.shape[1:] != PATCH_SHAPE:
            raise ValueError(f"patches must have shape [B, 224, 224, 3], got {patches.shape}")
        if len(patches) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        out = self._embed(patches)
        if self.device is None:
            self.device = out.device.rpartition("device:")[2] or out.device
        return out.numpy()


def visible_devices() -> list[str]:
    """TensorFlow's devices in this process, e.g. ["CPU:0", "GPU:0 (NVIDIA H200)"]."""
    import tensorflow as tf

    names = []
    for device in tf.config.list_logical_devices():
        name = device.name.rpartition("device:")[2]
        if device.device_type == "GPU":
            physical = tf.config.list_physical_devices("GPU")
            index = int(name.rpartition(":")[2])
            if index < len(physical):
                details = tf.config.experimental.get_device_details(physical[index])
                name += f" ({details.get('device_name', 'GPU')})"
        names.append(name)
    return names


def load_embedder(model_dir: pathlib.Path, options: EmbedderOptions | None = None) -> Embedder:
    """Loads the SavedModel at `model_dir` for embedding."""
    return Embedder(model_dir, options)
