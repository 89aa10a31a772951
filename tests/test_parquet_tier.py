"""The Parquet activation tier: every reader gives the SQLite tier's answer, bit for bit, and
``interlatent export`` / ``import`` convert a store between the tiers without losing anything."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.models import load_module
from interlatent.analysis.train import SAEPipeline
from interlatent.cli import main as cli_main
from interlatent.db import SequenceRecord
from interlatent.db.records import SparseActs
from interlatent.db.shards import ShardBlock, ShardFiles
from interlatent.db.transfer import convert_store
from interlatent.errors import (
    ConfigError,
    DatabaseNotFoundError,
    DtypeRangeError,
    ShardError,
)

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("sqlite", "parquet")
LAYERS = ("f16", "f32", "bf16", "sparse")


def records(rng: np.random.Generator, start: int, n: int) -> list[SequenceRecord]:
    """Sequences with four layers: float16 (one row beyond its range, stored as float32), float32,
    bfloat16 and a sparse TopK layer; token metrics and labels for the statistics."""
    out = []
    for i in range(start, start + n):
        length = int(rng.integers(1, 12))
        f16 = rng.normal(size=(length, 8)).astype(np.float32)
        if i % 4 == 2:
            f16[0, 3] = 1e6  # promoted to float32 for this row
        f16[-1, 0] = np.float32(3e-6)  # a float16 subnormal
        acts = {"f16": f16, "f32": rng.normal(size=(length, 6)).astype(np.float32) * 1e20,
                "bf16": rng.normal(size=(length, 5)).astype(np.float32),
                "sparse": SparseActs(np.stack([rng.permutation(40)[:3] for _ in range(length)]),
                                     rng.uniform(0, 2, (length, 3)).astype(np.float32), 40)}
        if i == 1:
            acts["bf16"][0, :3] = [np.inf, -np.inf, np.nan]
        out.append(SequenceRecord(list(range(length)), [f"tok{j % 5}" for j in range(length)], acts,
                                  text=f"prompt {i} {'sky' if i % 2 else 'sea'}", label="A" if i % 3 else "B",
                                  metrics={"m": rng.normal(size=length)}))
    return out


def build(path: Path, tier: str, seed: int = 0, **options) -> LatentDB:
    rng = np.random.default_rng(seed)
    db = LatentDB(path, activations=tier, **options)
    for batch in range(2):
        with db.run(kind="custom", model="synthetic") as run:
            for start in range(batch * 12, batch * 12 + 12, 6):
                run.write(records(rng, start, 6), dtypes={"f32": "float32", "bf16": "bfloat16"})
    return db


def encoded_rows(db: LatentDB, layer: str) -> list[tuple]:
    """Every activations row of a layer as stored bytes (read from its shard when it has one)."""
    from interlatent.db.reader import ActivationRow

    info = db.layer_info(layer)
    rows = db._q("SELECT a.seq_id, a.n_positions, a.dtype, a.k, a.index_dtype, a.data, a.indices, a.shard_id,"
                 " a.shard_row FROM activations a WHERE a.layer_id=? ORDER BY a.seq_id", (info.layer_id,))
    return [db._with_block(ActivationRow(*r))[:7] for r in rows]


def shard_files_on_disk(db: LatentDB) -> set[str]:
    return set(db._shard_files.files())


def referenced(db: LatentDB) -> set[str]:
    return {r[0] for r in db._q("SELECT path FROM shards")}


@pytest.fixture
def stores(tmp_path):
    dbs = {tier: build(tmp_path / f"{tier}.db", tier) for tier in TIERS}
    yield dbs
    for db in dbs.values():
        db.close()


# ---------------------------------------------------------------------------- readers
def test_every_block_is_stored_bit_exact_in_both_tiers(stores):
    sql, pq = stores["sqlite"], stores["parquet"]
    assert pq.activation_tier == "parquet" and sql.activation_tier == "sqlite"
    assert pq._q("SELECT COUNT(*) FROM activations WHERE LENGTH(data) > 0") == [(0,)]  # nothing left in SQLite
    for layer in LAYERS:
        assert encoded_rows(sql, layer) == encoded_rows(pq, layer)
    dtypes = dict(pq._q("SELECT a.dtype, COUNT(*) FROM activations a JOIN layers l USING(layer_id)"
                        " WHERE l.name='f16' GROUP BY a.dtype"))
    assert dtypes["float32"] == 6 and dtypes["float16"] == 18  # the promoted rows kept their own dtype
    assert referenced(pq) == shard_files_on_disk(pq) and len(referenced(pq)) >= 4 * 4


def test_every_reader_gives_the_same_answer_on_both_tiers(stores):
    answers = {}
    for tier, db in stores.items():
        got = {}
        for layer in LAYERS:
            acts = db.fetch_activations(layer)
            got[layer, "fetch"] = acts.values
            got[layer, "tokens"] = acts.tokens.to_json()
            got[layer, "filtered"] = db.fetch_activations(layer, token_like="tok3", prompt_like="sky", channels=[0, 2],
                                                          limit=7).values
            got[layer, "blocks"] = list(db.iter_sequence_blocks(layer, prompt_indices=[1, 5, 20]))
            got[layer, "chunks"] = list(db.iter_activation_chunks(layer, chunk_size=17, shuffle=True, seed=3,
                                                                  buffer_tokens=40))
        got["pair"] = list(db.iter_activation_chunks(["f16", "bf16"], chunk_size=9))
        db.compute_stats(min_count=1)
        got["stats"] = [(sb.channel, sb.mean, sb.std, sb.top_correlations) for sb in db.iter_statblocks()]
        db.compute_latent_examples("sparse", top=4)
        got["examples"] = db.latent_examples("sparse").to_json()
        table = db.layer_table()
        got["layers"] = table.drop(columns=["bytes"]).to_json()
        assert (table["bytes"] > 0).all()
        answers[tier] = got
    a, b = answers["sqlite"], answers["parquet"]
    assert a.keys() == b.keys()
    for key in a:
        assert _same(a[key], b[key]), key


def _same(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint8), y.view(np.uint8))
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y))
    if isinstance(x, float) and np.isnan(x):
        return isinstance(y, float) and np.isnan(y)
    return x == y


def test_blocks_across_row_groups_stream_in_any_order(tmp_path, stores, monkeypatch):
    from interlatent.db import shards

    monkeypatch.setattr(shards, "MIN_GROUP_ROWS", 4)
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 1)  # row groups of 4 rows: blocks straddle them
    with build(tmp_path / "g.db", "parquet") as db:
        rel = db._q("SELECT path FROM shards ORDER BY n_rows DESC LIMIT 1")[0][0]
        handle, starts = db._shard_files._file(rel)
        assert handle.metadata.num_row_groups > 3 and np.all(np.diff(starts)[:-1] == 4)
        for layer in LAYERS:
            for shuffle in (False, True):
                mine = list(db.iter_activation_chunks(layer, chunk_size=13, shuffle=shuffle, seed=1))
                theirs = list(stores["sqlite"].iter_activation_chunks(layer, chunk_size=13, shuffle=shuffle, seed=1))
                assert _same(mine, theirs), (layer, shuffle)


# ---------------------------------------------------------------------------- the codec, property-tested
BLOCK = st.tuples(st.integers(1, 9), st.integers(0, 2**31))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(["float16", "float32", "bfloat16"]), width=st.integers(1, 33),
       sparse=st.booleans(), wide_index=st.booleans(), blocks=st.lists(BLOCK, min_size=1, max_size=5),
       root_kind=st.sampled_from(["path", "memory"]))
def test_shards_give_back_every_bit_pattern(dtype, width, sparse, wide_index, blocks, root_kind):
    """Random bit patterns (every NaN payload, inf, subnormal and -0 included) come back byte for byte."""
    item = 4 if dtype == "float32" else 2
    index_dtype = ("<u4" if wide_index else "<u2") if sparse else None
    made = []
    for n, seed in blocks:
        bits = np.random.default_rng(seed).integers(0, 256, size=n * width * item, dtype=np.uint8).tobytes()
        idx = (np.random.default_rng(seed + 1).integers(0, 60_000, size=(n, width)).astype(index_dtype).tobytes()
               if sparse else None)
        made.append(ShardBlock(len(made), n, bits, idx))
    with tempfile.TemporaryDirectory() as folder:
        root = folder if root_kind == "path" else f"memory://interlatent-test/{uuid.uuid4().hex}"
        files = ShardFiles(root, Path(folder))
        rel, size, firsts = files.write(3, 7, dtype, width, index_dtype, made)
        assert rel.startswith("run=3/layer=7/part-") and size > 0 and files.files() == [rel]
        for block, first in zip(made, firsts):
            data, indices = files.read(rel, first, block.n_positions)
            assert data == block.data and indices == block.indices
            if dtype == "float16":
                assert np.array_equal(np.frombuffer(data, "<u2"), np.frombuffer(block.data, "<u2"))
        fresh = ShardFiles(root, Path(folder))  # a new reader, nothing cached
        data, _ = fresh.read(rel, 0, sum(b.n_positions for b in made))
        assert data == b"".join(b.data for b in made)
        files.delete([rel])
        assert files.files() == []


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), width=st.integers(1, 20), special=st.booleans())
def test_written_float16_values_read_back_as_the_sqlite_tier_reads_them(seed, width, special):
    rng = np.random.default_rng(seed)
    values = [rng.normal(size=(int(rng.integers(1, 6)), width)).astype(np.float32) * 100 for _ in range(3)]
    if special:
        values[0].flat[: min(4, values[0].size)] = [np.nan, np.inf, -np.inf, 6e-8][: min(4, values[0].size)]
    got = {}
    with tempfile.TemporaryDirectory() as folder:
        for tier in TIERS:
            with LatentDB(Path(folder) / f"{tier}.db", activations=tier) as db, db.run() as run:
                run.write([SequenceRecord(list(range(len(v))), ["t"] * len(v), {"x": v}) for v in values])
                got[tier] = db.fetch_activations("x").values
    assert np.array_equal(got["sqlite"].view(np.uint32), got["parquet"].view(np.uint32))
    expected = np.concatenate(values).astype(np.float16)
    assert np.array_equal(got["parquet"].astype(np.float16).view(np.uint16), expected.view(np.uint16))


# ---------------------------------------------------------------------------- the tier is the store's
def test_the_tier_is_recorded_and_asking_for_the_other_one_says_how_to_convert(tmp_path):
    build(tmp_path / "p.db", "parquet").close()
    assert (tmp_path / "p.db.shards").is_dir()
    with LatentDB(tmp_path / "p.db") as db:
        assert db.activation_tier == "parquet" and db.shard_root == "p.db.shards"
    with LatentDB(tmp_path / "p.db", mode="r") as db:
        assert db.fetch_activations("f16").values.shape[0] > 0
    with pytest.raises(ConfigError, match="interlatent export"):
        LatentDB(tmp_path / "p.db", activations="sqlite")
    build(tmp_path / "s.db", "sqlite").close()
    with pytest.raises(ConfigError, match="keeps its activations in sqlite.*interlatent export"):
        LatentDB(tmp_path / "s.db", activations="parquet")
    with pytest.raises(ConfigError, match="must be one of"):
        LatentDB(tmp_path / "n.db", activations="arrow")


def test_a_store_folder_moved_whole_keeps_its_shards(tmp_path):
    build(tmp_path / "a" / "m.db", "parquet").close()
    (tmp_path / "a").rename(tmp_path / "b")
    with LatentDB(tmp_path / "b" / "m.db", mode="r") as db:
        assert len(encoded_rows(db, "sparse")) == 24


def test_a_store_without_its_shard_folder_says_what_is_missing(tmp_path):
    import shutil

    from interlatent.errors import ShardError

    build(tmp_path / "lost.db", "parquet").close()
    shutil.rmtree(tmp_path / "lost.db.shards")
    with LatentDB(tmp_path / "lost.db", mode="r") as db:
        assert db.n_tokens("f16") > 0  # the catalog is whole
        with pytest.raises(ShardError, match="shard folder must travel with it"):
            db.fetch_activations("f16")


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_an_fsspec_shard_root_serves_the_same_activations(tmp_path, stores, scheme):
    root = (tmp_path / "elsewhere").as_uri() if scheme == "file" else f"memory://interlatent/{uuid.uuid4().hex}"
    with build(tmp_path / "u.db", "parquet", shard_root=root) as db:
        assert db.shard_root == root
        for layer in LAYERS:
            assert encoded_rows(db, layer) == encoded_rows(stores["sqlite"], layer)
    if scheme == "file":
        assert any((tmp_path / "elsewhere").rglob("part-*.parquet")) and not (tmp_path / "u.db.shards").exists()


# ---------------------------------------------------------------------------- deleting, replacing, crashing
def test_deleting_or_replacing_a_layer_removes_its_files_after_the_commit(tmp_path):
    db = build(tmp_path / "d.db", "parquet")
    before = shard_files_on_disk(db)
    with pytest.raises(RuntimeError, match="no"), db.atomic():
        db.delete_layer("f32")
        raise RuntimeError("no")
    assert shard_files_on_disk(db) == before and db.fetch_activations("f32").values.shape[0] > 0
    f32_files = {p for p in before if f"layer={db.layer_info('f32').layer_id}/" in p}
    db.delete_layer("f32")
    assert shard_files_on_disk(db) == before - f32_files and referenced(db) == shard_files_on_disk(db)
    old = {p for p in before if f"layer={db.layer_info('bf16').layer_id}/" in p}
    with db.run() as run:
        db.write_activations(run.run_id, "bf16.next", [(i, np.ones((n, 5), np.float32)) for i, n in
                                                       db._q("SELECT prompt_index, n_positions FROM sequences")],
                             dtype="bfloat16")
    db.replace_layer("bf16.next", "bf16")
    assert not old & shard_files_on_disk(db) and referenced(db) == shard_files_on_disk(db)
    assert np.all(db.fetch_activations("bf16").values == 1)
    db.close()


def test_a_file_no_commit_refers_to_is_deleted_unless_its_run_is_alive(tmp_path):
    db = build(tmp_path / "o.db", "parquet")
    rng = np.random.default_rng(9)
    with db.run() as run:
        with pytest.raises(RuntimeError), db.atomic():
            run.write(records(rng, 100, 2))  # the shard is written, then the commit never comes
            raise RuntimeError("crash before commit")
        orphans = shard_files_on_disk(db) - referenced(db)
        assert len(orphans) == 4
        assert db.vacuum_shards() == []  # its run is alive: it may still commit them
    assert sorted(db.vacuum_shards()) == sorted(orphans)
    assert shard_files_on_disk(db) == referenced(db)
    db.close()


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_parquet_tier import records
    from interlatent import LatentDB
    db = LatentDB({path!r}, activations="parquet")
    rng = np.random.default_rng(0)
    with db.run(model="killed") as run:
        for b in range(3):
            run.write(records(rng, b * 4, 4))
        with db.atomic():
            run.write(records(rng, 12, 4))  # its shards reach the disk; its rows never commit
            os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_writer_killed_mid_collection_leaves_its_committed_batches_and_no_orphans(tmp_path):
    path = tmp_path / "k.db"
    code = KILLED_WRITER.format(tests=str(ROOT / "tests"), path=str(path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with LatentDB(path, mode="r") as db:  # read-only: readable as it is, orphans and all
        assert db.prompt_indices("f16") == list(range(12))
        assert len(shard_files_on_disk(db) - referenced(db)) == 5  # 4 layers, one promoted float16 row
    with LatentDB(path) as db:  # writable: the run is found dead, its unreferenced files deleted
        assert db.runs()["status"].tolist() == ["interrupted"]
        assert shard_files_on_disk(db) == referenced(db)
        expected = records(np.random.default_rng(0), 0, 4)
        assert np.array_equal(db.fetch_activations("f32", prompt_index=[0, 1, 2, 3]).values,
                              np.concatenate([r.activations["f32"] for r in expected]))


# ---------------------------------------------------------------------------- shards written by other processes
def write_through_workers(path: Path, batches: int = 3, **options) -> tuple[LatentDB, list[list[str]]]:
    """``build``'s first run, with each batch's blocks written by a (pickled) ShardWriter, as a
    collection worker writes them; returns the store and each batch's shard paths as the worker
    reported them."""
    rng = np.random.default_rng(0)
    db = LatentDB(path, activations="parquet", **options)
    reported = []
    with db.run(kind="custom", model="synthetic") as run:
        for batch in range(batches):
            dtypes = {"f32": "float32", "bf16": "bfloat16"}
            writer = pickle.loads(pickle.dumps(db.shard_writer(run.run_id, dtypes)))  # travels to a worker
            written = writer.write(records(rng, batch * 6, 6))
            reported.append(sorted({b.path for r in written for b in r.activations.values()}))
            run.write(written, dtypes=dtypes)
    return db, reported


def test_blocks_another_process_wrote_commit_the_rows_a_direct_write_commits(tmp_path):
    direct = LatentDB(tmp_path / "direct" / "s.db", activations="parquet")
    rng = np.random.default_rng(0)
    with direct.run(kind="custom", model="synthetic") as run:
        for batch in range(3):
            run.write(records(rng, batch * 6, 6), dtypes={"f32": "float32", "bf16": "bfloat16"})
    (tmp_path / "workers").mkdir()
    db, reported = write_through_workers(tmp_path / "workers" / "s.db")
    # the first batch's layers were not registered yet: staged, then moved by the commit; later ones direct
    assert all("/staged/" in p for p in reported[0]) and not any("/staged/" in p for p in reported[1] + reported[2])
    assert len(reported[0]) == 5  # 4 layers, and the float16 layer's promoted rows in a file of their own
    assert shard_files_on_disk(db) == referenced(db) and db.vacuum_shards() == []
    for query in ("SELECT shard_id, layer_id, run_id, n_rows, n_bytes FROM shards",  # all but the file names
                  "SELECT * FROM activations", "SELECT layer_id, name, width, dtype, meta FROM layers",
                  "SELECT * FROM sequences", "SELECT * FROM tokens"):
        assert db._q(query) == direct._q(query), query
    for layer in LAYERS:
        assert encoded_rows(db, layer) == encoded_rows(direct, layer)
    promoted = db._q("SELECT COUNT(*) FROM activations WHERE dtype='float32' AND layer_id=?",
                     (db.layer_info("f16").layer_id,))
    assert promoted == [(4,)]  # prompts 2, 6, 10, 14
    db.close()
    direct.close()


def test_a_shard_writer_refuses_what_it_cannot_write(tmp_path):
    with LatentDB(tmp_path / "sql.db") as db, db.run() as run, pytest.raises(ConfigError, match="SQLite"):
        db.shard_writer(run.run_id)
    root = f"memory://interlatent/{uuid.uuid4().hex}"
    with LatentDB(tmp_path / "mem.db", activations="parquet", shard_root=root) as db:
        assert not db.shard_root_shared
        with db.run() as run, pytest.raises(ConfigError, match="only this process"):
            db.shard_writer(run.run_id)
    with LatentDB(tmp_path / "strict.db", activations="parquet", float16_overflow="raise") as db, db.run() as run:
        with pytest.raises(DtypeRangeError):  # a promoted row under "raise": no file is written
            db.shard_writer(run.run_id).write(records(np.random.default_rng(0), 0, 4))
        assert shard_files_on_disk(db) == set()
    db, _ = write_through_workers(tmp_path / "w.db", batches=1)
    with db.run() as second:
        with db.run() as first_run:
            manifest = db.shard_writer(first_run.run_id).write(records(np.random.default_rng(5), 50, 2))
        with pytest.raises(ShardError, match="another run"):
            second.write(manifest)
        again = db.shard_writer(second.run_id).write(records(np.random.default_rng(0), 0, 6))
        before = referenced(db)
        second.write(again, duplicates="attach")  # every block is stored already: its files go after the commit
        assert referenced(db) == before
    assert shard_files_on_disk(db) - referenced(db) == {b.path for r in manifest for b in r.activations.values()}
    db.close()


# ---------------------------------------------------------------------------- the pipelines on both tiers
def test_collection_and_sae_training_are_identical_on_both_tiers(tmp_path, tiny_tl, tokenizer):
    prompts = ["the sky is blue", "a cat sat on the mat", "hi there", "Alice said that Bob would report it"] * 6
    results = {}
    for tier in TIERS:
        db = LatentDB(tmp_path / f"{tier}.db", activations=tier)
        LLMCollector(db, layer_indices=[0, 1], batch_size=5).run(tiny_tl, tokenizer, prompts=prompts)
        torch.manual_seed(0)
        kw = {"k": 3, "d_sae": 32, "steps": 25, "batch_size": 32, "seed": 0, "progress": False}
        SAEPipeline(db, "llm.layer.1", **kw).run()
        res = SAEPipeline(db, "llm.layer.1", **kw).run()  # re-training replaces the latent layer
        weights = {k: v.clone() for k, v in load_module(res.path).state_dict().items()}
        results[tier] = (weights, {k: encoded_rows(db, k) for k in db.layers()},
                         db.fetch_activations("latent_sae:llm.layer.1").values)
        if tier == "parquet":
            assert referenced(db) == shard_files_on_disk(db)  # the replaced latent layer's files are gone
        db.close()
    (w_a, rows_a, lat_a), (w_b, rows_b, lat_b) = results["sqlite"], results["parquet"]
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert rows_a == rows_b and np.array_equal(lat_a, lat_b) and lat_a.shape[0] > 0


# ---------------------------------------------------------------------------- the CLIs on both tiers
READING_COMMANDS = (
    ["summary", "{db}", "--list-layers", "--format", "json"],
    ["summary", "{db}", "--stats", "f16", "--format", "csv"],
    ["search", "{db}", "--layer", "sparse", "--token-like", "tok1", "--top", "5", "--format", "json"],
    ["search", "{db}", "--layer-prefix", "f", "--prompt-like", "sky", "--top", "8"],
    ["diff", "{db}", "--layer", "f16", "--channels", "0", "1", "--prompt-like-a", "sky", "--prompt-like-b", "sea"],
)


def test_reading_commands_print_the_same_on_both_tiers(stores, capsys):
    for db in stores.values():
        db.compute_stats(min_count=1)
    for command in READING_COMMANDS:
        outputs = []
        for tier, db in stores.items():
            assert cli_main([a.format(db=db.path) for a in command]) == 0, (tier, command)
            out = capsys.readouterr().out
            if "--list-layers" in command:
                out = json.dumps([{k: v for k, v in row.items() if k != "bytes"} for row in json.loads(out)])
            outputs.append(out)
        assert outputs[0] == outputs[1] and outputs[0].strip(), command
    out = stores["parquet"].path.with_suffix(".html")
    assert cli_main(["dashboard", str(stores["parquet"].path), "-o", str(out)]) == 0
    assert "sparse" in out.read_text()


# ---------------------------------------------------------------------------- export / import
def dump(path: Path) -> dict[str, list]:
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}
    conn.close()
    return out


def test_sqlite_to_parquet_to_sqlite_gives_back_every_table_and_block(tmp_path, stores):
    src = stores["sqlite"]
    src.add_artifact("weights", "sae", data=bytes(range(256)), config={"d": 1})
    src.compute_stats(min_count=1)
    src.flush()
    there = convert_store(src.path, tmp_path / "there.db", activations="parquet")
    assert there.activations == "parquet" and there.rows == 4 * 24 and there.shards >= 4
    with LatentDB(there.path, mode="r") as db:
        assert db.activation_tier == "parquet"
        for layer in LAYERS:
            assert encoded_rows(db, layer) == encoded_rows(src, layer)
    back = convert_store(there.path, tmp_path / "back.db", activations="sqlite")
    assert back.shard_root is None
    original, returned = dump(src.path), dump(back.path)
    assert original.keys() == returned.keys() and "activations" in original
    for table in original:
        assert original[table] == returned[table], table


def exit_code(argv: list[str]) -> int:
    try:
        return cli_main(argv)
    except SystemExit as stop:  # argparse's usage errors
        return int(stop.code)


def test_export_and_import_commands(tmp_path, stores, capsys):
    src = str(stores["sqlite"].path)
    stores["sqlite"].flush()
    assert cli_main(["export", src, str(tmp_path / "e.db")]) == 0
    assert "as parquet" in capsys.readouterr().out
    assert cli_main(["import", str(tmp_path / "e.db"), str(tmp_path / "i.db")]) == 0
    with LatentDB(tmp_path / "e.db", mode="r") as e, LatentDB(tmp_path / "i.db", mode="r") as i:
        assert e.activation_tier == "parquet" and i.activation_tier == "sqlite"
        assert encoded_rows(e, "f16") == encoded_rows(i, "f16") == encoded_rows(stores["sqlite"], "f16")
    cases = [
        (["export", str(tmp_path / "missing.db"), str(tmp_path / "x.db")], 1, "no store"),
        (["export", src, str(tmp_path / "e.db")], 1, "exists"),
        (["export", src, str(tmp_path / "y.db"), "--activations", "arrow"], 2, "invalid choice"),
        (["import", src, str(tmp_path / "z.db"), "--shard-root", str(tmp_path / "s")], 2, "--shard-root"),
        (["export", src], 2, "DEST"),
    ]
    for argv, code, said in cases:
        assert exit_code(argv) == code, argv
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x.db").exists() and not (tmp_path / "y.db").exists()
    assert cli_main(["export", src, str(tmp_path / "e.db"), "--force"]) == 0
    with pytest.raises(DatabaseNotFoundError):
        convert_store(tmp_path / "missing.db", tmp_path / "w.db")
    proc = subprocess.run([sys.executable, "-m", "interlatent.vis.transfer", "import", str(tmp_path / "e.db"),
                           str(tmp_path / "m.db")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0 and "as sqlite" in proc.stdout, proc.stderr


def test_a_conversion_refuses_to_share_the_source_shard_root(tmp_path, stores):
    src = stores["parquet"]
    before = shard_files_on_disk(src)
    with pytest.raises(ConfigError, match="belongs to one store"):
        convert_store(src.path, tmp_path / "twin.db", shard_root=tmp_path / "parquet.db.shards")
    assert not (tmp_path / "twin.db").exists() and shard_files_on_disk(src) == before
    twin = convert_store(src.path, tmp_path / "twin.db", activations="parquet")  # parquet -> parquet, own root
    with LatentDB(twin.path, mode="r") as db:
        assert db.shard_root == "twin.db.shards" and encoded_rows(db, "sparse") == encoded_rows(src, "sparse")


def test_argument_parsing_and_conversion_are_apart(tmp_path):
    """The CLI plans a transfer from its arguments (one function) and carries it out (another): a
    new source kind adds a plan, not a new command."""
    import argparse

    from interlatent.vis import transfer

    parser = argparse.ArgumentParser()
    transfer.add_arguments(parser)
    args = parser.parse_args(["a.db", "b.db"])
    for command, tier in (("export", "parquet"), ("import", "sqlite")):
        args.command = command
        job = transfer.plan(args)
        assert job == transfer.TransferPlan("tier", "a.db", "b.db", tier, None, False)
    with pytest.raises(DatabaseNotFoundError):
        transfer.convert(job._replace(src=str(tmp_path / "none.db"), dst=str(tmp_path / "b.db")))
