"""Data-parallel training under torch.distributed (gloo, two CPU processes) equals one process.

Two ranks, each given its rows of every global batch, end with the weights of a one-process run
at the same global batch (to 1e-6) and identical to each other — for TopK with AuxK (dead latents
on purpose), for ReLU + L1 (whose loss depends on the batch's mean and variance, so each part must
use the whole batch's), with a global batch that does not split evenly, through a checkpoint
written by rank 0 and resumed by both, and through SAEPipeline on a store (rank 0 records the
artifact, both ranks return it).

The pipelines' partitioned streams: by default each of two ranks reads one of two data partitions
(disjoint prompts whose union is the training split, half the rows each) and the pair equals one
process with ``data_partitions=2``; ``data_partitions=1`` (every rank reads the whole stream)
equals the default one-process run. Killed and resumed, the two ranks end ``torch.equal`` to the
run that never stopped, and their checkpoint, which holds both partitions' positions, resumes in
one process too. In one process, each partition's stream holds every token of its prompts once
per epoch, rank ``r``'s stream yields exactly rows ``rows_of(B, r, W)`` of the global batch, and a
restored stream goes on as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from interlatent import LatentDB
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig
from interlatent.analysis.train import SAEPipeline, TrainConfig, checkpoint, fit
from interlatent.analysis.train.distributed import rows_of, shard, shard_batches, world
from interlatent.analysis.train.stream import (
    PartitionedStream,
    deal_prompts,
    partition_rows,
)
from interlatent.db import SequenceRecord
from interlatent.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
D, D_SAE, BATCH, STEPS = 8, 24, 63, 25  # 63 rows: the ranks get 31 and 32


def global_batches(seed: int = 0, n: int = STEPS):
    """The same global batches in every process: a few planted directions plus noise."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(6, D, generator=gen)
    for _ in range(n):
        codes = (torch.rand(BATCH, 6, generator=gen) < 0.3).float() * torch.rand(BATCH, 6, generator=gen)
        yield codes @ feats + 0.05 * torch.randn(BATCH, D, generator=gen)


def build(activation: str) -> SparseAutoencoder:
    cfg = SparseCoderConfig(d_in=D, d_sae=D_SAE, k=3 if activation == "topk" else None, activation=activation)
    model = SparseAutoencoder(cfg, seed=5)
    model.init_from_data(next(global_batches(seed=99)), seed=5)
    return model


# a few dead latents early, so AuxK takes part in the run
TRAIN = {"topk": TrainConfig(lr=5e-3, dead_tokens=BATCH * 2), "relu": TrainConfig(lr=5e-3)}


def write_store(path: Path) -> None:
    rng = np.random.default_rng(1)
    with LatentDB(path) as db, db.run(model="planted") as run:
        recs = []
        for i in range(30):
            n = 8 + i % 5
            acts = rng.standard_normal((n, D)).astype(np.float32)
            recs.append(SequenceRecord(list(range(n)), [f"t{j}" for j in range(n)], {"llm.layer.0": acts},
                                       text=f"prompt {i}", prompt_index=i))
        run.write(recs, dtypes={"llm.layer.0": "float32"})


PIPELINE = {"k": 3, "d_sae": 16, "steps": 12, "batch_size": 64, "seed": 2, "backfill": False, "progress": False}
STOP_AT, EVERY = 8, 5  # the partitioned two-rank pipeline is stopped at step 8, its checkpoint is at step 5

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[5])
    from test_distributed_train import EVERY, PIPELINE, STEPS, STOP_AT, TRAIN, build, global_batches
    from interlatent import LatentDB
    from interlatent.analysis.train import SAEPipeline, fit
    from interlatent.analysis.train.distributed import shard_batches

    torch.set_num_threads(1)
    rank, size, init, out, _, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    report = {}
    tensors = {}
    for activation in ("topk", "relu"):
        model = build(activation)
        if rank == 1:  # rank 0's initialisation is broadcast: a different start here must not matter
            with torch.no_grad():
                model.W_enc.add_(1.0)
        res = fit(model, shard_batches(global_batches()), STEPS, TRAIN[activation], progress=False)
        tensors.update({f"{activation}.{k}": v for k, v in model.state_dict().items()})
        tensors[f"{activation}.fire_counts"] = res.fire_counts
        report[activation] = {"tokens": res.tokens, "history": res.history}
    # checkpointed by rank 0, stopped on both ranks at step 12, resumed by both
    def stopping(batches):
        for step, batch in enumerate(batches):
            if step == 12:
                raise KeyboardInterrupt
            yield batch
    try:
        fit(build("topk"), stopping(shard_batches(global_batches())), STEPS, TRAIN["topk"], progress=False,
            checkpoint_dir=f"{out}/ckpt", checkpoint_every=5)
    except KeyboardInterrupt:
        pass
    model = build("topk")
    fit(model, shard_batches(global_batches()), STEPS, TRAIN["topk"], progress=False, checkpoint_dir=f"{out}/ckpt",
        checkpoint_every=5, resume=True)
    tensors.update({f"resumed.{k}": v for k, v in model.state_dict().items()})
    reads = []  # every shuffled read this rank asks the store for: its prompts and the rows it took
    original = LatentDB.iter_activation_chunks

    def recording(self, layer, **kw):
        entry = {"prompts": sorted(int(p) for p in kw.get("prompt_indices") or []), "rows": 0}
        if kw.get("shuffle"):
            reads.append(entry)
        for values, ids in original(self, layer, **kw):
            entry["rows"] += len(ids)
            yield values, ids

    LatentDB.iter_activation_chunks = recording
    for name, extra in (("pipeline", {}), ("whole", {"data_partitions": 1})):
        reads.clear()
        with LatentDB(store) as db:
            res = SAEPipeline(db, "llm.layer.0", **PIPELINE, **extra).run()
        tensors.update({f"{name}.{k}": v for k, v in res.module.state_dict().items()})
        report[name] = {"metrics": res.metrics, "artifact_id": res.artifact_id, "path": str(res.path),
                        "reads": list(reads), "eval": res.module.cfg.metadata["split"]["eval_prompt_indices"]}
    LatentDB.iter_activation_chunks = original
    # the partitioned pipeline stopped on both ranks at step STOP_AT, resumed by both
    import importlib, shutil
    fit_module = importlib.import_module("interlatent.analysis.train.fit")
    finite, seen = fit_module._finite, {"steps": 0}

    def stop(loss, params):
        seen["steps"] += 1
        if seen["steps"] > STOP_AT:
            raise KeyboardInterrupt
        return finite(loss, params)

    fit_module._finite = stop
    with LatentDB(store) as db:
        try:
            SAEPipeline(db, "llm.layer.0", **PIPELINE, checkpoint_dir=f"{out}/pipe_ckpt", checkpoint_every=EVERY).run()
        except KeyboardInterrupt:
            pass
    fit_module._finite = finite
    dist.barrier()
    if rank == 0:  # kept for the one-process resume in the test (the pipeline deletes its own)
        shutil.copytree(f"{out}/pipe_ckpt", f"{out}/pipe_ckpt_copy")
    dist.barrier()
    with LatentDB(store) as db:
        res = SAEPipeline(db, "llm.layer.0", **PIPELINE, checkpoint_dir=f"{out}/pipe_ckpt", checkpoint_every=EVERY,
                          resume=True).run()
    tensors.update({f"pipe_resumed.{k}": v for k, v in res.module.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(report, fh)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_rows_of_splits_every_batch_into_disjoint_parts_whose_union_is_the_batch():
    for n in (1, 2, 63, 64, 101):
        for size in (1, 2, 3, 5):
            parts = [range(n)[rows_of(n, r, size)] for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
    x, y = torch.arange(10).reshape(5, 2), torch.arange(5)
    assert torch.equal(torch.cat([shard((x, y), r, 2)[0] for r in range(2)]), x)
    assert torch.equal(torch.cat([b for b in shard_batches([x], 1, 2)]), x[2:])
    assert world() == (0, 1)  # no process group here


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    store = tmp / "store.db"
    write_store(store)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp / 'rendezvous'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp), str(ROOT / "tests"),
                               str(store)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-rank run did not finish in 240 s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    ranks = [load_file(str(tmp / f"rank{r}.safetensors")) for r in range(2)]
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, reports, store


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_two_gloo_ranks_equal_one_process_at_the_same_global_batch(two_ranks, activation):
    ranks, reports, _ = two_ranks
    model = build(activation)
    res = fit(model, global_batches(), STEPS, TRAIN[activation], progress=False)
    if activation == "topk":
        assert any(h["auxk"] > 0 for h in res.history), "AuxK never took part: the test would not cover it"
    for name, value in model.state_dict().items():
        both = [r[f"{activation}.{name}"] for r in ranks]
        assert torch.equal(both[0], both[1]), f"{name}: the ranks differ"
        diff = float((both[0] - value).abs().max())
        assert diff <= 1e-6, f"{activation} {name}: two ranks differ from one process by {diff:.3g}"
    assert torch.equal(ranks[0][f"{activation}.fire_counts"], res.fire_counts)
    assert reports[0][activation]["tokens"] == res.tokens == STEPS * BATCH
    for mine, theirs in zip(res.history, reports[0][activation]["history"]):
        assert theirs["fvu"] == pytest.approx(mine["fvu"], rel=1e-5, abs=1e-7)
        assert theirs["dead"] == mine["dead"]


def test_two_ranks_checkpoint_and_resume_to_the_run_that_never_stopped(two_ranks):
    ranks, _, _ = two_ranks
    for name in build("topk").state_dict():
        assert torch.equal(ranks[0][f"resumed.{name}"], ranks[0][f"topk.{name}"]), name
        assert torch.equal(ranks[1][f"resumed.{name}"], ranks[0][f"topk.{name}"]), name


@pytest.mark.parametrize(("name", "one_process"), [("pipeline", {"data_partitions": 2}), ("whole", {})])
def test_two_rank_pipeline_equals_one_process_and_records_one_artifact(two_ranks, tmp_path, name, one_process):
    """By default the two ranks read two partitions: one process with ``data_partitions=2`` trains
    on the same batches. With ``data_partitions=1`` both read the whole stream: the default run."""
    ranks, reports, store = two_ranks
    one = tmp_path / "one.db"
    write_store(one)
    with LatentDB(one) as db:
        res = SAEPipeline(db, "llm.layer.0", **PIPELINE, **one_process).run()
    for key, value in res.module.state_dict().items():
        assert torch.equal(ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"])
        assert float((ranks[0][f"{name}.{key}"] - value).abs().max()) <= 1e-6, key
    got = reports[0][name]
    assert reports[1][name]["artifact_id"] == got["artifact_id"]
    assert reports[1][name]["path"] == got["path"]
    assert got["metrics"]["fvu"] == pytest.approx(res.metrics["fvu"], rel=1e-5)
    assert got["metrics"]["steps"] == res.metrics["steps"]
    with LatentDB(store) as db:  # rank 0 alone recorded each: two runs, a resumed one, none for the stopped one
        assert len(db.artifacts()) == 3


def test_two_ranks_read_disjoint_partitions_whose_union_is_the_training_split(two_ranks):
    _, reports, store = two_ranks
    with LatentDB(store) as db:
        train = sorted(set(db.prompt_indices("llm.layer.0")) - set(reports[0]["pipeline"]["eval"]))
    init, *stream0 = reports[0]["pipeline"]["reads"]  # rank 0 alone reads a first chunk to initialise
    stream1 = reports[1]["pipeline"]["reads"]
    assert init["prompts"] == train
    mine = [{p for r in reads for p in r["prompts"]} for reads in (stream0, stream1)]
    assert stream0 and stream1 and all(len({tuple(r["prompts"]) for r in reads}) == 1 for reads in (stream0, stream1))
    assert not mine[0] & mine[1] and sorted(mine[0] | mine[1]) == train
    whole = [sum(r["rows"] for r in rep["whole"]["reads"][int(rank == 0):]) for rank, rep in enumerate(reports)]
    parted = [sum(r["rows"] for r in reads) for reads in (stream0, stream1)]
    steps, batch = reports[0]["pipeline"]["metrics"]["steps"], reports[0]["pipeline"]["metrics"]["batch_size"]
    assert all(w >= steps * batch for w in whole)  # every rank read every row of every global batch
    assert all(steps * batch // 2 <= p <= w * 0.6 for p, w in zip(parted, whole)), (parted, whole)


def test_two_ranks_partitioned_pipeline_resumes_to_the_run_that_never_stopped(two_ranks, tmp_path):
    ranks, _, store = two_ranks
    for name in ranks[0]:
        if name.startswith("pipeline."):
            key = name.removeprefix("pipeline.")
            assert torch.equal(ranks[0][f"pipe_resumed.{key}"], ranks[0][name]), key
            assert torch.equal(ranks[1][f"pipe_resumed.{key}"], ranks[0][name]), key
    saved = tmp_path / "ckpt"
    shutil.copytree(store.parent / "pipe_ckpt_copy", saved)
    found = checkpoint.latest(saved)
    assert found.step == EVERY and found.meta["data"]["partitions"] == 2
    assert len(found.meta["data"]["positions"]) == 2  # rank 1's partition was gathered into rank 0's checkpoint
    one = tmp_path / "one.db"
    write_store(one)
    with LatentDB(one) as db:
        ref = SAEPipeline(db, "llm.layer.0", **PIPELINE, data_partitions=2).run()
        res = SAEPipeline(db, "llm.layer.0", **PIPELINE, data_partitions=2, checkpoint_dir=saved, resume=True).run()
    for key, value in ref.module.state_dict().items():
        assert float((res.module.state_dict()[key] - value).abs().max()) <= 1e-6, key


# ---------------------------------------------------------------------------- partitioned streams, one process
def write_id_store(path: Path, n_prompts: int = 23) -> dict[int, int]:
    """Prompts of 5-11 tokens whose rows carry their own (prompt index, position): returns the lengths."""
    rng = np.random.default_rng(3)
    lengths = {}
    with LatentDB(path) as db, db.run(model="planted") as run:
        recs = []
        for i in range(n_prompts):
            n = lengths[i] = 5 + (i * 3) % 7
            acts = rng.standard_normal((n, D)).astype(np.float32)
            acts[:, 0], acts[:, 1] = i, np.arange(n)
            recs.append(SequenceRecord(list(range(n)), [f"t{j}" for j in range(n)], {"llm.layer.0": acts},
                                       text=f"prompt {i}", prompt_index=i))
        run.write(recs, dtypes={"llm.layer.0": "float32"})
    return lengths


def ids(rows: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in rows[:, :2].tolist()]


def test_prompts_are_dealt_into_disjoint_partitions_balanced_by_tokens():
    prompts = list(range(40, 77))
    lengths = [3 + (p * 7) % 11 for p in prompts]
    for parts in (1, 2, 3, 5):
        dealt = deal_prompts(prompts, lengths, parts, seed=4)
        assert len(dealt) == parts and sorted(p for d in dealt for p in d) == prompts
        loads = [sum(lengths[prompts.index(p)] for p in d) for d in dealt]
        assert max(loads) - min(loads) <= max(lengths), loads
        assert dealt == deal_prompts(prompts, lengths, parts, seed=4)  # deterministic
    assert deal_prompts(prompts, lengths, 3, seed=4) != deal_prompts(prompts, lengths, 3, seed=5)  # ties are seeded
    assert partition_rows(20, 3) == [6, 7, 7] and sum(partition_rows(63, 4)) == 63
    with pytest.raises(ConfigError, match="at least 5 training prompts"):
        deal_prompts([1, 2, 3, 4], [5] * 4, 5, seed=0)


def partitioned(db: LatentDB, train: list[int], batch: int, rank: int = 0, world: int = 1, parts: int = 3):
    return SAEPipeline(db, "llm.layer.0", data_partitions=parts, seed=4)._stream(["llm.layer.0"], train, batch, rank,
                                                                                   world)[0]


def test_each_partition_holds_every_token_of_its_prompts_once_per_epoch(tmp_path):
    lengths = write_id_store(tmp_path / "s.db")
    train = sorted(lengths)[2:]
    parts, batch = 3, 20
    dealt = deal_prompts(train, [lengths[p] for p in train], parts, seed=4)
    rows = partition_rows(batch, parts)
    tokens = [sum(lengths[p] for p in d) for d in dealt]
    steps = 2 * max(tokens) // min(rows) + 1
    with LatentDB(tmp_path / "s.db") as db:
        stream = partitioned(db, train, batch)
        batches = [b for _, b in zip(range(steps), stream)]
    assert all(b.shape == (batch, D) for b in batches)
    start = 0
    for p in range(parts):
        seen = ids(torch.cat([b[start:start + rows[p]] for b in batches]))
        start += rows[p]
        want = sorted((q, j) for q in dealt[p] for j in range(lengths[q]))
        first, second = seen[:tokens[p]], seen[tokens[p]:2 * tokens[p]]
        assert sorted(first) == want and sorted(second) == want, p  # each token once per epoch
        assert first != second  # each epoch shuffled anew
    with LatentDB(tmp_path / "s.db") as db:  # P=1 is the plain stream of the default run
        plain = SAEPipeline(db, "llm.layer.0", seed=4)._stream(["llm.layer.0"], train, batch, 0, 1)[0]
        one = SAEPipeline(db, "llm.layer.0", data_partitions=1, seed=4)._stream(["llm.layer.0"], train, batch, 0, 1)[0]
        assert all(torch.equal(a, b) for a, b, _ in zip(plain, one, range(10)))


def test_each_rank_yields_its_rows_of_the_global_batch_and_resumes_where_it_stopped(tmp_path):
    write_id_store(tmp_path / "s.db")
    train, batch, parts = list(range(1, 23)), 31, 6
    with LatentDB(tmp_path / "s.db") as db:
        whole = [b for _, b in zip(range(30), partitioned(db, train, batch, parts=parts))]
        for world_size in (2, 3):
            for rank in range(world_size):
                mine = [b for _, b in zip(range(30), partitioned(db, train, batch, rank, world_size, parts=parts))]
                assert all(torch.equal(m, w[rows_of(batch, rank, world_size)]) for m, w in zip(mine, whole))
        stream = partitioned(db, train, batch, parts=parts)
        it = iter(stream)
        for _ in range(13):
            next(it)
        meta, tensors = stream.checkpoint_state()
        assert meta["partitions"] == parts and len(meta["positions"]) == parts
        meta, tensors = json.loads(json.dumps(meta)), {k: v.clone() for k, v in tensors.items()}
        again = partitioned(db, train, batch, parts=parts)
        again.restore_state(meta, tensors)
        assert all(torch.equal(a, w) for a, w in zip(again, whole[13:]))
        rank1 = partitioned(db, train, batch, 1, 2, parts=parts)  # a rank restores its own partitions from the whole
        rank1.restore_state(meta, tensors)
        assert all(torch.equal(a, w[rows_of(batch, 1, 2)]) for a, w in zip(rank1, whole[13:]))
        with pytest.raises(CheckpointError, match="data_partitions=6"):
            partitioned(db, train, batch, parts=3).restore_state(meta, tensors)


def test_partition_options_are_checked(tmp_path):
    write_id_store(tmp_path / "s.db", n_prompts=6)
    with LatentDB(tmp_path / "s.db") as db, pytest.raises(ConfigError, match="data_partitions must be >= 1"):
        SAEPipeline(db, "llm.layer.0", data_partitions=0)
    with pytest.raises(ConfigError, match="among 2 ranks"):
        PartitionedStream(lambda p, seed, skip: iter(()), 3, 64, 0, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="batch_size >= 4"):
        PartitionedStream(lambda p, seed, skip: iter(()), 4, 3, 0)
    with LatentDB(tmp_path / "s.db") as db, pytest.raises(ConfigError, match="needs at least 8 training prompts"):
        SAEPipeline(db, "llm.layer.0", data_partitions=8, steps=3, backfill=False, progress=False).run()


def test_the_train_command_takes_data_partitions(tmp_path, capsys):
    from interlatent.vis.train import main

    write_store(tmp_path / "s.db")
    args = [str(tmp_path / "s.db"), "--layer", "llm.layer.0", "--k", "3", "--d-sae", "16", "--steps", "12",
            "--batch-size", "64", "--seed", "2", "--no-backfill", "--format", "json"]
    assert main([*args, "--data-partitions", "2"]) == 0
    fvu = json.loads(capsys.readouterr().out)[0]["fvu"]
    with LatentDB(tmp_path / "s.db") as db:
        res = SAEPipeline(db, "llm.layer.0", **PIPELINE, data_partitions=2).run()
        plain = SAEPipeline(db, "llm.layer.0", **PIPELINE).run()
    assert fvu == res.metrics["fvu"] != plain.metrics["fvu"]
    assert main([*args, "--data-partitions", "40"]) == 1  # more partitions than training prompts
    err = capsys.readouterr().err.strip()
    assert "data_partitions=40" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--data-partitions", "0"])
    assert exit_info.value.code == 2


def test_partitioned_training_reads_the_parquet_tier_as_the_sqlite_one(tmp_path):
    for tier in ("sqlite", "parquet"):
        rng = np.random.default_rng(1)
        with LatentDB(tmp_path / f"{tier}.db", **({"activations": "parquet"} if tier == "parquet" else {})) as db, \
                db.run(model="planted") as run:
            run.write([SequenceRecord(list(range(8 + i % 5)), [f"t{j}" for j in range(8 + i % 5)],
                                      {"llm.layer.0": rng.standard_normal((8 + i % 5, D)).astype(np.float32)},
                                      text=f"prompt {i}", prompt_index=i) for i in range(30)],
                      dtypes={"llm.layer.0": "float32"})
    with LatentDB(tmp_path / "sqlite.db") as a, LatentDB(tmp_path / "parquet.db") as b:
        assert (a.activation_tier, b.activation_tier) == ("sqlite", "parquet")
        ref = SAEPipeline(a, "llm.layer.0", **PIPELINE, data_partitions=3).run()
        res = SAEPipeline(b, "llm.layer.0", **PIPELINE, data_partitions=3).run()
    for key, value in ref.module.state_dict().items():
        assert torch.equal(res.module.state_dict()[key], value), key


def test_too_many_partitions_for_the_batch_names_the_batch_the_run_takes(tmp_path):
    """The global batch is capped at a quarter of the training tokens (at least 64): raising batch_size
    cannot give 70 partitions a row each, and the message must not say it would."""
    with LatentDB(tmp_path / "s.db") as db, db.run(model="planted") as run:
        run.write([SequenceRecord([0], ["t"], {"llm.layer.0": np.full((1, D), i, np.float32)}, text=f"p{i}",
                                  prompt_index=i) for i in range(70)], dtypes={"llm.layer.0": "float32"})
    with LatentDB(tmp_path / "s.db") as db, pytest.raises(ConfigError) as info:
        SAEPipeline(db, "llm.layer.0", **{**PIPELINE, "batch_size": 4096}, data_partitions=70, val_fraction=0.0).run()
    message = str(info.value)
    assert "64 rows" in message and "70 training tokens" in message and "batch_size >=" not in message, message
    with LatentDB(tmp_path / "s.db") as db, pytest.raises(ConfigError, match="8 rows .batch_size=8.; pass at most 8 partitions or batch_size >= 10"):
        SAEPipeline(db, "llm.layer.0", **{**PIPELINE, "batch_size": 8}, data_partitions=10, val_fraction=0.0).run()


def test_partitions_of_unequal_token_counts_are_warned_of(tmp_path, caplog):
    """A partition's rows per step do not depend on its tokens: the lighter partition's tokens are
    drawn more often, which a run must say when the dealing could not balance them."""
    with LatentDB(tmp_path / "s.db") as db, db.run(model="planted") as run:
        run.write([SequenceRecord(list(range(n)), ["t"] * n, {"llm.layer.0": np.ones((n, D), np.float32)},
                                  text=f"p{i}", prompt_index=i) for i, n in enumerate([300, 10, 10, 10])],
                  dtypes={"llm.layer.0": "float32"})
    with LatentDB(tmp_path / "s.db") as db:
        SAEPipeline(db, "llm.layer.0", **PIPELINE, data_partitions=2, val_fraction=0.0).run()
        assert "data partitions hold 300 to 30 tokens" in caplog.text, caplog.text
        caplog.clear()
        SAEPipeline(db, "llm.layer.0", **PIPELINE, data_partitions=1, val_fraction=0.0).run()
        write_id_store(tmp_path / "even.db")
    with LatentDB(tmp_path / "even.db") as db:
        SAEPipeline(db, "llm.layer.0", **PIPELINE, data_partitions=2).run()
    assert "data partitions hold" not in caplog.text


def test_the_partitions_of_one_process_share_one_streams_shuffle_buffer(tmp_path, monkeypatch):
    """P partition streams in one process (the run that reproduces P ranks) must not hold P shuffle
    buffers: each reads with 1/P of the plain stream's, and a rank of W holds 1/W of it."""
    import inspect

    default = inspect.signature(LatentDB.iter_activation_chunks).parameters["buffer_tokens"].default
    write_id_store(tmp_path / "s.db")
    train = list(range(1, 23))
    with LatentDB(tmp_path / "s.db") as db:
        asked: list[int] = []
        read = db.iter_activation_chunks

        def spy(*args, **kwargs):
            asked.append(kwargs.get("buffer_tokens", default))
            return read(*args, **kwargs)

        monkeypatch.setattr(db, "iter_activation_chunks", spy)
        plain = [b for _, b in zip(range(3), partitioned(db, train, 30, parts=1))]
        assert asked == [default] and len(plain) == 3
        for parts, world_size in ((3, 1), (6, 1), (6, 2)):
            asked.clear()
            for _ in zip(range(3), partitioned(db, train, 30, 0, world_size, parts=parts)):
                pass
            assert len(asked) == parts // world_size and sum(asked) <= default // world_size, (parts, asked)
