"""IDC releases in the local tables (issue 16 item 5): a newer run that embedded a series under
a new instance UUID retires the old UUID's rows from what search and lookups see, and the old
UUID stays findable in the history. (The BigQuery merge does the same:
tests/test_bigquery_sink.py.)"""

from __future__ import annotations

import json

import numpy as np

from pipeline.cli import main
from tests.test_access import RUN_1, RUN_2, write_slide, write_tables
from transforms.outputs import archive
from transforms.search import ranking


def _new_release_of(slide: dict, new: dict) -> dict:
    """`new`'s rows moved onto `slide`'s series: the same slide under a re-issued UUID."""
    same = {k: slide["resource"][k] for k in ("StudyInstanceUID", "SeriesInstanceUID")}
    return {
        **new,
        "resource": {**new["resource"], **same},
        "search": [{**row, **same} for row in new["search"]],
    }


def test_a_reissued_uuid_retires_the_old_one_from_search_and_lookups(tmp_path, capsys):
    root = tmp_path / "out"
    old, other = write_slide(root, "a", RUN_1, 1, 1), write_slide(root, "b", RUN_1, 1, 2)
    write_tables(root, RUN_1, [old, other])
    new = _new_release_of(old, write_slide(root, "a-v21", RUN_2, 2, 3))
    write_tables(root, RUN_2, [new])
    old_uuid, new_uuid = old["resource"]["instance_uuid"], new["resource"]["instance_uuid"]
    assert old_uuid != new_uuid

    current = archive.newest_resources(str(root))
    assert sorted(current["instance_uuid"].to_pylist()) == sorted(
        [new_uuid, other["resource"]["instance_uuid"]]
    )
    # The seed's lookup by Study + Series UIDs can only return the current UUID.
    series = old["resource"]["SeriesInstanceUID"]
    study = old["resource"]["StudyInstanceUID"]
    found = archive.find_resource(str(root), study_instance_uid=study, series_instance_uid=series)
    assert found["instance_uuid"] == new_uuid
    # Search reads only current slides' rows: the series' centroids count once.
    searched = [b for b in archive.search_table_batches(str(root), current) if b.num_rows]
    uuids = {u for b in searched for u in b["instance_uuid"].to_pylist()}
    assert old_uuid not in uuids and new_uuid in uuids

    # The old UUID stays findable, with what replaced it.
    (retired,) = archive.resource_history(str(root)).to_pylist()
    assert retired["instance_uuid"] == old_uuid and retired["run_id"] == RUN_1
    assert retired["superseded_by_instance_uuid"] == new_uuid
    assert retired["superseded_by_run_id"] == RUN_2
    by_uuid = archive.find_resource(str(root), instance_uuid=old_uuid)
    assert by_uuid["superseded_by_instance_uuid"] == new_uuid
    # `pathembed lookup OLD_UUID` says so.
    assert main(["lookup", old_uuid, "--output-root", str(root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["instance_uuid"] == old_uuid
    assert shown["superseded_by_instance_uuid"] == new_uuid
    assert shown["superseded_by_run_id"] == RUN_2


def test_exact_search_finds_a_reissued_series_once(tmp_path):
    root = tmp_path / "out"
    old, other = write_slide(root, "a", RUN_1, 1, 1), write_slide(root, "b", RUN_1, 1, 2)
    write_tables(root, RUN_1, [old, other])
    # The new release's centroids equal the old ones: both would hit every query.
    new = _new_release_of(old, write_slide(root, "a-v21", RUN_2, 2, 3))
    new["search"] = [{**row, "instance_uuid": new["resource"]["instance_uuid"]}
                     for row in old["search"]]  # fmt: skip
    write_tables(root, RUN_2, [new])
    query = np.array([row["embedding"] for row in old["search"]])
    matches = ranking.exact_search(
        str(root), ranking.SlideQuery(centroids=query), ranking.SearchParams(top_k=50)
    )
    series = [m.series_instance_uid for m in matches]
    assert len(series) == len(set(series))  # no series twice
    (match,) = [m for m in matches if m.series_instance_uid == old["resource"]["SeriesInstanceUID"]]
    assert match.instance_uuid == new["resource"]["instance_uuid"]
    # Each query centroid hits each of the series' centroids once, not once per UUID.
    assert match.hits == len(query) * len(new["search"])
