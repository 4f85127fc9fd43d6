"""The DAG writing to gs:// (gcp-storage-emulator, started here) and read back the way users of
the published dataset read it: an anonymous google-cloud-storage client, `get_blob`,
`download_as_string` / `np.load` / `download_to_filename` (seed, "Programmatically Accessing
the GCS Data"). The same slides are also run to a local folder: the two must hold the same
content. Rows of the local run's tables are then checked against the BigQuery schema.

The emulator checks no credentials and no ACLs: Beam's GCS filesystem finds no Application
Default Credentials here and connects anonymously, and the anonymous reader is never refused.
That a real bucket is readable anonymously is its IAM policy's business (README).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from google.cloud import storage

from models.signature import EMBEDDING_DIM
from pipeline.cli import main
from tests import servers
from tests.test_end_to_end import _make_low_resolution_only_slide
from transforms.outputs.bigquery_sink import bigquery_row
from transforms.outputs.layout import COMPLETE_MARKER
from transforms.outputs.tables import TABLES, row_errors

pytestmark = pytest.mark.e2e

BUCKET = "pathembed-test-out"
PREFIX = "encoded-data/idc/pathology"
ARTIFACTS = [
    "metadata.json", "slide_thumbnail.jpeg", "slide_thumbnail_mask.jpeg", "slide_embedding.npy",
    "slide_embedding_coord.npy", "embeddings_500_cluster_centroid.npy", "embeddings_500_labels.npy",
]  # fmt: skip


def _run(input_dir: Path, output_root: str, model_cache: Path) -> None:
    code = main([
        "run", "--input", str(input_dir), "--output-root", output_root, "--model", "stub-tiny",
        "--set", f"model.cache_dir={model_cache}",
    ])  # fmt: skip
    assert code == 0


@pytest.fixture(scope="module")
def slides(sample_slides, tmp_path_factory) -> Path:
    """small-40x plus a slide without a ~20x level (a failure row)."""
    root = tmp_path_factory.mktemp("cloud-slides")
    (root / "small-40x").symlink_to(sample_slides / "small-40x", target_is_directory=True)
    _make_low_resolution_only_slide(sample_slides / "small-40x", root / "low-res-only")
    return root


@pytest.fixture(scope="module")
def runs(slides, tmp_path_factory):
    """(local output folder, gs:// output root, emulator URL): the same slides run to both."""
    cache = tmp_path_factory.mktemp("cloud-models")
    local = tmp_path_factory.mktemp("cloud-local")
    _run(slides, str(local), cache)
    with servers.gcs_emulator(tmp_path_factory.mktemp("gcs-out")) as url:
        servers.upload(BUCKET, {})
        root = f"gs://{BUCKET}/{PREFIX}"
        _run(slides, root, cache)
        yield local, root, url


def _slide_uuid(local: Path) -> str:
    (meta,) = local.glob(f"*/path_foundation/v1/{ARTIFACTS[0]}")
    return meta.parts[-4]


def _without_roots(document, old: str, new: str):
    """metadata.json with the output root replaced and the run id dropped (they must differ)."""
    if isinstance(document, dict):
        return {k: _without_roots(v, old, new) for k, v in document.items() if k != "run_id"}
    if isinstance(document, list):
        return [_without_roots(v, old, new) for v in document]
    if isinstance(document, str):
        return document.replace(old, new)
    return document


@pytest.mark.filterwarnings("ignore:Blob.download_as_string:PendingDeprecationWarning")
def test_users_read_the_gcs_outputs_anonymously_with_the_local_runs_content(runs, tmp_path):
    local, root, _ = runs
    uuid = _slide_uuid(local)
    local_dir = local / uuid / "path_foundation" / "v1"
    # Exactly the seed's snippets: anonymous client, a Bucket, get_blob.
    client = storage.Client.create_anonymous_client()
    bucket = storage.Bucket(name=BUCKET, client=client)
    base = f"{PREFIX}/{uuid}/path_foundation/v1"

    blob = bucket.get_blob(f"{base}/metadata.json")
    metadata = json.loads(blob.download_as_string())
    expected = json.loads((local_dir / "metadata.json").read_text())
    assert metadata["instance_uuid"] == uuid
    entry = metadata["instance_patch_embeddings"][0]
    assert (
        entry["patch_embeddings_gs_path"] == f"{root}/{uuid}/path_foundation/v1/slide_embedding.npy"
    )
    assert entry["thumbnail_gs_path"] == f"gs://{BUCKET}/{base}/slide_thumbnail.jpeg"
    assert _without_roots(metadata, root, str(local)) == _without_roots(expected, "", "")

    blob = bucket.get_blob(f"{base}/slide_embedding.npy")
    with io.BytesIO() as mem:
        blob.download_to_file(mem)
        _ = mem.seek(0)
        embeddings = np.load(mem, allow_pickle=False)
    local_embeddings = np.load(local_dir / "slide_embedding.npy", allow_pickle=False)
    assert embeddings.shape == (entry["embedding_count"], EMBEDDING_DIM)
    assert embeddings.dtype == np.float32 and np.array_equal(embeddings, local_embeddings)

    blob = bucket.get_blob(f"{base}/slide_thumbnail.jpeg")
    blob.download_to_filename(tmp_path / "thumbnail.jpeg")
    thumbnail = (tmp_path / "thumbnail.jpeg").read_bytes()
    assert thumbnail[:2] == b"\xff\xd8"  # a JPEG
    assert thumbnail == (local_dir / "slide_thumbnail.jpeg").read_bytes()

    for name in ARTIFACTS[4:]:  # coordinates, centroids, labels: the same arrays
        with io.BytesIO(bucket.get_blob(f"{base}/{name}").download_as_bytes()) as mem:
            assert np.array_equal(
                np.load(mem, allow_pickle=False), np.load(local_dir / name, allow_pickle=False)
            ), name


def test_the_gcs_slide_folder_is_complete_with_its_marker_written_last(runs):
    local, _, _ = runs
    uuid = _slide_uuid(local)
    client = storage.Client.create_anonymous_client()
    blobs = {
        b.name.rsplit("/", 1)[-1]: b
        for b in client.list_blobs(BUCKET, prefix=f"{PREFIX}/{uuid}/path_foundation/v1/")
    }
    # No temporary names left behind: every file was renamed into place.
    assert sorted(blobs) == sorted([*ARTIFACTS, COMPLETE_MARKER])
    marker = blobs.pop(COMPLETE_MARKER)
    assert json.loads(marker.download_as_bytes())["embedding_count"] == len(
        np.load(local / uuid / "path_foundation" / "v1" / "slide_embedding.npy", allow_pickle=False)
    )
    # The server's creation times: the marker was created after every artifact was in place.
    assert all(marker.time_created > b.time_created for b in blobs.values())


def test_the_gcs_tables_hold_the_local_runs_rows(runs):
    local, root, _ = runs
    client = storage.Client.create_anonymous_client()
    for table in ("resource", "search", "failures"):
        (blob,) = client.list_blobs(BUCKET, prefix=f"{PREFIX}/tables/{table}/")
        assert blob.name.endswith(".parquet")
        remote = pq.read_table(io.BytesIO(blob.download_as_bytes())).to_pylist()
        (local_file,) = (local / "tables" / table).rglob("*.parquet")  # one slide, one row file
        rows = pq.read_table(local_file).to_pylist()
        assert len(remote) == len(rows) > 0, table
        if table == "search":
            key = lambda r: r["centroid_index"]  # noqa: E731
            for a, b in zip(sorted(remote, key=key), sorted(rows, key=key), strict=True):
                assert a["embedding"] == b["embedding"]
                assert a["instance_uuid"] == b["instance_uuid"]
    (resource,) = pq.read_table(
        io.BytesIO(next(iter(client.list_blobs(BUCKET, prefix=f"{PREFIX}/tables/resource/")))
                   .download_as_bytes())
    ).to_pylist()  # fmt: skip
    assert resource["embeddings_uri"].startswith(f"{root}/")


def test_rows_of_a_run_validate_against_the_bigquery_schema(runs):
    """Every row the run wrote, as the BigQuery sink would load it: types, REQUIRED columns,
    384 non-null finite embedding values per search row."""
    local, _, _ = runs
    counts = {}
    for table, columns in TABLES.items():
        (path,) = (local / "tables" / table).rglob("*.parquet")
        rows = pq.read_table(path).to_pylist()
        counts[table] = len(rows)
        for row in rows:
            loaded = bigquery_row(row, columns)
            assert row_errors(loaded, columns) == [], (table, row_errors(loaded, columns))
            assert set(loaded) == {c.name for c in columns}
        if table == "search":
            assert all(len(r["embedding"]) == EMBEDDING_DIM for r in rows)
            assert all(np.isfinite(r["embedding"]).all() for r in rows)
    resource = pq.read_table(next((local / "tables" / "resource").rglob("*.parquet"))).to_pylist()
    assert counts["search"] == resource[0]["number_of_centroids"]
    assert counts["resource"] == 1 and counts["failures"] == 1
    # The timestamps go to BigQuery as ISO 8601 strings with a zone.
    assert bigquery_row(resource[0], TABLES["resource"])["created_time"].endswith("+00:00")
