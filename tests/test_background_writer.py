"""The background writer, explicit resume, and shuffled streaming within twice its buffer.

Kills (SIGKILL, SIGINT, SIGTERM) land in forked collections of a tiny TransformerLens model built
from a config in one child process (a fork starts in milliseconds); each forked collection logs the
prompts of every batch right after its write returns (committed). The stores are then checked here,
resumed with ``resume=True`` in another fork, and compared with a store collected in one go: every
row of every table, activation BLOBs byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

from interlatent import LatentDB, LLMCollector
from interlatent.db import SequenceRecord
from interlatent.db.background import BackgroundWriter
from interlatent.errors import ConfigError, ResumeError

PROMPTS = [f"{w} is word number {i}" + " and more" * (i % 3) for i, w in enumerate(
    ["sky", "cat", "dog", "sea", "Alice", "Bob", "mat", "hello", "world", "blue", "green", "tiny"] * 2)]


def store_rows(db: LatentDB) -> dict[str, list[tuple]]:
    """Everything a collection stores, keyed by what it means (not by row ids), BLOBs as bytes."""
    q = db._q
    return {
        "sequences": sorted(q("SELECT prompt_index, kind, text, label, context, n_positions FROM sequences")),
        "tokens": sorted(q("SELECT s.prompt_index, t.token_ids, t.tokens, t.positions, t.generated FROM tokens t"
                           " JOIN sequences s ON s.seq_id = t.seq_id")),
        "metrics": sorted(q("SELECT s.prompt_index, m.name, tm.data FROM token_metrics tm JOIN metrics m"
                            " ON m.metric_id = tm.metric_id JOIN sequences s ON s.seq_id = tm.seq_id")),
        "layers": sorted(q("SELECT name, width, dtype, storage FROM layers")),
        "activations": sorted(q("SELECT l.name, s.prompt_index, a.n_positions, a.dtype, a.data FROM activations a"
                                " JOIN layers l ON l.layer_id = a.layer_id JOIN sequences s ON s.seq_id = a.seq_id")),
    }


def records(n: int, start: int = 0, width: int = 8, rows: int = 4, layer: str = "l") -> list[SequenceRecord]:
    rng = np.random.default_rng(start)
    return [SequenceRecord(token_ids=list(range(rows)), tokens=["t"] * rows, text=f"seq {start + i}",
                           activations={layer: rng.standard_normal((rows, width)).astype(np.float16)})
            for i in range(n)]


# ---------------------------------------------------------------------------- the writer itself
class Exploding(RuntimeError):
    pass


def test_a_writer_error_is_raised_in_the_caller_with_its_type(tmp_path):
    db = LatentDB(tmp_path / "err.db")
    run = db.start_run()

    class Failing(LatentDB):
        calls = 0

        def write(self, *args, **kwargs):
            Failing.calls += 1
            if Failing.calls == 2:
                raise Exploding("disk on fire at batch 2")
            return super().write(*args, **kwargs)

    writer = BackgroundWriter(db, run.run_id, max_batches=1, opener=lambda: Failing(db.path)).start()
    with pytest.raises(Exploding, match="disk on fire at batch 2"):
        for k in range(50):  # the error comes back at a later submit ...
            writer.submit(records(1, start=k))
            time.sleep(0.01)
    writer._thread.join(10)
    assert k < 50 and not writer._thread.is_alive()  # the writer stopped at its error
    with pytest.raises(Exploding, match="disk on fire"):  # ... and again at close
        writer.close()
    assert db.prompt_indices() == [0]  # the first batch, committed before the failure


def test_a_writer_error_interrupts_the_collection_with_its_type(tiny_tl, tokenizer, tmp_path, monkeypatch):
    original = LatentDB.write
    calls = {"n": 0}

    def failing(self, *args, **kwargs):  # the writer thread's own store: patch the class
        calls["n"] += 1
        if calls["n"] == 2:
            raise Exploding("the store refused batch 2")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LatentDB, "write", failing)
    db = LatentDB(tmp_path / "c.db")
    with pytest.raises(Exploding, match="the store refused batch 2"):
        LLMCollector(db, layer_indices=[0], batch_size=2, write_queue=1).run(tiny_tl, tokenizer, prompts=PROMPTS)
    runs = db.runs()
    assert runs["status"].tolist() == ["interrupted"] and "Exploding: the store refused batch 2" in runs["error"][0]
    assert len(db.prompt_indices()) == 2  # the batch before, whole


def test_the_queue_bounds_batches_and_bytes(tmp_path):
    db = LatentDB(tmp_path / "q.db")
    run = db.start_run()
    gate = threading.Event()

    class Gated(LatentDB):
        def write(self, *args, **kwargs):
            gate.wait(20)
            return super().write(*args, **kwargs)

    batch_bytes = 4 * 8 * 2  # one record of [4, 8] float16
    writer = BackgroundWriter(db, run.run_id, max_batches=3, max_bytes=10 * batch_bytes,
                              opener=lambda: Gated(db.path)).start()
    done = []

    def produce(n):
        for k in range(n):
            writer.submit(records(1, start=k))
            done.append(k)

    producer = threading.Thread(target=produce, args=(10,))
    producer.start()
    time.sleep(0.5)
    # three batches handed over (one stuck in the write, two queued): the producer blocks on the fourth
    assert producer.is_alive() and len(done) == 3 and writer.pending_batches == 3
    assert writer.pending_bytes == 3 * batch_bytes
    gate.set()
    producer.join(20)
    writer.close()
    assert len(done) == 10 and writer.peak_batches <= 3 and db.prompt_indices() == list(range(10))
    # by bytes: room for two batches of this size, whatever max_batches allows
    gate.clear()
    run2 = db.start_run()
    writer = BackgroundWriter(db, run2.run_id, max_batches=100, max_bytes=2 * 4 * 64 * 2,
                              opener=lambda: Gated(db.path)).start()
    done.clear()
    big = threading.Thread(target=lambda: [writer.submit(records(1, start=100 + k, width=64, layer="wide")) or done.append(k)
                                           for k in range(6)])
    big.start()
    time.sleep(0.5)
    assert big.is_alive() and len(done) == 2 and writer.pending_batches == 2
    assert writer.pending_bytes == 2 * 4 * 64 * 2
    gate.set()
    big.join(20)
    writer.close()
    assert len(done) == 6 and writer.peak_bytes <= 2 * 4 * 64 * 2 and len(db.prompt_indices()) == 16


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_writer_on_and_off_store_the_same_bytes(tiny_tl, tokenizer, tmp_path, dtype):
    stores = {}
    for queue in (0, 1, 4):
        with LatentDB(tmp_path / f"q{queue}.db") as db:
            LLMCollector(db, layer_indices=[0, 2], hooks=["resid_post", "mlp_out"], batch_size=3, write_queue=queue,
                         dtype=dtype,
                         token_metrics_fn=lambda text, idx, toks: {"n": len(toks)}, metrics=["next_token_loss"]
                         ).run(tiny_tl, tokenizer, prompts=PROMPTS, labels=[i % 2 for i in range(len(PROMPTS))])
            stores[queue] = store_rows(db)
            assert db.runs()["status"].tolist() == ["complete"]
    assert len(stores[0]["activations"]) == 4 * len(PROMPTS)
    assert stores[0] == stores[1] == stores[4]
    # and without user functions or logits, where the writer thread builds the records itself
    plain = {}
    for queue in (0, 4):
        with LatentDB(tmp_path / f"plain{queue}.db") as db:
            LLMCollector(db, layer_indices=[1], batch_size=4, write_queue=queue, dtype=dtype).run(
                tiny_tl, tokenizer, prompts=PROMPTS)
            plain[queue] = store_rows(db)
    assert plain[0] == plain[4] and plain[0]["activations"][0][3] == dtype


def test_write_queue_is_checked(tmp_path):
    db = LatentDB(tmp_path / "o.db")
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ConfigError, match="write_queue must be an int >= 0 or None"):
            LLMCollector(db, write_queue=bad)
    assert LLMCollector(db, write_queue=None).write_queue == 0


# ---------------------------------------------------------------------------- resume=True
def test_resume_refuses_nothing_to_resume_and_another_config(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "r.db")
    with pytest.raises(ResumeError, match="holds no interrupted collection"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS, resume=True)
    assert db.runs().empty  # refused before anything ran

    def failing(text, idx, toks, calls={"n": 0}):  # noqa: B006 - a counter local to this test
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        LLMCollector(db, layer_indices=[0], batch_size=2, token_metrics_fn=failing).run(tiny_tl, tokenizer,
                                                                                      prompts=PROMPTS)
    with pytest.raises(ResumeError, match=r"dtype 'float16' \(now 'float32'\)"):
        LLMCollector(db, layer_indices=[0], dtype="float32").run(tiny_tl, tokenizer, prompts=PROMPTS, resume=True)
    with pytest.raises(ResumeError, match="hook_points"):
        LLMCollector(db, layer_indices=[1]).run(tiny_tl, tokenizer, prompts=PROMPTS, resume=True)
    with pytest.raises(ResumeError, match="another prompt list"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS[::-1], resume=True)
    with pytest.raises(ConfigError, match="needs duplicates='attach'"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS, resume=True, duplicates="new")
    assert db.runs()["status"].tolist() == ["interrupted"]
    LLMCollector(db, layer_indices=[0], batch_size=5).run(tiny_tl, tokenizer, prompts=PROMPTS, resume=True)
    assert db.runs()["status"].tolist() == ["resumed", "complete"]
    assert len(db.prompt_indices("llm.layer.0")) == len(PROMPTS)
    with pytest.raises(ResumeError, match="holds no interrupted collection"):  # resumed: nothing left
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS, resume=True)


_CHILD = r"""
import json, os, random, signal, sys, time, traceback
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from interlatent import LatentDB, LLMCollector
from interlatent.llm.loading import load_local_tokenizer

work, tok_dir = sys.argv[1], sys.argv[2]
prompts = json.loads(sys.argv[3])
torch.set_num_threads(1)
tok = load_local_tokenizer(tok_dir)
torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=48, d_vocab=len(tok),
                              act_fn="gelu", normalization_type="LN", seed=0)
model = HookedTransformer(cfg, tokenizer=tok).eval()
write = LatentDB.write


def collect(path, progress, texts, queue=4, resume=False, slow=0.0):
    def logged(self, run_id, records, **kw):  # a batch is committed once write() returns
        time.sleep(slow)
        out = write(self, run_id, records, **kw)
        with open(progress, "a") as f:
            f.write(json.dumps({"t": time.time(), "written": out}) + "\n")
        return out

    LatentDB.write = logged
    db = LatentDB(path)
    LLMCollector(db, layer_indices=[0, 1], hooks=["resid_post", "mlp_out"], batch_size=2, write_queue=queue,
                 token_metrics_fn=lambda text, idx, toks: {"n": len(toks)}).run(
        model, prompts=texts, labels=[i % 3 for i in range(len(texts))], resume=resume, show_progress=False)
    db.close()


def forked(fn, *args, **kwargs):
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args, **kwargs)
        except SystemExit as exc:  # SIGTERM inside a run: Terminated, exit status 143
            code = exc.code if isinstance(exc.code, int) else 1
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def status(pid):
    _, st = os.waitpid(pid, 0)
    return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)


def committed(progress):
    try:
        return sum(1 for _ in open(progress))
    except FileNotFoundError:
        return 0


report = {"one_go": status(forked(collect, f"{work}/one_go.db", f"{work}/one_go.progress", prompts, queue=0))}
rng = random.Random(20261201)
kills = []
for i, sig in enumerate([signal.SIGKILL, signal.SIGINT, signal.SIGTERM] * 2):
    name = f"k{i}"
    pid = forked(collect, f"{work}/{name}.db", f"{work}/{name}.progress", prompts, slow=0.1)
    deadline = time.time() + 60
    while committed(f"{work}/{name}.progress") < 1 and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))  # mid-write, mid-forward or mid-queue
    os.kill(pid, sig)
    kills.append({"store": name, "signal": sig.name, "exit": status(pid)})
    db = LatentDB(f"{work}/{name}.db")  # a writable open marks a killed run interrupted
    kills[-1]["runs"] = db.runs()[["status", "error"]].values.tolist()
    db.close()
    kills[-1]["resume_exit"] = status(forked(collect, f"{work}/{name}.db", f"{work}/{name}.resume", prompts,
                                             resume=True))
report["kills"] = kills
# two processes, background writers on, overlapping prompt lists into one store at once
halves = [prompts[:16], prompts[8:]]
pids = [forked(collect, f"{work}/shared.db", f"{work}/shared{j}.progress", part) for j, part in enumerate(halves)]
report["shared_exits"] = [status(p) for p in pids]
json.dump(report, open(f"{work}/report.json", "w"))
"""


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory, tokenizer_dir):
    work = tmp_path_factory.mktemp("bgkills")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(work), str(tokenizer_dir), json.dumps(PROMPTS)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((work / "report.json").read_text())
    assert report["one_go"] == 0, proc.stderr[-4000:]
    return work, report


def test_killed_collections_are_consistent_and_resume_to_the_one_go_store(kill_runs):
    work, report = kill_runs
    with LatentDB(work / "one_go.db", mode="r") as ref:
        want = store_rows(ref)
        assert ref.runs()["status"].tolist() == ["complete"]
    assert len(want["sequences"]) == len(PROMPTS) and len(want["activations"]) == 4 * len(PROMPTS)
    seen = set()
    for kill in report["kills"]:
        expected_exit = {"SIGKILL": -9, "SIGINT": 130, "SIGTERM": 143}[kill["signal"]]
        assert kill["exit"] == expected_exit, kill
        assert kill["resume_exit"] == 0, kill
        progress = work / f"{kill['store']}.progress"
        committed = [i for line in progress.read_text().splitlines() for i in json.loads(line)["written"]]
        with LatentDB(work / f"{kill['store']}.db") as db:
            assert db._q("PRAGMA integrity_check") == [("ok",)]
            runs = db.runs()
            interrupted, resumed_by = runs.iloc[0], runs.iloc[1]
            # the killed run: interrupted (SIGKILL: found on reopen), every batch it committed kept
            why = {"SIGKILL": "owner process gone", "SIGINT": "KeyboardInterrupt", "SIGTERM": "SIGTERM"}
            assert kill["runs"][0][0] == "interrupted" and why[kill["signal"]] in kill["runs"][0][1], kill
            assert interrupted["status"] == "resumed" and resumed_by["status"] == "complete", runs
            assert 2 <= len(committed) < len(PROMPTS), kill  # the kill landed mid-collection
            killed_rows = db._q("SELECT DISTINCT s.prompt_index FROM activations a JOIN sequences s"
                                " ON s.seq_id = a.seq_id WHERE a.run_id = ?", (int(interrupted["run_id"]),))
            assert set(committed) <= {r[0] for r in killed_rows}, kill
            per_layer = db._q("SELECT seq_id, COUNT(*) FROM activations WHERE run_id = ? GROUP BY seq_id",
                              (int(interrupted["run_id"]),))
            assert all(n == 4 for _, n in per_layer), kill  # no sequence with part of its layers
            # resumed: exactly the store of one uninterrupted collection
            assert store_rows(db) == want, kill
            assert db.check_complete("llm.layer.1", action="raise").complete
        seen.add(kill["signal"])
    assert seen == {"SIGKILL", "SIGINT", "SIGTERM"}


def test_two_processes_with_background_writers_store_every_prompt_once(kill_runs):
    work, report = kill_runs
    assert report["shared_exits"] == [0, 0]
    with LatentDB(work / "one_go.db", mode="r") as ref, LatentDB(work / "shared.db") as db:
        texts = [t for (t,) in db._q("SELECT text FROM sequences")]
        assert sorted(texts) == sorted(set(PROMPTS))  # every prompt once, none twice
        assert db.runs()["status"].tolist() == ["complete", "complete"]
        sql = ("SELECT s.text, a.data FROM activations a JOIN sequences s ON s.seq_id = a.seq_id JOIN layers l"
               " ON l.layer_id = a.layer_id WHERE l.name = 'llm.layer.1.mlp_out'")
        want = dict(ref._q(sql))
        got = db._q(sql)
        assert len(got) == len(PROMPTS) and all(want[t] == b for t, b in got)
        assert db._q("SELECT COUNT(*) FROM activations")[0][0] == 4 * len(PROMPTS)


# ---------------------------------------------------------------------------- shuffled streaming
def _stream_store(path, n_seq=2000, positions=16, width=128):
    rng = np.random.default_rng(0)
    with LatentDB(path, durability="process") as db, db.run() as run:
        for start in range(0, n_seq, 250):
            lens = rng.integers(positions // 2, positions + 1, 250)
            run.write([SequenceRecord(token_ids=list(range(n)), tokens=["t"] * n, text=f"s{start + i}",
                                      activations={"l": rng.standard_normal((n, width)).astype(np.float16)})
                       for i, n in enumerate(lens)])


def test_shuffled_streaming_peaks_within_twice_its_buffer(tmp_path):
    path = tmp_path / "stream.db"
    width, buffer_tokens = 128, 8192  # a 4 MiB buffer of float32 rows
    _stream_store(path, width=width)
    with LatentDB(path, mode="r") as db:
        n_rows = int(db.sequences()["n_positions"].sum())
        assert n_rows > 2 * buffer_tokens
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            seen = 0
            for values, ids in db.iter_activation_chunks("l", shuffle=True, seed=3, buffer_tokens=buffer_tokens,
                                                         chunk_size=1024):
                seen += ids.shape[0]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    budget = buffer_tokens * width * 4
    assert seen == n_rows
    assert peak <= 2 * budget, f"peak {peak / 2**20:.2f} MiB for a {budget / 2**20:.2f} MiB buffer"


def _reference_shuffle(blocks, chunk_size, rng, buffer_rows):
    """The plain algorithm (concatenate what waits, permute, cut), whose order a seed must keep."""
    values, ids, out = [], [], []
    for v, i in blocks:
        values.append(v)
        ids.append(i)
        if sum(len(x) for x in ids) >= buffer_rows:
            v_all, i_all = np.concatenate(values), np.concatenate(ids)
            perm = rng.permutation(len(i_all))
            v_all, i_all = v_all[perm], i_all[perm]
            n_full = len(i_all) // chunk_size * chunk_size
            out += [(v_all[s : s + chunk_size], i_all[s : s + chunk_size]) for s in range(0, n_full, chunk_size)]
            values, ids = [v_all[n_full:]], [i_all[n_full:]]
    if ids:
        v_all, i_all = np.concatenate(values), np.concatenate(ids)
        perm = rng.permutation(len(i_all))
        v_all, i_all = v_all[perm], i_all[perm]
        out += [(v_all[s : s + chunk_size], i_all[s : s + chunk_size]) for s in range(0, len(i_all), chunk_size)]
    return out


def test_shuffled_stream_is_a_seeded_permutation_in_the_reference_order(tmp_path):
    path = tmp_path / "perm.db"
    _stream_store(path, n_seq=300, positions=12, width=16)
    with LatentDB(path, mode="r") as db:
        plain = [(v, i) for v, i in db.iter_activation_chunks("l", chunk_size=100)]
        runs = {seed: [(v, i) for v, i in db.iter_activation_chunks("l", shuffle=True, seed=seed, chunk_size=100,
                                                                     buffer_tokens=700)] for seed in (1, 1, 2)}
        again = [(v, i) for v, i in db.iter_activation_chunks("l", shuffle=True, seed=1, chunk_size=100,
                                                             buffer_tokens=700)]
        blocks = list(db.iter_sequence_blocks("l"))
    plain_v, plain_i = np.concatenate([v for v, _ in plain]), np.concatenate([i for _, i in plain])
    shuffled_v, shuffled_i = np.concatenate([v for v, _ in runs[1]]), np.concatenate([i for _, i in runs[1]])
    key = plain_i[:, 0] * 1000 + plain_i[:, 1]
    assert len(np.unique(key)) == len(key)  # every row once
    order = np.argsort(shuffled_i[:, 0] * 1000 + shuffled_i[:, 1])
    assert np.array_equal(shuffled_i[order], plain_i[np.argsort(key)])
    assert np.array_equal(shuffled_v[order], plain_v[np.argsort(key)])  # the same rows, each once
    assert not np.array_equal(shuffled_i, plain_i)
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]) for a, b in zip(runs[1], again))
    assert not np.array_equal(np.concatenate([i for _, i in runs[2]]), shuffled_i)  # another seed, another order
    # the order of a seed is that of the plain algorithm: sequences permuted by the same generator
    rng = np.random.default_rng(1)
    seq_order = rng.permutation(len(blocks))
    ref = _reference_shuffle([(blocks[k][1], np.stack([np.full(len(blocks[k][1]), blocks[k][0]),
                                                       np.arange(len(blocks[k][1]))], 1)) for k in seq_order],
                             100, rng, 700)
    assert len(ref) == len(runs[1])
    assert all(np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]) for a, b in zip(ref, runs[1]))


def test_gym_episodes_store_the_same_bytes_with_the_writer_on_and_off(tmp_path):
    import gymnasium as gym
    import torch
    from torch import nn

    from interlatent import GymCollector

    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    stores = {}
    for queue in (0, 2):
        with LatentDB(tmp_path / f"gym{queue}.db") as db:
            GymCollector(db, hook_layers=["0", "2"], write_queue=queue).run(policy, gym.make("CartPole-v1"),
                                                                             episodes=6, seed=3)
            stores[queue] = store_rows(db)
    assert len(stores[0]["sequences"]) == 6 and len(stores[0]["activations"]) == 6 * 5  # 2 hooks x pre/post + obs
    assert stores[0] == stores[2]
