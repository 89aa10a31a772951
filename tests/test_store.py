"""LatentDB: round trips, dtypes, runs, stats, concurrency, schema versions, literal SQL strings."""

from __future__ import annotations

import os
import sqlite3

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent.db import SequenceRecord, SparseActs
from interlatent.db.schema import LATEST_VERSION, MIGRATIONS
from interlatent.errors import (
    ConfigError,
    DatabaseNotFoundError,
    DtypeRangeError,
    LayerExistsError,
    LayerNotFoundError,
    ReadOnlyError,
    SchemaVersionError,
    ShapeError,
)


def make_records(rng, n_seq=4, width=8, layer="llm.layer.0", lengths=None, texts=None, labels=None,
                 metrics=None, scale=1.0):
    out = []
    for i in range(n_seq):
        n = lengths[i] if lengths else int(rng.integers(3, 9))
        text = texts[i] if texts else f"prompt {i}"
        out.append(SequenceRecord(
            token_ids=rng.integers(0, 100, n).tolist(),
            tokens=[f"t{j}" for j in range(n)],
            activations={layer: (rng.standard_normal((n, width)) * scale).astype(np.float32)},
            text=text,
            label=labels[i] if labels else None,
            metrics={k: f(n) for k, f in (metrics or {}).items()},
        ))
    return out


def test_round_trip_float32_exact_and_float16_close(tmp_path, rng):
    db = LatentDB(tmp_path / "a.db")
    recs32 = make_records(rng, layer="exact")
    recs16 = make_records(rng, layer="half", lengths=[len(r.tokens) for r in recs32])
    for r16, r32 in zip(recs16, recs32):  # same sequences, two layers
        r32.activations["half"] = r16.activations["half"]
    with db.run(model="m") as run:
        run.write(recs32, dtypes={"exact": "float32"})
    want = np.concatenate([r.activations["exact"] for r in recs32])
    got = db.fetch_activations("exact").values
    assert got.dtype == np.float32 and np.array_equal(got, want)
    want16 = np.concatenate([r.activations["half"] for r in recs32])
    got16 = db.fetch_activations("half").values
    assert np.allclose(got16, want16, rtol=1e-3, atol=1e-3)
    assert not np.array_equal(got16, want16)  # it really was stored at half precision
    assert db.layer_info("half").dtype == "float16"
    db.close()


def test_bfloat16_round_trip(tmp_path, rng):
    with LatentDB(tmp_path / "b.db") as db:
        recs = make_records(rng, layer="bf", scale=1e6)
        with db.run() as run:
            run.write(recs, dtypes={"bf": "bfloat16"})
        want = np.concatenate([r.activations["bf"] for r in recs])
        got = db.fetch_activations("bf").values
        assert np.allclose(got, want, rtol=1 / 128)  # bfloat16 keeps 8 bits of mantissa
        assert np.abs(got).max() > 65504  # and float32's range


def test_float16_overflow_promotes_row_or_raises(tmp_path, rng):
    db = LatentDB(tmp_path / "c.db")
    recs = make_records(rng, n_seq=2, lengths=[3, 3])
    recs[1].activations["llm.layer.0"][1, 2] = 1e6
    with db.run() as run:
        run.write(recs)
    got = db.fetch_activations("llm.layer.0").values
    assert got[4, 2] == np.float32(1e6)  # not clipped, not inf
    db.close()
    strict = LatentDB(tmp_path / "d.db", float16_overflow="raise")
    with pytest.raises(DtypeRangeError, match="float32"):
        with strict.run() as run:
            run.write(make_records(rng, n_seq=1, lengths=[2], scale=1e6))
    assert strict.layers() == []  # nothing of the failed batch is visible
    assert strict.runs()["status"].tolist() == ["interrupted"]


def test_sparse_round_trip_and_channel_selection(tmp_path, rng):
    db = LatentDB(tmp_path / "s.db")
    idx = np.stack([rng.choice(64, 4, replace=False) for _ in range(5)])
    vals = rng.random((5, 4)).astype(np.float32) + 0.1
    rec = SequenceRecord([0] * 5, list("abcde"), {"latent_sae:x": SparseActs(idx, vals, 64)}, text="t")
    with db.run() as run:
        run.write([rec], dtypes={"latent_sae:x": "float32"})
    dense = db.fetch_activations("latent_sae:x").values
    assert dense.shape == (5, 64) and np.array_equal(dense, rec.activations["latent_sae:x"].to_dense())
    chans = [int(idx[0, 0]), int(idx[3, 1]), 63]
    sub = db.fetch_activations("latent_sae:x", channels=chans).values
    assert np.array_equal(sub, dense[:, chans])
    assert db.layer_info("latent_sae:x").storage == "sparse"
    assert db.layer_info("latent_sae:x").kind == "latent_sae"


def test_filters_limit_and_metadata(tmp_path, rng):
    db = LatentDB(tmp_path / "f.db")
    recs = make_records(rng, n_seq=3, lengths=[4, 5, 6], texts=["the sky is", "a blue sea", "sky high up"],
                        labels=["a", "b", "a"], metrics={"loss": lambda n: np.arange(n, dtype=float)})
    recs[0].tokens = ["the", " sky", " is", " blue"]
    with db.run() as run:
        run.write(recs)
    full = db.fetch_activations("llm.layer.0")
    assert len(full.tokens) == 15 and full.values.shape == (15, 8)
    one = db.fetch_activations("llm.layer.0", prompt_index=1)
    assert one.tokens["prompt_index"].unique().tolist() == [1]
    assert np.allclose(one.values, full.values[4:9])
    sky = db.fetch_activations("llm.layer.0", token_like="SKY")
    assert sky.tokens["token"].tolist() == [" sky"]
    assert np.allclose(sky.values, full.values[1:2])
    assert db.fetch_activations("llm.layer.0", prompt_like="sky").tokens["prompt_index"].unique().tolist() == [0, 2]
    assert set(db.fetch_activations("llm.layer.0", label="a").tokens["prompt_index"]) == {0, 2}
    assert len(db.fetch_activations("llm.layer.0", limit=7).tokens) == 7
    assert full.tokens["loss"].tolist()[:4] == [0.0, 1.0, 2.0, 3.0]
    assert db.label_classes() == {"a": 0, "b": 1}
    df = db.to_pandas("llm.layer.0", channels=[0, 3])
    assert list(df.columns[-2:]) == ["ch0", "ch3"] and len(df) == 15
    long = db.to_pandas("llm.layer.0", channels=[0, 3], long=True)
    assert len(long) == 30 and np.allclose(long["value"].to_numpy()[1::2], full.values[:, 3])


def test_sql_looking_strings_are_literal(tmp_path, rng):
    evil = "x'); DROP TABLE tokens; --"
    db = LatentDB(tmp_path / "q.db")
    recs = make_records(rng, n_seq=3, lengths=[2, 2, 2], texts=[evil, "100% sure", "plain"])
    recs[0].tokens = ["%", evil]
    recs[1].tokens = ["_", "a_b"]
    with db.run() as run:
        run.write(recs)
    assert db.sequences()["text"].tolist() == [evil, "100% sure", "plain"]
    assert db.fetch_activations("llm.layer.0", token_like="%").tokens["token"].tolist() == ["%"]
    assert db.fetch_activations("llm.layer.0", token_like="_").tokens["token"].tolist() == ["_", "a_b"]
    assert db.fetch_activations("llm.layer.0", prompt_like="%").tokens["prompt_index"].unique().tolist() == [1]
    assert db.fetch_activations("llm.layer.0", prompt_like="DROP TABLE").values.shape[0] == 2
    assert len(db.tokens()) == 6  # the tokens table is still there


def test_interrupted_run_keeps_committed_batches(tmp_path, rng):
    db = LatentDB(tmp_path / "i.db")
    with pytest.raises(RuntimeError, match="boom"):
        with db.run(model="m") as run:
            run.write(make_records(rng, n_seq=2, lengths=[3, 4]))
            bad = make_records(rng, n_seq=2, lengths=[3, 3])
            bad[1].activations["llm.layer.0"] = np.zeros((2, 8))  # wrong length: whole batch refused
            with pytest.raises(ShapeError):
                run.write(bad)
            raise RuntimeError("boom")
    runs = db.runs()
    assert runs["status"].tolist() == ["interrupted"] and "boom" in runs["error"][0]
    assert len(db.fetch_activations("llm.layer.0").tokens) == 7
    assert len(db.sequences()) == 2
    db.close()
    again = LatentDB(tmp_path / "i.db", mode="r")
    assert again.fetch_activations("llm.layer.0").values.shape == (7, 8)


def test_keyboard_interrupt_marks_run(tmp_path, rng):
    db = LatentDB(tmp_path / "k.db")
    with pytest.raises(KeyboardInterrupt):
        with db.run() as run:
            run.write(make_records(rng, n_seq=1))
            raise KeyboardInterrupt
    assert db.runs()["status"].tolist() == ["interrupted"]


def test_same_prompt_index_adds_layers_or_refuses(tmp_path, rng):
    db = LatentDB(tmp_path / "p.db")
    first = make_records(rng, n_seq=2, lengths=[3, 4])
    with db.run() as run:
        run.write([SequenceRecord(r.token_ids, r.tokens, r.activations, text=r.text, prompt_index=i)
                   for i, r in enumerate(first)])
    second = make_records(rng, n_seq=2, lengths=[3, 4], layer="llm.layer.1")
    with db.run() as run:
        run.write([SequenceRecord(r.token_ids, r.tokens, r.activations, text=r.text, prompt_index=i)
                   for i, r in enumerate(second)])
    assert db.layers() == ["llm.layer.0", "llm.layer.1"] and len(db.sequences()) == 2
    with pytest.raises(LayerExistsError, match="delete_layer"):
        with db.run() as run:
            run.write([SequenceRecord(first[0].token_ids, first[0].tokens, first[0].activations,
                                      text=first[0].text, prompt_index=0)])
    other = make_records(rng, n_seq=1, lengths=[3], texts=["different"])[0]
    other.prompt_index = 0
    with pytest.raises(ConfigError, match="prompt_index 0"):
        with db.run() as run:
            run.write([other])
    other.prompt_index = None
    with db.run() as run:
        assert run.write([other]) == [2]


def test_width_mismatch_is_refused(tmp_path, rng):
    db = LatentDB(tmp_path / "w.db")
    with db.run() as run:
        run.write(make_records(rng, n_seq=1, width=8))
        with pytest.raises(ShapeError, match="width 8"):
            run.write(make_records(rng, n_seq=1, width=9))


def test_stats_and_correlations_match_numpy(tmp_path, rng):
    n_seq, width = 30, 6
    lengths = rng.integers(5, 40, n_seq).tolist()
    metric_fns = {"m_lin": lambda n: rng.standard_normal(n), "m_sq": lambda n: rng.standard_normal(n),
                  "m_partial": lambda n: np.where(rng.random(n) < 0.3, np.nan, rng.standard_normal(n))}
    recs = make_records(rng, n_seq=n_seq, width=width, lengths=lengths, metrics=metric_fns,
                        labels=[["x", "y", "z"][i % 3] for i in range(n_seq)])
    for r in recs:  # plant: channel 0 tracks m_lin, channel 1 tracks m_sq, channel 2 the partial metric
        acts = r.activations["llm.layer.0"]
        acts[:, 0] = 2 * r.metrics["m_lin"] + 0.1 * acts[:, 0]
        acts[:, 1] = -r.metrics["m_sq"] + 0.5 * acts[:, 1]
        acts[:, 2] = np.nan_to_num(r.metrics["m_partial"]) + 0.3 * acts[:, 2]
    db = LatentDB(tmp_path / "st.db")
    with db.run() as run:
        for i in range(0, n_seq, 7):
            run.write(recs[i : i + 7], dtypes={"llm.layer.0": "float32"})
    stored = db.compute_stats(min_count=5, chunk_tokens=50)  # many chunks
    assert stored == {"llm.layer.0": width}
    x = np.concatenate([r.activations["llm.layer.0"] for r in recs]).astype(np.float64)
    blocks = {b.channel: b for b in db.iter_statblocks(layer="llm.layer.0")}
    assert np.allclose([blocks[c].mean for c in range(width)], x.mean(0))
    assert np.allclose([blocks[c].std for c in range(width)], x.std(0))
    assert np.allclose([blocks[c].max for c in range(width)], x.max(0))
    assert [blocks[c].active_count for c in range(width)] == (x > 0).sum(0).tolist()
    label_of_token = np.concatenate([[r.label] * len(r.tokens) for r in recs])
    for name in metric_fns:
        m = np.concatenate([r.metrics[name] for r in recs]).astype(np.float32).astype(np.float64)
        ok = ~np.isnan(m)
        for c in range(width):
            want = np.corrcoef(x[ok, c], m[ok])[0, 1]
            got = dict(blocks[c].top_correlations)[name]
            assert got == pytest.approx(want, abs=1e-9)
    ind = (label_of_token == "y").astype(float)
    assert dict(blocks[3].top_correlations)["label==y"] == pytest.approx(np.corrcoef(x[:, 3], ind)[0, 1])
    assert blocks[0].top_correlations[0][0] == "m_lin" and blocks[0].top_correlations[0][1] > 0.99
    assert blocks[1].top_correlations[0][0] == "m_sq" and blocks[1].top_correlations[0][1] < -0.8
    assert blocks[2].top_correlations[0][0] == "m_partial"
    for b in blocks.values():
        rs = [abs(r) for _, r in b.top_correlations]
        assert rs == sorted(rs, reverse=True)


def test_min_count_skips_dead_channels(tmp_path, rng):
    idx = np.tile(np.array([[0, 1]]), (6, 1))
    idx[0, 1] = 2  # channel 2 fires once; channel 3 never
    rec = SequenceRecord([0] * 6, list("abcdef"), {"latent:l": SparseActs(idx, np.ones((6, 2)), 4)}, text="x")
    db = LatentDB(tmp_path / "mc.db")
    with db.run() as run:
        run.write([rec])
    assert db.compute_stats(min_count=2) == {"latent:l": 2}
    assert [b.channel for b in db.iter_statblocks("latent:l")] == [0, 1]


def test_streaming_chunks_cover_everything_once(tmp_path, rng):
    db = LatentDB(tmp_path / "it.db")
    recs = make_records(rng, n_seq=20, lengths=rng.integers(10, 50, 20).tolist())
    with db.run() as run:
        run.write(recs, dtypes={"llm.layer.0": "float32"})
    want = np.concatenate([r.activations["llm.layer.0"] for r in recs])
    plain = list(db.iter_activations("llm.layer.0", chunk_size=64))
    assert all(c.shape[0] == 64 for c in plain[:-1])
    assert np.array_equal(np.concatenate(plain), want)
    shuffled = list(db.iter_activations("llm.layer.0", chunk_size=64, shuffle=True, seed=3, buffer_tokens=200))
    got = np.concatenate(shuffled)
    assert got.shape == want.shape and not np.array_equal(got, want)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    assert np.array_equal(key(got), key(want))
    again = np.concatenate(list(db.iter_activations("llm.layer.0", chunk_size=64, shuffle=True, seed=3,
                                                    buffer_tokens=200)))
    assert np.array_equal(again, got)


def test_reader_sees_commits_while_writer_writes(tmp_path, rng):
    path = tmp_path / "wal.db"
    writer = LatentDB(path)
    with writer.run() as run:
        run.write(make_records(rng, n_seq=1, lengths=[5]))
    reader = LatentDB(path, mode="r")
    run = writer.start_run()
    # hold a write transaction open, mid-batch, the way a long write would
    writer._conn.execute("BEGIN IMMEDIATE")
    writer._write_sequence(writer._conn, run.run_id, make_records(rng, n_seq=1, lengths=[4])[0], 7, {})
    assert reader.fetch_activations("llm.layer.0").values.shape == (5, 8)  # not blocked by the writer
    assert reader.sequences()["prompt_index"].tolist() == [0]  # and no half-written batch visible
    writer._conn.execute("COMMIT")
    assert reader.sequences()["prompt_index"].tolist() == [0, 7]
    with pytest.raises(ReadOnlyError):
        reader.start_run()


def test_missing_path_is_an_error_and_creates_nothing(tmp_path):
    path = tmp_path / "nope" / "missing.db"
    with pytest.raises(DatabaseNotFoundError, match="missing.db"):
        LatentDB(path, mode="r")
    assert not path.exists() and not path.parent.exists()
    with pytest.raises(FileNotFoundError):  # the builtin still catches it
        LatentDB(str(path), mode="r")


def test_uri_forms(tmp_path, rng):
    path = tmp_path / "u.db"
    with LatentDB(f"sqlite:///{path}") as db:
        with db.run() as run:
            run.write(make_records(rng, n_seq=1))
    with LatentDB(str(path), mode="r") as db:
        assert db.layers() == ["llm.layer.0"]
    with pytest.raises(ConfigError, match="three slashes"):
        LatentDB("sqlite://relative.db")


def test_unknown_and_newer_schema_versions_raise(tmp_path, rng):
    path = tmp_path / "v.db"
    LatentDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations(version, name, applied_at) VALUES (999, 'future', 'x')")
    conn.commit()
    conn.close()
    for mode in ("rw", "r"):
        with pytest.raises(SchemaVersionError, match="999"):
            LatentDB(path, mode=mode)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE things (x)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match="not an Interlatent store"):
        LatentDB(foreign)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(SchemaVersionError):
        LatentDB(garbage, mode="r")
    assert garbage.read_bytes() == b"not sqlite at all" * 100


def test_unknown_layer_suggests_close_names(tmp_path, rng):
    db = LatentDB(tmp_path / "l.db")
    with db.run() as run:
        run.write(make_records(rng, n_seq=1), layer_meta={"llm.layer.0": {"n_blocks": 2,
                                                                          "hook_name": "blocks.0.hook_resid_post"}})
    with pytest.raises(LayerNotFoundError, match="llm.layer.0"):
        db.fetch_activations("llm.layer.O")
    assert db.resolve_layer("llm.layer.-2") == "llm.layer.0"
    assert db.resolve_layer("blocks.0.hook_resid_post") == "llm.layer.0"
    with pytest.raises(KeyError):
        db.fetch_activations("nothing-like-it")


def test_artifacts_examples_and_interventions(tmp_path, rng):
    db = LatentDB(tmp_path / "art.db")
    recs = make_records(rng, n_seq=5, width=4, lengths=[6] * 5)
    recs[3].activations["llm.layer.0"][2, 1] = 50.0
    with db.run() as run:
        run.write(recs, dtypes={"llm.layer.0": "float32"})
    assert db.compute_latent_examples("llm.layer.0", top=3) == 12
    ex = db.latent_examples("llm.layer.0", channel=1)
    assert ex.iloc[0][["prompt_index", "position", "value"]].tolist() == [3, 2, 50.0]
    x = np.concatenate([r.activations["llm.layer.0"] for r in recs])
    assert np.allclose(db.latent_examples("llm.layer.0", channel=2)["value"], np.sort(x[:, 2])[::-1][:3])
    aid = db.add_artifact("sae", "sae", architecture="topk", layer="llm.layer.0", path="/x.safetensors",
                          config={"k": 4}, metrics={"fvu": 0.1})
    art = db.get_artifact(aid)
    assert art["config"] == {"k": 4} and art["metrics"]["fvu"] == 0.1
    assert db.artifacts()["name"].tolist() == ["sae"]
    db.add_intervention("latent:llm.layer.0", "ablate", {"latents": [1]}, {"kl": 0.5})
    assert db.interventions().iloc[0]["results"] == {"kl": 0.5}
    db.delete_layer("llm.layer.0")
    assert db.layers() == []
    with pytest.raises(LayerNotFoundError):
        db.latent_examples("llm.layer.0")  # its examples went with it


def test_bad_metric_values_are_refused(tmp_path, rng):
    db = LatentDB(tmp_path / "bm.db")
    rec = make_records(rng, n_seq=1, lengths=[2])[0]
    rec.metrics = {"word": ["a", "b"]}
    with db.run() as run:
        with pytest.raises(ConfigError, match="context"):
            run.write([rec])
    assert db.sequences().empty


def test_durability_modes(tmp_path, rng):
    fast = LatentDB(tmp_path / "fast.db", durability="process")
    assert fast._conn.execute("PRAGMA synchronous").fetchone()[0] == 0  # OFF
    with fast.run() as run:
        run.write(make_records(rng, n_seq=2))
    fast.close()
    safe = LatentDB(tmp_path / "fast.db")
    assert safe._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert len(safe.sequences()) == 2
    with pytest.raises(ConfigError, match="durability"):
        LatentDB(tmp_path / "x.db", durability="none")


def test_explanations_round_trip_validate_and_go_with_their_layer(tmp_path, rng):
    db = LatentDB(tmp_path / "ex.db")
    with db.run() as run:
        run.write(make_records(rng, n_seq=2))
    width = db.layer_info("llm.layer.0").width
    assert db.set_explanations("llm.layer.0", {1: "  <b>sky</b> words ", 3: "colours"}, source="manual") == 2
    db.set_explanations("llm.layer.0", {3: "colour names"}, source="some-model", scores={3: 0.71})
    ex = db.explanations("llm.layer.0")
    assert ex["channel"].tolist() == [1, 3] and ex["text"].tolist() == ["<b>sky</b> words", "colour names"]
    assert ex["source"].tolist() == ["manual", "some-model"] and ex["score"].iloc[1] == pytest.approx(0.71)
    with pytest.raises(ConfigError, match=f"valid 0..{width - 1}"):
        db.set_explanations("llm.layer.0", {width: "too far"})
    with pytest.raises(ConfigError, match="non-empty string"):
        db.set_explanations("llm.layer.0", {0: "  "})
    assert len(db.explanations("llm.layer.0")) == 2  # a refused batch writes nothing
    db.delete_layer("llm.layer.0")
    with db.run() as run:  # the same name again, possibly the same row id: no stale explanations
        run.write(make_records(rng, n_seq=1))
    assert db.explanations("llm.layer.0").empty


def test_a_version_1_store_is_migrated_when_opened_writable(tmp_path, rng):
    path = tmp_path / "old.db"
    with LatentDB(path) as db, db.run() as run:
        run.write(make_records(rng, n_seq=1))
    conn = sqlite3.connect(path)  # make it what the first schema wrote
    conn.execute("DROP TABLE latent_explanations")
    conn.execute("DROP INDEX sequences_text")
    conn.execute("DROP TABLE logit_effects")
    for table, column in (("activations", "shard_id"), ("activations", "shard_row")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("DROP TABLE shards")
    conn.execute("DROP TABLE store_settings")
    for table, column in (("runs", "owner_host"), ("runs", "owner_pid"), ("runs", "owner_started"),
                          ("activations", "run_id")):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("DELETE FROM schema_migrations WHERE version > 1")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaVersionError, match="open it once writable"):
        LatentDB(path, mode="r")
    with LatentDB(path) as db:
        assert db.schema_version == LATEST_VERSION and db.explanations("llm.layer.0").empty
        assert db.activation_tier == "sqlite"  # a store from before the tiers keeps its blobs
        assert db.runs()["owner_pid"].isna().all()  # runs written before owners were recorded
        assert db.n_tokens("llm.layer.0") > 0  # nothing stored was lost
    with LatentDB(path, mode="r") as db:
        assert db.layers() == ["llm.layer.0"]


def test_json_column_decode_treats_none_and_nan_as_missing():
    from interlatent.db.store import decode_json

    assert decode_json(None) is None  # pandas 2 hands NULL over as None
    assert decode_json(float("nan")) is None  # pandas 3 as NaN
    assert decode_json(np.float64("nan"), default={}) == {}
    assert decode_json('{"a": 1}') == {"a": 1}
    assert decode_json('"x"') == "x" and decode_json("3") == 3


def test_a_null_label_among_labelled_prompts_keeps_the_store_readable(tmp_path, rng, tiny_tl):
    from interlatent import LLMCollector

    db = LatentDB(tmp_path / "null_label.db")
    recs = make_records(rng, n_seq=3, layer="custom", labels=["pos", "neg", "pos"],
                        metrics={"m": lambda n: np.arange(n)})
    recs[1].label = None
    with db.run() as run:
        run.write(recs)
    seqs = db.sequences()
    assert seqs["label"].tolist() == ["pos", None, "pos"]  # None, not NaN, not an error
    assert db.sequences(label="pos")["prompt_index"].tolist() == [0, 2]
    toks = db.tokens()
    assert toks.loc[toks["prompt_index"] == 1, "label"].isna().all()
    assert set(toks.loc[toks["prompt_index"] != 1, "label"]) == {"pos"}
    assert len(db.fetch_activations("custom").tokens) == len(toks)
    assert sum(v.shape[0] for v, _ in db.iter_activation_chunks("custom")) == len(toks)
    assert db.compute_stats(min_count=1)["custom"] > 0
    assert db.runs()["config"].tolist() == [{}]
    # further collection into the same store works, and adds prompts after the stored ones
    LLMCollector(db, layer_indices=[0], batch_size=2).run(tiny_tl, prompts=["the sky is blue", "a cat sat"])
    assert db.sequences()["prompt_index"].tolist() == [0, 1, 2, 3, 4]
    assert db.token_lists([1])[1][2] is None
    db.close()


_OPEN_AT_ONCE = """
import sys, time
import numpy as np
from interlatent.db.store import LatentDB
from interlatent.db import SequenceRecord
path, start, who = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
while time.time() < start:  # every process opens the new store at the same moment
    time.sleep(0.001)
db = LatentDB(path)
rec = SequenceRecord(token_ids=[1, 2], tokens=["a", "b"], text=f"writer {who}",
                     activations={"layer": np.full((2, 3), who, dtype=np.float32)})
with db.run(model=f"writer {who}") as run:
    run.write([rec], dtypes={"layer": "float32"})
db.close()
"""


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    import os
    import subprocess
    import sys
    import time

    path = tmp_path / "race.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(path), str(start), str(i)], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(errors)
    with LatentDB(path) as db:
        assert db._q("PRAGMA integrity_check") == [("ok",)]
        assert db._q("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='sequences'"
                     " AND name='sequences_text'") == [("sequences_text",)]
        assert [v for v, in db._q("SELECT version FROM schema_migrations ORDER BY version")] == \
            [m.version for m in MIGRATIONS]
        assert sorted(db.sequences()["text"]) == [f"writer {i}" for i in range(6)]
        assert db.runs()["status"].tolist() == ["complete"] * 6
        got = {t: float(v) for t, v in zip(db.fetch_activations("layer").tokens["prompt_index"],
                                           db.fetch_activations("layer").values[:, 0])}
        texts = dict(zip(db.sequences()["prompt_index"], db.sequences()["text"]))
        assert all(texts[p] == f"writer {int(v)}" for p, v in got.items())


_WRITE_SLOWLY = """
import sys, time
import numpy as np
from interlatent.db.store import LatentDB
from interlatent.db import SequenceRecord
path, progress = sys.argv[1], sys.argv[2]
db = LatentDB(path)
with db.run(model="slow") as run:
    for b in range(1000):
        recs = [SequenceRecord(token_ids=[1, 2, 3], tokens=["a", "b", "c"], text=f"b{b} p{i}",
                               activations={"layer": np.full((3, 4), b, dtype=np.float32)}) for i in range(2)]
        run.write(recs, dtypes={"layer": "float32"})
        with open(progress, "a") as f:
            f.write(f"{b}\\n")
        time.sleep(0.02)
"""


def _start_slow_writer(tmp_path, name):
    import os
    import subprocess
    import sys
    import time

    path, progress = tmp_path / f"{name}.db", tmp_path / f"{name}.progress"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_SLOWLY, str(path), str(progress)], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while (not progress.exists() or len(progress.read_text().split()) < 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    return proc, path, progress


def _check_committed_batches(db, progress):
    """Every batch the writer reported committed is stored whole, with its own values."""
    done = [int(b) for b in progress.read_text().split()]
    seqs = db.sequences()
    acts = db.fetch_activations("layer")
    by_prompt = dict(zip(seqs["prompt_index"], seqs["text"]))
    for pidx, value in zip(acts.tokens["prompt_index"], acts.values[:, 0]):
        assert by_prompt[pidx].startswith(f"b{int(value)} ")
    batches = {t.split()[0] for t in seqs["text"]}
    assert {f"b{b}" for b in done} <= batches  # nothing reported committed is lost
    assert len(seqs) == 2 * len(batches) and len(acts.values) == 3 * len(seqs)  # no half batch
    assert db._q("PRAGMA integrity_check") == [("ok",)]
    return len(batches)


def test_sigterm_during_a_run_marks_it_interrupted(tmp_path):
    import signal

    proc, path, progress = _start_slow_writer(tmp_path, "term")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err  # exits as SIGTERM asks, after marking the run
    with LatentDB(path, mode="r") as db:
        runs = db.runs()
        assert runs["status"].tolist() == ["interrupted"], runs
        assert "SIGTERM" in runs["error"][0]
        assert _check_committed_batches(db, progress) >= 3


def test_sigkilled_run_is_marked_interrupted_on_reopen(tmp_path):
    import signal

    proc, path, progress = _start_slow_writer(tmp_path, "kill")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    with LatentDB(path, mode="r") as ro:  # read-only: reported as stale, nothing written
        runs = ro.runs()
        assert runs["status"].tolist() == ["running"] and runs["stale"].tolist() == [True]
        assert ro.layer_completeness("layer").runs == {1: "running (stale)"}
    with LatentDB(path) as db:
        runs = db.runs()
        assert runs["status"].tolist() == ["interrupted"] and not runs["stale"].any()
        assert runs["error"][0] == "owner process gone (killed?)"
        n = _check_committed_batches(db, progress)
        report = db.layer_completeness("layer")
        assert not report.complete and report.n_incomplete_prompts == 2 * n == report.n_prompts


def test_a_live_writers_run_stays_running_until_its_process_dies(tmp_path):
    import signal

    proc, path, _ = _start_slow_writer(tmp_path, "live")
    try:
        with LatentDB(path) as db:
            assert db.runs()["status"].tolist() == ["running"]  # another live process: left alone
            assert db.stale_runs() == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    with LatentDB(path) as db:
        assert db.runs()["status"].tolist() == ["interrupted"]


def test_a_reused_pid_does_not_keep_a_dead_run_alive(tmp_path, rng):
    import os

    from interlatent.db.store import process_identity

    db = LatentDB(tmp_path / "reuse.db")
    run = db.start_run()
    run.write(make_records(rng, n_seq=1))
    assert db.stale_runs() == []  # this process owns it
    if process_identity(os.getpid()) is None:
        pytest.skip("no /proc here: a reused pid cannot be told apart")
    # the same pid, started at another time: another process now holds the dead owner's pid
    db._conn.execute("UPDATE runs SET owner_started='another-boot:1' WHERE run_id=?", (run.run_id,))
    assert db.stale_runs() == [run.run_id]
    db.close()
    with LatentDB(tmp_path / "reuse.db") as again:
        assert again.runs()["status"].tolist() == ["interrupted"]


def test_run_installs_and_restores_the_sigterm_handler(tmp_path, rng):
    import signal
    import threading

    from interlatent.errors import Terminated

    heard = []

    def previous(signum, frame):
        heard.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        db = LatentDB(tmp_path / "h.db")
        with pytest.raises(Terminated):
            with db.run() as outer:
                with db.run() as inner:  # nested runs share the handler
                    inner.write(make_records(rng, n_seq=1))
                assert signal.getsignal(signal.SIGTERM) is not previous  # still armed for the outer run
                outer.write(make_records(rng, n_seq=1))
                signal.raise_signal(signal.SIGTERM)
        assert heard == [signal.SIGTERM]  # the previous handler was chained
        assert signal.getsignal(signal.SIGTERM) is previous  # and restored
        assert db.runs()["status"].tolist() == ["interrupted", "complete"]
        assert "SIGTERM" in db.runs()["error"][0]
        assert len(db.sequences()) == 2  # committed batches kept
        seen = []

        def in_thread():
            with LatentDB(tmp_path / "h.db") as own, own.run():
                seen.append(signal.getsignal(signal.SIGTERM))

        worker = threading.Thread(target=in_thread)  # a run in another thread leaves signals alone
        worker.start()
        worker.join()
        assert seen == [previous] and db.runs()["status"].tolist()[-1] == "complete"
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with db.run():  # an ignored SIGTERM stays ignored
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        db.close()
    finally:
        signal.signal(signal.SIGTERM, old)


def test_check_complete_warns_or_raises_and_latent_layers_inherit(tmp_path, rng):
    from interlatent.db import SparseActs
    from interlatent.errors import IncompleteDataWarning, IncompleteRunError

    db = LatentDB(tmp_path / "cc.db")
    with db.run() as run:
        run.write(make_records(rng, n_seq=3))
    assert db.check_complete("llm.layer.0").complete  # no warning for a complete layer
    with pytest.raises(KeyboardInterrupt):
        with db.run() as run:
            run.write(make_records(rng, n_seq=2))
            raise KeyboardInterrupt
    report = db.layer_completeness("llm.layer.0")
    assert report.runs == {1: "complete", 2: "interrupted"} and report.prompts == {1: 3, 2: 2}
    assert report.incomplete_runs == [2] and report.n_incomplete_prompts == 2 and not report.complete
    with pytest.warns(IncompleteDataWarning, match=r"training uses layer 'llm.layer.0'.*2 of its 5 prompts.*run 2 "
                                                   r"\(interrupted\).*allow_incomplete=True"):
        db.check_complete("llm.layer.0", what="training")
    with pytest.raises(IncompleteRunError, match="Resume or redo"):
        db.check_complete("llm.layer.0", action="raise")
    with pytest.raises(RuntimeError):  # the builtin still catches it
        db.check_complete("llm.layer.0", action="raise")
    db.check_complete("llm.layer.0", action="raise", allow_incomplete=True)
    with pytest.raises(ConfigError, match="action"):
        db.check_complete("llm.layer.0", action="maybe")
    # a latent layer backfilled by a complete run from that layer is still incomplete
    with db.run(kind="train") as run:
        items = [(p, SparseActs(np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32), 4))
                 for p, n in zip(db.sequences()["prompt_index"], db.sequences()["n_positions"])]
        db.write_activations(run.run_id, "latent_sae:llm.layer.0", items,
                             layer_meta={"source": "llm.layer.0", "in_layer": "llm.layer.0"})
    latent = db.layer_completeness("latent_sae:llm.layer.0")
    assert latent.runs == {3: "complete"} and not latent.complete
    assert [s.layer for s in latent.sources] == ["llm.layer.0"]
    with pytest.warns(IncompleteDataWarning, match="computed from 'llm.layer.0'"):
        db.check_complete("latent_sae:llm.layer.0")
    db.close()


_AS_ANOTHER_USER = """
import json, os, sys
import numpy as np, pandas, pandas.io.sql  # imported before dropping root: the stdlib lives under /root
from interlatent.db.store import LatentDB
from interlatent.errors import ReadOnlyError
if os.geteuid() == 0:  # root ignores file modes: read as 'nobody', for whom they hold
    os.setgid(65534)
    os.setuid(65534)
out = {}
for name, path, mode in json.loads(sys.argv[1]):
    try:
        db = LatentDB(path, mode=mode)
        out[name] = {"values": db.fetch_activations("layer").values.tolist()}
        try:
            db.start_run()
        except ReadOnlyError as exc:
            out[name]["write"] = "ReadOnlyError: " + str(exc)
        db.close()
    except Exception as exc:
        out[name] = {"error": type(exc).__name__ + ": " + str(exc)}
print(json.dumps(out))
"""


@pytest.fixture
def shared_dir():
    """A temporary folder another user can enter (pytest's tmp_path is private to root)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="interlatent-ro-")
    os.chmod(path, 0o755)
    yield path
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    shutil.rmtree(path)


def _store_with(path, values, *, keep_wal=False):
    db = LatentDB(path)
    if keep_wal:
        db._conn.execute("PRAGMA wal_autocheckpoint = 0")
    rec = SequenceRecord(token_ids=[1, 2], tokens=["a", "b"], text="x",
                         activations={"layer": np.asarray(values, dtype=np.float32)})
    with db.run() as run:
        run.write([rec], dtypes={"layer": "float32"})
    return db


def test_a_store_in_a_read_only_folder_reads_and_refuses_writes(shared_dir):
    import json
    import pwd
    import shutil
    import subprocess
    import sys

    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root without a 'nobody' user: file modes cannot be enforced")
    values = [[1.0, 2.0], [3.0, 4.0]]
    folders = {}
    for name in ("plain", "wal_and_shm", "wal_only", "writable_folder"):
        folders[name] = os.path.join(shared_dir, name)
        os.mkdir(folders[name])
    _store_with(os.path.join(folders["plain"], "s.db"), values).close()  # closed: no -wal left
    _store_with(os.path.join(folders["writable_folder"], "s.db"), values).close()
    live = _store_with(os.path.join(shared_dir, "live.db"), values, keep_wal=True)  # as if killed mid-run
    for name, files in (("wal_and_shm", ["live.db", "live.db-wal", "live.db-shm"]), ("wal_only", ["live.db",
                                                                                                 "live.db-wal"])):
        for f in files:
            shutil.copy(os.path.join(shared_dir, f), os.path.join(folders[name], f.replace("live", "s")))
    live.close()
    before = {}
    for name, folder in folders.items():
        for f in os.listdir(folder):
            os.chmod(os.path.join(folder, f), 0o444)
            before[(name, f)] = open(os.path.join(folder, f), "rb").read()
        os.chmod(folder, 0o777 if name == "writable_folder" else 0o555)
    cases = [["ro", f"{folders['plain']}/s.db", "r"], ["rw", f"{folders['plain']}/s.db", "rw"],
             ["new", f"{folders['plain']}/new.db", "rw"], ["wal_and_shm", f"{folders['wal_and_shm']}/s.db", "r"],
             ["wal_only", f"{folders['wal_only']}/s.db", "r"], ["file_rw", f"{folders['writable_folder']}/s.db", "rw"],
             ["file_ro", f"{folders['writable_folder']}/s.db", "r"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _AS_ANOTHER_USER, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["ro"]["values"] == values  # an immutable read: the folder cannot hold a -shm file
    assert got["ro"]["write"].startswith("ReadOnlyError") and "mode='rw'" in got["ro"]["write"]
    assert got["rw"]["error"].startswith("ReadOnlyError") and "mode='r'" in got["rw"]["error"]
    assert f"{folders['plain']}/s.db" in got["rw"]["error"]
    assert got["new"]["error"].startswith("ReadOnlyError: cannot create the store")
    assert "not writable" in got["new"]["error"]
    assert got["wal_and_shm"]["values"] == values  # the log's writes are read, through its existing -shm
    assert got["wal_only"]["error"].startswith("ReadOnlyError") and "s.db-wal" in got["wal_only"]["error"]
    assert "LatentDB(path)" in got["wal_only"]["error"]
    assert got["file_rw"]["error"].startswith("ReadOnlyError") and "the file is read-only" in got["file_rw"]["error"]
    assert got["file_ro"]["values"] == values
    for (name, f), data in before.items():  # nothing stored was touched
        path = os.path.join(folders[name], f)
        if not f.endswith("-shm"):
            assert open(path, "rb").read() == data, (name, f)
    assert not os.path.exists(f"{folders['plain']}/new.db")


def test_a_directory_or_a_file_in_the_path_is_a_clear_error(tmp_path):
    for mode in ("rw", "r"):
        with pytest.raises(ConfigError, match="is a directory; give the store's file path"):
            LatentDB(tmp_path, mode=mode)
    (tmp_path / "plain.txt").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        LatentDB(tmp_path / "plain.txt" / "s.db")
    assert (tmp_path / "plain.txt").read_text() == "not a folder"


def test_sigterm_while_a_run_is_being_closed_still_records_its_status(tmp_path, rng, monkeypatch):
    import signal

    from interlatent.errors import Terminated

    db = LatentDB(tmp_path / "closing.db")
    finish = db.finish_run

    def finish_after_a_sigterm(run_id, status="complete", error=None):
        signal.raise_signal(signal.SIGTERM)  # arrives while the status is written
        finish(run_id, status, error)

    heard = []

    def record(signum, frame):
        heard.append(signum)

    monkeypatch.setattr(db, "finish_run", finish_after_a_sigterm)
    before = signal.signal(signal.SIGTERM, record)
    try:
        with pytest.raises(Terminated):
            with db.run() as run:
                run.write(make_records(rng, n_seq=1))
        with pytest.raises(Terminated):
            with db.run():
                raise Terminated()
        assert signal.getsignal(signal.SIGTERM) is record
    finally:
        signal.signal(signal.SIGTERM, before)
    assert db.runs()["status"].tolist() == ["complete", "interrupted"]  # the signal waited for the status
    assert heard == [signal.SIGTERM, signal.SIGTERM]
    db.close()
