"""The embedding step: read each chunk's patches and run the model on them, as one transform.

Reading and embedding are one composite so that they run on the same worker: a GPU resource
hint on it (Dataflow right fitting, pipeline/dag.py) puts both on the GPU workers, and only
coordinates (the chunks) cross into it, never pixels: a fusion break between a CPU-hinted
reader and a GPU-hinted model would ship ~150 kB of pixels per patch through the shuffle.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from transforms import stages


class EmbedChunks(beam.PTransform):
    """PatchChunks -> {'embedded': (uuid, (rows, embeddings [n, D])), 'bad': read dead letters,
    'embed_bad': dead letters of the model call and of the output check, per chunk}."""

    def __init__(self, handler, patch_size: int, icc_profile: str = "none"):
        super().__init__()
        self._handler = handler  # models.handler.PathFoundationModelHandler
        self._read = stages.ReadPatchesFn(patch_size, icc_profile)

    def expand(self, chunks):
        read = chunks | "ReadPatches" >> beam.ParDo(self._read).with_exception_handling()
        # Beam's own dead letters for RunInference: one chunk whose model call fails (an
        # out-of-memory error, a kernel error) fails that chunk, not the run.
        inferred, dlq = (
            read.good
            | "RunInference"
            >> RunInference(KeyedModelHandler(self._handler)).with_exception_handling()
        )
        checked = inferred | "KeyBySlide" >> beam.Map(stages.by_slide).with_exception_handling()
        embed_bad = [dlq.failed_inferences, checked.bad]
        embed_bad += [*dlq.failed_preprocessing, *dlq.failed_postprocessing]
        bad = embed_bad | "EmbedDeadLetters" >> beam.Flatten()
        return {"embedded": checked.good, "bad": read.bad, "embed_bad": bad}
