"""Fault injection: collections killed (SIGKILL, SIGTERM) at random points, and several writers at once.

A child process builds a tiny TransformerLens model from a config once, then forks one collection
per kill and kills each at its own seeded random delay (a fork starts in milliseconds, where a fresh
Python with torch takes seconds). Each forked collection logs the prompts of every batch right after
its write returns (committed). The stores are then reopened here and checked against an
uninterrupted reference collection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent.errors import IncompleteDataWarning

N_KILLS = 24
PROMPTS = [f"{text} ({i})" for i in range(6) for text in (
    "the sky is blue and the sea is green", "a cat sat on the mat while the dog slept",
    "hello world, this is a tiny corpus", "Alice said that Bob would report it",
    "numbers like 1 2 3 and symbols too", "the dog slept on the mat")]

_CHILD = r"""
import json, os, random, signal, sys, time, traceback
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from interlatent import LatentDB, LLMCollector
from interlatent.llm.loading import load_local_tokenizer

work, tok_dir, seed, n_kills = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prompts = json.loads(sys.argv[5])
torch.set_num_threads(1)
tok = load_local_tokenizer(tok_dir)
torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=48, d_vocab=len(tok),
                              act_fn="gelu", normalization_type="LN", seed=0)
model = HookedTransformer(cfg, tokenizer=tok).eval()
write = LatentDB.write


def collect(path, progress, texts, indices=None):
    def logged(self, run_id, records, **kw):  # a batch is committed once write() returns
        out = write(self, run_id, records, **kw)
        with open(progress, "a") as f:
            f.write(json.dumps({"t": time.time(), "written": out}) + "\n")
        return out

    LatentDB.write = logged
    db = LatentDB(path)
    LLMCollector(db, layer_indices=[0, 1], batch_size=2).run(model, prompts=texts, prompt_indices=indices,
                                                             show_progress=False)
    db.close()


def forked(fn, *args):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except SystemExit as exc:  # SIGTERM inside a run: Terminated, exit status 143
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def status(pid):
    _, st = os.waitpid(pid, 0)
    return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)


ref = status(forked(collect, f"{work}/ref.db", f"{work}/ref.progress", prompts))
start = time.time()  # a second uninterrupted collection times the window that kills land in
again = status(forked(collect, f"{work}/ref2.db", f"{work}/ref2.progress", prompts))
duration = time.time() - start
batches = [json.loads(line)["t"] - start for line in open(f"{work}/ref2.progress")]
rng = random.Random(seed)
kills = []
for i in range(n_kills):
    sig = signal.SIGKILL if i % 2 == 0 else signal.SIGTERM
    delay = rng.uniform(0.5 * batches[0], duration)  # from opening the store to closing it
    pid = forked(collect, f"{work}/k{i}.db", f"{work}/k{i}.progress", prompts)
    time.sleep(delay)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    kills.append({"store": f"k{i}", "signal": sig.name, "delay": round(delay, 4), "exit": status(pid)})
# several writers on one store at once, each its own run and prompts
parts = [prompts[j::4] for j in range(4)]
pids = [forked(collect, f"{work}/shared.db", f"{work}/shared{j}.progress", part,
               [100 * j + n for n in range(len(part))]) for j, part in enumerate(parts)]
shared = [status(p) for p in pids]
json.dump({"reference_exit": ref, "again_exit": again, "duration": duration, "first_batch": batches[0],
           "last_batch": batches[-1], "kills": kills, "shared_exits": shared},
          open(f"{work}/report.json", "w"))
"""


def _by_text(db: LatentDB, layer: str) -> dict[str, np.ndarray]:
    texts = dict(zip(db.sequences()["prompt_index"], db.sequences()["text"]))
    return {texts[p]: block for p, block in db.iter_sequence_blocks(layer)}


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, tokenizer_dir):
    work = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(work), str(tokenizer_dir), "20261201", str(N_KILLS),
                           json.dumps(PROMPTS)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    assert report["reference_exit"] == report["again_exit"] == 0, proc.stderr[-4000:]
    return work, report


def test_killed_collections_keep_every_committed_batch(fault_runs):
    work, report = fault_runs
    with LatentDB(work / "ref.db", mode="r") as ref, LatentDB(work / "ref2.db", mode="r") as again:
        want = {layer: _by_text(ref, layer) for layer in ("llm.layer.0", "llm.layer.1")}
        assert ref.runs()["status"].tolist() == ["complete"] and len(want["llm.layer.0"]) == len(PROMPTS)
        twice = _by_text(again, "llm.layer.1")  # collection is deterministic: a fair reference
        assert all(np.array_equal(twice[t], want["llm.layer.1"][t]) for t in PROMPTS)
    outcomes = {}
    for kill in report["kills"]:
        path = work / f"{kill['store']}.db"
        progress = work / f"{kill['store']}.progress"
        committed = [i for line in progress.read_text().splitlines() for i in json.loads(line)["written"]] \
            if progress.exists() else []
        assert kill["exit"] in (0, 143, -9, -15), kill  # SIGTERM inside a run exits 143
        if not path.exists():
            assert not committed
            outcomes["no store yet"] = outcomes.get("no store yet", 0) + 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IncompleteDataWarning)
            with LatentDB(path) as db:
                assert db._q("PRAGMA integrity_check") == [("ok",)], kill
                runs = db.runs()
                assert "running" not in set(runs["status"]), (kill, runs)  # a killed run is found on reopen
                stored = db.prompt_indices()
                assert set(committed) <= set(stored), kill  # every committed batch is still there
                for layer in ("llm.layer.0", "llm.layer.1"):
                    if not stored:
                        continue
                    assert db.prompt_indices(layer) == stored, kill  # no batch half written
                    for text, block in _by_text(db, layer).items():
                        assert np.array_equal(block, want[layer][text]), (kill, layer, text)
                status = runs["status"].iloc[0] if len(runs) else "no run"
                if status == "interrupted" and stored:
                    with pytest.warns(IncompleteDataWarning, match="llm.layer.0"):
                        db.check_complete("llm.layer.0")
                if status == "complete":
                    assert len(stored) == len(PROMPTS)
                    db.check_complete("llm.layer.0", action="raise")
                key = f"{kill['signal']} -> {status}"
                if status == "interrupted":
                    key += " (" + ("SIGTERM" if "SIGTERM" in runs["error"].iloc[0] else "owner gone") + ")"
                outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\nkill points (s after start): {sorted(k['delay'] for k in report['kills'])}; reference: batches "
          f"committed from {report['first_batch']:.3f} to {report['last_batch']:.3f} s, done at "
          f"{report['duration']:.3f} s\noutcomes: {outcomes}")
    assert len(report["kills"]) >= 20
    assert sum(v for k, v in outcomes.items() if "interrupted" in k) >= 5  # most kills land mid-collection


def test_writers_on_one_store_at_once_all_land(fault_runs):
    work, report = fault_runs
    assert report["shared_exits"] == [0, 0, 0, 0]
    with LatentDB(work / "ref.db", mode="r") as ref:
        want = _by_text(ref, "llm.layer.1")
    with LatentDB(work / "shared.db") as db:
        assert db._q("PRAGMA integrity_check") == [("ok",)]
        assert db.runs()["status"].tolist() == ["complete"] * 4
        got = _by_text(db, "llm.layer.1")
        assert set(got) == set(PROMPTS)
        assert all(np.array_equal(got[t], want[t]) for t in PROMPTS)
        assert db.check_complete("llm.layer.1", action="raise").complete


def test_consumers_warn_about_layers_from_incomplete_runs(tmp_path, tiny_tl):
    from interlatent import LLMCollector
    from interlatent.analysis.train import SAEPipeline, train_linear_probe
    from interlatent.patch import LatentPatch
    from interlatent.vis.dashboard import build_dashboard

    db = LatentDB(tmp_path / "partial.db")
    prompts = PROMPTS[:8]
    collector = LLMCollector(db, layer_indices=[0], batch_size=4,
                             prompt_context_fn=lambda text, i: {"label": "a" if i % 2 else "b"})
    run_id = collector.run(tiny_tl, prompts=prompts, show_progress=False)
    db.finish_run(run_id, "interrupted", "KeyboardInterrupt: ")  # as if stopped half way
    with pytest.warns(IncompleteDataWarning, match=r"sae training uses layer 'llm.layer.0'.*8 of its 8 prompts"):
        res = SAEPipeline(db, "llm.layer.0", k=2, d_sae=16, steps=20, batch_size=64, out_dir=tmp_path,
                          examples_top=4).run()
    with pytest.warns(IncompleteDataWarning, match=r"probe training"):
        train_linear_probe(db, layer="llm.layer.0", target_key="prompt_label", epochs=2, save=False)
    with pytest.warns(IncompleteDataWarning, match=r"LatentPatch.from_db.*computed from 'llm.layer.0'"):
        LatentPatch.from_db(db, res.latent_layer)
    with pytest.warns(IncompleteDataWarning, match="the dashboard"):
        html = build_dashboard(db, tmp_path / "report.html").read_text()
    assert "partial data" in html and "run 1 (interrupted)" in html
    db.close()
