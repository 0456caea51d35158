"""Packaging: the sdist and wheel build, a plain (non-editable) install works, Triton is optional.

Kept cheap: one ``python -m build --no-isolation`` of a copy of the source tree (sdist, then the
wheel from the sdist), one venv with the system site-packages (torch is not installed again),
``pip install --no-deps --no-index`` of the wheel, and one ``python -m bench --quick`` run from a
copy of the source tree against that install. The benchmarks are a source-tree tool (``bench/`` is in
the sdist, not in the wheel): no package called ``bench`` lands in site-packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import mod_models

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPTS = {
    "mod-train": "mod_models.train:main",
    "mod-export": "mod_models.tools.export:main",
    "mod-analysis": "mod_models.tools.analysis:main",
    "mod-facts": "mod_models.tools.facts:main",
}
PACKAGES = ("mod_models", "mod_kernels")  # what the wheel installs; bench/ stays in the source tree


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MOD_BACKEND")}
    env.update(extra)
    return env


def _source_copy(dest: Path) -> Path:
    """The files a fresh clone has (tracked and not ignored), copied to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=False)
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:  # an unpacked sdist: no git
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "__pycache__", "*.egg-info", "build", "dist", "runs", ".pytest_cache", ".hypothesis", ".venv"))
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="the packaging test needs the 'build' package: pip install -e '.[test]'")
    source = _source_copy(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
                            env=_user_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,), (wheel,) = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    return {"sdist": sdist, "wheel": wheel, "source": source}


def test_sdist_holds_what_its_tests_need(built) -> None:
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tests = {p.relative_to(built["source"]).as_posix() for p in (built["source"] / "tests").rglob("*.py")}
    needed = {"README.md", "LICENSE", "pyproject.toml", ".ci/run", "bench/gpu.sh"} | tests
    assert not needed - names, sorted(needed - names)
    modules = {p.relative_to(built["source"]).as_posix() for pkg in (*PACKAGES, "bench")
               for p in (built["source"] / pkg).rglob("*.py")}
    assert not modules - names, sorted(modules - names)


def test_wheel_metadata_license_version_and_console_scripts(built) -> None:
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = wheel.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert metadata["Name"] == "mod-cnn" and metadata["Version"] == mod_models.__version__
    assert metadata["License-Expression"] == "MIT" and metadata["License-File"] == "LICENSE"
    assert f"{info}/licenses/LICENSE" in names
    assert metadata.get_all("Author") == ["the mod-cnn authors"] and metadata.get_all("Classifier")
    lines = entry_points.split("[console_scripts]")[1].split("\n")
    scripts = dict(line.replace(" ", "").split("=", 1) for line in lines if "=" in line)
    assert scripts == CONSOLE_SCRIPTS
    tops = {n.split("/")[0] for n in names if not n.startswith(info)}
    assert tops == set(PACKAGES), tops  # no tests, no benchmarks, nothing else at the top level
    packaged = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert {"mod_models/train", "mod_models/tools", "mod_models/integrations"} <= packaged, packaged
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "the mod-cnn authors" in license_text


def test_plain_install_runs_the_quick_benchmark_from_the_source_tree(built, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                              str(built["wheel"])], env=_user_env(), capture_output=True, text=True, timeout=300,
                             check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    check = textwrap.dedent("""\
        import importlib.metadata as md, json
        import importlib.util, mod_models
        dist = md.distribution("mod-cnn")
        scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
        print(json.dumps({"bench": importlib.util.find_spec("bench") is not None, "mod_models": mod_models.__file__,
                          "version": dist.version, "callable": {n: callable(ep.load()) for n, ep in scripts.items()}}))
        """)
    work = tmp_path / "work"
    work.mkdir()
    loaded = subprocess.run([str(python), "-c", check], cwd=work, env=_user_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not facts["bench"] and Path(facts["mod_models"]).is_relative_to(site), facts  # no top-level "bench"
    assert facts["version"] == mod_models.__version__
    assert facts["callable"] == {name: True for name in CONSOLE_SCRIPTS}

    # The benchmark runs from a checkout (here a copy of the sdist's bench/) with the installed library:
    # the checkout's mod_models is left out so that the installed one is what gets measured.
    checkout = tmp_path / "checkout"
    shutil.copytree(built["source"] / "bench", checkout / "bench", ignore=shutil.ignore_patterns("results", "*.sh"))
    before = {p for p in checkout.rglob("*") if p.is_file()}
    run = subprocess.run([str(python), "-m", "bench", "--quick"], cwd=checkout, env=_user_env(), capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = sorted(p.relative_to(checkout).as_posix() for p in checkout.rglob("*")
                     if p.is_file() and p not in before and "__pycache__" not in p.parts)
    assert written and all(name.startswith("runs/bench/") for name in written), written
    assert {Path(n).suffix for n in written} == {".json", ".md", ".png"}
    assert not list(site.rglob("results")) and not list(site.rglob("runs"))  # nothing written into site-packages
    payload = json.loads((checkout / next(n for n in written if n.endswith(".json"))).read_text())
    assert payload["meta"]["env"]["mod_cnn"] == mod_models.__version__
    assert payload["meta"]["env"]["git_commit"] is None  # an installed copy has no commit to report


WITHOUT_TRITON = textwrap.dedent("""\
    import sys
    sys.modules["triton"] = None  # what `import triton` does where Triton is not installed: ImportError
    import contextlib, io
    import torch
    import mod_models, mod_models.integrations.features, mod_models.train
    import mod_models.tools.export, mod_models.tools.analysis
    import bench.cli, bench.models, bench.kernels, bench.providers, bench.report, bench.env
    model = mod_models.resnet18_mod(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        mod_models.set_backend(model, "auto")  # the reference on a CPU tensor
        assert torch.equal(model(x), reference)
        mod_models.set_backend(model, "triton")
        try:
            model(x)
        except RuntimeError as error:
            print("triton backend:", error)
        else:
            raise SystemExit("the triton backend ran without Triton")
    assert bench.env.collect_env(torch.device("cpu"))["triton"] is None
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            bench.cli.main(["--help"])
        except SystemExit as stop:
            assert stop.code == 0
    print("ok")
    """)


def test_everything_but_the_triton_backend_works_without_triton() -> None:
    env = _user_env(PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    message = next(line for line in lines if line.startswith("triton backend:"))
    assert "needs the Triton package" in message and "failed to import" in message
