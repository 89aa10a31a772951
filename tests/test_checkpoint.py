"""Training checkpoints: a run killed at a random step and resumed ends exactly as one that never stopped.

The pipelines are killed with SIGKILL in a subprocess (mid-step, at a step drawn at random, and
once inside a checkpoint write), resumed here, and compared with ``torch.equal`` on every weight,
fire count and loss-history entry, and ``==`` on the held-out metrics, against a run without
checkpoints (also with the training prompts read as three partition streams). ``fit`` resumes a
plain iterable (replaying it) and a stream that restores its own position; every generator in play
is restored. A checkpoint of another configuration is refused.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from interlatent import LatentDB
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig
from interlatent.analysis.train import (
    SAEPipeline,
    TrainConfig,
    TranscoderPipeline,
    checkpoint,
    fit,
)
from interlatent.db import SequenceRecord
from interlatent.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
D, STEPS, EVERY = 8, 30, 4


def write_store(path: Path) -> None:
    """40 prompts of 10-16 tokens: about 7 batches of 64 per epoch, so 30 steps cross epochs."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((D, D)).astype(np.float32)
    with LatentDB(path) as db, db.run(model="planted") as run:
        recs = []
        for i in range(40):
            n = 10 + i % 7
            a = rng.standard_normal((n, D)).astype(np.float32)
            recs.append(SequenceRecord(list(range(n)), [f"t{j}" for j in range(n)],
                                       {"llm.layer.0": a, "llm.layer.0.mlp_in": a, "llm.layer.0.mlp_out": np.tanh(a @ mix)},
                                       text=f"prompt {i}", prompt_index=i))
        run.write(recs, dtypes={n: "float32" for n in ("llm.layer.0", "llm.layer.0.mlp_in", "llm.layer.0.mlp_out")})


def make(kind: str, db: LatentDB, **extra):
    """The pipelines under test (AuxK reaches dead latents: ``dead_tokens`` is short)."""
    common = {"d_sae": 32 if kind == "topk" else 16, "steps": STEPS, "batch_size": 64, "seed": 3, "backfill": False, "progress": False, **extra}
    if kind == "partitioned":  # three partition streams, each with its own position
        kind, common = "topk", {**common, "data_partitions": 3}
    if kind == "topk":
        return SAEPipeline(db, "llm.layer.0", k=1, train_config=TrainConfig(lr=2e-2, dead_tokens=64), **common)
    if kind == "relu":
        return SAEPipeline(db, "llm.layer.0", activation="relu", **common)
    return TranscoderPipeline(db, "llm.layer.0", k=3, **common)


CHILD = textwrap.dedent("""
    import importlib, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import test_checkpoint as t
    from interlatent import LatentDB
    from interlatent.analysis.train import checkpoint
    fit_module = importlib.import_module("interlatent.analysis.train.fit")
    store, kind, kill_at, how = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    finite, replace, seen = fit_module._finite, os.replace, {"steps": 0, "writes": 0}

    def die_mid_step(loss, params):  # called once per step, between backward and the update
        if seen["steps"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        seen["steps"] += 1
        return finite(loss, params)

    def die_mid_write(src, dst):  # the checkpoint's files are written, the rename has not happened
        seen["writes"] += 1
        if seen["writes"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst)

    if how == "step":
        fit_module._finite = die_mid_step
    else:
        checkpoint.os.replace = die_mid_write
    with LatentDB(store) as db:
        t.make(kind, db, checkpoint_every=t.EVERY).run()
    sys.exit(3)  # never reached: the run is killed first
""")


def killed_run(tmp: Path, store: Path, kind: str, kill_at: int, how: str) -> None:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(ROOT / "tests"), str(store), kind, str(kill_at), how],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def assert_same(res, ref) -> None:
    for name, value in ref.module.state_dict().items():
        assert torch.equal(res.module.state_dict()[name], value), name
    assert torch.equal(res.fit.fire_counts, ref.fit.fire_counts)
    assert res.fit.history == ref.fit.history and res.fit.tokens == ref.fit.tokens
    assert res.metrics == ref.metrics


def default_folder(store: Path, kind: str) -> Path:
    stem = "sae" if kind != "transcoder" else "transcoder"
    return store.parent / f"{store.stem}_artifacts" / "checkpoints" / f"{stem}_llm.layer.0"


@pytest.mark.parametrize("kind", ["topk", "relu", "transcoder", "partitioned"])
def test_killed_at_a_random_step_and_resumed_equals_a_run_that_never_stopped(tmp_path, kind):
    store = tmp_path / "s.db"
    write_store(store)
    kill_at = random.randrange(EVERY + 1, STEPS)  # any step: resuming must not depend on where it stopped
    with LatentDB(store) as db:
        ref = make(kind, db).run()  # no checkpoints: the default behaviour
    if kind in ("topk", "partitioned"):
        assert any(h["auxk"] > 0 for h in ref.fit.history), "AuxK never took part: the test would not cover it"
    killed_run(tmp_path, store, kind, kill_at, "step")
    folder = default_folder(store, kind)
    found = checkpoint.latest(folder)
    assert found is not None and found.step == kill_at // EVERY * EVERY, (kill_at, found and found.step)
    assert len(list(folder.glob("step-*"))) == 1  # only the latest is kept
    with LatentDB(store) as db:
        res = make(kind, db, checkpoint_every=EVERY, resume=True).run()
    assert_same(res, ref), f"killed at step {kill_at}"
    assert not folder.exists()  # the artifact is recorded: its checkpoints are gone


def test_killed_inside_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    store = tmp_path / "s.db"
    write_store(store)
    with LatentDB(store) as db:
        ref = make("topk", db).run()
    killed_run(tmp_path, store, "topk", 3, "write")  # dies writing the third checkpoint (step 12)
    folder = default_folder(store, "topk")
    assert checkpoint.latest(folder).step == 2 * EVERY
    assert list(folder.glob(".tmp-*"))  # the half-done write is there, and ignored
    with LatentDB(store) as db:
        res = make("topk", db, checkpoint_every=EVERY, resume=True).run()
    assert_same(res, ref)


def test_checkpointing_and_resuming_without_a_checkpoint_change_nothing(tmp_path):
    store = tmp_path / "s.db"
    write_store(store)
    with LatentDB(store) as db:
        ref = make("transcoder", db).run()
        on = make("transcoder", db, checkpoint_every=3).run()
        fresh = make("transcoder", db, resume=True, checkpoint_dir=tmp_path / "none").run()
    assert_same(on, ref)
    assert_same(fresh, ref)


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """Make fit raise in the middle of step ``step`` (0-based), as a crash would."""
    fit_module = importlib.import_module("interlatent.analysis.train.fit")
    finite, seen = fit_module._finite, {"n": 0}

    def crashing(loss, params):
        if seen["n"] == step:
            raise Crash
        seen["n"] += 1
        return finite(loss, params)

    monkeypatch.setattr(fit_module, "_finite", crashing)


def crashed_run(monkeypatch, kind: str, db, folder, step: int = 10) -> None:
    """Run ``make(kind, ...)`` with checkpoints in ``folder`` until it crashes in step ``step``."""
    with monkeypatch.context() as m:
        crash_at(m, step)
        with pytest.raises(Crash):
            make(kind, db, checkpoint_every=EVERY, checkpoint_dir=folder).run()


@pytest.mark.parametrize(("change", "named"), [
    ({"seed": 4}, "seed"),
    ({"d_sae": 24}, "d_sae"),
    ({"val_fraction": 0.3}, "train_prompts_sha256"),
    ({"steps": STEPS + 5}, "total_steps"),
])
def test_a_checkpoint_of_another_configuration_is_refused_naming_the_difference(tmp_path, monkeypatch, change, named):
    store = tmp_path / "s.db"
    write_store(store)
    folder = tmp_path / "ckpt"
    with LatentDB(store) as db:
        crashed_run(monkeypatch, "topk", db, folder)
        assert checkpoint.latest(folder).step == 8
        with pytest.raises(CheckpointError, match=named) as err:
            make("topk", db, checkpoint_every=EVERY, checkpoint_dir=folder, resume=True, **change).run()
        assert "resume=False" in str(err.value)
        # an SAE of another layer, same folder
        with pytest.raises(CheckpointError, match="layer"):
            SAEPipeline(db, "llm.layer.0.mlp_in", k=1, d_sae=32, steps=STEPS, batch_size=64, seed=3, backfill=False,
                        train_config=TrainConfig(lr=2e-2, dead_tokens=64), checkpoint_dir=folder, resume=True,
                        progress=False).run()


def test_a_checkpoint_from_before_data_partitions_names_the_way_out(tmp_path, monkeypatch):
    """A checkpoint of a run that read one stream on every rank (every multi-rank run before data
    partitions existed wrote one: its tag has no data_partitions) is refused by a run that deals
    partitions (the default under several ranks, here asked for in one process): the message names
    data_partitions=1, and with it the run resumes and ends as one that never stopped. A checkpoint
    of P partitions resumed with another P names data_partitions=P."""
    store = tmp_path / "s.db"
    write_store(store)
    folder = tmp_path / "ckpt"
    with LatentDB(store) as db:
        crashed_run(monkeypatch, "topk", db, folder)
        assert "data_partitions" not in checkpoint.latest(folder).meta["fingerprint"]
        with pytest.raises(CheckpointError) as err:
            make("topk", db, checkpoint_dir=folder, resume=True, data_partitions=2).run()
        message = str(err.value)
        assert "data_partitions: checkpoint '<absent>', this run 2" in message, message
        assert "one data stream on every rank" in message and "\n" not in message
        assert "resume with data_partitions=1 (--data-partitions 1 on the command line)," in message, message
        resumed = make("topk", db, checkpoint_every=EVERY, checkpoint_dir=folder, resume=True,
                       data_partitions=1).run()
        assert_same(resumed, make("topk", db).run())

        crashed_run(monkeypatch, "partitioned", db, folder)  # three partitions, resumed with two
        with pytest.raises(CheckpointError) as err:
            make("topk", db, checkpoint_dir=folder, resume=True, data_partitions=2, seed=4).run()
        message = str(err.value)
        assert "resume with data_partitions=3 (--data-partitions 3 on the command line) and the other settings" \
            in message and "seed: checkpoint 3, this run 4" in message and "one data stream" not in message, message


def test_the_train_command_names_data_partitions_for_an_old_checkpoint(tmp_path, capsys, monkeypatch):
    from interlatent.vis.train import main

    store = tmp_path / "s.db"
    write_store(store)
    args = [str(store), "--layer", "llm.layer.0", "--k", "3", "--d-sae", "16", "--steps", "12", "--batch-size", "64",
            "--seed", "3", "--no-backfill", "--format", "json", "--checkpoint-every", "4",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    with monkeypatch.context() as m:
        crash_at(m, 6)
        assert main(args) != 0  # the command reports the crash
    capsys.readouterr()
    assert checkpoint.latest(tmp_path / "ckpt").step == 4
    assert main([*args, "--resume", "--data-partitions", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--data-partitions 1 on the command line" in err, err
    assert main([*args, "--resume", "--data-partitions", "1"]) == 0
    resumed = json.loads(capsys.readouterr().out)[0]["fvu"]
    assert main(args[:-4]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fvu"] == resumed


def test_a_checkpoint_from_before_the_shape_set_the_decoder_multiple_names_the_way_out(tmp_path, capsys,
                                                                                        monkeypatch):
    """A checkpoint whose decoder learned at the base rate (every one written before the default
    multiple followed the shape: its fingerprint has no decoder_lr_scale) is refused by a run at
    the default (10 here: 12 steps of 64 rows at k 1 of 100 latents, each expected to fire ~8
    times), naming the option that resumes it; with it, the run ends as one that never stopped.
    Bad values of the option are usage errors."""
    from interlatent.vis.train import main

    store = tmp_path / "s.db"
    write_store(store)
    args = [str(store), "--layer", "llm.layer.0", "--k", "1", "--d-sae", "100", "--steps", "12", "--batch-size",
            "64", "--seed", "3", "--no-backfill", "--format", "json"]
    ckpt = ["--checkpoint-every", "4", "--checkpoint-dir", str(tmp_path / "ckpt")]
    with monkeypatch.context() as m:
        crash_at(m, 6)
        assert main([*args, *ckpt, "--decoder-lr-scale", "1"]) != 0
    capsys.readouterr()
    assert "decoder_lr_scale" not in checkpoint.latest(tmp_path / "ckpt").meta["fingerprint"]["train"]
    assert main([*args, *ckpt, "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "its decoder learned at 1.0 times the learning rate" in err, err
    assert "TrainConfig(decoder_lr_scale=1.0), --decoder-lr-scale 1.0 on the command line" in err, err
    assert main([*args, *ckpt, "--resume", "--decoder-lr-scale", "1.0"]) == 0
    resumed = json.loads(capsys.readouterr().out)[0]["fvu"]
    assert main([*args, "--decoder-lr-scale", "1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fvu"] == resumed
    assert main(args) == 0  # the default multiple (10) trains another dictionary
    assert json.loads(capsys.readouterr().out)[0]["fvu"] != resumed
    for bad in ("0", "-1", "nan", "inf", "fast"):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--decoder-lr-scale", bad])
        assert exit_info.value.code == 2, bad
        assert "--decoder-lr-scale" in capsys.readouterr().err


def test_a_wide_checkpoint_from_before_the_width_set_the_rate_names_the_way_out(tmp_path, capsys, monkeypatch):
    """At width 512 the default peak rate is 1e-2 * sqrt(256 / 512); a checkpoint trained at 0.01
    (every TopK SAE's before the rate followed the width) is refused by a run at the default, with
    the option that resumes it, and with that option the run ends as one that never stopped. Bad
    values of --lr are usage errors."""
    from interlatent.vis.train import main

    store = tmp_path / "wide.db"
    rng = np.random.default_rng(1)
    with LatentDB(store) as db, db.run(model="planted") as run:
        run.write([SequenceRecord(list(range(12)), [f"t{j}" for j in range(12)],
                                  {"llm.layer.0": rng.standard_normal((12, 512)).astype(np.float32)}, prompt_index=i)
                   for i in range(24)], dtypes={"llm.layer.0": "float32"})
    args = [str(store), "--layer", "llm.layer.0", "--k", "2", "--d-sae", "32", "--steps", "8", "--batch-size",
            "32", "--no-backfill", "--format", "json"]
    ckpt = ["--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path / "ckpt")]
    with monkeypatch.context() as m:
        crash_at(m, 5)
        assert main([*args, *ckpt, "--lr", "0.01"]) != 0
    capsys.readouterr()
    assert checkpoint.latest(tmp_path / "ckpt").meta["fingerprint"]["train"]["lr"] == 0.01
    assert main([*args, *ckpt, "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "TrainConfig(lr=0.01), --lr 0.01 on the command line" in err and str(0.01 * 0.5 ** 0.5) in err, err
    assert main([*args, *ckpt, "--resume", "--lr", "0.01"]) == 0
    resumed = json.loads(capsys.readouterr().out)[0]["fvu"]
    assert main([*args, "--lr", "0.01"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["fvu"] == resumed
    assert main(args) == 0  # the width's rate trains another dictionary
    assert json.loads(capsys.readouterr().out)[0]["fvu"] != resumed
    for bad in ("0", "-1", "nan", "inf", "fast"):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--lr", bad])
        assert exit_info.value.code == 2, bad
        assert "--lr" in capsys.readouterr().err


def tiny_sae() -> SparseAutoencoder:
    model = SparseAutoencoder(SparseCoderConfig(d_in=D, d_sae=12, k=2), seed=1)
    model.init_from_data(torch.randn(64, D, generator=torch.Generator().manual_seed(0)))
    return model


def plain_batches():
    gen = torch.Generator().manual_seed(7)
    for _ in range(40):
        yield torch.randn(32, D, generator=gen)


def test_fit_resumes_a_plain_iterable_by_replaying_it(tmp_path, monkeypatch):
    cfg = TrainConfig(dead_tokens=64)
    ref_model = tiny_sae()
    ref = fit(ref_model, plain_batches(), 25, cfg, progress=False)
    model = tiny_sae()
    with monkeypatch.context() as m:
        crash_at(m, 13)
        with pytest.raises(Crash):
            fit(model, plain_batches(), 25, cfg, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5)
    model = tiny_sae()
    res = fit(model, plain_batches(), 25, cfg, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5, resume=True)
    for name, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert res.history == ref.history and torch.equal(res.fire_counts, ref.fire_counts)
    assert checkpoint.latest(tmp_path).step == 25  # fit keeps its last checkpoint
    with pytest.raises(CheckpointError, match="ran out"):
        fit(tiny_sae(), list(plain_batches())[:10], 25, cfg, progress=False, checkpoint_dir=tmp_path, resume=True)


class GlobalRandomStream:
    """Batches drawn from the global torch, numpy and ``random`` generators: only restoring them
    makes a resumed run draw what the uninterrupted one drew."""

    def __init__(self) -> None:
        self.n = 0

    def __iter__(self):
        while True:
            self.n += 1
            scale = 1.0 + random.random() + float(np.random.rand())
            yield torch.randn(32, D) * scale

    def checkpoint_state(self):
        return {"n": self.n}, {}

    def restore_state(self, meta, tensors):
        self.n = meta["n"]


def seed_all() -> None:
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)


def test_fit_restores_every_generator_and_the_stream_position(tmp_path, monkeypatch):
    seed_all()
    ref_model = tiny_sae()
    ref = fit(ref_model, GlobalRandomStream(), 20, progress=False)
    after = (torch.rand(2), np.random.rand(), random.random())
    seed_all()
    model = tiny_sae()
    with monkeypatch.context() as m:
        crash_at(m, 9)
        with pytest.raises(Crash):
            fit(model, GlobalRandomStream(), 20, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    torch.manual_seed(0)  # the resumed process starts from other generator states
    np.random.seed(0)
    random.seed(0)
    model = tiny_sae()
    stream = GlobalRandomStream()
    res = fit(model, stream, 20, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3, resume=True)
    assert stream.n == 21  # restored at 9, never replayed: 11 more batches, and one drawn before stopping
    for name, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert res.history == ref.history
    assert torch.equal(torch.rand(2), after[0]) and np.random.rand() == after[1] and random.random() == after[2]


def test_a_write_killed_before_its_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    t = {"w": torch.arange(3.0)}
    checkpoint.write(tmp_path, 1, {"x": 1}, t)

    def killed(src, dst):
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(checkpoint.os, "replace", killed)
        with pytest.raises(Crash):
            checkpoint.write(tmp_path, 2, {"x": 2}, {"w": torch.zeros(3)})
    found = checkpoint.latest(tmp_path)
    assert found.step == 1 and found.meta["x"] == 1 and torch.equal(found.tensors["w"], t["w"])
    assert list(tmp_path.glob(".tmp-*"))
    checkpoint.write(tmp_path, 3, {"x": 3}, t)
    assert not list(tmp_path.glob(".tmp-*")) and [p.name for p in tmp_path.iterdir()] == ["step-00000003"]
    checkpoint.remove(tmp_path)
    assert not tmp_path.exists()


def test_checkpoint_options_are_checked():
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        fit(tiny_sae(), plain_batches(), 5, checkpoint_every=2)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        fit(tiny_sae(), plain_batches(), 5, checkpoint_every=0, checkpoint_dir="x")


def test_the_train_command_resumes_and_reports_errors_in_one_line(tmp_path, capsys):
    from interlatent.vis.train import main

    store = tmp_path / "s.db"
    write_store(store)
    args = [str(store), "--layer", "llm.layer.0", "--k", "3", "--d-sae", "16", "--steps", "12", "--batch-size", "64",
            "--seed", "3", "--no-backfill", "--format", "json"]
    assert main([*args, "--checkpoint-every", "5", "--resume"]) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["fvu"] == json.loads(first)[0]["fvu"]
    assert not default_folder(store, "sae").exists()
    assert main([str(tmp_path / "missing.db"), "--layer", "llm.layer.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no store at") and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        main([str(store)])  # --layer is required
    assert exit_info.value.code == 2


@pytest.mark.parametrize("layers", ["llm.layer.0", ("llm.layer.0.mlp_in", "llm.layer.0.mlp_out")])
def test_a_stream_started_past_its_first_chunks_reads_only_what_is_still_to_come(tmp_path, monkeypatch, layers):
    from interlatent.db.reader import Reader

    store = tmp_path / "s.db"
    write_store(store)
    layers = list(layers) if isinstance(layers, tuple) else layers
    kw = {"chunk_size": 16, "shuffle": True, "seed": 5, "buffer_tokens": 100, "prompt_indices": list(range(2, 40))}
    with LatentDB(store) as db:
        full = list(db.iter_activation_chunks(layers, **kw))
        read: list[int] = []
        original = Reader._iter_layer_rows

        def counting(self, info, seq_ids, channels):
            for sid, block in original(self, info, seq_ids, channels):
                read.append(sid)
                yield sid, block

        monkeypatch.setattr(Reader, "_iter_layer_rows", counting)
        counts = []
        for skip in range(len(full) + 1):
            read.clear()
            part = list(db.iter_activation_chunks(layers, skip_chunks=skip, **kw))
            assert len(part) == len(full) - skip
            for (va, ia), (vb, ib) in zip(full[skip:], part):
                assert np.array_equal(ia, ib)
                assert all(np.array_equal(a, b) for a, b in zip(va, vb)) if isinstance(va, tuple) else \
                    np.array_equal(va, vb)
            per_layer = len(read) // (2 if isinstance(layers, list) else 1)
            counts.append(per_layer)
    # the further in, the less is read: all 38 sequences from the start, a few for the last chunk
    assert counts[0] == 38 and counts == sorted(counts, reverse=True) and counts[-2] <= 38 // 3, counts


def test_the_schedule_option_is_the_run_schedule_and_bad_values_are_usage_errors(tmp_path, capsys):
    """--lr-schedule sets the schedule the dictionary trains on and records (a 12-step run of k 1
    over 100 latents is short for its latents: "wsd" by default); a name it does not know exits 2."""
    from interlatent.db import LatentDB as DB
    from interlatent.vis.train import main

    store = tmp_path / "s.db"
    write_store(store)
    args = [str(store), "--layer", "llm.layer.0", "--k", "1", "--d-sae", "100", "--steps", "12", "--batch-size",
            "64", "--seed", "3", "--no-backfill", "--format", "json"]
    fvus = []
    for extra in ([], ["--lr-schedule", "linear"]):
        assert main([*args, *extra]) == 0
        fvus.append(json.loads(capsys.readouterr().out)[0]["fvu"])
    with DB(store) as db:
        schedules = [json.loads(Path(p, "config.json").read_text())["metadata"]["train"]["schedule"]
                     for p in db.artifacts()["path"]]
    assert schedules == ["wsd", "linear"] and fvus[0] != fvus[1]
    for bad in ("cosine", "", "Linear"):
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--lr-schedule", bad])
        assert exit_info.value.code == 2, bad
        assert "--lr-schedule" in capsys.readouterr().err
