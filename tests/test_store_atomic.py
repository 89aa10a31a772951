"""Nestable transactions (``LatentDB.atomic``) and the store's algorithms apart from SQL: the
running top-k of latent examples and the shuffle buffer, each against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent.db import SequenceRecord
from interlatent.errors import LayerNotFoundError, ReadOnlyError


def _record(rng, text="a prompt", n=4, width=8, layer="llm.layer.0"):
    return SequenceRecord(token_ids=list(range(n)), tokens=[f"t{j}" for j in range(n)], text=text,
                          activations={layer: rng.standard_normal((n, width)).astype(np.float32)})


def test_atomic_inner_failure_rolls_back_only_the_inner_savepoint(tmp_path):
    db = LatentDB(tmp_path / "s.db")
    with db.atomic():
        db.register_layer("kept", 4)
        with pytest.raises(ValueError, match="inner"):
            with db.atomic():
                db.register_layer("dropped", 4)
                db.register_label_classes(["x"])
                raise ValueError("inner")
        db.register_label_classes(["y"])
    assert db.layers() == ["kept"]
    assert db.label_classes() == {"y": 0}
    with pytest.raises(LayerNotFoundError):  # no cached trace of the rolled-back layer
        db.layer_info("dropped")
    db.close()
    with LatentDB(tmp_path / "s.db", mode="r") as reread:  # and it was committed
        assert reread.layers() == ["kept"]


def test_atomic_outer_failure_rolls_back_everything(tmp_path, rng):
    db = LatentDB(tmp_path / "s.db")
    run = db.start_run()
    with pytest.raises(RuntimeError, match="outer"):
        with db.atomic():
            run.write([_record(rng)])
            with db.atomic():
                db.register_layer("inner", 4)
            db.add_artifact("sae", "sae", data=b"weights")
            raise RuntimeError("outer")
    assert db.layers() == [] and db.sequences().empty and db.artifacts().empty
    assert not db._conn.in_transaction
    run.write([_record(rng)])  # the store goes on as before
    assert db.layers() == ["llm.layer.0"] and len(db.sequences()) == 1


def test_public_writes_nest_inside_atomic_without_a_begin_error(tmp_path, rng):
    db = LatentDB(tmp_path / "s.db")
    with db.atomic() as conn:
        run = db.start_run(kind="custom")
        run.write([_record(rng, "one"), _record(rng, "two")])
        db.set_explanations("llm.layer.0", {0: "fires on t0"})
        db.add_intervention("llm.layer.0", "ablate", {"channels": [0]}, {"kl": 0.1})
        db.finish_run(run.run_id)
        assert conn.in_transaction  # all of it is still one open transaction
    assert len(db.sequences()) == 2 and db.explanations("llm.layer.0")["text"].tolist() == ["fires on t0"]
    assert db.runs()["status"].tolist() == ["complete"]
    with db.atomic(), db.atomic(), db.atomic():  # deep nesting: savepoints all the way down
        db.register_layer("deep", 2)
    assert "deep" in db.layers()


def test_a_failed_write_inside_atomic_leaves_the_outer_transaction_usable(tmp_path, rng):
    db = LatentDB(tmp_path / "s.db")
    run = db.start_run()
    with db.atomic():
        run.write([_record(rng, "first")])
        with pytest.raises(Exception, match="already stored"):  # the same layer for the same prompt
            db.write_activations(run.run_id, "llm.layer.0", [(0, rng.standard_normal((4, 8)))])
        run.write([_record(rng, "second")])
    assert db.sequences()["text"].tolist() == ["first", "second"]
    assert db.n_tokens("llm.layer.0") == 8


def test_atomic_refuses_a_read_only_store(tmp_path, rng):
    with LatentDB(tmp_path / "s.db") as db:
        db.register_layer("a", 2)
    reader = LatentDB(tmp_path / "s.db", mode="r")
    with pytest.raises(ReadOnlyError, match="read-only"):
        with reader.atomic():
            pass


def test_a_manual_transaction_is_joined_not_restarted(tmp_path):
    db = LatentDB(tmp_path / "s.db")
    db._conn.execute("BEGIN IMMEDIATE")
    db.register_layer("joined", 3)  # a savepoint inside the caller's transaction, not a second BEGIN
    assert "joined" in db.layers()
    db._conn.execute("ROLLBACK")  # the caller's choice decides
    assert db.layers() == []


def test_topk_matches_a_full_sort(rng):
    from interlatent.db.topk import TopK

    width, top = 5, 3
    blocks = [rng.standard_normal((int(rng.integers(1, 7)), width)).astype(np.float32) for _ in range(20)]
    best = TopK(width, top, merge_rows=7)
    for sid, block in enumerate(blocks):
        best.add(block, sid)
    found = best.result()
    every = np.concatenate(blocks)
    where = np.concatenate([np.stack([np.full(len(b), s), np.arange(len(b))], axis=1) for s, b in enumerate(blocks)])
    for ch in range(width):
        order = np.argsort(-every[:, ch], kind="stable")[:top]
        np.testing.assert_array_equal(found.values[:, ch], every[order, ch])
        np.testing.assert_array_equal(np.stack([found.seq_ids[:, ch], found.rows[:, ch]], axis=1), where[order])


@pytest.mark.parametrize("shuffle", [False, True])
def test_rechunk_yields_every_row_once_in_chunks(rng, shuffle):
    from interlatent.db.shuffle import rechunk

    blocks = [rng.standard_normal((int(rng.integers(1, 9)), 3)) for _ in range(30)]
    ids = [np.full(len(b), i) for i, b in enumerate(blocks)]
    out = list(rechunk((([b, b * 2], i) for b, i in zip(blocks, ids)), 8,
                       rng=np.random.default_rng(0) if shuffle else None, buffer_rows=20))
    sizes = [len(i) for _, i in out]
    assert all(s == 8 for s in sizes[:-1]) and 0 < sizes[-1] <= 8
    values = np.concatenate([a for (a, _), _ in out])
    np.testing.assert_array_equal(np.concatenate([b for (_, b), _ in out]), values * 2)  # streams stay aligned
    every = np.concatenate(blocks)
    if shuffle:
        assert not np.array_equal(values, every)
        values = values[np.lexsort(values.T[::-1])]
        every = every[np.lexsort(every.T[::-1])]
    np.testing.assert_array_equal(values, every)


def test_negative_block_names_count_from_the_end():
    from interlatent.naming import with_block_counted

    assert with_block_counted("llm.layer.-1", 4) == "llm.layer.3"
    assert with_block_counted("latent_sae:llm.layer.-2.mlp_out", 4) == "latent_sae:llm.layer.2.mlp_out"
    assert with_block_counted("policy.layer.-1:post", 3) == "policy.layer.2:post"
    assert with_block_counted("llm.layer.1", 4) is None
    assert with_block_counted("blocks.-1.hook_resid_post", 4) is None
