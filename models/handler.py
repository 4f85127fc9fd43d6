"""Beam RunInference model handler for Path Foundation (or a stand-in) SavedModels.

Beam's stock TF handler loads models through Keras, which cannot load a plain SavedModel
under Keras 3, so this handler loads the `serving_default` signature itself (see
`models.path_foundation.Embedder`). Examples are uint8 RGB patches [224, 224, 3]; each
prediction's inference is a float32 [384] embedding. Wrap it in `KeyedModelHandler` to carry
patch keys through `RunInference`:

    patches | RunInference(KeyedModelHandler(PathFoundationModelHandler("stub-tiny")))
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from models.path_foundation import Embedder, ModelInfo, describe_model, load_embedder, resolve_model


class PathFoundationModelHandler(ModelHandler[np.ndarray, PredictionResult, Embedder]):
    """Embeds batches of uint8 [224, 224, 3] patches with one model call per batch.

    Args:
      model: a stub name, a local SavedModel directory or a Hugging Face repo id
        (see `models.path_foundation.resolve_model`).
      cache_dir: where stubs are built; default ~/.cache/pathembed/models.
      revision: Hugging Face revision (branch, tag or commit).
      min_batch_size, max_batch_size: bounds for Beam's `BatchElements`.
      large_model, model_copies: Beam's options to share loaded models across the worker's
        processes (e.g. one model on a GPU); by default each process loads its own.
    """

    def __init__(
        self,
        model: str,
        cache_dir: pathlib.Path | None = None,
        revision: str | None = None,
        min_batch_size: int = 1,
        max_batch_size: int = 64,
        *,
        large_model: bool = False,
        model_copies: int | None = None,
    ) -> None:
        super().__init__(
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            large_model=large_model,
            model_copies=model_copies,
        )
        self._model = model
        self._cache_dir = cache_dir
        self._revision = revision
        self._info: ModelInfo | None = None

    def model_info(self) -> ModelInfo:
        """What will be recorded as the model; needs no TensorFlow (a Hugging Face model is
        resolved, i.e. fetched or found in the cache)."""
        if self._info is None:
            self._info = describe_model(self._model, self._cache_dir, self._revision)
        return self._info

    def load_model(self) -> Embedder:
        """Resolves (building a stub or fetching from Hugging Face if needed) and loads."""
        model_dir, self._info = resolve_model(self._model, self._cache_dir, self._revision)
        return load_embedder(model_dir)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        embeddings = model(np.stack(batch))
        model_id = self.model_info().name
        return [
            PredictionResult(example, embedding, model_id)
            for example, embedding in zip(batch, embeddings, strict=True)
        ]

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
        return f"PathFoundationModelHandler(model={self._model!r})"
