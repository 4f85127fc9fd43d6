"""Reading outputs back: resource lookups, newest-run tables, slide artifacts, BigQuery lookup.

The output roots here are written by the project's own writers (artifacts.write_artifacts and
the tables' Arrow schema), with small random arrays: no pipeline run is needed to read them.
"""

from __future__ import annotations

import datetime
import json
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from transforms import bigquery
from transforms.errors import SlideError
from transforms.outputs import archive, artifacts, layout
from transforms.outputs.tables import TABLES, arrow_schema

RUN_1, RUN_2 = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
LEVEL = (2240, 1344)  # patch-source frame: a 10 x 6 grid of 224 px patches


def _uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pathembed-access/{name}"))


def _uid(name: str, kind: str) -> str:
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, f'pathembed-access/{name}/{kind}').int}"


def write_slide(root: Path, name: str, run_id: str, day: int, seed: int) -> dict:
    """Artifacts of one slide under root, and its resource row and search rows."""
    rng = np.random.default_rng(seed)
    instance_uuid = _uuid(name)
    paths = layout.ArtifactPaths.for_slide(str(root), instance_uuid, "v1", 500)
    coords = np.argwhere(rng.random((6, 10)) < 0.6)[:, ::-1].astype(np.int64) * 224
    embeddings = rng.normal(size=(len(coords), 8)).astype(np.float32)
    centroids = embeddings[:5]
    labels = (((embeddings[:, None] - centroids[None]) ** 2).sum(-1)).argmin(1).astype(np.int64)
    thumbnail = rng.integers(0, 255, (60, 100, 3), np.uint8)
    identity = {
        "instance_uuid": instance_uuid,
        "study_instance_uid": _uid(name, "study"),
        "series_instance_uid": _uid(name, "series"),
        "sop_instance_uid": _uid(name, "sop"),
        "instance_hash": "0" * 32,
        "instance_pixeldata_SHA512_hash": "0" * 128,
    }
    metadata = artifacts.build_metadata(
        identity=identity, paths=paths, model_name="stub-tiny", model_version="test",
        dataset_version="v1", embedding_count=len(embeddings), number_of_centroids=5,
        patch_size=224, level_width=LEVEL[0], level_height=LEVEL[1], extra={},
    )  # fmt: skip
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(thumbnail, cv2.COLOR_RGB2BGR))[1].tobytes()
    files = {
        paths.metadata: artifacts.json_bytes(metadata),
        paths.thumbnail: jpeg,
        paths.thumbnail_mask: jpeg,
        paths.embeddings: artifacts.npy_bytes(embeddings),
        paths.coordinates: artifacts.npy_bytes(coords),
        paths.centroids: artifacts.npy_bytes(centroids),
        paths.labels: artifacts.npy_bytes(labels),
    }
    artifacts.write_artifacts(paths, files, {"parameter_hash": "test"}, run_id)
    uids = {
        "instance_uuid": instance_uuid,
        "StudyInstanceUID": identity["study_instance_uid"],
        "SeriesInstanceUID": identity["series_instance_uid"],
        "SOPInstanceUID": identity["sop_instance_uid"],
    }
    resource = {
        **uids, "collection": "test", "metadata_uri": paths.metadata,
        "thumbnail_uri": paths.thumbnail, "thumbnail_mask_uri": paths.thumbnail_mask,
        "embeddings_uri": paths.embeddings, "coordinates_uri": paths.coordinates,
        "centroids_uri": paths.centroids, "labels_uri": paths.labels,
        "embedding_count": len(embeddings), "number_of_centroids": 5,
        "slide_pyramid_level_width": LEVEL[0], "slide_pyramid_level_height": LEVEL[1],
        "native_level_width": LEVEL[0], "native_level_height": LEVEL[1],
        "native_pixel_spacing_row_mm": 0.0005, "native_pixel_spacing_column_mm": 0.0005,
        "downsample": 1.0, "mask_pixel_spacing_mm": 0.005, "model_name": "stub-tiny",
        "model_version": "test", "model_is_stand_in": True, "idc_version": None,
        "pipeline_version": "test", "parameter_hash": "test", "run_id": run_id,
        "created_time": datetime.datetime(2026, 1, day, tzinfo=datetime.UTC),
    }  # fmt: skip
    search = [
        {**uids, "centroid_index": k, "cluster_size": int((labels == k).sum()),
         "embedding": c.astype(np.float64).tolist()}
        for k, c in enumerate(centroids)
    ][::-1]  # fmt: skip
    return {"resource": resource, "search": search, "thumbnail": jpeg, "arrays": {
        "embeddings": embeddings, "coordinates": coords, "centroids": centroids, "labels": labels,
    }}  # fmt: skip


def write_tables(root: Path, run_id: str, slides: list[dict]) -> None:
    for table in ("resource", "search"):
        rows = [r for s in slides for r in ([s[table]] if table == "resource" else s[table])]
        (root / "tables" / table).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(rows, schema=arrow_schema(TABLES[table])),
            root / "tables" / table / f"{run_id}.parquet",
        )


@pytest.fixture
def outputs(tmp_path) -> dict:
    """Slide a in two runs (the second newer), slide b in the first only."""
    root = tmp_path / "out"
    a1, b = write_slide(root, "a", RUN_1, 1, 1), write_slide(root, "b", RUN_1, 1, 2)
    write_tables(root, RUN_1, [a1, b])
    a2 = write_slide(root, "a", RUN_2, 2, 3)  # rerun: new artifacts replace the old ones
    write_tables(root, RUN_2, [a2])
    return {"root": str(root), "a": a2, "a_old": a1, "b": b}


def test_the_newest_resource_row_of_each_slide_wins(outputs):
    rows = archive.newest_resources(outputs["root"]).to_pylist()
    assert [(r["instance_uuid"], r["run_id"]) for r in rows] == sorted(
        [(_uuid("a"), RUN_2), (_uuid("b"), RUN_1)]
    )


def test_find_a_slide_by_uuid_or_by_study_and_series(outputs):
    row = archive.find_resource(outputs["root"], instance_uuid=_uuid("a"))
    assert row["run_id"] == RUN_2 and row["StudyInstanceUID"] == _uid("a", "study")
    by_uids = archive.find_resource(
        outputs["root"], study_instance_uid=_uid("b", "study"),
        series_instance_uid=_uid("b", "series"),
    )  # fmt: skip
    assert by_uids["instance_uuid"] == _uuid("b")
    with pytest.raises(archive.SlideNotFoundError, match=r"resource table at .*pathembed run"):
        archive.find_resource(outputs["root"], instance_uuid=_uuid("nowhere"))
    with pytest.raises(archive.SlideNotFoundError, match="no resource table at"):
        archive.find_resource(outputs["root"] + "-missing", instance_uuid=_uuid("a"))


def test_names_are_validated_before_any_path_or_query(tmp_path):
    missing = str(tmp_path / "never-read")
    with pytest.raises(SlideError, match="not a UUID"):
        archive.find_resource(missing, instance_uuid="../../etc/passwd")
    with pytest.raises(ValueError, match="not a DICOM UID"):
        archive.find_resource(missing, study_instance_uid="1.2'--", series_instance_uid="1.2")
    with pytest.raises(ValueError, match="by instance UUID, or by both"):
        archive.find_resource(missing, study_instance_uid="1.2")
    with pytest.raises(SlideError, match="not a UUID"):
        archive.SlideArtifacts.open(missing, "a/../b")


def test_search_rows_come_from_each_slides_newest_run_in_bounded_blocks(outputs):
    resources = archive.newest_resources(outputs["root"])
    batches = list(archive.search_table_batches(outputs["root"], resources, block_rows=3))
    assert all(batch.num_rows <= 3 for batch in batches)
    rows = pa.Table.from_batches(batches).to_pylist()
    expected = outputs["a"]["search"] + outputs["b"]["search"]
    key = lambda r: (r["instance_uuid"], r["centroid_index"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(
        [{k: r[k] for k in archive.SEARCH_COLUMNS} for r in expected], key=key
    )


def test_slide_centroids_are_the_newest_runs_in_centroid_order(outputs):
    row = archive.find_resource(outputs["root"], instance_uuid=_uuid("a"))
    centroids = archive.slide_centroids(outputs["root"], row, block_rows=2)
    np.testing.assert_array_equal(centroids, outputs["a"]["arrays"]["centroids"])


def test_artifacts_read_back_from_a_copied_output_root(outputs, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(outputs["root"], moved)
    shutil.rmtree(outputs["root"])  # metadata.json still names the old root
    slide = archive.SlideArtifacts.open(str(moved), _uuid("a"))
    for name, expected in outputs["a"]["arrays"].items():
        np.testing.assert_array_equal(getattr(slide, name)(), expected)
    assert slide.thumbnail_jpeg() == outputs["a"]["thumbnail"]
    decoded = cv2.imdecode(np.frombuffer(outputs["a"]["thumbnail"], np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(slide.thumbnail(), cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))
    assert slide.patch_size == (224, 224) and slide.level_size == LEVEL
    files = slide.files()
    assert sorted(files) == sorted([
        "metadata.json", "slide_thumbnail.jpeg", "slide_thumbnail_mask.jpeg",
        "slide_embedding.npy", "slide_embedding_coord.npy",
        "embeddings_500_cluster_centroid.npy", "embeddings_500_labels.npy",
    ])  # fmt: skip
    assert all(Path(uri).parent == moved / _uuid("a") / "path_foundation" / "v1"
               for uri in files.values())  # fmt: skip
    with pytest.raises(archive.SlideNotFoundError, match=r"no metadata.json at .*pathembed run"):
        archive.SlideArtifacts.open(str(moved), _uuid("nowhere"))


def test_embedding_matrix_needs_one_length():
    ragged = pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float64()))
    with pytest.raises(ValueError, match="different lengths"):
        archive.embedding_matrix(ragged)
    square = pa.chunked_array([pa.array([[1.0, 2.0]]), pa.array([[3.0, 4.0]])])
    np.testing.assert_array_equal(archive.embedding_matrix(square), [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    "table_id",
    ["hai-cd3-foundations.idc_metadata.pathology_embeddings_metadata",
     "bigquery-public-data.idc_current.dicom_all", "example.com:my-project.d_1.t-2"],
)  # fmt: skip
def test_published_table_ids_are_valid(table_id):
    assert bigquery.validate_table_id(table_id) == table_id


@pytest.mark.parametrize(
    "table_id",
    ["dataset.table", "p.d.t`; DROP TABLE x; --", "`proj.d.t`", "proj.d.t WHERE TRUE",
     "proj.d.*", "Proj.d.t", "proj.d.t\n", ""],
)  # fmt: skip
def test_anything_else_is_refused_as_a_table_id(table_id):
    with pytest.raises(ValueError, match="not a BigQuery table id"):
        bigquery.validate_table_id(table_id)


def test_bigquery_lookup_job_passes_values_as_parameters():
    study, series = "1.2.840.1", "1.2.840.2"
    sql, config = archive.bigquery_lookup_job(
        archive.PUBLISHED_RESOURCE_TABLE, study_instance_uid=study, series_instance_uid=series
    )
    assert f"FROM `{archive.PUBLISHED_RESOURCE_TABLE}`" in sql
    assert study not in sql and series not in sql and "${" not in sql
    values = {p.name: (p.type_, p.value) for p in config.query_parameters}
    assert values == {
        "instance_uuid": ("STRING", None),
        "study_instance_uid": ("STRING", study),
        "series_instance_uid": ("STRING", series),
    }
    sql, config = archive.bigquery_lookup_job("p-roj1.d.t", instance_uuid=_uuid("a"))
    assert {p.name: p.value for p in config.query_parameters}["instance_uuid"] == _uuid("a")
    with pytest.raises(ValueError, match="not a BigQuery table id"):
        archive.bigquery_lookup_job("p.d.t` --", instance_uuid=_uuid("a"))


def test_cli_lookup_and_fetch(outputs, tmp_path, capsys):
    assert main(["lookup", _uuid("a"), "--output-root", outputs["root"], "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["SeriesInstanceUID"] == _uid("a", "series") and found["run_id"] == RUN_2
    uids = ["--study", _uid("b", "study"), "--series", _uid("b", "series")]
    assert main(["lookup", *uids, "--output-root", outputs["root"]]) == 0
    assert _uuid("b") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not in the resource table"):
        main(["lookup", _uuid("c"), "--output-root", outputs["root"]])

    assert main(["fetch", _uuid("a"), "--output-root", outputs["root"], "--out",
                 str(tmp_path / "copy")]) == 0  # fmt: skip
    source = Path(outputs["root"]) / _uuid("a") / "path_foundation" / "v1"
    fetched = tmp_path / "copy" / _uuid("a")
    assert sorted(p.name for p in fetched.iterdir()) == sorted(
        p.name for p in source.iterdir() if p.name != layout.COMPLETE_MARKER
    )
    for path in fetched.iterdir():
        assert path.read_bytes() == (source / path.name).read_bytes()
