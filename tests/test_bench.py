"""The benchmark's helpers: the generated large slide is a WSI the pipeline reads; its datasets
are what they say. (No timing is asserted anywhere in the tests.)"""

from __future__ import annotations

import pathlib
import sys

import cv2
import numpy as np
import pydicom
from pydicom.encaps import generate_frames

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from scripts import bench, bench_slides
from transforms import patches
from transforms.plan import PlanParams, plan_slide
from transforms.sources.dicom_files import enumerate_dicom_folder


def test_large_slide_is_a_wsi_the_pipeline_reads(sample_slides, tmp_path):
    frames = bench_slides.tissue_frames(sample_slides / "medium-20x" / "level-0.dcm", 50)
    assert len(frames) == 50 and min(map(len, frames)) >= 15000
    paths = bench_slides.write_large_slide(tmp_path, 400, frames)
    assert [p.name for p in paths] == ["level-0.dcm", "level-1.dcm"]
    ds = pydicom.dcmread(paths[0])
    stored = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert stored[:50] == frames and stored[50] == frames[0]  # tiled in order

    (record,) = list(enumerate_dicom_folder(tmp_path))
    assert record.levels.downsample == 1.0
    assert record.levels.mask.sop_instance_uid != record.sop_instance_uid
    plan = plan_slide(record, PlanParams())
    chunks = plan.chunks
    grid_cells = plan.grid_columns * plan.grid_rows
    assert len(plan.coords) == grid_cells >= 400  # every cell is tissue

    slide = patches.open_slide(record.files)
    level = patches.level_of(slide, record.sop_instance_uid)
    first = patches.read_patches(slide, level, chunks[0].coords[:1], 1.0)[0]
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(frames[0], np.uint8), 1), cv2.COLOR_BGR2RGB)
    assert np.array_equal(first, decoded[:224, :224])


def test_frames_needed_counts_the_frames_under_the_patches(sample_slides):
    (record,) = list(enumerate_dicom_folder(sample_slides / "small-40x"))
    slide = patches.open_slide(record.files)
    level = patches.level_of(slide, record.sop_instance_uid)
    # 40x: a 224 px patch at [0, 0] covers native [0, 448)^2: 2 x 2 frames of 256.
    assert bench.frames_needed(record, np.array([[0, 0]]), level) == [0, 1, 57, 58]


def test_benchmark_datasets():
    gauss = bench.gaussian_embeddings(3000)
    assert gauss.shape == (3000, 384) and gauss.dtype == np.float32
    assert np.array_equal(gauss, bench.gaussian_embeddings(3000))
    base = np.random.default_rng(0).normal(size=(50, 384)).astype(np.float32)
    stub = bench.stub_embeddings(base, 1000)
    assert stub.shape == (1000, 384) and stub.dtype == np.float32
    nearest = ((stub[:, None, :] - base[None]) ** 2).sum(-1).min(1)
    assert nearest.max() < ((base[:, None] - base[None]) ** 2).sum(-1)[np.triu_indices(50, 1)].min()


def test_rows_and_best_of():
    row = bench.Row("s", "w", 100, "patches", 2.0, 4.0)
    assert row.rate == 50 and row.per_core == 25
    assert "patches" in bench.table([row])
    calls = []
    [(wall, cpu)] = bench.best_of(3, lambda: calls.append(1))
    assert len(calls) == 3 and wall >= 0 and cpu >= 0


def test_hashing_bytes_counts_one_more_pass_over_the_pixel_data(sample_slides):
    (record,) = list(enumerate_dicom_folder(sample_slides / "small-40x"))
    plan = plan_slide(record, PlanParams())
    counted = bench.hashing_bytes(record, plan.coords)
    value = len(pydicom.dcmread(record.embedding_file).PixelData)
    assert 0 < counted["without"] < counted["with"]
    assert counted["with"] - counted["without"] == counted["hash_pass"]
    # the value once, plus the header read in whole 64 KiB blocks
    assert value <= counted["hash_pass"] <= counted["embedding_instance"] + 256 * 1024
