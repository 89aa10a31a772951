"""The token index (``interlatent.db.token_index``) and token-filtered searches: exact against the scan
(``queries.search_rows(..., use_index=False)``) after any history of writes, deletes, re-trains,
rollbacks and rows written past the writer; answered from the search index without reading a block
where it can prove the answer; migrated into old stores; read-only stores still answer. Token-filtered
reads (``fetch_activations`` / ``tokens`` with ``token_like``) take their positions from the index and
equal the scan of the token lists and a reference built by hand, read-only and with the index stale."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB
from interlatent.db import SequenceRecord, search_index, token_index
from interlatent.db.schema import LATEST_VERSION
from interlatent.errors import SchemaVersionError
from interlatent.vis import queries

from _helpers import history, raw_sql, replay_history, retokenise

WIDTH = 4
VALUES = np.array([0.0, -0.0, 1.0, 1.5, -2.0, 3.0, np.inf, -np.inf, np.nan, 0.25], dtype=np.float32)
# few texts, so filters hit; the Kelvin sign and dotted I lower-case to ASCII letters that LIKE does not fold
WORDS = [" a", " b", " ab", " AB", " ka", "\u212a", "\u0130x", "", None, " the", " The"]
NEEDLES = ["a", "b", "AB", "k", "i", "the", " ", "", "zz", "\u0130"]


def _block(rng: np.random.Generator, n: int) -> np.ndarray:
    return VALUES[rng.integers(0, len(VALUES), (n, WIDTH))]


def _record(rng, layers, n, prompt_index=None, words=WORDS):
    return SequenceRecord(list(range(n)), [words[j] for j in rng.integers(0, len(words), n)],
                          {ly: _block(rng, n) for ly in layers}, text=f"prompt {rng.integers(1 << 40)}",
                          prompt_index=prompt_index, label=["a", "b"][int(rng.integers(2))])


def _brute_positions(db: LatentDB, needle: str) -> dict[int, list[int]]:
    out = {}
    for p, (_, toks, _) in db.token_lists(db.prompt_indices()).items():
        rows = [i for i, t in enumerate(toks) if needle.lower() in (t or "").lower()]
        if rows:
            out[p] = rows
    return out


def _same_answers(db: LatentDB, rng: np.random.Generator) -> None:
    layers = db.layers()
    for needle in NEEDLES:
        got = db.token_positions(needle)
        assert {p: r.tolist() for p, r in got.items()} == _brute_positions(db, needle), needle
        for name in layers:
            for filters in ({}, {"label": "a"}, {"prompt_like": "1"}):
                top = int(rng.integers(1, 41))
                channel = [None, [0], [1, 3]][int(rng.integers(3))]
                fast = queries.search_rows(db, layer=name, channel=channel, token_like=needle, top=top, **filters)
                slow = queries.search_rows(db, layer=name, channel=channel, token_like=needle, top=top,
                                           use_index=False, **filters)
                assert fast == slow, (name, needle, top, channel, filters)
    if layers:
        assert queries.search_rows(db, layer_prefix="L", token_like="a", top=7) == \
            queries.search_rows(db, layer_prefix="L", token_like="a", top=7, use_index=False)


OPS = history(["write", "write", "write", "late", "delete_layer", "delete_sequence", "retokenise", "retrain",
               "rollback", "inner_rollback"], max_size=8)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, depth=st.sampled_from([2, 5, 128]), fold=st.sampled_from([8, 1 << 20]))
def test_token_filtered_search_equals_the_scan_after_any_history(ops, depth, fold):
    kept = search_index.DEFAULT_DEPTH, token_index.FOLD_PAIRS
    search_index.DEFAULT_DEPTH, token_index.FOLD_PAIRS = depth, fold  # shallow tops, frequent folds
    try:
        with tempfile.TemporaryDirectory() as tmp, LatentDB(Path(tmp) / "s.db") as db:
            replay_history(db, ops, record=_record, block=_block, words=WORDS)
            _same_answers(db, np.random.default_rng(len(ops)))
    finally:
        search_index.DEFAULT_DEPTH, token_index.FOLD_PAIRS = kept


# ---------------------------------------------------------------------------- token-filtered reads
def _measured_record(rng, layers, n, prompt_index=None):
    """A record with stored positions that are not its row numbers, and one or two metrics."""
    rec = _record(rng, layers, n, prompt_index=prompt_index)
    rec.positions = list(range(3, 3 + n))
    for name in ["m1", "m2"][: 1 + int(rng.integers(2))]:
        rec.metrics[name] = np.where(rng.random(n) < 0.2, np.nan, rng.standard_normal(n)).astype(np.float32)
    return rec


def _fetch_reference(db: LatentDB, layer: str, needle: str, limit: int | None, channels: list[int] | None,
                     filters: dict):
    """The fetch by hand: each prompt's block and token list, rows kept where the text holds
    ``needle``; with the whole token frame of those prompts and the kept rows' places in it."""
    chosen = set(db.sequences(**filters)["prompt_index"].tolist())
    prompts = [p for p in db.prompt_indices(layer) if p in chosen]
    lists = db.token_lists(prompts)
    everything = db.tokens(prompt_index=prompts)
    keys, values, places = [], [], []
    start = 0
    for p, block in db.iter_sequence_blocks(layer, prompt_indices=prompts, channels=channels):
        positions, texts, _ = lists[p]
        for i, t in enumerate(texts):
            if needle.lower() in (t or "").lower() and (limit is None or len(keys) < limit):
                keys.append((p, int(positions[i]), t))
                values.append(block[i])
                places.append(start + i)
        start += len(texts)
    width = db.layer_info(layer).width if channels is None else len(channels)
    return keys, np.stack(values) if values else np.zeros((0, width), np.float32), everything, places


def _check_fetch(db: LatentDB, layer: str, needle: str, limit: int | None, channels: list[int] | None,
                 filters: dict, want=None):
    """One token-filtered fetch: equal to the reference by hand, and to the scan of the token lists."""
    got = db.fetch_activations(layer, token_like=needle, limit=limit, channels=channels, **filters)
    keys, values, everything, places = _fetch_reference(db, layer, needle, limit, channels, filters)
    assert list(zip(got.tokens["prompt_index"], got.tokens["position"], got.tokens["token"])) == keys
    assert np.array_equal(got.values, values, equal_nan=True)
    for name in ("m1", "m2"):  # a metric column holds the stored values of the rows kept, or is absent
        stored = everything[name].to_numpy()[places] if name in everything else np.zeros(0)
        if name in got.tokens:
            assert np.array_equal(got.tokens[name].to_numpy(), stored, equal_nan=True)
        else:
            assert np.isnan(stored).all()
    fast_tokens = db.tokens(token_like=needle, **filters)
    db._indexed_token_rows = lambda *_: None  # what a store without a current token index does: scan
    try:
        scanned = db.fetch_activations(layer, token_like=needle, limit=limit, channels=channels, **filters)
        scanned_tokens = db.tokens(token_like=needle, **filters)
    finally:
        del db._indexed_token_rows
    assert np.array_equal(got.values, scanned.values, equal_nan=True)
    pd.testing.assert_frame_equal(got.tokens, scanned.tokens)
    pd.testing.assert_frame_equal(fast_tokens, scanned_tokens)
    if want is not None:
        assert np.array_equal(got.values, want.values, equal_nan=True)
        pd.testing.assert_frame_equal(got.tokens, want.tokens)
    return got


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, fold=st.sampled_from([8, 1 << 20]), seed=st.integers(0, 2**32 - 1))
def test_token_filtered_fetch_equals_the_scan_after_any_history(ops, fold, seed):
    """``fetch_activations`` / ``tokens`` with ``token_like`` ask the token index where it is
    current: the same rows, order, values and metrics as the scan and as a reference by hand; on
    the writable store, read-only, and read-only with the index not current (the scan answers)."""
    kept, token_index.FOLD_PAIRS = token_index.FOLD_PAIRS, fold
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s.db"
            with LatentDB(path) as db:
                replay_history(db, ops, record=_measured_record, block=_block, words=WORDS)
                rng = np.random.default_rng(seed)
                cases = [(name, needle, [None, 0, 1, 3][int(rng.integers(4))], [None, [1, 3]][int(rng.integers(2))],
                          [{}, {"label": "a"}, {"prompt_like": "1"}][int(rng.integers(3))])
                         for name in db.layers() for needle in NEEDLES]
                assert db.token_index_current()
                assert all(db._indexed_token_rows(n, db._seq_ids()) is not None for n in NEEDLES)
                answers = [_check_fetch(db, *case) for case in cases]
            with LatentDB(path, mode="r") as db:
                assert db.token_index_current()
                for case, want in zip(cases, answers):
                    _check_fetch(db, *case, want=want)
            raw_sql(path, "INSERT OR IGNORE INTO token_index_pending(seq_id) SELECT seq_id FROM tokens")
            with LatentDB(path, mode="r") as db:
                if db._q("SELECT 1 FROM tokens LIMIT 1"):  # a stored sequence waits: the index is not current
                    assert not db.token_index_current() and db._indexed_token_rows("a", db._seq_ids()) is None
                for case, want in zip(cases, answers):
                    _check_fetch(db, *case, want=want)
    finally:
        token_index.FOLD_PAIRS = kept


# ---------------------------------------------------------------------------- what is read
@pytest.fixture()
def store(tmp_path):
    """Prompts of ' the' (frequent) and other words, one prompt holding the rare ' sky'."""
    rng = np.random.default_rng(7)
    path = tmp_path / "s.db"
    words = [" the", " the", " a", " cat", " sat"]
    with LatentDB(path) as db, db.run() as run:
        for b in range(6):
            recs = [_record(rng, ["L0"], 8, words=words) for _ in range(5)]
            if b == 3:
                recs[2].tokens[5] = " Sky"
            run.write(recs, dtypes={"L0": "float32"})
    return path


def test_a_frequent_token_search_reads_no_activation_block(store, monkeypatch):
    with LatentDB(store, mode="r") as db:
        want = {top: queries.search_rows(db, layer="L0", token_like="THE", top=top, use_index=False)
                for top in (1, 5, 20)}

        def refuse(*_, **__):
            raise AssertionError("the search read activation blocks")

        monkeypatch.setattr(db, "iter_sequence_blocks", refuse)
        monkeypatch.setattr(db, "iter_sequence_rows", refuse)
        for top, rows in want.items():
            assert queries.search_rows(db, layer="L0", token_like="THE", top=top) == rows
            assert rows and all("the" in r["token"].lower() for r in rows)
        with pytest.raises(AssertionError, match="read activation"):
            queries.search_rows(db, layer="L0", token_like="sky", top=5)  # too rare for the index


def test_rows_read_from_a_blob_equal_those_of_the_decoded_block(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "r.db"
    with LatentDB(path, float16_overflow="promote") as db, db.run() as run:
        for dtype in ("float16", "float32", "bfloat16"):
            blocks = [rng.standard_normal((40, 6)).astype(np.float32) * (1e6 if i == 1 else 1) for i in range(3)]
            run.write([SequenceRecord(list(range(40)), [" t"] * 40, {f"L{dtype}": b}, text=f"{dtype} {i}")
                       for i, b in enumerate(blocks)], dtypes={f"L{dtype}": dtype})
    with LatentDB(path, mode="r") as db:
        for name in db.layers():  # the float16 layer holds one block promoted to float32
            prompts = db.prompt_indices(name)
            wanted = {prompts[0]: np.array([0, 7, 39]), prompts[1]: np.array([3]), prompts[2]: np.arange(0, 40, 2)}
            whole = dict(db.iter_sequence_blocks(name, prompt_indices=prompts, channels=[1, 4]))
            got = list(db.iter_sequence_rows(name, wanted, channels=[1, 4]))
            assert [p for p, _ in got] == sorted(wanted)
            for p, sub in got:
                assert np.array_equal(sub, whole[p][wanted[p]], equal_nan=True), (name, p)


def test_a_rare_token_search_reads_only_the_sequences_holding_it(store, monkeypatch):
    with LatentDB(store, mode="r") as db:
        want = queries.search_rows(db, layer="L0", token_like="sky", top=5, use_index=False)
        assert want and {(r["token"], r["prompt_index"], r["position"]) for r in want} == {(" Sky", 17, 5)}
        read, lists = [], []
        rows, token_lists = db.iter_sequence_rows, db.token_lists

        def spy(layer, wanted, *, channels=None):
            read.append({p: r.tolist() for p, r in wanted.items()})
            return rows(layer, wanted, channels=channels)

        def no_like(prompts, token_like=None):
            lists.append(token_like)
            return token_lists(prompts, token_like)

        monkeypatch.setattr(db, "iter_sequence_rows", spy)
        monkeypatch.setattr(db, "token_lists", no_like)
        assert queries.search_rows(db, layer="L0", token_like="sky", top=5) == want
        assert read == [{17: [5]}]  # one row of one block
        assert lists == [None]  # only the answer's contexts: no token list searched


def test_the_index_answers_a_filter_when_the_channels_it_cut_rank_after_the_answer(tmp_path, monkeypatch):
    """Depth 2: every channel is full. A channel keeping fewer than ``top`` passing entries cannot hide
    a better one when its kept minimum ranks at or after the answer's last entry."""
    monkeypatch.setattr(search_index, "DEFAULT_DEPTH", 2)
    path = tmp_path / "f.db"
    block = np.array([[9.0, 1.0], [8.0, 1.0], [7.0, 1.0], [1.0, 5.0]], dtype=np.float32)
    with LatentDB(path) as db, db.run() as run:
        run.write([SequenceRecord([0, 1, 2, 3], [" x", " y", " y", " x"], {"L": block}, text="p")],
                  dtypes={"L": "float32"})
    with LatentDB(path, mode="r") as db:
        # channel 0 keeps 9 (row 0, x), 8 (row 1, y); channel 1 keeps 5 (row 3, x), 1 (row 0, x)
        assert db.index_top("L", 1, token_like="x")["value"].tolist() == [9.0]
        # channel 1 keeps no y, but its kept minimum (1) ranks after the answer (8): nothing hides there
        assert db.index_top("L", 1, token_like="y")["value"].tolist() == [8.0]
        assert db.index_top("L", 2, token_like="x") is None  # channel 0 cut 7 (row 2): it could be an x
        assert db.index_top("L", 2, token_like="y") is None  # one y kept: the rest could be anywhere
        for needle, top in (("x", 1), ("x", 2), ("x", 3), ("y", 1), ("y", 2)):
            assert queries.search_rows(db, layer="L", token_like=needle, top=top) == \
                queries.search_rows(db, layer="L", token_like=needle, top=top, use_index=False)


def test_a_tie_with_the_kept_minimum_is_not_taken_for_a_cut_value(tmp_path, monkeypatch):
    monkeypatch.setattr(search_index, "DEFAULT_DEPTH", 2)
    path = tmp_path / "t.db"
    block = np.array([[2.0], [2.0], [2.0], [2.0]], dtype=np.float32)  # channel keeps rows 0, 1
    with LatentDB(path) as db, db.run() as run:
        run.write([SequenceRecord([0, 1, 2, 3], [" x", " y", " x", " y"], {"L": block}, text="p")],
                  dtypes={"L": "float32"})
    with LatentDB(path, mode="r") as db:
        assert db.index_top("L", 1, token_like="x")["row"].tolist() == [0]
        assert db.index_top("L", 2, token_like="x") is None  # row 2 ties the kept minimum and was cut
        rows = queries.search_rows(db, layer="L", token_like="x", top=2)
        assert rows == queries.search_rows(db, layer="L", token_like="x", top=2, use_index=False)
        assert [r["position"] for r in rows] == [0, 2]


# ---------------------------------------------------------------------------- old, read-only and shared stores
def test_a_store_from_before_the_token_index_is_migrated_and_answers_the_same(store):
    with LatentDB(store, mode="r") as db:
        want = {n: queries.search_rows(db, layer="L0", token_like=n, top=6, use_index=False) for n in NEEDLES}
    conn = sqlite3.connect(store)  # make it what schema version 6 wrote
    for trigger in ("token_index_insert", "token_index_update", "token_index_delete"):
        conn.execute(f"DROP TRIGGER {trigger}")
    for table in ("token_vocab", "token_vocab_ids", "token_postings", "token_postings_log", "token_index_pending"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("DELETE FROM schema_migrations WHERE version >= 7")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match="open it once writable"):
        LatentDB(store, mode="r")
    with LatentDB(store) as db:
        assert db.schema_version == LATEST_VERSION == 7
        assert db._q("SELECT COUNT(*) FROM token_index_pending") == [(0,)]
        assert db._q("SELECT COUNT(*) FROM token_vocab_ids") == db._q("SELECT COUNT(*) FROM tokens")
    with LatentDB(store, mode="r") as db:
        for needle in NEEDLES:
            assert {p: r.tolist() for p, r in db.token_positions(needle).items()} == _brute_positions(db, needle)
            assert queries.search_rows(db, layer="L0", token_like=needle, top=6) == want[needle]


def test_a_read_only_store_with_unindexed_rows_falls_back_to_the_token_lists(store):
    rng = np.random.default_rng(1)
    with LatentDB(store) as db:
        retokenise(db, 3, rng, WORDS)  # rows written past the token index: another library's writer, say
    raw_sql(store, "INSERT OR IGNORE INTO token_index_pending(seq_id) SELECT seq_id FROM tokens")
    with LatentDB(store, mode="r") as db:
        assert not db.token_index_current() and db.token_positions("the") is None
        for needle in ("the", "sky", "a"):
            assert queries.search_rows(db, layer="L0", token_like=needle, top=5) == \
                queries.search_rows(db, layer="L0", token_like=needle, top=5, use_index=False)
    with LatentDB(store) as db:  # a writable store indexes what waits, on the first query
        assert db.token_index_current() and db._q("SELECT COUNT(*) FROM token_index_pending") == [(0,)]
        assert {p: r.tolist() for p, r in db.token_positions("a").items()} == _brute_positions(db, "a")


def test_vocabulary_ids_of_a_rolled_back_write_are_never_used(tmp_path):
    path = tmp_path / "v.db"
    rng = np.random.default_rng(2)
    with LatentDB(path) as a, LatentDB(path) as b:
        with a.run() as run:
            run.write([_record(rng, ["L0"], 3, words=[" base"])])
        with pytest.raises(RuntimeError), a.atomic(), a.run() as run:
            run.write([_record(rng, ["L0"], 3, words=[" zeta"])])
            raise RuntimeError("rolled back")
        with b.run() as run:  # the other connection takes the vocab id " zeta" had for a moment
            run.write([_record(rng, ["L0"], 3, words=[" omega"])])
        with a.run() as run:
            run.write([_record(rng, ["L0"], 2, words=[" zeta"]), _record(rng, ["L0"], 2, words=[" omega"])])
        for db in (a, b):
            for needle in ("zeta", "omega", "base"):
                assert {p: r.tolist() for p, r in db.token_positions(needle).items()} == \
                    _brute_positions(db, needle)
        assert sorted(t for _, t in a._q("SELECT vocab_id, text FROM token_vocab")) == [" base", " omega", " zeta"]


def test_search_cli_prints_the_same_with_and_without_the_indexes(store, capsys):
    from interlatent.cli import main

    def printed() -> list[str]:
        out = []
        for needle in ("the", "sky", "A"):
            for fmt in ("json", "table"):
                rc = main(["search", str(store), "--layer", "L0", "--token-like", needle, "--top", "4",
                           "--format", fmt])
                assert rc == 0
                out.append(capsys.readouterr().out)
        return out

    indexed = printed()
    with LatentDB(store) as db, db.atomic() as conn:  # neither index usable by a read-only command
        conn.execute("DELETE FROM search_index")
        conn.execute("DELETE FROM search_index_layers")
        conn.execute("DELETE FROM search_index_log")
    raw_sql(store, "INSERT INTO token_index_pending(seq_id) SELECT seq_id FROM tokens")
    with LatentDB(store, mode="r") as db:
        assert db.index_depth("L0") is None and not db.token_index_current()
    assert printed() == indexed
    assert "Sky" in indexed[2] and json.loads(indexed[0])


@pytest.mark.parametrize("tier", ["sqlite", "parquet"])
def test_token_searches_that_scan_equal_the_reference_on_both_tiers(tmp_path, monkeypatch, tier):
    monkeypatch.setattr(search_index, "DEFAULT_DEPTH", 2)  # most token filters then scan
    rng = np.random.default_rng(8)
    with LatentDB(tmp_path / "p.db", activations=tier) as db:
        with db.run() as run:
            for _ in range(3):
                run.write([_record(rng, ["L0", "L1"], int(rng.integers(2, 30))) for _ in range(4)],
                          dtypes={"L0": "float16", "L1": "float32"})
        assert db.activation_tier == tier
        for needle in NEEDLES:
            for top in (1, 3, 12):
                for name in ("L0", "L1"):
                    assert queries.search_rows(db, layer=name, token_like=needle, top=top, channel=[0, 2]) == \
                        queries.search_rows(db, layer=name, token_like=needle, top=top, channel=[0, 2],
                                            use_index=False), (needle, top, name)
