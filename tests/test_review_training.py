"""Training-side review findings: non-finite features, artifact folders that never overwrite
another artifact, messages that name the real cause, and read-only stores refused up front."""

from __future__ import annotations

import hashlib
import logging
import shutil

import numpy as np
import pytest
import torch

from interlatent import LatentDB, naming
from interlatent.analysis.models import WEIGHTS_NAME, load_module
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline, train_linear_probe
from interlatent.analysis.train import pipelines as pipelines_mod
from interlatent.analysis.train import probe as probe_mod
from interlatent.db import SequenceRecord
from interlatent.errors import ArtifactError, NotEnoughDataError, ReadOnlyError, TrainingDivergedError

D, POS, LAYER = 6, 5, "llm.layer.0"
FAST = dict(k=2, d_sae=12, steps=5, batch_size=16, progress=False)


def _store(path, *, n=16, seed=0, bad=None, layers=(LAYER,), context=None):
    """``n`` prompts labelled 'x'/'y' alternately, the label planted along channel 0 of every layer;
    ``bad`` maps prompt index -> the value written at position 1, channel 2 (NaN, inf)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        acts = {}
        for name in layers:
            a = rng.normal(size=(POS, D)).astype(np.float32)
            a[:, 0] += 3.0 if i % 2 else -3.0
            if bad and i in bad:
                a[1, 2] = bad[i]
            acts[name] = a
        ctx = {"dilemma": f"d{i // 2}", "severity": float(i % 2) * 2.0 + 0.01 * i}
        ctx.update(context or {})
        recs.append(SequenceRecord(list(range(POS)), [f"t{j}" for j in range(POS)], acts, text=f"p{i}",
                                   label=["x", "y"][i % 2], context=ctx))
    db = LatentDB(path)
    with db.run() as run:
        run.write(recs, dtypes={name: "float32" for name in layers})
    return db


def _sha256(folder) -> str:
    return hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- 1: non-finite features
def test_probe_drops_nonfinite_rows_and_records_how_many(tmp_path, caplog):
    db = _store(tmp_path / "nan.db", bad={0: np.nan, 3: np.inf})
    with caplog.at_level(logging.WARNING, logger="interlatent"):
        res = train_linear_probe(db, LAYER, "label", save=False, epochs=30)
    assert res.metrics["dropped_nonfinite_rows"] == 2
    assert all(torch.isfinite(p).all() for p in res.module.parameters())
    assert res.metrics["n_train"] + res.metrics["n_test"] == 14
    assert res.metrics["accuracy"] > res.metrics["baseline_accuracy"]
    assert any("2" in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records)


def test_probe_token_level_drops_only_the_nonfinite_tokens(tmp_path):
    db = _store(tmp_path / "nan.db", bad={0: np.nan, 3: -np.inf})
    res = train_linear_probe(db, LAYER, "label", pool=None, save=False, epochs=5)
    assert res.metrics["dropped_nonfinite_rows"] == 2
    assert res.metrics["n_train"] + res.metrics["n_test"] == 16 * POS - 2


def test_probe_regression_on_nonfinite_features_reports_a_finite_r2(tmp_path):
    db = _store(tmp_path / "nan.db", bad={0: np.nan, 5: np.inf})
    res = train_linear_probe(db, LAYER, "severity", task="regression", save=False, epochs=300, lr=0.05)
    assert res.metrics["dropped_nonfinite_rows"] == 2
    assert np.isfinite(res.metrics["r2"]) and res.metrics["r2"] > 0.5


def test_probe_regression_drops_rows_whose_target_is_inf(tmp_path):
    rng = np.random.default_rng(2)
    recs = []
    for i in range(12):
        a = rng.normal(size=(POS, D)).astype(np.float32)
        m = 2.0 * a[:, 0].astype(np.float64)
        if i == 3:
            m[2] = np.inf
        recs.append(SequenceRecord(list(range(POS)), [f"t{j}" for j in range(POS)], {LAYER: a}, text=f"p{i}",
                                   metrics={"m": m}))
    db = LatentDB(tmp_path / "inf_target.db")
    with db.run() as run:
        run.write(recs, dtypes={LAYER: "float32"})
    res = train_linear_probe(db, LAYER, "m", task="regression", pool=None, save=False, epochs=100, lr=0.05)
    assert res.metrics["dropped_nonfinite_rows"] == 1
    assert np.isfinite(res.metrics["r2"]) and res.metrics["r2"] > 0.9


def test_probe_with_too_few_finite_rows_raises_not_enough_data(tmp_path):
    db = _store(tmp_path / "nan.db", n=6, bad={i: np.nan for i in range(5)})
    with pytest.raises(NotEnoughDataError, match="non-finite"):
        train_linear_probe(db, LAYER, "label", save=False)


def test_probe_whose_weights_diverge_raises_instead_of_scoring(tmp_path):
    db = _store(tmp_path / "ok.db")
    with pytest.raises(TrainingDivergedError, match="lr"):
        train_linear_probe(db, LAYER, "label", save=True, lr=float("inf"), epochs=3)
    assert db.artifacts().empty


@pytest.mark.parametrize("pipeline", ["sae", "transcoder"])
def test_pipelines_name_nonfinite_input_before_training(tmp_path, monkeypatch, pipeline):
    layers = (LAYER,) if pipeline == "sae" else ("llm.layer.0.mlp_in", "llm.layer.0.mlp_out")
    db = _store(tmp_path / "nan.db", bad={4: np.inf, 7: np.nan}, layers=layers)

    def never(*args, **kwargs):
        raise AssertionError("training started on non-finite input")

    monkeypatch.setattr(pipelines_mod, "fit", never)
    cls = SAEPipeline if pipeline == "sae" else TranscoderPipeline
    with pytest.raises(TrainingDivergedError, match=r"non-finite.*prompts? \[4, 7\]"):
        cls(db, LAYER, **FAST).run()
    assert db.artifacts().empty


def test_sae_with_nonfinite_held_out_prompt_names_it_instead_of_reporting_nan_fvu(tmp_path):
    from interlatent.analysis.train.pipelines import split_groups, split_prompts

    db = _store(tmp_path / "ok.db", n=20)
    prompts = db.prompt_indices(LAYER)
    _, val = split_prompts(prompts, 0.1, 0, split_groups(db, prompts))
    db.close()
    db = _store(tmp_path / "val_nan.db", n=20, bad={val[0]: np.nan})
    with pytest.raises(TrainingDivergedError, match=rf"non-finite.*prompts \[{val[0]}\]"):
        SAEPipeline(db, LAYER, backfill=False, **FAST).run()
    assert db.artifacts().empty


# ---------------------------------------------------------------------------- 2: artifact folders
def test_two_stores_sharing_out_dir_keep_their_own_weights(tmp_path):
    shared = tmp_path / "shared"
    a, b = _store(tmp_path / "a.db", seed=0), _store(tmp_path / "b.db", seed=1)
    ra = SAEPipeline(a, LAYER, out_dir=shared, backfill=False, **FAST).run()
    wa = (ra.path / WEIGHTS_NAME).read_bytes()
    rb = SAEPipeline(b, LAYER, out_dir=shared, backfill=False, seed=1, **FAST).run()
    assert ra.path != rb.path
    assert (ra.path / WEIGHTS_NAME).read_bytes() == wa
    art = a.get_artifact(ra.artifact_id)
    assert art["config"]["weights_sha256"] == hashlib.sha256(wa).hexdigest()
    assert torch.equal(load_module(art["path"]).W_enc, ra.module.W_enc)


def test_two_stores_with_one_stem_keep_their_own_probes(tmp_path):
    a, b = _store(tmp_path / "a.db", seed=0), _store(tmp_path / "a.sqlite", seed=1)
    pa = train_linear_probe(a, LAYER, "label", epochs=5)
    wa = (pa.path / WEIGHTS_NAME).read_bytes()
    pb = train_linear_probe(b, LAYER, "label", epochs=5, seed=1)
    assert pa.path.parent == pb.path.parent and pa.path != pb.path
    assert (pa.path / WEIGHTS_NAME).read_bytes() == wa


def test_a_folder_taken_by_a_concurrent_trainer_is_never_written_into(tmp_path, monkeypatch):
    """Two processes training into one store both count the same artifacts before either records
    its own: the second must not write into the folder the first just made."""
    db = _store(tmp_path / "one.db")
    first = SAEPipeline(db, LAYER, backfill=False, **FAST).run()
    before = (first.path / WEIGHTS_NAME).read_bytes()
    stale = db.artifacts().iloc[:0]  # what the other process saw before the first artifact was recorded
    monkeypatch.setattr(type(db), "artifacts", lambda self: stale)
    second = SAEPipeline(db, LAYER, backfill=False, seed=3, **FAST).run()
    third = train_linear_probe(db, LAYER, "label", epochs=3)
    assert len({first.path, second.path, third.path}) == 3
    assert (first.path / WEIGHTS_NAME).read_bytes() == before


def test_a_swapped_weights_file_is_detected_on_load(tmp_path):
    from interlatent.patch import LatentPatch

    a, b = _store(tmp_path / "a.db", seed=0), _store(tmp_path / "b.db", seed=1)
    ra = SAEPipeline(a, LAYER, **FAST).run()
    rb = SAEPipeline(b, LAYER, seed=1, **FAST).run()
    LatentPatch.from_db(a, ra.latent_layer)  # loads while the file is its own
    shutil.copyfile(rb.path / WEIGHTS_NAME, ra.path / WEIGHTS_NAME)
    recorded = a.get_artifact(ra.artifact_id)["config"]["weights_sha256"]
    with pytest.raises(ArtifactError) as err:
        LatentPatch.from_db(a, ra.latent_layer)
    msg = str(err.value)
    assert recorded[:12] in msg and _sha256(ra.path)[:12] in msg and ra.path.name in msg
    with pytest.raises(ArtifactError):
        load_module(ra.path, sha256=a.get_artifact(ra.artifact_id)["config"]["weights_sha256"])


# ---------------------------------------------------------------------------- 3: messages
def test_probe_unknown_split_key_names_it_and_the_context_keys(tmp_path):
    db = _store(tmp_path / "s.db")
    with pytest.raises(KeyError) as err:
        train_linear_probe(db, LAYER, "label", split_key="dilema", save=False)
    msg = str(err.value)
    assert "'dilema'" in msg and "'dilemma'" in msg and "severity" in msg
    assert msg.index("'dilemma'") < msg.index("severity")
    assert "no training or no test rows" not in msg


@pytest.mark.parametrize("spelling", ["llm.layer.1.mlp_out", "blocks.1.hook_mlp_out", "llm.layer.1.mlp_in",
                                      "llm.layer.1"])
def test_transcoder_given_either_end_of_a_block_mlp_uses_that_mlp(tmp_path, spelling):
    db = _store(tmp_path / "t.db", layers=("llm.layer.1.mlp_in", "llm.layer.1.mlp_out"))
    res = TranscoderPipeline(db, spelling, backfill=False, **FAST).run()
    meta = res.module.cfg.metadata
    assert (meta["in_layer"], meta["out_layer"]) == ("llm.layer.1.mlp_in", "llm.layer.1.mlp_out")
    assert meta["layer"] == "llm.layer.1"


def test_transcoder_io_of_mlp_ends():
    assert naming.transcoder_io("llm.layer.2.mlp_out") == ("llm.layer.2.mlp_in", "llm.layer.2.mlp_out")
    assert naming.transcoder_io("blocks.2.ln2.hook_normalized") == ("llm.layer.2.mlp_in", "llm.layer.2.mlp_out")
    assert naming.transcoder_io("policy_net.0") == ("policy_net.0:pre", "policy_net.0:post")
    assert naming.transcoder_io("llm.layer.2.attn_out") == ("llm.layer.2.attn_out:pre", "llm.layer.2.attn_out:post")


# ---------------------------------------------------------------------------- 4: read-only stores
def _read_only(tmp_path):
    _store(tmp_path / "ro.db").close()
    return LatentDB(tmp_path / "ro.db", mode="r")


def test_pipeline_on_read_only_store_refuses_before_training(tmp_path, monkeypatch):
    db = _read_only(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("trained on a store it cannot record into")

    monkeypatch.setattr(pipelines_mod, "fit", never)
    with pytest.raises(ReadOnlyError, match="mode='rw'"):
        SAEPipeline(db, LAYER, out_dir=tmp_path / "out", **FAST).run()
    with pytest.raises(ReadOnlyError, match="mode='rw'"):
        SAEPipeline(db, LAYER, out_dir=tmp_path / "out", backfill=False, **FAST).run()
    assert not (tmp_path / "out").exists() and not (tmp_path / "ro_artifacts").exists()


def test_probe_on_read_only_store_refuses_to_save_up_front_and_trains_without_saving(tmp_path, monkeypatch):
    db = _read_only(tmp_path)
    real_fit = probe_mod._fit

    def never(*args, **kwargs):
        raise AssertionError("trained a probe it cannot record")

    monkeypatch.setattr(probe_mod, "_fit", never)
    with pytest.raises(ReadOnlyError, match="save=False"):
        train_linear_probe(db, LAYER, "label")
    assert not (tmp_path / "ro_artifacts").exists()
    monkeypatch.setattr(probe_mod, "_fit", real_fit)
    res = train_linear_probe(db, LAYER, "label", save=False, epochs=5)
    assert res.path is None and np.isfinite(res.metrics["accuracy"])
