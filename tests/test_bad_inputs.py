"""The bad-input matrix: one DAG run over a folder of slides each made to fail one way, plus a
good slide and a slide whose 20x level would be 3.2 GB if loaded whole; and one run over a
manifest with malformed rows. Each bad slide must give its reason code and a clear message,
never a `_COMPLETE.json`; the good slides must complete and be correct.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from pipeline.cli import main
from pipeline.summary import FAILED_SHARE_EXIT
from tests import bad_slides as bad
from transforms import patches
from transforms.outputs.layout import COMPLETE_MARKER
from transforms.records import local_instance_uuid
from transforms.sources import manifest
from transforms.sources.dicom_files import enumerate_dicom_folder

pytestmark = pytest.mark.e2e

ARTIFACTS = [
    "metadata.json", "slide_thumbnail.jpeg", "slide_thumbnail_mask.jpeg", "slide_embedding.npy",
    "slide_embedding_coord.npy", "embeddings_500_cluster_centroid.npy", "embeddings_500_labels.npy",
]  # fmt: skip
# slide -> (reason codes of its failure rows, words its message must hold)
EXPECTED = {
    "missing-spacing": ({"no_pixel_spacing"}, "no PixelSpacing"),
    "zero-spacing": ({"implausible_pixel_spacing"}, "0.0, 0.0 mm"),
    "negative-spacing": ({"implausible_pixel_spacing"}, "-0.0005"),
    "absurd-spacing": ({"implausible_pixel_spacing"}, "5.0, 5.0 mm"),
    "non-square": ({"non_square_pixels"}, "non-square pixels"),
    "low-res-only": ({"no_high_resolution_level"}, "finest level is 2 µm/px"),
    "label-only": ({"no_pyramid"}, "LABEL"),
    "optical-paths": ({"multiple_planes"}, "2 optical paths"),
    "focal-planes": ({"multiple_planes"}, "2 focal planes"),
    "unsupported-syntax": ({"unsupported_transfer_syntax"}, "1.2.840.10008.1.2.4.100"),
    "no-tissue": ({"no_tissue"}, "no 224 px patch has tissue"),
    "truncated-frame": ({"decode_error"}, "truncated"),
    "corrupt-frame": ({"decode_error"}, "does not decode"),
}
CHUNK_SIDE_PX = 16 * 224  # a chunk is at most 16 x 16 neighbouring patches


def make_bad_slides(good: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bad.derive(good, out, "missing-spacing", bad.set_spacing(None))
    bad.derive(good, out, "zero-spacing", bad.set_spacing(0.0))
    bad.derive(good, out, "negative-spacing", bad.set_spacing(-0.0005))
    bad.derive(good, out, "absurd-spacing", bad.set_spacing(5.0, levels=(0, 1, 2)))
    bad.derive(good, out, "non-square", bad.set_spacing(0.0005, 0.0006, levels=(0, 1, 2)))
    bad.derive(good, out, "low-res-only", levels=(1, 2))
    bad.derive(good, out, "label-only", bad.label_only)
    bad.derive(good, out, "optical-paths", bad.second_optical_path)
    bad.derive(good, out, "focal-planes", bad.set_attribute("TotalPixelMatrixFocalPlanes", 2))
    bad.derive(good, out, "unsupported-syntax", bad.set_transfer_syntax("1.2.840.10008.1.2.4.100"))
    bad.derive(good, out, "no-tissue", bad.blank)
    bad.derive(good, out, "truncated-frame", bad.corrupt_level_0("truncate"))
    bad.derive(good, out, "corrupt-frame", bad.corrupt_level_0("garbage"))


def uuid_of(slide_dir: Path) -> str:
    """The slide's instance UUID: uuid5 of its largest level's SOPInstanceUID."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in slide_dir.glob("*.dcm")]
    finest = max(headers, key=lambda ds: int(ds.TotalPixelMatrixColumns))
    return local_instance_uuid(str(finest.SOPInstanceUID))


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def run(model_cache: Path, output: Path, *flags: str) -> int:
    patches.open_slide.cache_clear()
    return main([
        "run", "--output-root", str(output), "--model", "stub-tiny", "--log-level", "WARNING",
        "--set", f"model.cache_dir={model_cache}", *flags,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, model_cache):
    """One run over the good, huge and bad slides; region reads (the mask level) and patch
    reads (every chunk: level width, patches, footprint) are recorded."""
    root = tmp_path_factory.mktemp("matrix")
    slides = root / "slides"
    good = bad.tiny_slide(slides)
    huge = bad.huge_sparse_slide(good, slides)
    make_bad_slides(good, slides / "bad")
    regions: list[tuple[int, int, int]] = []
    chunks: list[tuple[int, int, int, int]] = []
    read_region, read_patches = patches.read_region, patches.read_patches

    def spy(slide, level, x, y, w, h):
        regions.append((level.width, w, h))
        return read_region(slide, level, x, y, w, h)

    def patch_spy(slide, level, coords, downsample, patch_size=224, cache=None, **kwargs):
        extent = coords.max(axis=0) - coords.min(axis=0) + patch_size if len(coords) else (0, 0)
        chunks.append((level.width, len(coords), int(extent[0]), int(extent[1])))
        return read_patches(slide, level, coords, downsample, patch_size, cache, **kwargs)

    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patches, "read_region", spy)
        mp.setattr(patches, "read_patches", patch_spy)
        code = run(
            model_cache, out, "--input", str(slides), "--set", "run.max_failed_fraction=null"
        )
    assert code == 0
    failures = pq.read_table(out / "tables" / "failures").to_pylist()
    (summary,) = (out / "runs").glob("*.json")
    return {
        "out": out,
        "good": uuid_of(good),
        "huge": uuid_of(huge),
        "bad": {name: uuid_of(slides / "bad" / name) for name in EXPECTED},
        "failures": failures,
        "regions": regions,
        "chunks": chunks,
        "summary": json.loads(summary.read_text()),
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_bad_slide_gives_its_reason_code_and_a_clear_message(matrix, name):
    codes, words = EXPECTED[name]
    rows = [r for r in matrix["failures"] if r["instance_uuid"] == matrix["bad"][name]]
    assert {r["reason_code"] for r in rows} == codes, rows
    (first,) = rows  # one failure row per slide: the slide stops at its first failure
    assert words in first["message"], first["message"]
    assert all(r["run_id"] == matrix["summary"]["run_id"] and r["time"] for r in rows)
    marker = matrix["out"] / matrix["bad"][name] / "path_foundation" / "v1" / COMPLETE_MARKER
    assert not marker.exists()


def test_the_good_slides_complete_and_nothing_partial_is_marked_complete(matrix):
    out = matrix["out"]
    complete = {p.parts[-4] for p in out.glob(f"*/path_foundation/v1/{COMPLETE_MARKER}")}
    assert complete == {matrix["good"], matrix["huge"]}
    for directory in out.glob("*/path_foundation/v1"):
        assert sorted(p.name for p in directory.iterdir()) == sorted([*ARTIFACTS, COMPLETE_MARKER])
    resource = pq.read_table(out / "tables" / "resource").to_pylist()
    assert sorted(r["instance_uuid"] for r in resource) == sorted(complete)
    counters = matrix["summary"]["counters"]
    assert counters["slides_written"] == 2
    written = sum(
        json.loads(m.read_text())["instance_patch_embeddings"][0]["embedding_count"]
        for m in out.glob("*/path_foundation/v1/metadata.json")
    )
    assert counters["patches_embedded"] == written
    assert {r["instance_uuid"] for r in matrix["failures"]} == set(matrix["bad"].values())


def test_fewer_patches_than_clusters_keeps_every_embedding_as_a_centroid(matrix):
    directory = matrix["out"] / matrix["good"] / "path_foundation" / "v1"
    embeddings = np.load(directory / "slide_embedding.npy", allow_pickle=False)
    centroids = np.load(directory / "embeddings_500_cluster_centroid.npy", allow_pickle=False)
    assert 0 < len(embeddings) < 500
    assert np.array_equal(centroids, embeddings)
    labels = np.load(directory / "embeddings_500_labels.npy", allow_pickle=False)
    assert np.array_equal(labels, np.arange(len(centroids)))


def test_a_huge_grid_is_streamed_in_chunks(matrix):
    """The 32768 px level is read only chunk by chunk (at most 256 patches, a chunk-sized
    footprint), never whole; only the ~2X mask level is read as one region; its ~16 tissue
    patches are embedded."""
    level_reads = [c for c in matrix["chunks"] if c[0] == 32768]
    assert level_reads
    assert max(n for _, n, _, _ in level_reads) <= 256
    assert max(w * h for _, _, w, h in level_reads) <= CHUNK_SIDE_PX**2
    assert all(width != 32768 for width, _, _ in matrix["regions"])
    assert max(w * h for width, w, h in matrix["regions"]) <= 4096 * 4096  # the ~2X mask level
    directory = matrix["out"] / matrix["huge"] / "path_foundation" / "v1"
    coords = np.load(directory / "slide_embedding_coord.npy", allow_pickle=False)
    assert 9 <= len(coords) <= 25
    assert (coords >= 16384 - 224).all() and (coords < 16384 + 1024).all()


def test_a_malformed_manifest_row_and_a_non_uuid_are_failure_rows(tmp_path, model_cache):
    good = bad.tiny_slide(tmp_path / "slides")
    (record,) = enumerate_dicom_folder(good)
    row = manifest.record_to_row(record)
    listed = tmp_path / "slides.jsonl"
    lines = [
        json.dumps(row),
        "{not json",
        json.dumps({**row, "instance_uuid": "../../escaped"}),
        json.dumps({k: v for k, v in row.items() if k != "files"}),
        json.dumps({**row, "study_instance_uid": "1.2.x"}),
    ]
    listed.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = run(
        model_cache, out, "--source", "manifest", "--input", str(listed),
        "--set", "run.max_failed_fraction=null",
    )  # fmt: skip
    assert code == 0
    rows = pq.read_table(out / "tables" / "failures").to_pylist()
    by_line = {int(r["message"].split(" line ")[1].split(":")[0]): r for r in rows}
    for line, reason, words in [
        (2, "malformed_manifest_row", "Expecting property name"),
        (3, "invalid_uuid", "'../../escaped' is not a UUID"),
        (4, "malformed_manifest_row", "'files'"),
        (5, "malformed_manifest_row", "'1.2.x' is not a DICOM UID"),
    ]:
        assert by_line[line]["reason_code"] == reason, by_line[line]
        assert words in by_line[line]["message"], by_line[line]["message"]
    assert all(r["instance_uuid"] in (None, record.instance_uuid) for r in rows)
    assert not list(tmp_path.rglob("escaped"))
    assert (out / record.instance_uuid / "path_foundation" / "v1" / COMPLETE_MARKER).exists()


def test_a_non_uuid_on_the_command_line_is_rejected_before_the_run(tmp_path, model_cache):
    with pytest.raises(SystemExit, match="is not a UUID"):
        run(model_cache, tmp_path / "out", "--input", str(tmp_path), "--uuids", "../etc,x")
    uuids_file = tmp_path / "uuids.txt"
    uuids_file.write_text("6fa459ea-ee8a-3ca4-894e-db77e160355e\nDROP TABLE x\n")
    with pytest.raises(SystemExit, match="DROP TABLE"):
        run(
            model_cache, tmp_path / "out", "--input", str(tmp_path), "--uuids-file", str(uuids_file)
        )
    assert not (tmp_path / "out").exists()


def test_a_run_whose_slides_fail_wholesale_is_stopped(tmp_path, model_cache, caplog):
    """More than run.max_failed_fraction of the slides failing (here 4 of 5, a stand-in for a
    broken credential) stops the run with exit status 3 once enough slides were tried."""
    slides = tmp_path / "slides"
    good = bad.tiny_slide(slides)
    for k in range(4):
        bad.derive(good, slides, f"no-spacing-{k}", bad.set_spacing(None))
    out = tmp_path / "out"
    code = run(model_cache, out, "--input", str(slides), "--set", "run.failure_check_min_slides=3")
    assert code == FAILED_SHARE_EXIT
    assert "more than run.max_failed_fraction = 50%" in caplog.text
    assert not (out / "runs").exists()  # the run did not finish: nothing is committed


def test_the_failures_command_summarises_the_table(matrix, capsys):
    assert main(["failures", str(matrix["out"] / "tables" / "failures")]) == 0
    printed = capsys.readouterr().out
    assert f"{len(matrix['failures'])} failure rows, {len(EXPECTED)} slides" in printed
    assert "decode_error" in printed and matrix["bad"]["no-tissue"] in printed
    assert (
        main(["failures", str(matrix["out"] / "tables" / "failures"), "--reason", "no_tissue"]) == 0
    )
    assert "1 failure rows, 1 slides" in capsys.readouterr().out
