"""The Dataflow worker image's Dockerfile, parsed (docker build cannot run here): its base
image is Beam's Python 3.11 SDK at the pinned Beam version, it installs the CUDA build of the
pinned TensorFlow and the project under requirements.lock, and keeps Beam's boot entrypoint."""

from __future__ import annotations

import json
import re
import subprocess
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


def test_tensorflow_with_cuda_at_the_pinned_version_and_the_project_under_the_lock():
    runs = " ".join(args for op, args in _instructions() if op == "RUN")
    tf = _pins()["tensorflow-cpu"]
    # pyproject's tensorflow-cpu pin becomes tensorflow[and-cuda], and the build checks it did.
    assert 's/"tensorflow-cpu==\\([0-9.]*\\)"/"tensorflow[and-cuda]==\\1"/' in runs
    assert f"grep -q '\"tensorflow\\[and-cuda\\]=={tf}\"' pyproject.toml" in runs
    # ...applied here with sed exactly as the build applies it:
    (expression,) = re.findall(r"sed -i '([^']*)' pyproject.toml", runs)
    swapped = subprocess.run(
        ["sed", "-e", expression, str(ROOT / "pyproject.toml")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    deps = tomllib.loads(swapped)["project"]["dependencies"]
    assert f"tensorflow[and-cuda]=={tf}" in deps and not any("tensorflow-cpu" in d for d in deps)
    assert "requirements.lock > /tmp/constraints.txt" in runs
    assert "pip install -c /tmp/constraints.txt ." in runs
    copied = {args.split()[0] for op, args in _instructions() if op == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in packages["packages"]["find"]["include"]:
        assert package.rstrip("*") in copied
    assert {"pyproject.toml", "configs"} <= copied
    lock = (ROOT / "requirements.lock").read_text()
    assert f"tensorflow_cpu=={tf}" in lock.replace("tensorflow-cpu", "tensorflow_cpu")


def test_the_beam_boot_entrypoint_is_kept():
    instructions = _instructions()
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["/opt/apache/beam/boot"]
    assert not [args for op, args in instructions if op == "CMD"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)
