"""The folder tree is the architecture: imports flow one way, and the shipped data is packaged.

Walks every import of pipeline/, transforms/, models/ and configs/ (module level and inside
functions) with `ast` and checks: no import circle, no import from a higher room into a lower
one, and the command-line root (pipeline/cli.py) imported by nothing but `python -m pipeline`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["pipeline", "transforms", "models", "configs"]

# Lowest room first; a module may import its own room and the rooms before it.
ROOMS = [
    ("model signature", ["models.signature"]),
    (
        "domain rules",
        [
            "transforms.errors",
            "transforms.urls",
            "transforms.metrics",
            "transforms.levels",
            "transforms.records",
            "transforms.tissue",
            "transforms.clustering",
            "transforms.bigquery",
        ],
    ),
    ("DICOM I/O", ["transforms.dicom_io"]),
    ("reading and planning", ["transforms.patches", "transforms.mask_level", "transforms.plan"]),
    ("sources", ["transforms.sources"]),
    ("outputs", ["transforms.outputs"]),
    ("search", ["transforms.search"]),
    ("sample slides", ["transforms.samples"]),
    ("DAG steps", ["transforms.failures", "transforms.stages"]),
    ("models", ["models"]),
    ("configs", ["configs"]),
    ("pipeline", ["pipeline"]),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if path.name != "__init__.py" or "import" in path.read_text():
                modules[name.removesuffix(".__init__")] = path  # (a docstring-only one is not)
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported by `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update(names & modules.keys() or {node.module})
    return found & modules.keys()


def _room(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} is in no room of tests/test_layout.py ROOMS"
    return best[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_is_in_a_room(graph):
    for module in graph:
        _room(module)


def test_imports_never_go_up_a_room(graph):
    upward = [
        f"{module} ({ROOMS[_room(module)][0]}) imports {target} ({ROOMS[_room(target)][0]})"
        for module, targets in graph.items()
        for target in targets
        if _room(target) > _room(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_command_line_root_is_imported_by_nothing(graph):
    importers = sorted(m for m, targets in graph.items() if "pipeline.cli" in targets)
    assert importers == ["pipeline.__main__"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install .` (not editable) into a fresh venv outside the checkout that reuses this
    environment's third-party packages (so nothing is downloaded); returns its python."""
    where = tmp_path_factory.mktemp("installed")
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(where / "venv")
    python = where / "venv" / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # This environment's site-packages (dependencies only: the project is excluded below).
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "dependencies.pth").write_text("\n".join(ours) + "\n")
    build = where / "build"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", site, "--no-compile", str(ROOT)],
        check=True, cwd=where, env={**os.environ, "PIP_NO_INDEX": "1", "TMPDIR": str(build.parent)},
    )  # fmt: skip
    return python


def _run_outside(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_a_non_editable_install_runs_the_pipeline_and_renders_the_sql(installed, tmp_path):
    probe = _run_outside(
        installed, tmp_path, "-c",
        "import transforms, configs, pipeline.launch as l; print(transforms.__file__); "
        "from transforms import bigquery; "
        "print(len(bigquery.render_sql('search.sql', {'search_table': 'my-proj.d.s', "
        "'resource_table': 'my-proj.d.r', 'idc_table': 'my-proj.d.i'}, "
        "{'fraction_lists_to_search': 0.01}))); print(l.DEFAULT_CONFIG.read_text()[:1])",
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    where, sql_length, _ = probe.stdout.splitlines()
    assert not Path(where).is_relative_to(ROOT), f"imported the checkout: {where}"
    assert int(sql_length) > 500
    slides, out = tmp_path / "slides", tmp_path / "out"
    sample = _run_outside(installed, tmp_path, "-m", "pipeline", "sample", "--out", str(slides),
                          "--which", "small-40x")  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    run = _run_outside(
        installed, tmp_path, "-m", "pipeline", "run", "--input", str(slides),
        "--output-root", str(out), "--model", "stub-tiny",
        "--set", f"model.cache_dir={tmp_path / 'models'}",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "slides done         1" in run.stdout
    assert len(list(out.glob("*/path_foundation/v1/slide_embedding.npy"))) == 1
