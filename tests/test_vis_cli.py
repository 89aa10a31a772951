"""The inspection commands of SPEC.md on a store built here: exit codes, formats, filters."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from interlatent import LatentDB
from interlatent.db import SequenceRecord, SparseActs
from interlatent.vis import queries

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("vis") / "latents.db"
    db = LatentDB(path)
    texts = ["A the sky is blue", "A the sky is grey today", "B a <b>x</b> token here", "B the sea is calm"]
    recs = []
    for i, text in enumerate(texts):
        words = text.split(" ")
        toks = [words[0]] + [" " + w for w in words[1:]]
        n = len(toks)
        dense = rng.standard_normal((n, 8)).astype(np.float32)
        idx = np.stack([rng.choice(16, 2, replace=False) for _ in range(n)])
        vals = rng.random((n, 2)).astype(np.float32) + 0.1
        if " sky" in toks:
            j = toks.index(" sky")
            idx[j] = [3, 5]
            vals[j] = [9.0 + i, 0.5]  # latent 3 fires hard on "sky"
        if text.startswith("A"):
            dense[:, 0] += 3.0  # channel 0 separates group A from B
        recs.append(SequenceRecord(list(range(n)), toks, {"llm.layer.8": dense,
                                                          "latent:llm.layer.8": SparseActs(idx, vals, 16)},
                                   text=text, label="calm" if text.startswith("A") else "angry", prompt_index=i))
    with db.run() as run:
        run.write(recs, dtypes={"llm.layer.8": "float32", "latent:llm.layer.8": "float32"})
    db.compute_latent_examples("latent:llm.layer.8", top=8)
    db.compute_stats(min_count=1)
    db.set_explanations("latent:llm.layer.8", {3: "the word sky"})
    db.close()
    return path


def cli(*args, module=None):
    """Run the real console entry point (or ``python -m module``) as a process."""
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, "-m", "interlatent.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_spec_commands_run(store, tmp_path):
    rc, out, err = cli(str(store), "--list-layers", "--layer-prefix", "latent:", module="interlatent.vis.summary")
    assert rc == 0 and "latent:llm.layer.8" in out and "llm.layer.8 " not in out.replace("latent:llm.layer.8", "")
    rc, out, _ = cli(str(store), "--layer-prefix", "latent:", "--token-like", "sky", "--top", "20",
                     module="interlatent.vis.search")
    assert rc == 0 and "[[ sky]]" in out
    png = tmp_path / "p.png"
    rc, out, _ = cli(str(store), "--layer", "latent:llm.layer.8", "--channel", "0", "--prompt-index", "0",
                     "--out", str(png), module="interlatent.vis.plot")
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, _ = cli(str(store), "--layer-prefix", "latent:", "--channels", "0", "1", "--prompt-like-a", "A",
                     "--prompt-like-b", "B", module="interlatent.vis.diff")
    assert rc == 0 and "std_diff" in out


def test_json_equals_query_functions(store):
    rc, out, _ = cli("search", str(store), "--layer-prefix", "latent:", "--token-like", "sky", "--format", "json")
    assert rc == 0
    with LatentDB(store, mode="r") as db:
        want = queries.search(db, layer_prefix="latent:", token_like="sky")
    got = pd.read_json(io.StringIO(out), orient="records")
    assert got["value"].round(5).tolist() == want["value"].round(5).tolist()
    assert got["context"].tolist() == want["context"].tolist()
    assert got.iloc[0]["channel"] == 3 and got.iloc[0]["prompt_index"] == 1  # 9 + 1 is the top
    rc, out, _ = cli("diff", str(store), "--layer", "llm.layer.8", "--label-a", "calm", "--label-b", "angry",
                     "--format", "csv")
    df = pd.read_csv(io.StringIO(out))
    assert df.iloc[0]["channel"] == 0 and df.iloc[0]["std_diff"] > 1.5
    with LatentDB(store, mode="r") as db:
        want = queries.diff(db, "llm.layer.8", label_a="calm", label_b="angry")
    np.testing.assert_allclose(df["std_diff"].to_numpy(), want["std_diff"].to_numpy(), rtol=1e-6)
    rc, out, _ = cli("summary", str(store), "--stats", "latent:llm.layer.8", "--format", "json")
    stats = {r["channel"]: r for r in json.loads(out)}
    assert rc == 0 and stats[3]["explanation"] == "the word sky" and stats[0]["explanation"] is None
    rc, out, _ = cli("summary", str(store), "--format", "json")
    summary = json.loads(out)
    assert summary["store"][0]["sequences"] == 4 and {r["layer"] for r in summary["layers"]} == {
        "llm.layer.8", "latent:llm.layer.8"}


def test_search_filters_and_top(store):
    with LatentDB(store, mode="r") as db:
        full = queries.search(db, layer="llm.layer.8", top=5)
        assert len(full) == 5 and full["value"].is_monotonic_decreasing
        x = db.fetch_activations("llm.layer.8").values
        assert full["value"].iloc[0] == pytest.approx(x.max())
        lab = queries.search(db, layer="llm.layer.8", label="angry", top=50)
        assert set(lab["label"]) == {"angry"}
        ch = queries.search(db, layer="llm.layer.8", channel=[2], top=3)
        assert set(ch["channel"]) == {2} and ch["value"].iloc[0] == pytest.approx(x[:, 2].max())
        from_examples = queries.search(db, layer="latent:llm.layer.8", top=4)
        dense = db.fetch_activations("latent:llm.layer.8").values
        assert from_examples["value"].tolist() == pytest.approx(sorted(dense.ravel())[::-1][:4])


def test_no_matches_is_success_with_a_note(store):
    rc, out, err = cli("search", str(store), "--layer", "llm.layer.8", "--token-like", "zzz")
    assert rc == 0 and "no matches" in err


def test_missing_db_is_exit_1_and_creates_nothing(tmp_path):
    missing = tmp_path / "nope.db"
    for args in (["summary", str(missing)], ["search", str(missing), "--layer", "x"]):
        rc, out, err = cli(*args)
        assert rc == 1 and "no store" in err
    assert not missing.exists()


def test_unknown_layer_suggests_close_names(store):
    rc, _, err = cli("search", str(store), "--layer", "latent:llm.layer.9")
    assert rc == 1 and "did you mean" in err and "latent:llm.layer.8" in err


def test_usage_errors_exit_2(store):
    rc, _, err = cli("search", str(store))  # neither --layer nor --layer-prefix
    assert rc == 2
    rc, _, _ = cli("plot", str(store), "--layer", "llm.layer.8")
    assert rc == 2


def test_reading_commands_do_not_import_torch(store):
    code = ("import sys; from interlatent.cli import main; main(['summary', %r]); "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)") % str(store)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_help_for_every_command():
    for cmd in ("summary", "search", "plot", "diff"):
        rc, out, _ = cli(cmd, "--help")
        assert rc == 0 and "usage" in out
