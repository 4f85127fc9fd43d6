"""Real converters' headers (issue 12): the real-files folder as a user would run it, and one
run over a corpus re-wrapped from the real CMU pixels with one case per way a header used to
crash the run or be embedded as wrong pixels, plus the bad-input matrix (tests/bad_slides.py).

Every case must become its own failure row (a specific reason code and a message naming the
instance and the value), the run must finish with its summary and tables, and the good slides
must complete with exactly the outputs of a run without the bad ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from pipeline.cli import main
from tests import bad_slides as bad
from tests import real_corpus as rc
from tests.conftest import REAL_DATA
from tests.test_bad_inputs import EXPECTED as MATRIX
from tests.test_bad_inputs import make_bad_slides
from transforms import patches, stages
from transforms.outputs.layout import COMPLETE_MARKER
from transforms.records import failure_uuid, local_instance_uuid

pytestmark = pytest.mark.e2e

NPY = [
    "slide_embedding.npy", "slide_embedding_coord.npy", "embeddings_500_cluster_centroid.npy",
    "embeddings_500_labels.npy",
]  # fmt: skip


@pytest.fixture(scope="module")
def real() -> Path:
    if not (REAL_DATA / rc.CMU).is_dir():
        pytest.skip(f"real test slides not found at {REAL_DATA} (../shared/testdata/real)")
    return REAL_DATA


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def run(model_cache: Path, output: Path, *flags: str) -> int:
    patches.open_slide.cache_clear()
    return main([
        "run", "--output-root", str(output), "--model", "stub-tiny", "--log-level", "WARNING",
        "--set", f"model.cache_dir={model_cache}", "--set", "run.max_failed_fraction=null",
        *flags,
    ])  # fmt: skip


def finest_uuid(slide: Path) -> str:
    # In listing order (sorted paths): of two equal levels, the first is the series' finest.
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(slide.glob("*.dcm"))]
    finest = max(headers, key=lambda ds: int(ds.TotalPixelMatrixColumns))
    return failure_uuid(finest.SOPInstanceUID)


def slide_dir(out: Path, uuid: str) -> Path:
    return out / uuid / "path_foundation" / "v1"


# -- the real folder -------------------------------------------------------------------------

# file -> reason code of its failure row (the CMU pyramid is embedded; two files are ignored)
REAL_EXPECTED = {
    "pathml_tcga_small/small_dicom.dcm": "malformed_header",
    "camelyon_jpeg_multiframe.dcm": "no_high_resolution_level",
    "camelyon_jpeg2000_multiframe.dcm": "no_high_resolution_level",
    "highdicom_sm/sm_image.dcm": "too_small",
    "highdicom_sm/sm_image_jpegls.dcm": "too_small",
    "highdicom_sm/sm_image_grayscale.dcm": "unsupported_pixel_format",
    "gcp_misc/test_jpeg_dicom.dcm": "no_high_resolution_level",
    "gcp_misc/test_raw_dicom.dcm": "no_high_resolution_level",
    "gcp_misc/test_wikipedia_label.dcm": "no_pyramid",
}
REAL_IGNORED = ["gcp_misc/test_slide_coordinates.dcm", "gcp_misc/wsi_annotation.dcm"]


def test_the_real_folder_runs_to_its_summary(real, model_cache, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    code = main([
        "run", "--input", str(real), "--output-root", str(out), "--model", "stub-tiny",
        "--set", f"model.cache_dir={model_cache}",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "pathembed run summary" in printed and "files ignored       2" in printed
    assert "remote pixel reads" not in printed
    for name in REAL_IGNORED:
        assert f"ignored {real / name}: not a whole-slide image" in caplog.text
    # The CMU pyramid: complete, 42 patches at 0.499 µm/px, mask at ~4 µm/px.
    cmu = local_instance_uuid(str(pydicom.dcmread(rc.cmu_files(real)[0]).SOPInstanceUID))
    directory = slide_dir(out, cmu)
    assert (directory / COMPLETE_MARKER).exists()
    entry = json.loads((directory / "metadata.json").read_text())["instance_patch_embeddings"][0]
    assert entry["embedding_count"] == 42
    assert entry["embedding_level"]["pixel_spacing_mm"] == pytest.approx([0.000499] * 2, 1e-3)
    assert entry["embedding_level"]["downsample_to_patch_source"] == 1.0
    assert entry["mask_level"]["pixel_spacing_mm"][0] * 1000 == pytest.approx(4.0, rel=0.01)
    assert np.load(directory / "slide_embedding.npy", allow_pickle=False).shape == (42, 384)
    # Every other WSI file: one failure row, its specific code, a message naming the file or
    # its instance; nothing else complete.
    failures = pq.read_table(out / "tables" / "failures").to_pylist()
    by_uuid = {r["instance_uuid"]: r for r in failures}
    assert len(failures) == len(by_uuid) == len(REAL_EXPECTED)
    for name, reason in REAL_EXPECTED.items():
        ds = pydicom.dcmread(real / name, stop_before_pixels=True)
        row = by_uuid[failure_uuid(ds.SOPInstanceUID, where=str(real / name))]
        assert row["reason_code"] == reason, (name, row)
        assert row["message"][0].isalpha() and "Error(" not in row["message"], row
    assert "65 characters" in by_uuid[finest_uuid(real / "pathml_tcga_small")]["message"]
    complete = {p.parts[-4] for p in out.glob(f"*/path_foundation/v1/{COMPLETE_MARKER}")}
    assert complete == {cmu}


# -- the re-wrapped corpus -------------------------------------------------------------------

# case -> (reason codes of its rows, words of its first specific message)
CORPUS = {
    "long-uids": ({"malformed_header"}, "65 characters"),
    "illegal-sop": ({"malformed_header"}, "not digits and dots"),
    "long-sop": ({"malformed_header"}, "200 characters"),
    "no-series-uid": ({"malformed_header"}, "has no SeriesInstanceUID"),
    "sparse-off-grid": ({"unsupported_tiling"}, "not on its 500 x 500 px frame grid"),
    "fewer-frames-declared": ({"inconsistent_frames"}, "NumberOfFrames 20"),
    "matrix-mismatch": ({"inconsistent_frames"}, "3220 x 2967 px matrix"),
    "fewer-frames-stored": ({"inconsistent_frames"}, "holds 24 frames"),
    "two-level-0": ({"ambiguous_level"}, "claimed by 2 instances"),
    "truncated-pixeldata": ({"truncated_pixel_data"}, "cut short"),
    "gray16": ({"unsupported_pixel_format"}, "16 bits allocated"),
    "tiny": ({"too_small"}, "50 x 50 px"),
    "poison-nan": ({"non_finite_embedding"}, "NaN or infinite"),
    "poison-inf": ({"non_finite_embedding"}, "NaN or infinite"),
    "poison-wide": ({"bad_model_output"}, "shape (42, 385)"),
    "poison-oom": ({"inference_error"}, "ResourceExhausted"),
}
GOOD = ["cmu", "cmu-rewrapped", "sparse-full", "sparse", "tiny-20x"]
PER_FILE = {"long-uids", "no-series-uid"}  # one row per file: no series to group them in


def make_corpus(real: Path, root: Path) -> dict[str, Path]:
    root.mkdir(parents=True)
    slides = {name: root / name for name in [*CORPUS, *GOOD]}
    (root / "cmu").symlink_to(real / rc.CMU, target_is_directory=True)
    rc.derive(real, root, "cmu-rewrapped")
    rc.derive(real, root, "sparse-full", rc.sparse(keep_order=True))
    bad.tiny_slide(root)
    rc.derive(real, root, "long-uids", rc.long_uids, levels=range(4))
    rc.derive(real, root, "illegal-sop", rc.sop("1.2.826.0.1.3680043.abc.7"))
    rc.derive(real, root, "long-sop", rc.sop("1.2." + "9" * 196))
    rc.derive(real, root, "no-series-uid", rc.no_series_uid, levels=range(3))
    rc.derive(real, root, "sparse", rc.sparse(keep_order=False))
    rc.derive(real, root, "sparse-off-grid", rc.sparse(keep_order=False, off_grid=True))
    rc.derive(real, root, "fewer-frames-declared", rc.number_of_frames(20))
    rc.derive(real, root, "matrix-mismatch", rc.matrix_columns(3220))
    rc.derive(real, root, "fewer-frames-stored", rc.at_level_0(rc.fewer_stored_frames))
    rc.second_level_0(real, rc.derive(real, root, "two-level-0"), "two-level-0")
    rc.truncate_level_0(rc.derive(real, root, "truncated-pixeldata"))
    rc.derive(real, root, "gray16", rc.gray16)
    rc.tiny(real, root, "tiny")
    for name in ("poison-nan", "poison-inf", "poison-wide", "poison-oom"):
        rc.derive(real, root, name)
    make_bad_slides(slides["tiny-20x"], root / "matrix")
    rc.odd_files(root)
    return slides


class _ResourceExhaustedError(RuntimeError):
    """Stands in for tf.errors.ResourceExhaustedError (a GPU out of memory in one chunk)."""


def poison_model(mp: pytest.MonkeyPatch, poisoned: dict[str, str]) -> None:
    """The real model, with its output spoiled for the chunks of some slides: NaN, +Inf, 385
    values wide, or an out-of-memory error (what a broken model or a full GPU gives)."""
    real_embed_plan = stages.embed_plan

    def embed_plan(plan, embed, *args, **kwargs):
        kind = poisoned.get(plan.record.instance_uuid)

        def spoiled(pixels):
            if kind == "oom":
                raise _ResourceExhaustedError(
                    "OOM when allocating tensor with shape [42,224,224,3]"
                )
            embeddings = np.array(embed(pixels))
            if kind == "nan":
                embeddings[3, 7] = np.nan
            elif kind == "inf":
                embeddings[0, 0] = np.inf
            elif kind == "wide":
                embeddings = np.concatenate([embeddings, embeddings[:, :1]], axis=1)
            return embeddings

        return real_embed_plan(plan, spoiled if kind else embed, *args, **kwargs)

    mp.setattr(stages, "embed_plan", embed_plan)


@pytest.fixture(scope="module")
def corpus(real, model_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    slides = make_corpus(real, root / "slides")
    uuids = {name: finest_uuid(path) for name, path in slides.items()}
    matrix = {name: finest_uuid(root / "slides" / "matrix" / name) for name in MATRIX}
    out = root / "out"
    # A truncated completion marker of an earlier run: the slide must simply be done again.
    marker = slide_dir(out, uuids["cmu-rewrapped"]) / COMPLETE_MARKER
    marker.parent.mkdir(parents=True)
    marker.write_text('{"parameter_hash": "ab')
    poisoned = {uuids[f"poison-{k}"]: k for k in ("nan", "inf", "wide", "oom")}
    with pytest.MonkeyPatch.context() as mp:
        poison_model(mp, poisoned)
        code = run(model_cache, out, "--input", str(root / "slides"))
    # The same good slides alone, for bit-identical outputs.
    alone = root / "alone"
    alone.mkdir()
    for name in GOOD:
        (alone / name).symlink_to(slides[name].resolve(), target_is_directory=True)
    baseline_code = run(model_cache, root / "baseline", "--input", str(alone))
    return {
        "code": code,
        "baseline_code": baseline_code,
        "out": out,
        "baseline": root / "baseline",
        "slides": slides,
        "uuids": uuids,
        "matrix": matrix,
        "failures": pq.read_table(out / "tables" / "failures").to_pylist(),
        "summary": json.loads(next((out / "runs").glob("*.json")).read_text()),
    }


def test_one_run_over_every_case_finishes(corpus):
    assert corpus["code"] == 0 and corpus["baseline_code"] == 0
    counters = corpus["summary"]["counters"]
    assert counters["slides_written"] == len(GOOD)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_case_is_its_own_failure_row(corpus, name):
    codes, words = CORPUS[name]
    slide = corpus["slides"][name]
    if name in PER_FILE:  # each file its own row, carrying the UUID a rerun finds
        expected = {
            failure_uuid(ds.SOPInstanceUID, where=str(p))
            for p in slide.glob("*.dcm")
            for ds in [pydicom.dcmread(p, stop_before_pixels=True)]
        }
        rows = [r for r in corpus["failures"] if r["instance_uuid"] in expected]
        assert {r["instance_uuid"] for r in rows} == expected
    else:
        rows = [r for r in corpus["failures"] if r["instance_uuid"] == corpus["uuids"][name]]
    assert {r["reason_code"] for r in rows} == codes, rows
    first = next(r for r in rows if r["reason_code"] != "incomplete_slide")
    assert words in first["message"], first["message"]
    for uuid in {r["instance_uuid"] for r in rows}:
        assert not (slide_dir(corpus["out"], uuid) / COMPLETE_MARKER).exists()


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_the_bad_input_matrix_in_the_same_run(corpus, name):
    codes, words = MATRIX[name]
    rows = [r for r in corpus["failures"] if r["instance_uuid"] == corpus["matrix"][name]]
    assert {r["reason_code"] for r in rows} == codes, rows
    assert words in next(r for r in rows if r["reason_code"] != "incomplete_slide")["message"]


def test_good_slides_complete_and_identical_to_a_run_without_the_bad_ones(corpus):
    out, baseline = corpus["out"], corpus["baseline"]
    good = {corpus["uuids"][name] for name in GOOD}
    complete = {p.parts[-4] for p in out.glob(f"*/path_foundation/v1/{COMPLETE_MARKER}")}
    assert complete == good  # nothing partial, nothing bad marked complete
    for uuid in good:  # the truncated marker of cmu-rewrapped was replaced by a whole one
        assert json.loads((slide_dir(out, uuid) / COMPLETE_MARKER).read_text())["run_id"]
    for uuid in good:
        for name in NPY:
            produced = (slide_dir(out, uuid) / name).read_bytes()
            assert produced == (slide_dir(baseline, uuid) / name).read_bytes(), (uuid, name)
    resource = pq.read_table(out / "tables" / "resource").to_pylist()
    assert sorted(r["instance_uuid"] for r in resource) == sorted(good)
    # Each file was read once: the symlink loop and the symlinked folder add no duplicates.
    assert not [r for r in corpus["failures"] if r["reason_code"] == "ambiguous_level"][1:]


def test_a_complete_sparse_level_reads_as_its_tiled_full_twin(corpus):
    """TILED_SPARSE whose per-frame positions cover the full grid gives exactly the patches
    and embeddings of the same frames stored TILED_FULL."""
    out, uuids = corpus["out"], corpus["uuids"]
    for name in ("slide_embedding.npy", "slide_embedding_coord.npy"):
        sparse = np.load(slide_dir(out, uuids["sparse-full"]) / name, allow_pickle=False)
        full = np.load(slide_dir(out, uuids["cmu-rewrapped"]) / name, allow_pickle=False)
        assert sparse.shape[0] == 42 and np.array_equal(sparse, full)


def test_failure_rows_are_rerunnable_by_their_uuid(corpus, model_cache, tmp_path):
    """A rerun asking for a failed slide's UUID finds it again (the same row, same UUID)."""
    wanted = [corpus["uuids"]["illegal-sop"], corpus["uuids"]["gray16"]]
    out = tmp_path / "rerun"
    slides = corpus["slides"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("illegal-sop", "gray16", "cmu"):
        (folder / name).symlink_to(slides[name].resolve(), target_is_directory=True)
    assert run(model_cache, out, "--input", str(folder), "--uuids", ",".join(wanted)) == 0
    rows = pq.read_table(out / "tables" / "failures").to_pylist()
    assert sorted(r["instance_uuid"] for r in rows) == sorted(wanted)
    assert not list(out.glob(f"*/path_foundation/v1/{COMPLETE_MARKER}"))


def test_a_sparse_level_reads_each_frame_at_its_position_and_absent_frames_as_background(corpus):
    """Level 0 stored TILED_SPARSE in reverse order with two frames left out: every patch fully
    covered by present frames has exactly the embedding of the same pixels stored TILED_FULL;
    patches reaching into an absent frame see background there (white), never black tissue."""
    out, uuids = corpus["out"], corpus["uuids"]
    sparse_dir, full_dir = slide_dir(out, uuids["sparse"]), slide_dir(out, uuids["cmu-rewrapped"])
    coords = np.load(sparse_dir / "slide_embedding_coord.npy", allow_pickle=False)
    assert np.array_equal(
        coords, np.load(full_dir / "slide_embedding_coord.npy", allow_pickle=False)
    )  # same mask
    sparse, full = (
        np.load(d / "slide_embedding.npy", allow_pickle=False) for d in (sparse_dir, full_dir)
    )
    frame, across = 500, 5
    absent = [divmod(k, across) for k in rc.ABSENT]  # (row, column) of each absent frame
    touches = np.array([
        any(
            x < (c + 1) * frame and x + 224 > c * frame and y < (r + 1) * frame
            and y + 224 > r * frame
            for r, c in absent
        )
        for x, y in coords
    ])  # fmt: skip
    assert touches.any() and (~touches).sum() >= 20
    assert np.array_equal(sparse[~touches], full[~touches])
    assert not np.isclose(sparse[touches], full[touches]).all(axis=1).any()
