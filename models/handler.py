"""Beam RunInference model handler for Path Foundation (or a stand-in) SavedModels.

Beam's stock TF handler loads models through Keras, which cannot load a plain SavedModel
under Keras 3, so this handler loads the `serving_default` signature itself (see
`models.path_foundation.Embedder`).

An example is one chunk of a slide's patches, uint8 RGB [n, 224, 224, 3], and its inference
is float32 [n, 384]. Chunks are not merged into larger batches: each chunk is embedded in
consecutive model calls of `batch_size` patches, so a patch always shares its model call with
the same neighbours and a rerun gives bit-identical embeddings (TF's CPU kernels give results
that depend, in the last bits, on a patch's batch and position in it; k-means amplifies that).
Wrap it in `KeyedModelHandler` to carry chunk keys through `RunInference`:

    chunks | RunInference(KeyedModelHandler(PathFoundationModelHandler("stub-tiny")))
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from models.path_foundation import (
    Embedder,
    EmbedderOptions,
    ModelInfo,
    configure_threads,
    describe_model,
    load_embedder,
    resolve_model,
    visible_devices,
)
from transforms import metrics

_LOG = logging.getLogger(__name__)


class ModelSnapshotMismatchError(RuntimeError):
    """A worker resolved a different model snapshot than the one the run records."""


class PathFoundationModelHandler(ModelHandler[np.ndarray, PredictionResult, Embedder]):
    """Embeds chunks of uint8 [n, 224, 224, 3] patches, `batch_size` patches per model call.

    Args:
      model: a stub name, a local SavedModel directory or a Hugging Face repo id
        (see `models.path_foundation.resolve_model`).
      cache_dir: where stubs are built; default ~/.cache/pathembed/models.
      revision: Hugging Face revision (branch, tag or commit).
      batch_size: patches per model call.
      intra_op_threads, inter_op_threads: TensorFlow's thread pools in the worker process
        (0 = TensorFlow's default); set before the model is loaded.
      options: precision and XLA (`EmbedderOptions`; default: the model as defined).
      large_model, model_copies: Beam's options to share loaded models across the worker's
        processes (e.g. one model on a GPU); by default each process loads its own.
    """

    def __init__(
        self,
        model: str,
        cache_dir: pathlib.Path | None = None,
        revision: str | None = None,
        batch_size: int = 32,
        *,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        options: EmbedderOptions | None = None,
        large_model: bool = False,
        model_copies: int | None = None,
    ) -> None:
        # One chunk per RunInference batch: the chunk already is a batch of neighbours.
        super().__init__(
            min_batch_size=1,
            max_batch_size=1,
            large_model=large_model,
            model_copies=model_copies,
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._model = model
        self._cache_dir = cache_dir
        self._revision = revision
        self._batch_size = batch_size
        self._threads = (intra_op_threads, inter_op_threads)
        self._options = options or EmbedderOptions()
        self._info: ModelInfo | None = None

    @classmethod
    def from_config(cls, model: Any, model_copies: int | None = None) -> PathFoundationModelHandler:
        """The handler of a `pipeline.config.ModelConfig` (the `model:` config section);
        `model_copies` (dataflow.model_copies): models per worker, shared by its processes."""
        return cls(
            model.name,
            cache_dir=model.cache_dir,
            revision=model.revision,
            batch_size=model.batch_size,
            intra_op_threads=model.intra_op_threads,
            inter_op_threads=model.inter_op_threads,
            options=EmbedderOptions(model.precision, model.jit_compile),
            model_copies=model_copies,
        )

    def model_info(self) -> ModelInfo:
        """What will be recorded as the model; needs no TensorFlow (a Hugging Face model is
        resolved, i.e. fetched or found in the cache)."""
        if self._info is None:
            self._info = describe_model(self._model, self._cache_dir, self._revision)
        return self._info

    def load_model(self) -> Embedder:
        """Resolves (building a stub or fetching from Hugging Face if needed) and loads.

        When the driver has recorded the model (`model_info()` before the handler was sent to
        the workers), the snapshot this worker resolved must be that one: outputs record the
        driver's model name and version, so a worker whose image baked another snapshot (or
        whose `main` moved) would make embeddings that claim to be what they are not.
        """
        recorded = self._info
        # First: building a stand-in runs TensorFlow, which fixes its thread pools.
        configure_threads(*self._threads)
        model_dir, info = resolve_model(self._model, self._cache_dir, self._revision)
        if recorded is not None and (info.name, info.version) != (
            recorded.name,
            recorded.version,
        ):
            raise ModelSnapshotMismatchError(
                f"this worker loaded {info.name} {info.version} from {model_dir}, but the run "
                f"records {recorded.name} {recorded.version}; pin model.revision to a commit "
                "and bake that snapshot into the worker image"
            )
        self._info = info
        embedder = load_embedder(model_dir, self._options)
        _LOG.info(
            "loaded model %s %s; TensorFlow devices in this process: %s",
            info.name, info.version, ", ".join(visible_devices()),
        )  # fmt: skip
        return embedder

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        model_id = self.model_info().name
        results = []
        for chunk in batch:
            calls = [
                model(chunk[start : start + self._batch_size])
                for start in range(0, len(chunk), self._batch_size)
            ]
            embeddings = np.concatenate(calls) if calls else np.zeros((0, 384), np.float32)
            # The example is not kept: the patches are large and nothing downstream needs them.
            results.append(PredictionResult(None, embeddings, model_id))
        self._report_device(model)
        return results

    @staticmethod
    def _report_device(model: Embedder) -> None:
        """Once per loaded model, after its first call: where it ran, in the log and as the
        `model_device_{GPU,CPU}` counter that the run summary reads (pipeline/summary.py)."""
        device = getattr(model, "device", None)
        if device is None or getattr(model, "device_reported", False):
            return
        model.device_reported = True
        kind = metrics.device_kind(device)
        metrics.counter(metrics.MODEL_DEVICE_PREFIX + kind).inc()
        _LOG.info("the model runs on %s (%s)", device, kind)

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        if inference_args:
            raise ValueError(
                f"PathFoundationModelHandler takes no inference_args: {inference_args}"
            )

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(example.nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return "pathembed"

    def __repr__(self) -> str:
        return f"PathFoundationModelHandler(model={self._model!r}, options={self._options})"
