"""`pathembed run` end to end from the remote sources, against real local servers: the same
slide from local files, from Orthanc over DICOMweb (`--source dicomweb`), and from
gcp-storage-emulator through a manifest of gs:// URIs (`--source manifest`) gives identical
coordinates and embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests import servers
from transforms import patches
from transforms.sources import manifest
from transforms.sources.dicom_files import enumerate_dicom_folder

pytestmark = pytest.mark.e2e

ARRAYS = ("slide_embedding.npy", "slide_embedding_coord.npy", "embeddings_500_labels.npy")


@pytest.fixture(scope="module")
def small(sample_slides) -> Path:
    return sample_slides / "small-40x"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def run(output: Path, model_cache: Path, *flags: str) -> dict:
    patches.open_slide.cache_clear()  # each run opens its slide afresh, as a new worker would
    code = main([
        "run", "--output-root", str(output), "--model", "stub-tiny",
        "--set", f"model.cache_dir={model_cache}", *flags,
    ])  # fmt: skip
    assert code == 0
    (summary,) = (output / "runs").glob("*.json")
    return json.loads(summary.read_text())


def arrays(output: Path) -> tuple[str, dict[str, np.ndarray]]:
    (directory,) = output.glob("*/path_foundation/v1")
    return directory.parts[-3], {
        name: np.load(directory / name, allow_pickle=False) for name in ARRAYS
    }


@pytest.fixture(scope="module")
def local_run(small, model_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    assert run(out, model_cache, "--input", str(small))["counters"]["slides_written"] == 1
    return out


def test_dicomweb_source_gives_the_local_artifacts(small, local_run, model_cache, tmp_path):
    written = tmp_path / "slides.jsonl"
    with servers.orthanc(tmp_path / "orthanc") as url:
        servers.stow(url, sorted(small.glob("*.dcm")))
        summary = run(
            tmp_path / "out", model_cache, "--source", "dicomweb", "--dicomweb-url", url,
            "--manifest-out", str(written), "--set", "hashing.pixeldata_sha512=all",
        )  # fmt: skip
    assert summary["counters"]["slides_written"] == 1
    # The run summary reports the remote reads: batched, so far fewer requests than frames.
    counters = summary["counters"]
    assert 0 < counters["pixel_source_requests"] < counters["pixel_frames_read"]
    assert counters["pixel_source_bytes_read"] > 0
    uuid, got = arrays(tmp_path / "out")
    local_uuid, expected = arrays(local_run)
    assert uuid == local_uuid
    for name in ARRAYS:
        assert np.array_equal(got[name], expected[name]), name
    # The manifest it wrote names the slide by its WADO-RS URLs.
    (record,) = manifest.parse_manifest(str(written))
    assert record.instance_uuid == uuid and record.dicomweb_url == url
    assert all(uri.startswith(f"{url}/studies/") for _, uri in record.files)
    meta = json.loads(
        next((tmp_path / "out").glob("*/path_foundation/v1/metadata.json")).read_text()
    )
    # hashing.pixeldata_sha512=all: the PixelData value streamed from the store hashes as the
    # local file's does (computed from the file on disk in the local run).
    local_meta = json.loads(next(local_run.glob("*/path_foundation/v1/metadata.json")).read_text())
    assert len(meta["instance_pixeldata_SHA512_hash"]) == 128
    assert meta["instance_pixeldata_SHA512_hash"] == local_meta["instance_pixeldata_SHA512_hash"]
    assert meta["instance_patch_embeddings"][0]["hashing"] == {"pixeldata_sha512": "all"}
    (row,) = pq.read_table(tmp_path / "out" / "tables" / "resource").to_pylist()
    assert row["instance_pixeldata_SHA512_hash"] == meta["instance_pixeldata_SHA512_hash"]


def test_bucket_pixels_from_a_manifest_give_the_local_artifacts(
    small, local_run, model_cache, tmp_path
):
    (record,) = enumerate_dicom_folder(small)
    names = {sop: f"slides/small-40x/{Path(path).name}" for sop, path in record.files}
    remote = type(record)(
        **{**record.__dict__, "files": tuple((s, f"gs://pathembed/{names[s]}") for s in names)}
    )
    listed = tmp_path / "slides.csv"
    manifest.write_manifest([remote], str(listed))
    with servers.gcs_emulator(tmp_path / "gcs"):
        servers.upload("pathembed", {names[s]: Path(p) for s, p in record.files})
        summary = run(tmp_path / "out", model_cache, "--source", "manifest", "--input", str(listed))
    assert summary["counters"]["slides_written"] == 1
    whole = sum(Path(p).stat().st_size for _, p in record.files)
    assert 0 < summary["counters"]["pixel_source_bytes_read"] < whole
    _, got = arrays(tmp_path / "out")
    _, expected = arrays(local_run)
    for name in ARRAYS:
        assert np.array_equal(got[name], expected[name]), name
    (row,) = pq.read_table(tmp_path / "out" / "tables" / "resource").to_pylist()
    assert row["instance_uuid"] == record.instance_uuid
    # hashing.pixeldata_sha512 is "local" by default: a remote value is not streamed again.
    assert row["instance_pixeldata_SHA512_hash"] is None
