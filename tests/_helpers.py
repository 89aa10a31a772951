"""Code shared by test modules that is not a fixture (fixtures live in conftest.py).

:func:`replay_history` drives a store through a random history of writes, deletes, re-trains,
rollbacks and rows written past the store's writer; the index tests (search index, token index,
token-filtered reads) replay one and then compare the indexed answers with the scans.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st

from interlatent import LatentDB, naming
from interlatent.db import SequenceRecord
from interlatent.vis import queries

Record = Callable[..., SequenceRecord]  # (rng, layers, n_positions, prompt_index=None) -> a record
Block = Callable[[np.random.Generator, int], np.ndarray]  # (rng, n_positions) -> [n_positions, width]

ROLLED_BACK = (" rolled", " back")  # the tokens of writes that are rolled back: never found afterwards
INNER = (" inner",)


def history(ops: Sequence[str], max_size: int) -> st.SearchStrategy:
    """Random histories: lists of ``(op, seed)`` with ops drawn from ``ops`` (repeat one to draw it
    more often)."""
    return st.lists(st.tuples(st.sampled_from(list(ops)), st.integers(0, 2**31)), min_size=1, max_size=max_size)


def replay_history(db: LatentDB, ops: Sequence[tuple[str, int]], *, record: Record, block: Block,
                   dtype: str | None = None, words: Sequence[str | None] = ()) -> None:
    """Apply ``ops`` to ``db``: ``write`` (1-3 runs of new prompts on L0, or L0 and L1), ``late``
    (prompts with explicit indices below those written: out of order), ``delete_layer``,
    ``delete_sequence``, ``retokenise`` (a tokens row rewritten past the writer, with texts drawn
    from ``words``), ``retrain`` (a layer built aside in two writes and swapped in, as a backfill
    does), ``rollback`` and ``inner_rollback`` (writes undone: checked to leave no trace).
    ``dtype``: of every layer written; None draws float16 or float32 per op."""
    free = iter(range(1000, 0, -7))
    for op, seed in ops:
        rng = np.random.default_rng(seed)
        stored = db.layers()
        kind = dtype or ("float16" if seed % 2 else "float32")
        if op in ("write", "late"):
            layers = ["L0", "L1"][: 1 + seed % 2]
            with db.run() as run:
                for _ in range(1 + seed % 3):
                    index = next(free) if op == "late" else None
                    run.write([record(rng, layers, int(rng.integers(1, 7)), prompt_index=index)
                               for _ in range(1 if index is not None else 1 + seed % 3)],
                              dtypes=dict.fromkeys(layers, kind))
        elif op == "delete_layer" and stored:
            db.delete_layer(stored[seed % len(stored)])
        elif op == "delete_sequence" and db.prompt_indices():
            delete_sequence(db, db.prompt_indices()[seed % len(db.prompt_indices())])
        elif op == "retokenise" and db.prompt_indices():
            retokenise(db, db.prompt_indices()[seed % len(db.prompt_indices())], rng, words)
        elif op == "retrain" and db.prompt_indices():
            name, built = "Llat", naming.building_name("Llat")
            with db.run(kind="train") as run:
                seqs = db.sequences()
                items = [(p, block(rng, int(n))) for p, n in zip(seqs["prompt_index"], seqs["n_positions"])]
                half = max(1, len(items) // 2)
                db.write_activations(run.run_id, built, items[:half], dtype=kind)
                db.write_activations(run.run_id, built, items[half:], dtype=kind)
                db.replace_layer(built, name)
        elif op == "rollback":
            before = {n: queries.search_rows(db, layer=n, top=5) for n in stored}
            with pytest.raises(RuntimeError), db.atomic(), db.run() as run:
                run.write([_spoken(record(rng, ["L0", "L1"], 4), ROLLED_BACK)],
                          dtypes=dict.fromkeys(["L0", "L1"], kind))
                raise RuntimeError("interrupted")
            assert {n: queries.search_rows(db, layer=n, top=5) for n in stored} == before
            assert db.token_positions(ROLLED_BACK[0]) == {}
        elif op == "inner_rollback":
            with db.atomic(), db.run() as run:
                with pytest.raises(RuntimeError), db.atomic():
                    run.write([_spoken(record(rng, ["L0"], 3), INNER)], dtypes={"L0": kind})
                    raise RuntimeError("inner")
                run.write([record(rng, ["L0"], 2)], dtypes={"L0": kind})
            assert db.token_positions(INNER[0]) == {}


def _spoken(rec: SequenceRecord, words: Sequence[str]) -> SequenceRecord:
    """``rec`` with its token texts replaced by ``words``, repeated."""
    for i in range(len(rec.tokens)):
        rec.tokens[i] = words[i % len(words)]
    return rec


def delete_sequence(db: LatentDB, prompt_index: int) -> None:
    """What a delete of one sequence does to its rows (the store's triggers keep the token index)."""
    with db.atomic() as conn:
        (seq_id,), = conn.execute("SELECT seq_id FROM sequences WHERE prompt_index=?", (prompt_index,)).fetchall()
        for table in ("activations", "token_metrics", "tokens", "sequences"):
            conn.execute(f"DELETE FROM {table} WHERE seq_id=?", (seq_id,))


def raw_sql(path: Path, sql: str, params: tuple = ()) -> None:
    """A write by another program, on its own connection: the store's own code does not run."""
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, params)
    conn.close()


def retokenise(db: LatentDB, prompt_index: int, rng: np.random.Generator, words: Sequence[str | None]) -> None:
    """The tokens row rewritten by a program that bypassed the store's writer."""
    if not words:
        raise ValueError("retokenise needs the words to draw token texts from; got none")
    (seq_id, n), = db._q("SELECT seq_id, n_positions FROM sequences WHERE prompt_index=?", (prompt_index,))
    texts = [words[j] for j in rng.integers(0, len(words), n)]
    raw_sql(db.path, "UPDATE tokens SET tokens=? WHERE seq_id=?", (json.dumps(texts), seq_id))
