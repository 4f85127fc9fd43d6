from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import PipelineConfig, load_config, parameter_hash

ROOT = Path(__file__).resolve().parents[1]


def test_local_yaml_equals_builtin_defaults():
    assert load_config(ROOT / "configs" / "local.yaml") == PipelineConfig()


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(ROOT / "configs" / "local.yaml", {"kmeans.n_init": 1, "run.uuids": ["a"]})
    assert cfg.kmeans.n_init == 1 and cfg.run.uuids == ("a",)
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, {"kmeans.n_inits": 1})


def test_parameter_hash_changes_with_outputs_not_with_run_options():
    cfg = PipelineConfig()
    base = parameter_hash(cfg.output_params("stub-tiny", "v1"))
    assert base == parameter_hash(
        load_config(None, {"run.force": True}).output_params("stub-tiny", "v1")
    )
    other = load_config(None, {"tissue.min_tissue_fraction": 0.25})
    assert base != parameter_hash(other.output_params("stub-tiny", "v1"))
    assert base != parameter_hash(cfg.output_params("stub-tiny", "v2"))


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "run" in out and "sample" in out


def test_run_without_input_says_what_to_do():
    with pytest.raises(SystemExit, match="--input"):
        main(["run", "--output-root", "/tmp/x"])


def test_run_with_an_unknown_model_says_what_to_use(tmp_path):
    with pytest.raises(SystemExit, match="neither a stub"):
        main(["run", "--input", str(tmp_path), "--output-root", str(tmp_path), "--model", "nope"])


def test_sample_command_writes_a_readable_slide(tmp_path, capsys):
    assert main(["sample", "--out", str(tmp_path), "--which", "small-40x"]) == 0
    assert "small-40x: 3 DICOM files" in capsys.readouterr().out
    assert len(list((tmp_path / "small-40x").glob("*.dcm"))) == 3
