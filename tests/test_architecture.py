"""The architecture, checked: the import layers of pyproject.toml hold (import-linter), every module
sits in a layer, and the code passes the project's ruff rule set.

The layers, bottom to top: the method's functional ops (``mod_models.functional``), the kernels
(``mod_kernels``), the blocks and models, the applications (``mod_models.train``,
``mod_models.integrations``, ``mod_models.tools``), the benchmarks (``bench``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tool(name: str) -> str:
    """The console script ``name`` of the test extra, next to this interpreter or on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it is part of the test extra: pip install -e '.[test]'")
    return found


def _run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_import_layers_hold() -> None:
    result = _run(_tool("lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout), result.stdout[-2000:]


def _layer_modules() -> set[str]:
    (contract,) = [c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return {name.strip() for layer in contract["layers"] for name in re.split(r"[|:]", layer)}


def test_every_module_of_the_library_sits_in_a_layer() -> None:
    """A new module or subpackage of ``mod_models`` must be placed in the layers contract, or the
    contract would not see what it imports."""
    layered = _layer_modules()
    top = {
        f"mod_models.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "mod_models").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())
    }
    assert top - layered == set(), f"modules outside the import layers of pyproject.toml: {sorted(top - layered)}"
    assert {"mod_kernels", "bench"} <= layered


def test_lint_layer_catches_an_upward_import(tmp_path: Path) -> None:
    """The contract is not vacuous: a kernel module importing the training application breaks it."""
    for package in ("mod_models", "mod_kernels", "bench"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "mod_kernels" / "_utils.py", "a") as handle:
        handle.write("\nimport mod_models.train.loop  # an upward import\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "mod_kernels is not allowed to import mod_models.train" in result.stdout, result.stdout[-2000:]


def test_ruff_finds_nothing() -> None:
    selected = PYPROJECT["tool"]["ruff"]["lint"]["select"]
    assert {"E", "F"} <= set(selected), selected  # the rule set is chosen explicitly in pyproject.toml
    result = _run(_tool("ruff"), "check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
