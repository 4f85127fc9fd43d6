"""The resource and search rows are checked before a slide is written: a row the table would
refuse (here a NaN centroid that got past every earlier check) fails that slide, as a dead
letter of the write stage, with nothing written and no completion marker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models.path_foundation import ModelInfo
from pipeline.config import PIPELINE_VERSION, load_config
from tests import bad_slides as bad
from transforms import clustering, stages
from transforms.errors import ReasonCode, SlideError
from transforms.outputs.artifacts import RunContext
from transforms.outputs.layout import DATASET_VERSION
from transforms.plan import SlideResult, plan_slide
from transforms.sources.dicom_files import enumerate_dicom_folder


def test_a_row_the_table_would_refuse_fails_the_slide_before_anything_is_written(tmp_path):
    (record,) = enumerate_dicom_folder(bad.tiny_slide(tmp_path / "slides"))
    cfg = load_config(None, [])
    plan = plan_slide(record, cfg.plan_params())
    embeddings = np.random.default_rng(0).normal(size=(len(plan.coords), 384)).astype(np.float32)
    clusters = clustering.cluster_embeddings(embeddings, cfg.kmeans, 0)
    centroids = clusters.centroids.copy()
    centroids[0, 5] = np.nan
    spoiled = dataclasses.replace(clusters, centroids=centroids)
    result = SlideResult(plan, embeddings, spoiled)
    model = ModelInfo("stub-tiny", "0", "test", True)
    params = cfg.output_params(model.name, model.version)
    write = stages.WriteSlideFn(RunContext(
        output_root=str(tmp_path / "out"), model=model, parameter_hash="h", params=params,
        dataset_version=DATASET_VERSION, pipeline_version=PIPELINE_VERSION, run_id="run-1",
    ))  # fmt: skip
    with pytest.raises(SlideError) as err:
        list(write.process(result))
    assert err.value.reason is ReasonCode.INTERNAL_ERROR
    assert "search rows of slide" in err.value.message and "NaN" in err.value.message
    assert not (tmp_path / "out").exists()
