"""Which device the model runs on, in the worker's log and in the run summary (issue 14).

The handler reports where the model's first call ran (the device of its output tensor), once
per loaded model: a log line and the `model_device_{GPU,CPU}` counter, which the summary
prints and writes to runs/{run_id}.json. On this CPU machine: CPU; on a GPU machine with
`pip install -e '.[gpu]'`: GPU (TensorFlow places the model on its first GPU).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from models.handler import PathFoundationModelHandler
from pipeline.cli import main
from pipeline.summary import model_devices
from transforms import metrics
from transforms.dicom_io import gpu_decode


def _expected_kind() -> str:
    import tensorflow as tf

    return "GPU" if tf.config.list_logical_devices("GPU") else "CPU"


def test_the_handler_reports_the_device_of_the_first_call_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="models.handler")
    handler = PathFoundationModelHandler("stub-tiny", cache_dir=tmp_path, batch_size=2)
    model = handler.load_model()
    assert model.device is None  # not known before the model ran
    assert "TensorFlow devices in this process: CPU:0" in caplog.text
    chunk = np.zeros((3, 224, 224, 3), np.uint8)
    handler.run_inference([chunk], model)
    handler.run_inference([chunk], model)
    kind = _expected_kind()
    assert metrics.device_kind(model.device) == kind
    assert caplog.text.count("the model runs on") == 1
    assert f"the model runs on {model.device} ({kind})" in caplog.text


def test_device_kind_and_summary_line():
    assert metrics.device_kind("GPU:0") == "GPU" == metrics.device_kind("/device:GPU:1")
    assert metrics.device_kind("CPU:0") == "CPU"
    assert model_devices({"model_devices": {"GPU": 2}}) == "GPU (2 model loads)"
    assert model_devices({"model_devices": {"CPU": 1, "GPU": 0}}) == "CPU (1 model load)"
    assert model_devices({"model_devices": {}}).startswith("-")


def test_pathembed_run_reports_the_model_device(sample_slides, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    code = main([
        "run", "--input", str(sample_slides / "small-40x"), "--output-root", str(out),
        "--model", "stub-tiny", "--set", f"model.cache_dir={tmp_path / 'models'}",
    ])  # fmt: skip
    assert code == 0
    kind = _expected_kind()
    (summary_file,) = (out / "runs").glob("*.json")
    summary = json.loads(summary_file.read_text())
    assert set(summary["model_devices"]) == {kind} and summary["model_devices"][kind] >= 1
    if not gpu_decode.available():
        assert summary["counters"]["gpu_decoded_frames"] == 0
    printed = capsys.readouterr().out
    assert f"model ran on        {kind} (" in printed
    assert f"the model runs on {kind}:0 ({kind})" in caplog.text
