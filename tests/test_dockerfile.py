"""The Dataflow worker image's Dockerfile, parsed (docker build cannot run here): its base
image is Beam's Python 3.11 SDK at the pinned Beam version, it installs the project's `gpu`
extra (the CUDA build of the pinned TensorFlow, nvImageCodec) under requirements.lock, and
keeps Beam's boot entrypoint. `make setup` installs the `cpu` extra."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, "a dangling line continuation"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"]:
        name, _, version = dep.partition("==")
        pins[re.sub(r"\[.*\]", "", name)] = version
    return {**pins, "requires-python": project["requires-python"]}


def test_base_image_is_the_beam_python_311_sdk_at_the_pinned_version():
    instructions = _instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert len(froms) == 1  # one stage: the worker image is the SDK image plus pathembed
    image, _, tag = froms[0].partition(":")
    assert image == "apache/beam_python3.11_sdk"
    assert tag == _pins()["apache-beam"]
    assert _pins()["requires-python"] == ">=3.11,<3.12"  # the image's Python


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_tensorflow_cpu_and_gpu_builds_are_extras_of_one_version():
    extras = _extras()
    (cpu,) = [d for d in extras["cpu"] if d.startswith("tensorflow")]
    tf = cpu.removeprefix("tensorflow-cpu==")
    assert cpu == f"tensorflow-cpu=={tf}"
    assert f"tensorflow[and-cuda]=={tf}" in extras["gpu"]
    assert any(d.startswith("nvidia-nvimgcodec-cu12[") and "nvjpeg2k" in d for d in extras["gpu"])
    # no TensorFlow in the base dependencies: the CPU and CUDA wheels cannot be installed together
    assert not any(name.startswith("tensorflow") for name in _pins())
    lock = (ROOT / "requirements.lock").read_text().replace("tensorflow-cpu", "tensorflow_cpu")
    assert f"tensorflow_cpu=={tf}" in lock
    for dep in extras["gpu"]:
        if dep.startswith("nvidia-nvimgcodec"):
            name, _, version = dep.partition("==")
            bare = re.sub(r"\[.*\]", "", name)
            assert f"{bare}=={version}" in lock
    # make setup keeps the CPU build
    assert "-c requirements.lock -e '.[cpu,dev]'" in (ROOT / "Makefile").read_text()


def test_the_image_installs_the_gpu_extra_under_the_lock():
    runs = " ".join(args for op, args in _instructions() if op == "RUN")
    assert "pip install -c requirements.lock '.[gpu]'" in runs
    assert "sed " not in runs  # pyproject.toml is installed as it is
    assert "from nvidia import nvimgcodec" in runs and "import apache_beam, tensorflow" in runs
    copied = {src for op, args in _instructions() if op == "COPY" for src in args.split()[:-1]}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in packages["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied
    assert {"pyproject.toml", "requirements.lock", "configs"} <= copied


def test_the_beam_boot_entrypoint_is_kept():
    instructions = _instructions()
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["/opt/apache/beam/boot"]
    assert not [args for op, args in instructions if op == "CMD"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)
