"""Logit effects of dictionary latents: computed through the model's final norm and unembedding,
stored by schema migration 4, read back per channel, refused where they mean nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interlatent import LatentDB
from interlatent.analysis.logit_effects import compute_logit_effects
from interlatent.analysis.models import load_module
from interlatent.analysis.train import SAEPipeline
from interlatent.db import SequenceRecord
from interlatent.db.schema import LATEST_VERSION
from interlatent.errors import ConfigError, ShapeError


def _store(folder, layer: str, width: int = 32):
    rng = np.random.default_rng(0)
    db = LatentDB(folder / "fx.db")
    recs = [SequenceRecord(list(range(10)), [f" t{j}" for j in range(10)],
                           {layer: rng.standard_normal((10, width)).astype(np.float32)}, text=f"p{i}", prompt_index=i)
            for i in range(12)]
    with db.run() as run:
        run.write(recs, dtypes={layer: "float32"})
    res = SAEPipeline(db, layer, k=2, d_sae=16, steps=5, batch_size=32, progress=False).run()
    return db, res


def test_logit_effects_match_the_models_own_final_norm_and_unembedding(tmp_path, tiny_tl, tokenizer):
    db, res = _store(tmp_path, "llm.layer.0")
    layer = res.latent_layer
    n = compute_logit_effects(db, layer, tiny_tl, top=5)
    assert n == 16 * 2 * 5
    w_dec = load_module(db.get_artifact(res.artifact_id)["path"]).W_dec.detach()
    with torch.no_grad():  # independent: the model's LN of the direction, minus that of zero (its bias)
        base = tiny_tl.unembed(tiny_tl.ln_final(torch.zeros(1, 1, 32)))[0, 0]
        for c in (0, 7, 15):
            d = w_dec[c].reshape(1, 1, -1)
            scale = d.std(-1, unbiased=False).item()
            want = (tiny_tl.unembed(tiny_tl.ln_final(d))[0, 0] - base) * scale
            got = db.logit_effects(layer, channel=c)
            up = got[got["direction"] == "promoted"]
            down = got[got["direction"] == "suppressed"]
            assert up["token_id"].tolist() == want.topk(5).indices.tolist()
            assert down["token_id"].tolist() == (-want).topk(5).indices.tolist()
            np.testing.assert_allclose(up["value"], want.topk(5).values.numpy(), rtol=1e-3, atol=1e-4)
            assert up["token"].tolist() == [tokenizer.decode([t]) for t in up["token_id"]]
            assert (np.diff(up["value"]) <= 0).all() and (np.diff(down["value"]) >= 0).all()
    db.close()


def test_logit_effects_refuse_a_dictionary_of_the_mlp_input(tmp_path, tiny_tl):
    db, res = _store(tmp_path, "llm.layer.0.mlp_in")
    with pytest.raises(ConfigError, match="not the residual stream"):
        compute_logit_effects(db, res.latent_layer, tiny_tl)
    with pytest.raises(ConfigError, match="no recorded dictionary"):
        compute_logit_effects(db, "llm.layer.0.mlp_in", tiny_tl)
    db.close()


def test_logit_effects_store_round_trip_replace_and_layer_delete(tmp_path):
    rng = np.random.default_rng(0)
    with LatentDB(tmp_path / "s.db") as db:
        recs = [SequenceRecord([0, 1], [" a", " b"], {"llm.layer.0": rng.standard_normal((2, 4)).astype(np.float32)},
                               text="x", prompt_index=0)]
        with db.run() as run:
            run.write(recs, dtypes={"llm.layer.0": "float32"})
        assert db.schema_version == LATEST_VERSION and db.logit_effects("llm.layer.0").empty
        ids = {"promoted": np.array([[5, 6]] * 4), "suppressed": np.array([[1, 2]] * 4)}
        vals = {"promoted": np.array([[2.0, 1.0]] * 4), "suppressed": np.array([[-2.0, -1.0]] * 4)}
        assert db.set_logit_effects("llm.layer.0", ids, vals, tokens={5: " sky", 1: "<b>"}) == 16
        got = db.logit_effects("llm.layer.0", channel=2)
        assert got["direction"].tolist() == ["promoted", "promoted", "suppressed", "suppressed"]
        assert got["token"].tolist() == [" sky", None, "<b>", None]
        db.set_logit_effects("llm.layer.0", {k: v[:1] for k, v in ids.items()},
                             {"promoted": np.array([[9.0, 8.0]]), "suppressed": np.array([[0.0, 0.0]])}, channels=[2])
        assert db.logit_effects("llm.layer.0", channel=2)["value"].tolist()[:2] == [9.0, 8.0]
        assert db.logit_effects("llm.layer.0", channel=1)["value"].tolist()[:2] == [2.0, 1.0]
        with pytest.raises(ShapeError, match=r"\[1 channels, k\]"):
            db.set_logit_effects("llm.layer.0", ids, vals, channels=[0])
        with pytest.raises(ConfigError, match="0..3"):
            db.set_logit_effects("llm.layer.0", ids, vals, channels=[0, 1, 2, 9])
        db.delete_layer("llm.layer.0")
        assert db._conn.execute("SELECT COUNT(*) FROM logit_effects").fetchone()[0] == 0


def test_a_pipeline_given_the_model_stores_logit_effects_at_backfill(tmp_path, tiny_tl):
    rng = np.random.default_rng(1)
    with LatentDB(tmp_path / "p.db") as db:
        recs = [SequenceRecord(list(range(8)), [f" t{j}" for j in range(8)],
                               {"llm.layer.0": rng.standard_normal((8, 32)).astype(np.float32),
                                "llm.layer.0.mlp_in": rng.standard_normal((8, 32)).astype(np.float32)},
                               text=f"p{i}", prompt_index=i) for i in range(8)]
        with db.run() as run:
            run.write(recs, dtypes={"llm.layer.0": "float32", "llm.layer.0.mlp_in": "float32"})
        res = SAEPipeline(db, "llm.layer.0", k=2, d_sae=8, steps=3, batch_size=16, progress=False, model=tiny_tl).run()
        assert len(db.logit_effects(res.latent_layer)) == 8 * 2 * 10
        skipped = SAEPipeline(db, "llm.layer.0.mlp_in", k=2, d_sae=8, steps=3, batch_size=16, progress=False,
                              model=tiny_tl).run()  # not the residual stream: nothing to compute, no error
        assert db.logit_effects(skipped.latent_layer).empty
