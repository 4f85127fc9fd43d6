"""Trust boundaries (issue 15): where credentials go, what a manifest may name, full-match
grammars, URL redaction and terminal escaping."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import io
import logging
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ez_wsi_dicomweb import credential_factory

from pipeline import summary
from pipeline.run import failures_command
from transforms import failures, metrics, urls
from transforms.bigquery import validate_table_id
from transforms.dicom_io import dicomweb
from transforms.records import FolderFailure, SlideRecord, validate_uid, validate_uuid
from transforms.sources import enumeration, idc, manifest
from transforms.sources.dicom_files import enumerate_dicom_folder

STORE = (
    "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
)


@pytest.fixture(scope="module")
def record(sample_slides) -> SlideRecord:
    (found,) = enumerate_dicom_folder(sample_slides / "small-40x")
    return found


def _web(record: SlideRecord, base: str) -> SlideRecord:
    files = tuple(
        (sop, dicomweb.instance_url(base, record.study_instance_uid,
                                    record.series_instance_uid, sop))
        for sop, _ in record.files
    )  # fmt: skip
    return dataclasses.replace(record, files=files, dicomweb_url=base)


@pytest.mark.parametrize(
    "url",
    [
        "https://evilgoogleapis.com/dicomWeb",
        "http://healthcare.googleapis.com/v1/dicomWeb",
        "https://healthcare.googleapis.com.evil.org/dicomWeb",
        "https://user:pw@healthcare.googleapis.com/dicomWeb",
        "https://googleapis.com/dicomWeb",
    ],
)
def test_auto_sends_no_google_token_outside_https_googleapis(url):
    factory = dicomweb.credentials_for(url, "auto")
    assert isinstance(factory, credential_factory.NoAuthCredentialsFactory)


def test_auto_uses_google_credentials_for_a_googleapis_https_store():
    assert not isinstance(
        dicomweb.credentials_for(STORE, "auto"), credential_factory.NoAuthCredentialsFactory
    )


@pytest.mark.parametrize("url", ["http://healthcare.googleapis.com/x", "https://u:p@h.example/x"])
def test_google_auth_refuses_plain_http_and_user_info(url):
    with pytest.raises(ValueError, match="https"):
        dicomweb.credentials_for(url, "google")


def test_none_means_none_for_a_manifest_row_without_dicomweb_url(record):
    tagged = list(enumeration._tagged(record, frozenset(), "none", None, True))
    assert [r.dicomweb_auth for r in tagged] == ["none"]


def test_a_manifest_row_cannot_send_the_configured_store_token_elsewhere(record):
    evil = _web(record, "https://evil.example/dicomWeb")
    (tagged,) = enumeration._tagged(evil, frozenset(), "google", STORE, True)
    failure = tagged.value
    assert isinstance(failure, FolderFailure)
    assert failure.error.reason.value == "untrusted_url"
    (ok,) = enumeration._tagged(_web(record, STORE), frozenset(), "google", STORE, True)
    assert isinstance(ok, SlideRecord) and ok.dicomweb_auth == "google"


def test_a_manifest_store_without_a_configured_store_is_read_without_credentials(record):
    row_store = _web(record, "https://healthcare.googleapis.com/v1/other/dicomWeb")
    row_store = dataclasses.replace(row_store, dicomweb_auth="google")
    for manifest_source in (True, False):
        bound = enumeration.bound_to_source(row_store, "auto", None, manifest_source)
        assert bound.dicomweb_auth == "none" and bound.files == row_store.files
        bound = enumeration.bound_to_source(row_store, "google", None, manifest_source)
        assert bound.dicomweb_auth == "none"


@pytest.mark.parametrize(
    "uri", ["file:///etc/passwd", "ftp://h/x.dcm", "http://h/x.dcm", "https://u:p@h/x.dcm"]
)
def test_manifest_files_outside_the_allowed_schemes_are_untrusted(record, uri):
    row = dataclasses.replace(record, files=((record.sop_instance_uid, uri),))
    (tagged,) = enumeration._tagged(row, frozenset(), "auto", None, True)
    failure = tagged.value
    assert isinstance(failure, FolderFailure) and failure.error.reason.value == "untrusted_url"
    assert "u:p" not in failure.error.message


def test_grammar_checks_refuse_a_trailing_newline():
    with pytest.raises(ValueError):
        validate_uid("1.2.3\n")
    with pytest.raises(ValueError):
        validate_table_id("my-project.dataset.table\n")
    with pytest.raises(ValueError):
        idc.render_slides_query("my-project.idc_v20.dicom_all\n")
    assert not dicomweb.is_instance_url("https://h/studies/1/series/2/instances/3\n")
    with pytest.raises(Exception, match="UUID"):
        validate_uuid(str(uuid.uuid4()) + "\n")


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://alice:s3cret@dicom.example/wado/studies/1", "s3cret"),
        ("https://b.s3.amazonaws.com/k.dcm?X-Amz-Signature=abcdef&X-Amz-Expires=60", "abcdef"),
        ("https://storage.googleapis.com/b/o?X-Goog-Signature=f00d&x=1", "f00d"),
    ],
)
def test_redaction_removes_user_info_and_signatures(url, secret):
    shown = urls.redact_url(url)
    assert secret not in shown and urls.REDACTED in shown
    assert urls.host_of(shown) == urls.host_of(url)
    assert secret not in urls.redact_text(f"failed reading {url}: 403")


def test_terminal_text_has_no_control_characters():
    shown = urls.for_terminal("1.2.840\x1b[2J\x07\rfake\nline")
    assert not any(ord(c) < 32 or ord(c) == 127 for c in shown)
    assert "\\x1b" in shown and "\\n" in shown


SECRET_URL = "https://alice:pw1@dicom.example/x.dcm?X-Amz-Signature=sig2&X-Amz-Date=1"


def test_failure_rows_and_their_log_lines_carry_no_url_secret(caplog):
    row = failures.failure_row(None, "plan", "read_error", f"GET {SECRET_URL}: 403", "run1")
    assert "pw1" not in row["message"] and "sig2" not in row["message"]
    assert "dicom.example/x.dcm" in row["message"]  # still says which object


def test_a_written_manifest_carries_no_presigned_signature(record):
    signed = dataclasses.replace(record, files=tuple((sop, SECRET_URL) for sop, _ in record.files))
    text = manifest.format_rows([signed], csv_format=False)
    assert "sig2" not in text and "pw1" not in text and "dicom.example" in text


def test_log_lines_are_redacted_by_the_cli_filter():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("pathembed.test_trust")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        urls.install_log_redaction(logger)
        logger.warning("reading %s\x1b[2J", SECRET_URL)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "sig2" not in out and "pw1" not in out and "\x1b" not in out
    assert "dicom.example" in out


def test_launch_options_hide_secret_looking_values():
    shown = urls.redact_options(
        {
            "project": "p",
            "dataflow_service_options": [f"url={SECRET_URL}"],
            "hdfs_password": "hunter2",
            "temp_location": "gs://b/tmp",
        }
    )
    assert shown["project"] == "p" and shown["temp_location"] == "gs://b/tmp"
    assert shown["hdfs_password"] == urls.REDACTED
    assert "sig2" not in str(shown) and "pw1" not in str(shown)


def test_failures_command_escapes_header_strings(tmp_path, capsys):
    folder = tmp_path / "failures"
    folder.mkdir()
    row = {
        "instance_uuid": str(uuid.uuid4()),
        "stage": "plan",
        "reason_code": "unsupported_transfer_syntax",
        "message": "transfer syntax 1.2.3\x1b]0;owned\x07\r\x1b[2K",
        "run_id": "r",
        "time": datetime.datetime.now(datetime.UTC),
    }
    pq.write_table(pa.Table.from_pylist([row]), folder / "part-0.parquet")
    args = argparse.Namespace(table=str(folder), run_id=None, reason=[])
    assert failures_command(args, []) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b" in out


def test_the_run_summary_counts_failures_per_reason():
    counters = {name: 0 for name in metrics.COUNTERS}
    counters |= {"failures": 3, "failures_by_reason": {"no_pyramid": 1, "not_brightfield": 2}}
    text = summary.render({"counters": counters, "stage_seconds": {}}, "out", 1.0)
    assert "not_brightfield" in text and "no_pyramid" in text
    line = next(line for line in text.splitlines() if "not_brightfield" in line)
    assert line.split()[-1] == "2"


def test_every_np_load_refuses_pickles():
    """A .npy under an output root is data: no np.load in the project may unpickle it."""
    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    calls = 0
    for name in files:
        for node in ast.walk(ast.parse((root / name).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "np"
            ):
                calls += 1
                pickle = [k for k in node.keywords if k.arg == "allow_pickle"]
                allowed = pickle and isinstance(pickle[0].value, ast.Constant)
                assert allowed and pickle[0].value.value is False, (
                    f"{name}:{node.lineno}: np.load without allow_pickle=False"
                )
    assert calls > 10
