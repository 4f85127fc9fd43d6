"""Manifests (transforms/sources/manifest.py) and the source flags of `pathembed run`."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.cli import main
from pipeline.run import config_from_args
from transforms.records import FolderFailure, SlideRecord
from transforms.sources import manifest
from transforms.sources.dicom_files import enumerate_dicom_folder


@pytest.fixture(scope="module")
def records(sample_slides) -> list[SlideRecord]:
    found = list(enumerate_dicom_folder(sample_slides))
    assert len(found) == 2 and all(isinstance(r, SlideRecord) for r in found)
    idc_like = dataclasses.replace(
        found[0], collection="tcga_luad", idc_version="v20", instance_hash="ab" * 16
    )
    return [idc_like, found[1]]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_manifest_reads_back_the_records_it_was_written_from(records, tmp_path, suffix):
    path = tmp_path / f"slides{suffix}"
    assert manifest.write_manifest(records, str(path)) == 2
    assert list(manifest.parse_manifest(str(path))) == records


def test_a_bad_line_is_a_failure_and_the_others_are_read(records, tmp_path):
    good = manifest.record_to_row(records[0])
    traversal = {**good, "instance_uuid": "../../etc"}
    no_files = {**good}
    del no_files["files"]
    path = tmp_path / "slides.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (traversal, good, no_files)))
    first, second, third = manifest.parse_manifest(str(path))
    assert isinstance(first, FolderFailure) and first.error.reason.value == "invalid_uuid"
    assert second == records[0]
    assert isinstance(third, FolderFailure) and "line 3" in third.error.message


def _args(*flags: str):
    import argparse

    from pipeline.run import add_run_parser as _run_parser

    parser = argparse.ArgumentParser()
    _run_parser(parser.add_subparsers())
    return parser.parse_args(["run", *flags])


def test_source_flags_set_the_source_config():
    cfg = config_from_args(
        _args("--source", "bigquery", "--collections", "tcga_luad,cptac_ccrcc", "--limit", "3",
              "--bigquery-table", "my-project.idc_v21.dicom_all", "--read-from", "aws")
    )  # fmt: skip
    assert cfg.source.kind == "bigquery" and cfg.source.limit == 3
    assert cfg.source.collections == ("tcga_luad", "cptac_ccrcc")
    assert cfg.source.bigquery_table == "my-project.idc_v21.dicom_all"
    assert cfg.source.read_from == "aws"
    cfg = config_from_args(_args("--source", "dicomweb", "--dicomweb-url", "http://h/dicom-web"))
    assert cfg.source.dicomweb_url == "http://h/dicom-web" and cfg.source.dicomweb_auth == "auto"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--source", "dicomweb"], "--dicomweb-url"),
        (["--source", "manifest"], "--input FILE"),
        (["--source", "idc_index", "--read-from", "dicomweb"], "--dicomweb-url"),
    ],
)
def test_a_source_missing_what_it_needs_stops_the_run(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["run", *flags])
    assert message in str(stopped.value)
