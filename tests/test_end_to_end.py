"""End to end on the DirectRunner (FnApiRunner) over the project's own sample slides.

One session-scoped run embeds both samples plus a slide that must fail; the checks below read
its outputs back and verify them against independent computations: pixels decoded frame by
frame with pydicom, tissue fractions by brute force, nearest centroids by direct distances.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.pixels import pixel_array

from models.path_foundation import load_embedder, resolve_model
from pipeline.cli import main

pytestmark = pytest.mark.e2e

PATCH = 224
ARTIFACTS = [
    "metadata.json", "slide_thumbnail.jpeg", "slide_thumbnail_mask.jpeg", "slide_embedding.npy",
    "slide_embedding_coord.npy", "embeddings_500_cluster_centroid.npy", "embeddings_500_labels.npy",
]  # fmt: skip
PUBLISHED_TOP = [
    "instance_uuid", "instance_hash", "instance_pixeldata_SHA512_hash", "study_instance_uid",
    "series_instance_uid", "sop_instance_uid", "instance_patch_embeddings",
]  # fmt: skip
PUBLISHED_EMBEDDING = [
    "model_name", "model_version", "version", "embedding_count", "input_image_patch_width_px",
    "input_image_patch_height_px", "patch_embeddings_gs_path", "patch_coordinates_gs_path",
    "thumbnail_patch_sampling_mask_gs_path", "thumbnail_gs_path", "slide_pyramid_level_width",
    "slide_pyramid_level_height", "kmeans_embeddings",
]  # fmt: skip
PUBLISHED_KMEANS = ["number_of_centroids", "centroids_gs_path", "embedding_centroid_index_gs_path"]
# Embedding a patch in a different batch changes the last float32 bits (values reach ~10).
REEMBED_ATOL = 1e-4


def _make_low_resolution_only_slide(small_dir: Path, out: Path) -> None:
    """A series holding only the small sample's 4 and 8 µm levels: no ~20x level."""
    out.mkdir()
    series = pydicom.uid.generate_uid(entropy_srcs=["pathembed-test", "low-res-only"])
    for name in ("level-1.dcm", "level-2.dcm"):
        ds = pydicom.dcmread(small_dir / name)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["pathembed-test", name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / name)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def slides_dir(sample_slides, tmp_path_factory) -> Path:
    """The two samples (linked) plus a slide that must fail."""
    root = tmp_path_factory.mktemp("slides")
    for name in ("small-40x", "medium-20x"):
        (root / name).symlink_to(sample_slides / name, target_is_directory=True)
    _make_low_resolution_only_slide(sample_slides / "small-40x", root / "low-res-only")
    return root


def run_cli(input_dir: Path, output: Path, model_cache: Path, *extra: str) -> dict:
    """Runs `pathembed run` in process; returns the run's summary JSON."""
    before = set((output / "runs").glob("*.json")) if (output / "runs").exists() else set()
    code = main([
        "run", "--input", str(input_dir), "--output-root", str(output), "--model", "stub-tiny",
        "--set", f"model.cache_dir={model_cache}", *extra,
    ])  # fmt: skip
    assert code == 0
    (new,) = set((output / "runs").glob("*.json")) - before
    return json.loads(new.read_text())


@pytest.fixture(scope="session")
def first_run(slides_dir, model_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out1")
    run_cli(slides_dir, out, model_cache)
    return out


def slide_dirs(output: Path) -> dict[str, Path]:
    """{sample name: artifact dir}, identified through metadata.json's series UID."""
    from transforms.samples.slides import sample_uids

    by_series = {sample_uids(name)[1]: name for name in ("small-40x", "medium-20x")}
    found = {}
    for meta in output.glob("*/path_foundation/v1/metadata.json"):
        found[by_series[json.loads(meta.read_text())["series_instance_uid"]]] = meta.parent
    return found


def load(directory: Path) -> dict[str, np.ndarray]:
    return {
        "emb": np.load(directory / "slide_embedding.npy", allow_pickle=False),
        "coords": np.load(directory / "slide_embedding_coord.npy", allow_pickle=False),
        "centroids": np.load(directory / "embeddings_500_cluster_centroid.npy", allow_pickle=False),
        "labels": np.load(directory / "embeddings_500_labels.npy", allow_pickle=False),
    }


def decode_region(path: Path, x: int, y: int, w: int, h: int) -> np.ndarray:
    """A level region assembled from frames decoded one by one with pydicom (not ez-wsi)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    fw, fh = int(ds.Columns), int(ds.Rows)
    across = math.ceil(int(ds.TotalPixelMatrixColumns) / fw)
    out = np.zeros((h, w, 3), np.uint8)
    for row in range(y // fh, (y + h - 1) // fh + 1):
        for col in range(x // fw, (x + w - 1) // fw + 1):
            frame = pixel_array(path, index=row * across + col)
            fx, fy = col * fw, row * fh
            x0, y0 = max(x, fx), max(y, fy)
            x1, y1 = min(x + w, fx + fw), min(y + h, fy + fh)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = frame[y0 - fy : y1 - fy, x0 - fx : x1 - fx]
    return out


def file_of(slides_dir: Path, sop_uid: str) -> Path:
    for path in map(Path, glob.glob(f"{slides_dir}/**/*.dcm", recursive=True)):  # follows links
        if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == sop_uid:
            return path
    raise AssertionError(sop_uid)


def test_every_slide_has_the_seven_artifacts_with_published_shapes(first_run):
    dirs = slide_dirs(first_run)
    assert set(dirs) == {"small-40x", "medium-20x"}
    for name, directory in dirs.items():
        assert sorted(p.name for p in directory.iterdir()) == sorted([*ARTIFACTS, "_COMPLETE.json"])
        a = load(directory)
        n = len(a["emb"])
        assert a["emb"].dtype == np.float32 and a["emb"].shape == (n, 384)
        assert np.isfinite(a["emb"]).all()
        assert a["coords"].dtype.kind == "i" and a["coords"].shape == (n, 2)
        assert a["centroids"].dtype == np.float32 and a["centroids"].shape == (min(500, n), 384)
        assert a["labels"].dtype.kind == "i" and a["labels"].shape == (n,)
        if name == "small-40x":
            assert n <= 500  # the identity path: centroids are the embeddings
            assert np.array_equal(a["centroids"], a["emb"])
            assert a["labels"].tolist() == list(range(n))
        else:
            assert 2000 <= n <= 5000  # k-means path
        for jpeg in ("slide_thumbnail.jpeg", "slide_thumbnail_mask.jpeg"):
            image = cv2.imread(str(directory / jpeg))
            assert image is not None and max(image.shape[:2]) <= 1024


def test_labels_index_the_nearest_centroid(first_run):
    for directory in slide_dirs(first_run).values():
        a = load(directory)
        dist = ((a["emb"][:, None, :] - a["centroids"][None]) ** 2).sum(-1)
        assert np.array_equal(a["labels"], dist.argmin(1))
        assert set(np.unique(a["labels"])) <= set(range(len(a["centroids"])))


def test_embeddings_belong_to_the_patches_at_their_coordinates(first_run, slides_dir, model_cache):
    embedder = load_embedder(resolve_model("stub-tiny", model_cache)[0])
    for directory in slide_dirs(first_run).values():
        meta = json.loads((directory / "metadata.json").read_text())
        level = meta["instance_patch_embeddings"][0]["embedding_level"]
        path = file_of(slides_dir, meta["sop_instance_uid"])
        d = level["downsample_to_patch_source"]
        native = round(PATCH * d)
        a = load(directory)
        picks = np.random.default_rng(0).choice(len(a["coords"]), 6, replace=False)
        patches = []
        for k in picks:
            x, y = (math.floor(c * d) for c in a["coords"][k])
            region = decode_region(path, x, y, native, native)
            if native != PATCH:
                region = cv2.resize(region, (PATCH, PATCH), interpolation=cv2.INTER_AREA)
            patches.append(region)
        direct = embedder(np.stack(patches))
        np.testing.assert_allclose(a["emb"][picks], direct, atol=REEMBED_ATOL, rtol=0)
        # ...and not of a neighbouring patch: shifting by one patch changes the embedding.
        assert not np.allclose(a["emb"][picks[0]], a["emb"][picks[1]], atol=1e-3)


def brute_force_fractions(mask: np.ndarray, source_w: int, source_h: int) -> np.ndarray:
    """[rows, cols] tissue fraction of every whole grid cell: mask pixels with centres inside."""
    mh, mw = mask.shape
    cy = (np.arange(mh) + 0.5) * source_h / mh
    cx = (np.arange(mw) + 0.5) * source_w / mw
    rows, cols = source_h // PATCH, source_w // PATCH
    out = np.zeros((rows, cols))
    for i in range(rows):
        ys = (cy >= i * PATCH) & (cy < (i + 1) * PATCH)
        for j in range(cols):
            xs = (cx >= j * PATCH) & (cx < (j + 1) * PATCH)
            out[i, j] = mask[np.ix_(ys, xs)].mean()
    return out


def test_coordinates_are_every_tissue_cell_of_the_grid(first_run, slides_dir):
    for directory in slide_dirs(first_run).values():
        meta = json.loads((directory / "metadata.json").read_text())
        entry = meta["instance_patch_embeddings"][0]
        mask_meta = entry["mask_level"]
        mask_path = file_of(slides_dir, mask_meta["sop_instance_uid"])
        rgb = decode_region(mask_path, 0, 0, mask_meta["width"], mask_meta["height"])
        value = rgb.max(axis=2)
        mask = (value > 0) & (value <= 204)
        w, h = entry["slide_pyramid_level_width"], entry["slide_pyramid_level_height"]
        fractions = brute_force_fractions(mask, w, h)
        expected = np.argwhere(fractions >= 0.5)[:, ::-1] * PATCH  # row-major [x, y]
        coords = load(directory)["coords"]
        assert (coords % PATCH == 0).all()
        assert (coords[:, 0] + PATCH <= w).all() and (coords[:, 1] + PATCH <= h).all()
        assert np.array_equal(coords, expected)
        recorded = np.array(entry["patch_tissue_fraction"])
        at_coords = fractions[coords[:, 1] // PATCH, coords[:, 0] // PATCH]
        np.testing.assert_allclose(recorded, at_coords, atol=1e-4)


def test_metadata_has_every_published_key_with_consistent_values(first_run):
    for directory in slide_dirs(first_run).values():
        meta = json.loads((directory / "metadata.json").read_text())
        assert all(key in meta for key in PUBLISHED_TOP)
        (entry,) = meta["instance_patch_embeddings"]
        assert all(key in entry for key in PUBLISHED_EMBEDDING)
        (kmeans,) = entry["kmeans_embeddings"]
        assert all(key in kmeans for key in PUBLISHED_KMEANS)
        a = load(directory)
        assert entry["embedding_count"] == len(a["emb"])
        assert kmeans["number_of_centroids"] == len(a["centroids"])
        assert entry["input_image_patch_width_px"] == entry["input_image_patch_height_px"] == 224
        for key in ("patch_embeddings_gs_path", "patch_coordinates_gs_path", "thumbnail_gs_path",
                    "thumbnail_patch_sampling_mask_gs_path"):  # fmt: skip
            assert Path(entry[key]).parent == directory and Path(entry[key]).exists()
        for key in ("centroids_gs_path", "embedding_centroid_index_gs_path"):
            assert Path(kmeans[key]).parent == directory and Path(kmeans[key]).exists()
        assert meta["instance_uuid"] == directory.parts[-3]
        assert entry["model_name"] == "stub-tiny"
        assert "NOT Path Foundation" in entry["model_version"]
        assert entry["model_is_stand_in"] is True
        assert len(meta["instance_pixeldata_SHA512_hash"]) == 128


def test_tables_match_the_files(first_run):
    resource = pq.read_table(first_run / "tables" / "resource").to_pylist()
    search = pq.read_table(first_run / "tables" / "search").to_pylist()
    dirs = slide_dirs(first_run)
    assert len(resource) == len(dirs)
    for row in resource:
        directory = Path(row["embeddings_uri"]).parent
        a = load(directory)
        meta = json.loads((directory / "metadata.json").read_text())
        assert row["instance_uuid"] == meta["instance_uuid"]
        assert row["SeriesInstanceUID"] == meta["series_instance_uid"]
        assert row["embedding_count"] == len(a["emb"])
        assert row["number_of_centroids"] == len(a["centroids"])
        assert row["model_name"] == "stub-tiny" and row["model_is_stand_in"]
        rows = sorted(
            (r for r in search if r["instance_uuid"] == row["instance_uuid"]),
            key=lambda r: r["centroid_index"],
        )
        assert [r["centroid_index"] for r in rows] == list(range(len(a["centroids"])))
        table_centroids = np.array([r["embedding"] for r in rows])
        np.testing.assert_allclose(table_centroids, a["centroids"], rtol=1e-6)
        sizes = np.bincount(a["labels"], minlength=len(rows)).tolist()
        assert [r["cluster_size"] for r in rows] == sizes


def test_a_bad_slide_becomes_a_failure_row_and_the_run_goes_on(first_run):
    failures = pq.read_table(first_run / "tables" / "failures").to_pylist()
    assert len(failures) == 1
    (row,) = failures
    assert row["stage"] == "enumerate"
    assert row["reason_code"] == "no_high_resolution_level"
    assert "µm/px" in row["message"]
    assert len(slide_dirs(first_run)) == 2  # the good slides are complete


def test_a_second_run_reproduces_the_outputs(first_run, slides_dir, model_cache, tmp_path_factory):
    second = tmp_path_factory.mktemp("out2")
    run_cli(slides_dir, second, model_cache)
    one, two = slide_dirs(first_run), slide_dirs(second)
    assert set(one) == set(two)
    for name in one:
        a, b = load(one[name]), load(two[name])
        # Same machine and configuration: every array is bit-identical (see README).
        for key in ("coords", "emb", "centroids", "labels"):
            assert np.array_equal(a[key], b[key]), (name, key)


def test_complete_slides_are_skipped_and_force_reruns_one_uuid(slides_dir, model_cache, tmp_path):
    only_small = tmp_path / "in"
    only_small.mkdir()
    for path in (slides_dir / "small-40x").iterdir():
        (only_small / path.name).symlink_to(path)
    out = tmp_path / "out"
    first = run_cli(only_small, out, model_cache)
    assert first["counters"]["slides_written"] == 1
    again = run_cli(only_small, out, model_cache)
    assert again["counters"]["slides_skipped_complete"] == 1
    assert again["counters"]["slides_written"] == 0
    (uuid,) = [p.name for p in out.iterdir() if p.name not in ("tables", "runs")]
    forced = run_cli(only_small, out, model_cache, "--uuids", uuid, "--force")
    assert forced["counters"]["slides_written"] == 1
    other = run_cli(only_small, out, model_cache, "--uuids", "00000000-0000-4000-8000-000000000000")
    assert other["counters"]["slides_planned"] == 0


def test_clustering_provenance_is_what_was_done_in_metadata_and_tables(first_run):
    """A slide with at most 500 embeddings is recorded as "identity" (its centroids are its
    embeddings), whatever method is configured; a larger one under the configured method; the
    resource table carries the same method and the configured parameters."""
    rows = {
        r["instance_uuid"]: r for r in pq.read_table(first_run / "tables" / "resource").to_pylist()
    }
    seen = set()
    for directory in slide_dirs(first_run).values():
        meta = json.loads((directory / "metadata.json").read_text())
        (entry,) = meta["instance_patch_embeddings"]
        clustering = entry["clustering"]
        n = entry["embedding_count"]
        arrays = load(directory)
        if n <= 500:
            assert clustering["method"] == "identity"
            assert np.array_equal(arrays["centroids"], arrays["emb"])
        else:
            assert clustering["method"] == "lloyd"
        seen.add(clustering["method"])
        assert clustering["configured_method"] == entry["parameters"]["kmeans"]["method"] == "lloyd"
        row = rows[meta["instance_uuid"]]
        assert row["clustering_method"] == clustering["method"]
        assert json.loads(row["clustering_parameters"]) == entry["parameters"]["kmeans"]
        assert row["clustering_random_state"] == clustering["random_state"]
        # Local slides: no IDC license; the embeddings' own license is stated.
        assert meta["source_license"] is None and row["source_license"] is None
        assert meta["embeddings_license"] == "CC BY 4.0"
        assert row["instance_pixeldata_SHA512_hash"] == meta["instance_pixeldata_SHA512_hash"]
    assert seen, "no slide written"


def test_the_run_summary_counts_failures_per_reason_code(first_run):
    (summary_file,) = (first_run / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    failures = pq.read_table(first_run / "tables" / "failures").to_pylist()
    expected = {}
    for row in failures:
        expected[row["reason_code"]] = expected.get(row["reason_code"], 0) + 1
    assert summary["counters"]["failures_by_reason"] == expected == {"no_high_resolution_level": 1}
    from pipeline.summary import render

    text = render(summary, str(first_run), 1.0)
    assert "no_high_resolution_level" in text
