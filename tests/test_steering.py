"""Steering with controls of the same norm, and dose-response curves of ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interlatent import LatentDB
from interlatent.errors import ConfigError, ShapeError
from interlatent.patch import ablation_effect, attribute, dose_response, steering_effect
from test_attribution import ANSWER, linear_tl, sae, tokens_for


@pytest.fixture(scope="module")
def lin(tokenizer):
    return linear_tl(tokenizer)


def readout(model) -> torch.Tensor:
    """The direction whose dot product with the final residual stream is the answer logit difference."""
    return (model.W_U[:, ANSWER[0]] - model.W_U[:, ANSWER[1]]).detach()


def test_steering_a_latent_moves_the_logit_diff_by_its_decoder_readout(lin, tmp_path):
    patch = sae(k=8)
    toks = tokens_for(lin, batch=6)
    latent = 0
    with torch.no_grad():  # plant a latent that writes along the readout (a unit decoder row, like the others)
        patch.module.W_dec[latent] = readout(lin) / readout(lin).norm()
    with LatentDB(tmp_path / "s.db") as db:
        res = steering_effect(patch, lin, toks, latent=latent, scale=3.0, positions=[-1], answer=ANSWER,
                              n_control=6, seed=1, db=db)
        row = db.interventions().iloc[0]
    expected = 3.0 * float(patch.module.W_dec[latent].detach() @ readout(lin))
    assert res.value == pytest.approx(expected, abs=1e-4)
    assert len(res.control) == 6 and latent not in res.control_latents
    norms = patch.module.W_dec.detach().norm(dim=-1)
    for c, s in zip(res.control_latents, res.control_scales):  # every control adds a vector of the same norm
        assert abs(s) * float(norms[c]) == pytest.approx(res.norm, rel=1e-5)
        eff = res.control[res.control_latents.index(c)]
        assert eff.delta_logit_diff == pytest.approx(s * float(patch.module.W_dec[c].detach() @ readout(lin)),
                                                     abs=1e-4)
    assert res.exceeds_control and res.percentile == 1.0
    assert row["kind"] == "steering" and row["results"]["value"] == pytest.approx(res.value)


def test_steering_a_direction_against_random_directions_of_the_same_norm(lin):
    patch = sae()
    toks = tokens_for(lin)
    d = readout(lin)
    res = steering_effect(patch, lin, toks, direction=d, scale=0.5, positions=[-1], answer=ANSWER, n_control=8)
    assert res.value == pytest.approx(0.5 * float(d @ d), rel=1e-4)
    assert res.norm == pytest.approx(0.5 * float(d.norm()), rel=1e-5)
    assert res.exceeds_control and abs(res.control_mean) < abs(res.value)
    again = steering_effect(patch, lin, toks, direction=d, scale=0.5, positions=[-1], answer=ANSWER, n_control=8)
    assert again.control_values == res.control_values  # seeded
    loss = steering_effect(patch, lin, toks, direction=d, scale=0.5, n_control=2)
    assert loss.metric == "delta_loss" and np.isfinite(loss.value)


def test_steering_refuses_bad_requests(lin):
    patch = sae()
    toks = tokens_for(lin)
    with pytest.raises(ConfigError, match="exactly one of latent"):
        steering_effect(patch, lin, toks, answer=ANSWER)
    with pytest.raises(ConfigError, match="exactly one of latent"):
        steering_effect(patch, lin, toks, latent=1, direction=torch.ones(32), answer=ANSWER)
    with pytest.raises(ShapeError, match="width"):
        steering_effect(patch, lin, toks, direction=torch.ones(7), answer=ANSWER)
    with pytest.raises(ConfigError, match="unknown latent"):
        steering_effect(patch, lin, toks, latent=64, answer=ANSWER)
    with pytest.raises(ConfigError, match="pass answer"):
        steering_effect(patch, lin, toks, latent=1, metric="delta_logit_diff")
    with pytest.raises(ConfigError, match="cannot change"):  # a final-block point, read where it does not steer
        steering_effect(patch, lin, toks, direction=torch.ones(32), positions=[0], answer=ANSWER)


def test_dose_response_on_a_linear_model_adds_up_the_attribution_scores(lin, tmp_path):
    patch = sae(d_sae=128, k=8)
    toks = tokens_for(lin, batch=8)
    res = attribute(patch, lin, toks, answer=ANSWER)
    with LatentDB(tmp_path / "d.db") as db:
        curve = dose_response(patch, lin, toks, res, sizes=(1, 2, 4, 8), sign="negative", answer=ANSWER,
                              n_control=4, db=db)
        row = db.interventions().iloc[-1]
    df = curve.to_pandas()
    assert df["n_latents"].tolist() == [1, 2, 4, 8]
    top = res.top(8, sign="negative")
    for n, value in zip(df["n_latents"], df["value"]):  # linear: the effects of a set add up
        assert value == pytest.approx(float(res.scores[top[:n]].sum()), abs=1e-4)
    assert df["value"].is_monotonic_decreasing
    assert (df["control_lo"] <= df["control_mean"]).all() and (df["control_mean"] <= df["control_hi"]).all()
    single = ablation_effect(patch, lin, toks, top[:2], answer=ANSWER, n_control=4, seed=0)
    assert df["control_mean"].iloc[1] == pytest.approx(single.control_mean)
    assert curve.ranked_by.startswith("attribution") and row["kind"] == "dose_response"


def test_dose_response_drops_doses_beyond_the_ranking_and_refuses_repeats(lin, caplog):
    patch = sae()
    toks = tokens_for(lin)
    res = attribute(patch, lin, toks, answer=ANSWER)
    ranking = res.top(3)
    curve = dose_response(patch, lin, toks, ranking, sizes=(1, 2, 4), answer=ANSWER, n_control=2)
    assert curve.to_pandas()["n_latents"].tolist() == [1, 2] and "dropped" in caplog.text
    with pytest.raises(ConfigError, match="twice"):
        dose_response(patch, lin, toks, [ranking[0], ranking[0]], answer=ANSWER)
    with pytest.raises(ConfigError, match="fewer than the smallest dose"):
        dose_response(patch, lin, toks, ranking, sizes=(4, 8), answer=ANSWER)
