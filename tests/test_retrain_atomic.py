"""Re-training a latent layer is atomic: a SIGKILL mid-backfill keeps the previous layer whole."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from interlatent import LatentDB
from interlatent.analysis.train import SAEPipeline
from interlatent.db import SequenceRecord

D, LAYER, LATENT = 16, "llm.layer.0", "latent_sae:llm.layer.0"

def _retrain(path: str, seed: int, out) -> None:
    """Runs in a forked process: re-train and backfill; after every committed write it reports and
    waits for the go-ahead, so the parent picks the write after which the kill comes."""
    db = LatentDB(path)
    write, start_run = db.write_activations, db.start_run

    def traced(name, call):
        def step(*args, **kwargs):
            result = call(*args, **kwargs)
            out.send(name)
            out.recv()
            return result
        return step

    db.write_activations = traced("wrote", write)
    db.start_run = traced("backfill", start_run)  # the backfill's run opens just before its first write
    pipe = SAEPipeline(db, LAYER, k=2, d_sae=32, steps=5, batch_size=64, seed=seed, progress=False)
    pipe.backfill_tokens = 64  # many small transactions: many places to be killed in
    pipe.run()
    out.send("done")


def _store(path: Path) -> None:
    rng = np.random.default_rng(0)
    recs = [SequenceRecord(list(range(50)), [f"t{j}" for j in range(50)],
                           {LAYER: rng.standard_normal((50, D)).astype(np.float32)}, text=f"p{i}")
            for i in range(40)]
    with LatentDB(path) as db:
        with db.run() as run:
            run.write(recs, dtypes={LAYER: "float32"})
        SAEPipeline(db, LAYER, k=2, d_sae=32, steps=5, batch_size=64, progress=False).run()
        db.set_explanations(LATENT, {0: "first latent", 5: "sixth latent"}, source="manual")


def _snapshot(db: LatentDB) -> tuple:
    acts = db.fetch_activations(LATENT)
    return (db.layer_info(LATENT).artifact_id, acts.values, acts.tokens[["prompt_index", "position"]],
            db.explanations(LATENT)[["channel", "text"]], db.latent_examples(LATENT))


def _integrity(path: Path) -> tuple[str, list[str]]:
    conn = sqlite3.connect(path)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        names = [r[0] for r in conn.execute("SELECT name FROM layers")]
    finally:
        conn.close()
    return ok, names


def test_sigkill_during_backfill_keeps_the_old_layer_and_a_retrain_replaces_it(tmp_path):
    path = tmp_path / "kill.db"
    _store(path)
    with LatentDB(path) as db:
        before = _snapshot(db)
    ctx = multiprocessing.get_context("fork")  # a real process, without paying for imports again
    rng = np.random.default_rng()  # a different kill point on every run
    killed = 0
    for trial in range(4):
        # events: the backfill's run opening, then 20 writes (40 prompts of 50 tokens, 100 per write)
        kill_after = int(rng.integers(1, 22))
        parent, kid = ctx.Pipe()
        child = ctx.Process(target=_retrain, args=(str(path), trial + 10, kid), daemon=True)
        child.start()
        kid.close()
        events, seen, finished = 0, 0, False
        try:
            while events < kill_after and not finished and parent.poll(60):
                msg = parent.recv()
                finished |= msg == "done"
                if msg != "done":
                    events += 1
                    seen += msg == "wrote"
                    parent.send("go")
            time.sleep(float(rng.uniform(0, 0.005)))  # into the next write, the examples or the swap
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.join(timeout=60)
            parent.close()
        assert events >= 1
        ok, names = _integrity(path)
        assert ok == "ok"
        with LatentDB(path) as db:
            assert db.layers() == [LATENT, LAYER] and "~building:" not in db.layer_table()["layer"].str.cat()
            if finished or db.layer_info(LATENT).artifact_id != before[0]:
                # the child got past the swap's commit: its layer replaced the old one whole
                assert db.n_tokens(LATENT) == 2000 and db.explanations(LATENT).empty
                before = _snapshot(db)  # the next kill must keep this one
                continue
            killed += 1
            if seen:  # it really died mid-backfill, with latents written aside
                assert any(n.startswith("~building:") for n in names)
            now = _snapshot(db)
            np.testing.assert_array_equal(now[1], before[1])
            for a, b in zip(now[2:], before[2:]):
                pd.testing.assert_frame_equal(a, b)
    assert killed >= 1
    with LatentDB(path) as db:  # a normal re-train replaces the layer and clears the leftover
        res = SAEPipeline(db, LAYER, k=2, d_sae=32, steps=5, batch_size=64, seed=99, progress=False).run()
        assert db.layer_info(LATENT).artifact_id == res.artifact_id and db.explanations(LATENT).empty
        assert db.n_tokens(LATENT) == 2000
    ok, names = _integrity(path)
    assert ok == "ok" and sorted(names) == [LATENT, LAYER]


def test_replace_layer_swaps_in_one_step_and_leaves_nothing_of_the_old_layer(tmp_path):
    from interlatent import naming
    from interlatent.errors import LayerNotFoundError

    rng = np.random.default_rng(1)
    db = LatentDB(tmp_path / "swap.db")
    old = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    with db.run() as run:
        run.write([SequenceRecord(list(range(4)), ["a", "b", "c", "d"], {"latent:x": o}, text=f"p{i}")
                   for i, o in enumerate(old)], dtypes={"latent:x": "float32"})
    db.compute_stats(min_count=1)
    db.compute_latent_examples("latent:x", top=2)
    db.set_explanations("latent:x", {1: "old"})
    old_id = db.layer_info("latent:x").layer_id
    with pytest.raises(LayerNotFoundError):
        db.replace_layer(naming.building_name("latent:x"), "latent:x")  # nothing built: nothing touched
    assert db.explanations("latent:x")["text"].tolist() == ["old"]
    built = naming.building_name("latent:x")
    new = [o + 10 for o in old]
    with db.run() as run:
        db.write_activations(run.run_id, built, list(enumerate(new)), dtype="float32", layer_meta={"kind": "latent"})
    assert db.layers() == ["latent:x"]  # the built layer is not listed while it is built
    np.testing.assert_array_equal(db.fetch_activations("latent:x").values, np.concatenate(old))
    db.replace_layer(built, "latent:x")
    assert db.layers() == ["latent:x"] and db.layer_info("latent:x").kind == "latent"
    np.testing.assert_array_equal(db.fetch_activations("latent:x").values, np.concatenate(new))
    assert db.explanations("latent:x").empty
    conn = sqlite3.connect(tmp_path / "swap.db")
    for table in ("activations", "latent_examples", "latent_explanations", "stats", "correlations"):
        assert conn.execute(f"SELECT COUNT(*) FROM {table} WHERE layer_id=?", (old_id,)).fetchone()[0] == 0, table
    conn.close()
