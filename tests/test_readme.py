"""The README runs as written: its Python snippets execute, the commands it names exist.

Read at test time, so the checks follow the README as it changes:

* every ```python block runs in a fresh interpreter (in a temporary folder), unless the line
  right before its opening fence (blank lines allowed) is the marker
  ``<!-- no-test: REASON -->`` (for a block that needs a GPU or a data set; the reason is
  required and should say which);
* every ``python -m MODULE`` / ``torchrun ... -m MODULE`` in a ```bash block or in inline code
  names an importable module, and the project's own modules answer ``--help``; ``python -m
  bench`` commands parse with the benchmark's own argument parser; ``bash FILE`` names a file of
  the repository; every ``".[extra]"`` is an extra of pyproject.toml and every ``mod-*``
  command one of its console scripts;
* inline usage such as ```mod_models.integrations.features.mod_feature_extractor(...)``` resolves after a
  plain ``import mod_models``;
* the quick start is two commands and CI runs the second one verbatim.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROJECT_PACKAGES = ("bench", "mod_models", "mod_kernels")
NO_TEST = re.compile(r"^<!--\s*no-test:(?P<reason>.*?)-->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence, 1-based
    skip_reason: str | None  # the no-test marker's reason, None without a marker


def readme_text() -> str:
    return README.read_text()


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, each with the no-test marker before it (if any).

    Raises ValueError for an unclosed fence, a marker without a reason, or a marker that no
    code block follows."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str] | None = None  # (line, reason) of a marker waiting for its block
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        marker = NO_TEST.match(stripped)
        fence = FENCE.match(stripped)
        if marker:
            reason = marker["reason"].strip()
            if not reason:
                raise ValueError(f"README line {i + 1}: a no-test marker needs a reason: <!-- no-test: REASON -->")
            pending = (i + 1, reason)
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"README line {i + 1}: unclosed code fence")
            blocks.append(Block(fence["lang"], "\n".join(lines[i + 1:end]), i + 1, pending[1] if pending else None))
            pending = None
            i = end
        elif stripped and pending:
            raise ValueError(f"README line {pending[0]}: a no-test marker must stand right before a code block")
        i += 1
    if pending:
        raise ValueError(f"README line {pending[0]}: a no-test marker must stand right before a code block")
    return blocks


def inline_code(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    outside = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", outside)


def shell_commands(text: str) -> list[str]:
    """Commands of the bash blocks that are not marked no-test (one per line, continuations
    joined, comments dropped, ``a && b`` split) and of inline code that starts with a command."""
    commands = []
    for block in fenced_blocks(text):
        if block.lang not in ("bash", "sh", "shell", "console") or block.skip_reason:
            continue
        for line in block.code.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in line.split("#", 1)[0].split("&&") if part.strip()]
    commands += [span.strip() for span in inline_code(text)
                 if re.match(r"(python3? |torchrun |bash |mod-\w+ )", span.strip())]
    return commands


def module_of(command: str) -> str | None:
    """``X`` of ``python -m X ...`` or ``torchrun ... -m X ...``."""
    words = shlex.split(command)
    if not words or words[0] not in ("python", "python3", "torchrun") or "-m" not in words:
        return None
    position = words.index("-m")
    return words[position + 1] if position + 1 < len(words) else None


# ------------------------------------------------------------------------------ the parser itself


def test_block_parser_reads_markers_and_rejects_misplaced_ones():
    text = textwrap.dedent("""\
        Intro.

        <!-- no-test: needs a GPU -->

        ```python
        import torch
        ```

        ```bash
        python -m bench --quick   # smoke
        ```
        Inline `python -m mod_models.tools.facts` and
        `mod_models.integrations.features.mod_feature_extractor(m, ["x"])`.
        """)
    first, second = fenced_blocks(text)
    assert (first.lang, first.code, first.skip_reason) == ("python", "import torch", "needs a GPU")
    assert (second.lang, second.skip_reason, second.line) == ("bash", None, 9)
    assert shell_commands(text) == ["python -m bench --quick", "python -m mod_models.tools.facts"]
    assert module_of("torchrun --nproc-per-node 8 -m mod_models.train --out x") == "mod_models.train"
    with pytest.raises(ValueError, match="needs a reason"):
        fenced_blocks("<!-- no-test: -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="right before a code block"):
        fenced_blocks("<!-- no-test: needs a GPU -->\nsome prose\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="unclosed"):
        fenced_blocks("```python\npass\n")


# ---------------------------------------------------------------------------------- the README


def test_readme_markers_are_well_formed():
    blocks = fenced_blocks(readme_text())  # raises on a malformed marker or fence
    assert any(b.lang == "python" for b in blocks), "the README has no Python snippet to check"


PYTHON_BLOCKS = [b for b in fenced_blocks(readme_text()) if b.lang == "python"]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line{b.line}" for b in PYTHON_BLOCKS])
def test_python_snippet_runs(block: Block, tmp_path: Path):
    if block.skip_reason:
        # Marked in the README itself; reported as skipped, never as a pass.
        pytest.skip(f"README line {block.line} is marked no-test: {block.skip_reason}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MOD_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, f"README snippet at line {block.line} failed:\n{block.code}\n{result.stderr[-3000:]}"


def test_inline_usage_resolves_after_import():
    """In a fresh interpreter (other tests import submodules, which would hide a missing one)."""
    calls = sorted({m for span in inline_code(readme_text()) for m in re.findall(r"^(mod_models(?:\.\w+)+)\(", span)})
    assert calls, "expected inline usage such as mod_models.integrations.features.mod_feature_extractor(...)"
    check = textwrap.dedent(f"""
        import mod_models
        for dotted in {calls!r}:
            target = mod_models
            for name in dotted.split(".")[1:]:
                assert hasattr(target, name), f"README: `{{dotted}}(...)` fails after `import mod_models` at {{name!r}}"
                target = getattr(target, name)
            assert callable(target), dotted
        """)
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_commands_name_modules_and_files_that_exist():
    commands = shell_commands(readme_text())
    modules = {m for m in map(module_of, commands) if m}
    assert {"bench", "pytest"} <= modules, modules
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"README names modules that do not exist: {missing}"
    shell_scripts = [shlex.split(c)[1] for c in commands if c.startswith("bash ")]
    assert shell_scripts and all((ROOT / s).is_file() for s in shell_scripts), shell_scripts
    if tomllib is None:
        pytest.skip("reading pyproject.toml's extras needs tomllib (Python >= 3.11)")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {e.strip() for group in re.findall(r'\.\[([\w,\s-]+)\]', readme_text()) for e in group.split(",")}
    assert named and named <= extras, f"README names extras {sorted(named - extras)} that pyproject.toml lacks"
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {}))
    used = {shlex.split(c)[0] for c in commands if c.startswith("mod-")}
    assert used <= scripts, f"README runs commands {sorted(used - scripts)} that pyproject.toml does not install"


def test_bench_commands_parse():
    from bench.cli import build_parser

    for command in shell_commands(readme_text()):
        if module_of(command) == "bench":
            words = shlex.split(command)
            build_parser().parse_args(words[words.index("bench") + 1:])  # exits 2 on an unknown flag


def test_project_modules_answer_help():
    """``python -m X --help`` for every project module the README names, in one interpreter."""
    modules = sorted({m for m in map(module_of, shell_commands(readme_text()))
                      if m and m.split(".")[0] in PROJECT_PACKAGES})
    assert "bench" in modules and any(m.startswith("mod_models.") for m in modules), modules
    script = textwrap.dedent("""\
        import contextlib, io, os, runpy, sys
        failed = []
        environment = dict(os.environ)
        for module in sys.argv[1:]:
            os.environ.clear()  # each module sees the environment a fresh process would
            os.environ.update(environment)
            sys.argv = [module, "--help"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as stop:
                code = stop.code or 0
            if code != 0 or "usage:" not in out.getvalue():
                failed.append(f"{module}: exit {code}: {out.getvalue()[-300:]!r}")
        print("\\n".join(failed))
        raise SystemExit(1 if failed else 0)
        """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # as a user runs them (tests/conftest.py sets it for the suite)
    result = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", script, *modules], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def quick_start_commands() -> list[str]:
    section = readme_text().split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "python -m bench" in commands[0]
    assert "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, f".ci/run must run the README's test command {commands[1]!r} verbatim"
