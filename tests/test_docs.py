"""Every Python block and shell command of README.md and GUIDE.md runs, so the docs cannot drift.

Each document runs in a fresh folder: its Python blocks in order in one namespace, then its shell
lines there (the package's interpreter and console script first on PATH). The two set-up commands
(`make demo`, `make test`) are what CI itself runs; the demo has its own test.

A newcomer does not run the blocks alone: between them they poke at the tokenizer the way
TransformerLens users do (`to_tokens` on a batch, `to_str_tokens`, `tokenizer(..., padding=True,
truncation=True)`), which leaves padding and truncation switched on in the fast tokenizer's backend.
The documents run again with those calls between every two blocks, and every store they leave
behind is checked against TransformerLens's own tokenisation of each stored prompt: no pad, no
truncation, nothing missing.
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


def tokenizer_calls(namespace: dict[str, object]) -> None:
    """What a TransformerLens user types between two cells; each leaves state in the tokenizer."""
    model = namespace.get("model")
    if model is None or getattr(model, "tokenizer", None) is None:
        return
    model.to_tokens(["my heart aches", "ngl I found a wallet lol and kept it"])
    model.to_str_tokens("my heart aches")
    model.tokenizer(["a", "a much longer prompt than the first"], padding=True, truncation=True, max_length=4)
    model.tokenizer.padding_side = "left"


def check_stores_against_tokenizer(folder: Path, model) -> int:
    """Every LLM prompt in every store under ``folder`` holds exactly TransformerLens's tokens of its
    text (``to_tokens`` of that prompt alone, which pads nothing). Returns the prompts checked."""
    from interlatent import LatentDB

    checked = 0
    for path in sorted(folder.glob("*.db")):
        with LatentDB(path, mode="r") as db:
            seqs = db.sequences()
            prompts = seqs[seqs["kind"] == "prompt"]
            if prompts.empty:
                continue
            tokens = db.tokens(prompt_index=prompts["prompt_index"].tolist(), metrics=False)
            for pidx, text in zip(prompts["prompt_index"], prompts["text"]):
                stored = tokens.loc[tokens["prompt_index"] == pidx, "token_id"].tolist()
                bare = model.to_tokens(text, prepend_bos=False, padding_side="right")[0].tolist()
                with_bos = [model.tokenizer.bos_token_id, *bare]
                assert stored in (bare, with_bos), (
                    f"{path.name} prompt {pidx}: stored {len(stored)} tokens {stored[:12]}..., "
                    f"expected {len(bare)} (+BOS) of {text[:40]!r}")
                checked += 1
    return checked


@pytest.mark.parametrize("interleave", [False, True], ids=["in-order", "tokenizer-calls-between"])
@pytest.mark.parametrize("doc", ["README.md", "GUIDE.md"])
def test_doc_runs(doc, interleave, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    code = blocks(doc, "python")
    assert code, f"{doc} has no python blocks"
    from interlatent.llm import demo_model

    oracle = demo_model(quick=True)
    side = oracle.tokenizer.padding_side
    try:
        for i, block in enumerate(code):
            if interleave:
                tokenizer_calls(namespace)
            try:
                exec(compile(block, f"{doc}[python block {i}]", "exec"), namespace)  # noqa: S102
            except Exception as exc:  # pragma: no cover - the message names the failing block
                raise AssertionError(f"{doc} python block {i} failed: {exc!r}\n{block}") from exc
        assert check_stores_against_tokenizer(tmp_path, oracle) > 0
    finally:
        oracle.tokenizer.padding_side = side
    if interleave:
        return  # the shell commands read the same stores: running them once is enough
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT))
    for cmd in shell_lines(doc):
        proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{doc}: `{cmd}` exited {proc.returncode}\n{proc.stderr[-2000:]}"
        assert "error" not in proc.stderr.lower(), f"{doc}: `{cmd}`: {proc.stderr[-1000:]}"
