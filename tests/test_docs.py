"""Every Python block and shell command of README.md and GUIDE.md runs, so the docs cannot drift.

Each document runs in a fresh folder: its Python blocks in order in one namespace, then its shell
lines there (the package's interpreter and console script first on PATH). The two set-up commands
(`make demo`, `make test`) are what CI itself runs; the demo has its own test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SETUP_COMMANDS = {"make demo", "make test"}


def blocks(doc: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall((ROOT / doc).read_text()) if kind == lang]


def shell_lines(doc: str) -> list[str]:
    lines = []
    for body in blocks(doc, "bash"):
        for line in body.splitlines():
            cmd = line.split("  #", 1)[0].strip()
            if cmd and cmd not in SETUP_COMMANDS:
                lines.append(cmd)
    return lines


def test_readme_has_exactly_the_two_setup_commands():
    found = [ln.split("#", 1)[0].strip() for b in blocks("README.md", "bash") for ln in b.splitlines()]
    assert [c for c in found if c.startswith("make ")] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "demos/llm_workflow_demo.py" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("doc", ["README.md", "GUIDE.md"])
def test_doc_runs(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    code = blocks(doc, "python")
    assert code, f"{doc} has no python blocks"
    for i, block in enumerate(code):
        try:
            exec(compile(block, f"{doc}[python block {i}]", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # pragma: no cover - the message names the failing block
            raise AssertionError(f"{doc} python block {i} failed: {exc!r}\n{block}") from exc
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT))
    for cmd in shell_lines(doc):
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{doc}: `{cmd}` exited {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "error" not in proc.stderr.lower(), f"{doc}: `{cmd}`: {proc.stderr[-1000:]}"
