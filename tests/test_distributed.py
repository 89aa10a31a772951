"""The Ray engine on a local cluster: distributed collection stores exactly what LLMCollector
stores (on the parquet tier with the workers writing the shard files), and map/reduce statistics
and top examples equal the single-process ones."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sqlite3
import sys

import numpy as np
import pytest

from interlatent import LatentDB, LLMCollector
from interlatent.db import SequenceRecord, codec
from interlatent.db.reader import ActivationRow
from interlatent.db.shards import ShardFiles
from interlatent.db.topk import TopK
from interlatent.distributed import ReturnRecords, WriteShards
from interlatent.errors import ConfigError, MissingDependencyError, WorkerError
from interlatent.llm.capture import PromptBatch

PROMPTS = [
    "the sky is blue",
    "a cat sat on the mat while the dog slept and the sky was green",
    "hi",
    "Alice said that Bob would report it",
    "the sky is blue",  # a repeat: collected once
    "numbers like 1 2 3 are text too",
    "hello world",
]
LABELS = ["a", "b", "a", 3, "a", None, 1.5]
#: columns that differ between two runs of the same collection
VOLATILE = {"run_id", "created_at", "finished_at", "owner_host", "owner_pid", "owner_started", "applied_at"}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def dump(path, also: tuple[str, ...] = ()) -> dict[str, list[tuple]]:
    """Every row of every table, without run ids and timestamps (nor the columns in ``also``)."""
    conn = sqlite3.connect(path)
    out = {}
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name"):
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] not in {*VOLATILE, *also}]
        if cols:
            out[table] = sorted(conn.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall(), key=repr)
    conn.close()
    return out


def context(text, idx):
    return {"chars": len(text), "even": idx % 2 == 0}


def token_metrics(text, idx, tokens):
    return {"position": np.arange(len(tokens), dtype=float), "prompt_len": float(len(text))}


def load_model_file(path):
    """A model factory: the workers load the model from a file themselves."""
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)  # a file this test wrote


def fail_on_hi(text, idx, tokens):
    if text == "hi":
        raise ValueError("metric failed on 'hi'")
    return {}


# ---------------------------------------------------------------------------- collection
class TestCollection:
    """One pool of two replicas serves every collection here (starting one costs seconds), and is
    closed before the map/reduce tests need the cluster's CPUs."""

    @pytest.fixture(scope="class")
    def pool(self, ray_cluster, tiny_tl, tokenizer_dir, tmp_path_factory):
        from interlatent.distributed import ReplicaPool
        from interlatent.llm.loading import load_local_tokenizer

        saved = tmp_path_factory.mktemp("replica") / "model.pkl"
        saved.write_bytes(ray_cluster.cloudpickle.dumps(tiny_tl))  # (a TL 4 bridge pickles with cloudpickle only)
        model_factory = functools.partial(load_model_file, str(saved))  # replicas built from factories
        with ReplicaPool(model_factory, functools.partial(load_local_tokenizer, str(tokenizer_dir)),
                         num_workers=2) as pool:
            yield pool

    def test_it_stores_exactly_what_one_process_stores(self, pool, tiny_tl, tokenizer, tmp_path):
        from interlatent.distributed import collect_distributed

        settings = {"layer_indices": [0, -1], "hooks": ["resid_post", "mlp_out"], "batch_size": 2,
                    "prompt_context_fn": context, "token_metrics_fn": token_metrics, "metrics": ["next_token_loss"]}
        extra = ["a brand new prompt", "and one more new prompt here"]
        one, many = tmp_path / "one.db", tmp_path / "many.db"
        # the reference writes each batch in its own transaction, as the driver commits them: the
        # search index logs and folds per transaction, and the background writer would put the
        # batches that queue while it writes into one (a layout that depends on timing)
        with LatentDB(one) as db:
            LLMCollector(db, write_queue=0, **settings).run(tiny_tl, tokenizer, prompts=PROMPTS, labels=LABELS)
        with LatentDB(many) as db:
            run_id = collect_distributed(pool, None, db, PROMPTS, labels=LABELS, **settings)
            assert db.runs().set_index("run_id").loc[run_id, "status"] == "complete"
        first = dump(one)
        assert first == dump(many)
        assert len(first["activations"]) == 6 * 4 and len(first["sequences"]) == 6  # 6 texts x 4 layers
        assert {m for (_, m) in first["metrics"]} == {"next_token_loss", "position", "prompt_len"}

        # a second run over a longer list: stored prompts are skipped, new ones take the next indices
        with LatentDB(one) as db:
            LLMCollector(db, write_queue=0, **settings).run(tiny_tl, tokenizer, prompts=PROMPTS + extra,
                                                             labels=LABELS + ["x", "y"])
        with LatentDB(many) as db:
            collect_distributed(pool, None, db, PROMPTS + extra, labels=LABELS + ["x", "y"], **settings)
        assert dump(one) == dump(many)
        assert len(dump(many)["sequences"]) == 8

    def test_generation_matches_too(self, pool, tiny_tl, tokenizer, tmp_path):
        from interlatent.distributed import collect_distributed

        one, many = tmp_path / "one.db", tmp_path / "many.db"
        with LatentDB(one) as db:
            LLMCollector(db, layer_indices=[1], batch_size=3, dtype="float32", write_queue=0).run(  # as above
                tiny_tl, tokenizer, prompts=PROMPTS, max_new_tokens=3)
        with LatentDB(many) as db:
            collect_distributed(pool, None, db, PROMPTS, layer_indices=[1], batch_size=3, dtype="float32",
                                max_new_tokens=3)
        assert dump(one) == dump(many)
        with LatentDB(many, mode="r") as db:
            assert db.tokens()["generated"].sum() == 3 * 6

    def test_a_workers_exception_is_raised_as_itself_and_the_run_is_interrupted(self, pool, tmp_path):
        from interlatent.distributed import collect_distributed

        with LatentDB(tmp_path / "fail.db") as db:
            with pytest.raises(ValueError, match="metric failed on 'hi'"):
                collect_distributed(pool, None, db, PROMPTS, layer_indices=[0], batch_size=1,
                                    token_metrics_fn=fail_on_hi)
            runs = db.runs()
            assert runs["status"].tolist() == ["interrupted"]
            assert "metric failed" in runs["error"].iloc[0]
            assert "hi" not in set(db.sequences()["text"])

    def test_an_interrupted_driver_marks_the_run_and_a_rerun_resumes(self, pool, tiny_tl, tokenizer, tmp_path):
        from interlatent.distributed import collect_distributed

        sink = InterruptAfterFirst()
        with LatentDB(tmp_path / "cut.db") as db:
            with pytest.raises(KeyboardInterrupt):
                collect_distributed(pool, None, db, PROMPTS, layer_indices=[0], batch_size=2, sink=sink)
            assert db.runs()["status"].tolist() == ["interrupted"]
            assert len(db.sequences()) == 2  # the first batch, committed before the interrupt
            collect_distributed(pool, None, db, PROMPTS, layer_indices=[0], batch_size=2)
            assert db.runs()["status"].tolist() == ["interrupted", "complete"]
        with LatentDB(tmp_path / "whole.db") as db:
            LLMCollector(db, layer_indices=[0], batch_size=2).run(tiny_tl, tokenizer, prompts=PROMPTS)
        cut, whole = dump(tmp_path / "cut.db"), dump(tmp_path / "whole.db")
        for table in ("sequences", "tokens", "activations"):
            assert [r[1:] for r in cut[table]] == [r[1:] for r in whole[table]]  # all but the row ids


    # ------------------------------------------------------------------------ the parquet tier
    def test_on_the_parquet_tier_the_workers_write_the_shards(self, pool, tiny_tl, tokenizer, tmp_path,
                                                              monkeypatch):
        from interlatent.distributed import collect_distributed

        settings = {"layer_indices": [0, -1], "hooks": ["resid_post", "mlp_out"], "batch_size": 2,
                    "prompt_context_fn": context, "token_metrics_fn": token_metrics, "metrics": ["next_token_loss"]}
        extra = ["a brand new prompt", "and one more new prompt here"]
        stores = {name: tmp_path / name / "s.db" for name in ("sqlite", "parquet", "many")}
        for path in stores.values():
            path.parent.mkdir()
        for tier in ("sqlite", "parquet"):
            with LatentDB(stores[tier], activations=tier) as db:
                for texts, labels in ((PROMPTS, LABELS), (PROMPTS + extra, [*LABELS, "x", "y"])):
                    # each batch in its own transaction, as the driver commits them: the background writer
                    # would put the batches that queue up while it writes into one transaction (one shard
                    # per layer for all of them), a layout that depends on timing
                    LLMCollector(db, write_queue=0, **settings).run(tiny_tl, tokenizer, prompts=texts,
                                                                     labels=labels)
        calls = count_driver_encoding(monkeypatch)
        with LatentDB(stores["many"], activations="parquet") as db:
            for texts, labels in ((PROMPTS, LABELS), (PROMPTS + extra, [*LABELS, "x", "y"])):
                collect_distributed(pool, None, db, texts, labels=labels, **settings)
            assert db.runs()["status"].tolist() == ["complete", "complete"]
            assert set(db._shard_files.files()) == shard_paths(db)  # every file written is referenced
            assert not any("/staged/" in p for p in shard_paths(db))
        assert calls == {"encode_block": 0, "ShardFiles.write": 0}  # the workers encoded and wrote every block

        def data_tables(path) -> dict:
            # the search index's own layout differs (built once, or as written), and the token index numbers
            # token texts in the order the driver commits the workers' batches: compared by text below
            return {t: rows for t, rows in dump(path, also=("path",)).items()
                    if not t.startswith(("search_index", "token_vocab", "token_postings", "token_index"))}

        def indexed_texts(path) -> dict[int, list[str]]:  # each sequence's token texts, read through the token index
            conn = sqlite3.connect(path)
            vocab = dict(conn.execute("SELECT vocab_id, text FROM token_vocab"))
            out = {sid: [vocab[int(v)] for v in np.frombuffer(data, dtype="<i4")]
                   for sid, data in conn.execute("SELECT seq_id, data FROM token_vocab_ids")}
            conn.close()
            return out

        many = data_tables(stores["many"])
        assert many == data_tables(stores["parquet"])
        assert indexed_texts(stores["many"]) == indexed_texts(stores["parquet"]) and indexed_texts(stores["many"])
        assert len(many["activations"]) == 8 * 4 and len(many["shards"]) == (3 + 1) * 4  # batches x layers
        sql = {t: rows for t, rows in dump(stores["sqlite"]).items()
               if not t.startswith(("search_index", "token_vocab", "token_postings", "token_index"))}
        assert indexed_texts(stores["sqlite"]) == indexed_texts(stores["many"])
        assert {t: r for t, r in many.items() if t not in ("activations", "shards", "store_settings")} == {
            t: r for t, r in sql.items() if t not in ("activations", "shards", "store_settings")}
        assert stored_blocks(stores["many"]) == stored_blocks(stores["sqlite"]) == stored_blocks(stores["parquet"])
        from interlatent.vis import queries

        with LatentDB(stores["many"], mode="r") as db:  # the index the driver built after the workers' writes
            for layer in db.layers():
                assert db.index_depth(layer) is not None, layer
                assert queries.search_rows(db, layer=layer, top=20) == queries.search_rows(
                    db, layer=layer, top=20, use_index=False)
        with LatentDB(tmp_path / "sqlite.db") as db:  # a store whose shards the workers cannot write: refused first
            with pytest.raises(ConfigError, match="ReturnRecords"):
                collect_distributed(pool, None, db, PROMPTS, sink=WriteShards())
            assert db.runs().empty

    def test_a_worker_killed_mid_batch_leaves_orphans_the_next_open_deletes(self, ray_cluster, pool, tiny_tl,
                                                                             tokenizer, tokenizer_dir, tmp_path):
        from interlatent.distributed import collect_distributed
        from interlatent.llm.loading import load_local_tokenizer

        path = tmp_path / "killed.db"
        with LatentDB(path, activations="parquet") as db:
            with pytest.raises(WorkerError, match="lost"):
                collect_distributed(tiny_tl, functools.partial(load_local_tokenizer, str(tokenizer_dir)), db,
                                    PROMPTS, layer_indices=[0, 1], batch_size=2, num_workers=1,
                                    worker_options={"num_cpus": 0}, sink=DieAfterWriting(batch_no=1))
            runs = db.runs()
            assert runs["status"].tolist() == ["interrupted"] and len(db.sequences()) == 2  # batch 0 committed
            run_id = int(runs["run_id"].iloc[0])
            orphans = set(db._shard_files.files()) - shard_paths(db)
            assert len(orphans) == 2 and all(ShardFiles.run_of(p) == run_id for p in orphans)  # batch 1, 2 layers
        with LatentDB(path) as db:  # a writable open: the run is over, its unreferenced files go
            assert set(db._shard_files.files()) == shard_paths(db)
            collect_distributed(pool, None, db, PROMPTS, layer_indices=[0, 1], batch_size=2)
            assert db.runs()["status"].tolist() == ["interrupted", "complete"]
        self._check_resumed(path, tiny_tl, tokenizer, tmp_path)

    def test_an_interrupted_driver_keeps_the_live_runs_files_then_leaves_orphans(self, ray_cluster, pool, tiny_tl,
                                                                                  tokenizer, tmp_path):
        from interlatent.distributed import collect_distributed

        path = tmp_path / "cut.db"
        sink = VacuumThenInterrupt()
        with LatentDB(path, activations="parquet") as db:
            with pytest.raises(KeyboardInterrupt):
                collect_distributed(pool, None, db, PROMPTS, layer_indices=[0, 1], batch_size=2, sink=sink)
            assert sink.kept  # another writable open while the driver ran deleted none of the workers' files
            assert db.runs()["status"].tolist() == ["interrupted"] and len(db.sequences()) == 2
            ray_cluster.get([a.__ray_ready__.remote() for a in pool.actors])  # batches in flight have ended
            assert set(db._shard_files.files()) - shard_paths(db)  # their files are orphans now
        with LatentDB(path) as db:
            assert set(db._shard_files.files()) == shard_paths(db)
            collect_distributed(pool, None, db, PROMPTS, layer_indices=[0, 1], batch_size=2)
        self._check_resumed(path, tiny_tl, tokenizer, tmp_path)

    @staticmethod
    def _check_resumed(path, tiny_tl, tokenizer, tmp_path):
        """The store after an interrupted run and a rerun holds what one uninterrupted process stores."""
        whole = tmp_path / "whole.db"
        with LatentDB(whole, activations="parquet") as db:
            LLMCollector(db, layer_indices=[0, 1], batch_size=2).run(tiny_tl, tokenizer, prompts=PROMPTS)
        got, want = dump(path, also=("path",)), dump(whole, also=("path",))
        for table in ("sequences", "tokens"):
            assert [r[1:] for r in got[table]] == [r[1:] for r in want[table]]  # all but the row ids
        assert len(got["activations"]) == 6 * 2  # no duplicates
        assert stored_blocks(path) == stored_blocks(whole)
        with LatentDB(path, mode="r") as db:
            assert set(db._shard_files.files()) == shard_paths(db)


def count_driver_encoding(monkeypatch) -> dict[str, int]:
    """Counts, in this process only, the calls that encode a block or write a shard file."""
    calls = {"encode_block": 0, "ShardFiles.write": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(codec, "encode_block", counted("encode_block", codec.encode_block))
    monkeypatch.setattr(ShardFiles, "write", counted("ShardFiles.write", ShardFiles.write))
    return calls


def shard_paths(db) -> set[str]:
    return {r[0] for r in db._q("SELECT path FROM shards")}


def stored_blocks(path) -> dict[tuple, tuple]:
    """(layer, prompt index) -> the block as stored (dtype, k, index dtype, value and index bytes),
    read from its shard where it has one."""
    out = {}
    with LatentDB(path, mode="r") as db:
        for name in db.layers():
            rows = db._q("SELECT s.prompt_index, a.seq_id, a.n_positions, a.dtype, a.k, a.index_dtype, a.data,"
                         " a.indices, a.shard_id, a.shard_row FROM activations a JOIN sequences s"
                         " ON s.seq_id = a.seq_id WHERE a.layer_id=?", (db.layer_info(name).layer_id,))
            for index, *row in rows:
                block = db._with_block(ActivationRow(*row))
                out[(name, index)] = (block.n_positions, block.dtype, block.k, block.index_dtype, bytes(block.data),
                                      None if block.indices is None else bytes(block.indices))
    return out


class DieAfterWriting(WriteShards):
    """The worker writes batch ``batch_no``'s shard files, then its process is killed."""

    def __init__(self, batch_no: int) -> None:
        super().__init__()
        self.batch_no = batch_no

    def emit(self, batch_no, records):
        payload = super().emit(batch_no, records)
        if batch_no == self.batch_no:
            os.kill(os.getpid(), signal.SIGKILL)
        return payload


class VacuumThenInterrupt(WriteShards):
    """Commits the first batch; at the second, another writable open of the store runs the vacuum
    (which must keep the live run's files), then the driver is interrupted (Ctrl-C)."""

    def __init__(self) -> None:
        super().__init__()
        self.committed, self.kept = 0, False

    def commit(self, run, payload, **write_options):
        if self.committed:
            written = {b.path for rec in payload for b in rec.activations.values()}
            with LatentDB(run.db.path) as other:
                self.kept = other.vacuum_shards() == [] and written <= set(other._shard_files.files())
            raise KeyboardInterrupt
        self.committed += 1
        super().commit(run, payload, **write_options)


class InterruptAfterFirst(ReturnRecords):
    """Commits the first batch, then the driver is interrupted (Ctrl-C)."""

    def __init__(self) -> None:
        self.committed = 0

    def commit(self, run, payload, **write_options):
        if self.committed:
            raise KeyboardInterrupt
        self.committed += 1
        super().commit(run, payload, **write_options)


def test_a_replica_takes_the_model_object_or_a_factory(tiny_tl, tokenizer):
    """The worker class itself, in this process: both ways of giving the model build the same batch."""
    from interlatent.distributed.collect import Replica

    capture = LLMCollector(None, layer_indices=[0]).capture
    batch = PromptBatch([0], [tokenizer.encode("hello world")], ["hello world"], [None], [{}], [0], [0])
    got = []
    for replica in (Replica(tiny_tl), Replica(lambda: tiny_tl, lambda: tokenizer)):
        facts = replica.facts(capture, 0)
        assert [p.name for p in facts.points] == ["llm.layer.0"]
        got.append(replica.collect(capture, facts, ReturnRecords(), 0, batch, 0)[0])
    np.testing.assert_array_equal(got[0].activations["llm.layer.0"], got[1].activations["llm.layer.0"])
    assert got[0].token_ids == got[1].token_ids and got[0].text == "hello world"


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    from interlatent.distributed import compute_stats_distributed

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'interlatent-toolkit\[ray\]'"):
        compute_stats_distributed(tmp_path / "x.db", "llm.layer.0")


# ---------------------------------------------------------------------------- map/reduce
@pytest.fixture
def planted(tmp_path):
    """A store with one float16 layer of coarse values (many exact ties), a few NaNs, a dead channel,
    two metrics and string labels; returns its path."""
    rng = np.random.default_rng(7)
    path = tmp_path / "planted.db"
    records = []
    for i in range(40):
        n = int(rng.integers(1, 15))
        acts = np.round(rng.normal(size=(n, 6)) * 2) / 2
        acts[:, 5] = 0.0  # dead
        acts[:, 1] += 0.5 * np.arange(n)  # tracks the position metric
        if i % 9 == 0:
            acts[0, 2] = np.nan
        records.append(SequenceRecord(
            token_ids=list(range(n)), tokens=[f"t{j}" for j in range(n)], activations={"L": acts},
            text=f"prompt {i}", label=["red", "blue", None][i % 3], prompt_index=i,
            metrics={"position": np.arange(n, dtype=float), "noise": rng.normal(size=n)}))
    with LatentDB(path) as db:
        db.register_label_classes(["blue", "red"])
        with db.run(kind="custom") as run:
            run.write(records, dtypes={"L": "float16"})
    return path


def test_distributed_stats_equal_single_process_stats(ray_cluster, planted, tmp_path):
    from interlatent.distributed import compute_stats_distributed

    copy = shutil.copy(planted, tmp_path / "copy.db")
    with LatentDB(planted) as db:
        n_single = db.compute_stats(min_count=2, layers=["L"])["L"]
        single = list(db.iter_statblocks("L"))
    n_dist = compute_stats_distributed(copy, "L", num_workers=3, min_count=2, chunk_tokens=10)
    with LatentDB(copy, mode="r") as db:
        dist = list(db.iter_statblocks("L"))
    assert n_single == n_dist == 5 and [b.channel for b in dist] == [0, 1, 2, 3, 4]
    for a, b in zip(single, dist):
        assert (a.count, a.active_count) == (b.count, b.active_count)
        np.testing.assert_allclose([b.mean, b.std, b.min, b.max], [a.mean, a.std, a.min, a.max], rtol=0, atol=1e-6)
        assert dict(b.correlation_counts) == dict(a.correlation_counts)
        ra, rb = dict(a.top_correlations), dict(b.top_correlations)
        assert set(ra) == set(rb) == {"position", "noise", "label==blue", "label==red"}
        np.testing.assert_allclose([rb[k] for k in ra], list(ra.values()), rtol=0, atol=1e-6)
    assert dist[1].top_correlations[0][0] == "position" and dist[2].count == single[2].count < dist[0].count


def test_distributed_top_examples_are_identical_ties_by_sequence_then_position(ray_cluster, planted, tmp_path):
    from interlatent.distributed import top_examples_distributed

    copy = shutil.copy(planted, tmp_path / "copy.db")
    with LatentDB(planted) as db:
        db.compute_latent_examples("L", top=6, chunk_tokens=16)
        single = db.latent_example_rows("L")
        acts = db.fetch_activations("L")
    assert top_examples_distributed(copy, "L", top=6, num_workers=3, chunk_tokens=4) == len(single)
    with LatentDB(copy, mode="r") as db:
        assert db.latent_example_rows("L") == single
    values, meta, _ = acts
    prompt, position = meta["prompt_index"].to_numpy(), meta["position"].to_numpy()
    expected = []  # by value, then sequence (stored here in prompt order), then position
    for ch in range(6):
        col = values[:, ch]
        keep = [(-float(col[r]), int(prompt[r]), int(position[r])) for r in range(len(col)) if col[r] > 0]
        expected += [(ch, rank, p, pos, -v) for rank, (v, p, pos) in enumerate(sorted(keep)[:6])]
    assert single == expected
    assert len({v for *_, v in single}) < len(single)  # ties were there to break


def test_topk_parts_merge_into_the_one_pass_result():
    rng = np.random.default_rng(0)
    blocks = [(rng.integers(0, 4, size=(int(rng.integers(1, 30)), 5)).astype(np.float32), sid) for sid in range(40)]

    def mine(parts, merge_rows):
        out = TopK(5, 7, merge_rows=merge_rows)
        for part in parts:
            t = TopK(5, 7, merge_rows=merge_rows)
            for b, s in part:
                t.add(b, s)
            out.add_examples(t.result())
        return out.result()

    whole = mine([blocks], 8192)
    for other in (mine([blocks[:13], blocks[13:20], blocks[20:]], 5), mine([[b] for b in blocks], 1)):
        for a, b in zip(whole, other):
            np.testing.assert_array_equal(a, b)
    cells = sorted((-float(b[r, 0]), s, r) for b, s in blocks for r in range(b.shape[0]))[:7]
    assert list(zip(whole.values[:, 0].tolist(), whole.seq_ids[:, 0].tolist(), whole.rows[:, 0].tolist())) == [
        (-v, s, r) for v, s, r in cells]
