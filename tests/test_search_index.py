"""The search index (``interlatent.db.search_index``): kept as blocks are written, exact against the
full scan (``queries.search_rows(..., use_index=False)``) after writes, deletes, re-trains and
rolled-back writes, in one documented order with ties, NaN and infinities."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB
from interlatent.db import SequenceRecord, search_index
from interlatent.db.search_index import ChannelTops, merge_block, ranked
from interlatent.vis import queries

from _helpers import history, replay_history

WIDTH = 5
# few distinct values, so float16 ties are everywhere; NaN, both infinities and both zeros among them
VALUES = np.array([0.0, -0.0, 1.0, 1.5, -2.0, 3.0, np.inf, -np.inf, np.nan, 0.25], dtype=np.float32)


def _block(rng: np.random.Generator, n: int, width: int = WIDTH) -> np.ndarray:
    return VALUES[rng.integers(0, len(VALUES), (n, width))]


def _record(rng, layers, n, prompt_index=None, text=None):
    return SequenceRecord(list(range(n)), [f" t{j}" for j in range(n)], {ly: _block(rng, n) for ly in layers},
                          text=text or f"prompt {rng.integers(1 << 40)}", prompt_index=prompt_index,
                          label=["a", "b", "c"][int(rng.integers(3))])


def _reference(values, prompts, rows, depth):
    """Per channel, the best ``depth`` (value, prompt, row) by a plain sort, as sets."""
    out = []
    for c in range(values.shape[1]):
        keep = ~np.isnan(values[:, c])
        entries = sorted(((-float(v), int(p), int(r)) for v, p, r in zip(values[keep, c], prompts[keep], rows[keep])))
        out.append({(-v + 0.0, p, r) for v, p, r in entries[:depth]})
    return out


# ---------------------------------------------------------------------------- the merge
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), depth=st.integers(1, 6), sizes=st.lists(st.integers(1, 20), min_size=1,
                                                                               max_size=5),
       shuffled=st.booleans())
def test_merge_keeps_each_channels_best_entries_like_a_full_sort(seed, depth, sizes, shuffled):
    rng = np.random.default_rng(seed)
    blocks = [_block(rng, n) for n in sizes]
    starts = rng.permutation(len(blocks)) * 100 if shuffled else np.arange(len(blocks)) * 100
    tops = ChannelTops.empty(depth, WIDTH)
    seen_max = -1
    for start, block in zip(starts.tolist(), blocks):
        prompts = np.full(block.shape[0], start, np.int64)
        tops = merge_block(tops, block, prompts, np.arange(block.shape[0]), in_order=start > seen_max)
        seen_max = max(seen_max, start)
    values = np.concatenate(blocks)
    prompts = np.concatenate([np.full(b.shape[0], s) for s, b in zip(starts.tolist(), blocks)])
    rows = np.concatenate([np.arange(b.shape[0]) for b in blocks])
    want = _reference(values, prompts, rows, depth)
    for c in range(WIDTH):
        n = int(tops.counts[c])
        got = {(float(v) + 0.0, int(p), int(r)) for v, p, r in zip(tops.values[:n, c], tops.prompts[:n, c],
                                                                  tops.rows[:n, c])}
        assert got == want[c]
        keys = list(zip(tops.prompts[:n, c].tolist(), tops.rows[:n, c].tolist()))
        assert keys == sorted(keys)  # kept in (prompt, row) order, which the next merge relies on


def test_ranked_order_is_value_then_prompt_row_channel_and_nan_never_first():
    v = np.array([1.0, np.inf, 1.0, -np.inf, 1.0, -0.0, 0.0], dtype=np.float32)
    p = np.array([2, 9, 1, 0, 1, 3, 3])
    r = np.array([0, 0, 5, 0, 5, 1, 0])
    c = np.array([0, 0, 4, 0, 2, 0, 1])
    assert ranked(v, p, r, c).tolist() == [1, 4, 2, 0, 6, 5, 3]


# ---------------------------------------------------------------------------- the store against the scan
def _same_answers(db: LatentDB, layers: list[str], tops=(1, 2, 3, 5, 7, 40)) -> None:
    for name in layers:
        for top in tops:
            for channel in (None, [0], [1, 3]):
                fast = queries.search_rows(db, layer=name, channel=channel, top=top)
                slow = queries.search_rows(db, layer=name, channel=channel, top=top, use_index=False)
                assert fast == slow, (name, top, channel)
        for filters in ({"label": "a"}, {"prompt_like": "1"}, {"label": "b", "prompt_like": "2"}):
            for top in (1, 4):  # the index answers when enough of each full channel's entries match
                assert queries.search_rows(db, layer=name, top=top, **filters) == \
                    queries.search_rows(db, layer=name, top=top, use_index=False, **filters), (name, filters)
    if layers:
        assert queries.search_rows(db, layer_prefix="L", top=9) == \
            queries.search_rows(db, layer_prefix="L", top=9, use_index=False)


OPS = history(["write", "write", "write", "late", "delete_layer", "retrain", "rollback", "inner_rollback"], max_size=9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, dtype=st.sampled_from(["float16", "float32"]), depth=st.sampled_from([2, 5, 128]))
def test_index_backed_search_equals_the_full_scan_after_any_history(ops, dtype, depth):
    kept = search_index.DEFAULT_DEPTH
    search_index.DEFAULT_DEPTH = depth  # shallow indexes fill up, so merges must drop entries
    try:
        with tempfile.TemporaryDirectory() as tmp, LatentDB(Path(tmp) / "s.db") as db:
            replay_history(db, ops, record=_record, block=_block, dtype=dtype)
            layers = db.layers()
            for name in layers:
                assert db.index_depth(name) is not None  # every layer was indexed as it was written
            _same_answers(db, layers)
    finally:
        search_index.DEFAULT_DEPTH = kept


@pytest.fixture()
def store(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "s.db"
    with LatentDB(path) as db, db.run() as run:
        for b in range(4):
            run.write([_record(rng, ["L0", "L1"], 6, text=f"p{b} {i}") for i in range(3)])
    return path


def test_an_indexed_search_reads_no_activation_block(store, monkeypatch):
    with LatentDB(store, mode="r") as db:
        want = queries.search_rows(db, layer="L0", top=10, use_index=False)

        def refuse(*_, **__):
            raise AssertionError("the search scanned the layer")

        monkeypatch.setattr(db, "iter_sequence_blocks", refuse)
        assert queries.search_rows(db, layer="L0", top=10) == want
        assert queries.search_rows(db, layer="L0", top=2, label="b") == \
            queries.search_rows(LatentDB(store, mode="r"), layer="L0", top=2, label="b", use_index=False)
        with pytest.raises(AssertionError, match="scanned"):
            queries.search_rows(db, layer="L0", top=500)  # beyond the depth: the scan


def test_documented_order_nan_never_ranks_and_infinities_are_extremes(tmp_path):
    path = tmp_path / "o.db"
    block = np.array([[np.nan, 2.0], [np.inf, 2.0], [-np.inf, np.nan]], dtype=np.float32)
    with LatentDB(path) as db, db.run() as run:
        run.write([SequenceRecord([0, 1, 2], [" a", " b", " c"], {"L": block}, text=f"p{i}", prompt_index=i)
                   for i in (4, 1)], dtypes={"L": "float32"})
        rows = queries.search_rows(db, layer="L", top=10)
        assert rows == queries.search_rows(db, layer="L", top=10, use_index=False)
    got = [(r["value"], r["prompt_index"], r["position"], r["channel"]) for r in rows]
    assert got == [(np.inf, 1, 1, 0), (np.inf, 4, 1, 0), (2.0, 1, 0, 1), (2.0, 1, 1, 1), (2.0, 4, 0, 1),
                   (2.0, 4, 1, 1), (-np.inf, 1, 2, 0), (-np.inf, 4, 2, 0)]  # no NaN


def test_a_store_written_before_the_index_scans_read_only_and_builds_once_writable(store):
    with LatentDB(store) as db:  # make it what a store of the previous schema holds
        with db.atomic() as conn:
            conn.execute("DELETE FROM search_index")
            conn.execute("DELETE FROM search_index_layers")
            conn.execute("DELETE FROM search_index_log")
        with db.run() as run:  # more rows into the unindexed layer: no partial index appears
            run.write([_record(np.random.default_rng(9), ["L0"], 5)])
        assert db.index_depth("L0") is None
    with LatentDB(store, mode="r") as db:
        scanned = queries.search_rows(db, layer="L0", top=8)
        assert db.index_depth("L0") is None and scanned == queries.search_rows(db, layer="L0", top=8, use_index=False)
    with LatentDB(store) as db:
        assert queries.search_rows(db, layer="L0", top=8) == scanned  # built by this query, then stored
        assert db.index_depth("L0") == 128
        assert db.build_index() == ["L0", "L1"]
    with LatentDB(store, mode="r") as db:
        assert db.index_depth("L1") == 128 and queries.search_rows(db, layer="L0", top=8) == scanned


def test_rows_written_past_the_index_make_it_stale_not_wrong(store):
    with LatentDB(store) as db:
        with db.atomic() as conn:  # a writer that bypassed the index (an older library, say)
            conn.execute("DELETE FROM activations WHERE seq_id = (SELECT MIN(seq_id) FROM activations)")
        assert db.index_depth("L0") is None
        assert queries.search_rows(db, layer="L0", top=6) == queries.search_rows(db, layer="L0", top=6,
                                                                                  use_index=False)
        assert db.index_depth("L0") == 128  # rebuilt on that query


def test_delete_layer_drops_its_index_and_a_new_layer_of_that_name_starts_clean(store):
    rng = np.random.default_rng(5)
    with LatentDB(store) as db:
        layer_id = db.layer_info("L0").layer_id
        db.delete_layer("L0")
        assert db._q("SELECT COUNT(*) FROM search_index WHERE layer_id=?", (layer_id,)) == [(0,)]
        assert db._q("SELECT COUNT(*) FROM search_index_layers WHERE layer_id=?", (layer_id,)) == [(0,)]
        with db.run() as run:
            db.write_activations(run.run_id, "L0", [(p, _block(rng, 6)) for p in db.prompt_indices()[:5]])
        assert db.index_depth("L0") == 128
        _same_answers(db, ["L0"])


def test_sparse_layers_keep_their_examples_and_are_not_indexed(tmp_path):
    from interlatent.db import SparseActs

    path = tmp_path / "sp.db"
    rng = np.random.default_rng(0)
    with LatentDB(path) as db, db.run() as run:
        run.write([SequenceRecord([0, 1, 2], [" a", " b", " c"],
                                  {"latent:x": SparseActs(np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]),
                                                          rng.random((3, 2)), 8)},
                                  text=f"p{i}") for i in range(4)])
        assert db.index_depth("latent:x") is None and db.index_top("latent:x", 3) is None
        assert queries.search_rows(db, layer="latent:x", top=3) == \
            queries.search_rows(db, layer="latent:x", top=3, use_index=False)


# ---------------------------------------------------------------------------- summary and dashboard
def _drop_index(path: Path) -> None:
    with LatentDB(path) as db, db.atomic() as conn:
        conn.execute("DELETE FROM search_index")
        conn.execute("DELETE FROM search_index_layers")
        conn.execute("DELETE FROM search_index_log")


def _relu_store(path: Path) -> Path:
    rng = np.random.default_rng(11)
    with LatentDB(path) as db, db.run() as run:
        for b in range(3):
            run.write([SequenceRecord(list(range(7)), [f" w{j}" for j in range(7)],
                                      {"L0": np.where(rng.random((7, WIDTH)) < 0.15, np.maximum(_block(rng, 7), 0), 0),
                                       "L1": _block(rng, 7)},
                                      text=f"q{b} {i}") for i in range(4)])
    return path


def test_examples_per_channel_from_the_index_equal_those_of_a_scan(store, capsys):
    from interlatent.cli import main

    with LatentDB(store, mode="r") as db:
        fast = queries.examples_table(db, "L1", top=4)
        assert (fast.groupby("channel")["rank"].max() == 3).all()
        for c in range(WIDTH):
            want = queries.search_rows(db, layer="L1", channel=[c], top=4, use_index=False)
            got = fast[fast["channel"] == c]
            assert got["value"].tolist() == [r["value"] for r in want]
            assert list(zip(got["prompt_index"], got["position"], got["token"])) == \
                [(r["prompt_index"], r["position"], r["token"]) for r in want]
    _drop_index(store)
    with LatentDB(store, mode="r") as db:  # no index, read-only: the same rows from one scan
        assert db.index_examples("L1", 4) is None
        assert queries.examples_table(db, "L1", top=4).equals(fast)
    rc = main(["summary", str(store), "--examples", "L1", "--channel", "2", "--top", "3", "--format", "json"])
    out, _ = capsys.readouterr()
    import json

    rows = json.loads(out)
    assert rc == 0 and [r["rank"] for r in rows] == [0, 1, 2] and {r["channel"] for r in rows} == {2}


def test_dashboard_top_examples_from_the_index_equal_those_of_its_scan(tmp_path):
    import re

    from interlatent.vis.dashboard import build_dashboard

    path = _relu_store(tmp_path / "d.db")

    def details() -> dict:
        with LatentDB(path, mode="r") as db:
            html = build_dashboard(db, tmp_path / "r.html", layers=["L0", "L1"]).read_text()
        data = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.DOTALL).group(1)
        import json

        return json.loads(data)["details"]

    with LatentDB(path, mode="r") as db:
        assert db.index_depth("L0") == 128
    indexed = details()
    _drop_index(path)
    assert details() == indexed  # the scan's answer (the layer is smaller than max_tokens)
    tops = [ex["value"] for page in indexed["L0"].values() for ex in page["top"]]
    assert 0 < len(tops) < 10 * WIDTH and all(v == {"$nonfinite": "inf"} or v > 0 for v in tops)  # zeros not shown


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_late_prompt_tied_with_a_full_channels_floor_enters_it(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(search_index, "DEFAULT_DEPTH", 2)
    with LatentDB(tmp_path / "t.db") as db, db.run() as run:
        def put(index, column):
            block = np.array(column, dtype=np.float32)[:, None]
            run.write([SequenceRecord(list(range(len(column))), [" x"] * len(column), {"L": block},
                                      text=f"p{index}", prompt_index=index)], dtypes={"L": dtype})

        put(10, [0.0, 0.0, -1.0])  # full at depth 2, floor 0.0
        put(5, [-0.0, -2.0])  # equal to the floor, earlier prompt: it enters
        put(20, [0.0])  # equal, later prompt: it does not
        rows = queries.search_rows(db, layer="L", top=2)
        assert [(r["prompt_index"], r["position"]) for r in rows] == [(5, 0), (10, 0)]
        assert rows == queries.search_rows(db, layer="L", top=2, use_index=False)
