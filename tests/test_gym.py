"""GymCollector on CartPole-v1 (discrete) and Pendulum-v1 (continuous)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch import nn

from interlatent import GymCollector, LatentDB
from interlatent.analysis.train import TranscoderPipeline, train_linear_probe
from interlatent.errors import ConfigError, LayerNotFoundError, ShapeError
from interlatent.gym import MLPPolicy, cartpole_policy
from interlatent.metrics import EpisodeAccumulator, LambdaMetric


@pytest.fixture(scope="module")
def policy():
    return cartpole_policy(seed=0)


def rollout_actions(policy, seed, steps):
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=seed)
    actions = []
    for _ in range(steps):
        with torch.no_grad():
            a = int(policy(torch.as_tensor(obs).reshape(1, -1)).argmax())
        actions.append(a)
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
    return actions


def test_policy_reaches_max_return(policy):
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=123)
    total = 0.0
    for _ in range(500):
        with torch.no_grad():
            obs, r, term, trunc, _ = env.step(int(policy(torch.as_tensor(obs).reshape(1, -1)).argmax()))
        total += r
        if term or trunc:
            break
    assert total == 500.0


def test_spec_snippet_and_step_records(policy, tmp_path):
    db = LatentDB(tmp_path / "gym.db")
    angle = LambdaMetric("pole_angle", lambda obs, **_: float(obs[2]))
    collector = GymCollector(db, hook_layers=["policy_net.0"], metric_fns=[angle, EpisodeAccumulator()])
    collector.run(policy, gym.make("CartPole-v1"), steps=200, seed=0)
    assert set(db.layers()) == {"policy_net.0:pre", "policy_net.0:post", "obs"}
    assert db.n_tokens("policy_net.0:pre") == 200 and db.layer_info("policy_net.0:post").width == 64
    pre = db.fetch_activations("policy_net.0:pre")
    np.testing.assert_allclose(pre.values, db.fetch_activations("obs").values)  # the Linear's input is obs
    post = db.fetch_activations("policy_net.0:post").values
    w, b = policy.policy_net[0].weight.detach().numpy(), policy.policy_net[0].bias.detach().numpy()
    np.testing.assert_allclose(post, pre.values @ w.T + b, atol=1e-5)
    seqs = db.sequences()
    assert seqs["kind"].unique().tolist() == ["episode"]
    for _, row in seqs.iterrows():
        toks = db.tokens(prompt_index=row["prompt_index"])
        assert row["context"]["length"] == len(toks) == row["n_positions"]
        assert toks["reward"].sum() == pytest.approx(row["context"]["return"])
        assert toks["return_so_far"].iloc[-1] == pytest.approx(row["context"]["return"])
        np.testing.assert_allclose(toks["pole_angle"].to_numpy(),
                                   db.fetch_activations("obs", prompt_index=row["prompt_index"]).values[:, 2], rtol=1e-6)
    assert set(pre.tokens["action"].unique()) <= {0.0, 1.0}


def test_hooks_never_change_actions(policy, tmp_path):
    db = LatentDB(tmp_path / "same.db")
    GymCollector(db, hook_layers=["policy_net.0", "policy_net.2", "action_net"]).run(
        policy, gym.make("CartPole-v1"), steps=300, seed=5)
    stored = db.tokens()["action"].astype(int).tolist()
    assert stored == rollout_actions(policy, seed=5, steps=300)


def test_metric_correlates_as_planted_and_transcoder_runs(policy, tmp_path):
    db = LatentDB(tmp_path / "corr.db")
    angle = LambdaMetric("pole_angle", lambda obs, **_: float(obs[2]))
    GymCollector(db, hook_layers=["policy_net.0"], metric_fns=[angle]).run(
        policy, gym.make("CartPole-v1"), episodes=6, seed=1)
    db.compute_stats(min_count=5)
    obs_blocks = {b.channel: b for b in db.iter_statblocks(layer="obs")}
    assert dict(obs_blocks[2].top_correlations)["pole_angle"] == pytest.approx(1.0, abs=1e-6)
    res = TranscoderPipeline(db, "policy_net.0", k=4, d_sae=64, steps=200, batch_size=128, progress=False).run()
    assert res.latent_layer == "latent:policy_net.0" and res.metrics["fvu"] < 0.5
    db.compute_stats(min_count=5, layers=["latent:policy_net.0"])
    best = max((abs(dict(b.top_correlations).get("pole_angle", 0.0)) for b in
                db.iter_statblocks(layer="latent:policy_net.0")), default=0.0)
    assert best > 0.3  # some latent tracks the pole angle
    probe = train_linear_probe(db, layer="policy_net.0:post", target_key="pole_angle", task="regression", epochs=50)
    assert probe.metrics["r2"] > 0.9


def test_continuous_actions_pendulum(tmp_path):
    torch.manual_seed(0)
    policy = MLPPolicy(3, 1)
    db = LatentDB(tmp_path / "pend.db")
    GymCollector(db, hook_layers=["policy_net.0", "action_net"]).run(policy, gym.make("Pendulum-v1"), steps=50, seed=0)
    toks = db.tokens()
    assert len(toks) == 50 and "action" in toks.columns
    assert toks["action"].between(-2.0, 2.0).all()
    post = db.fetch_activations("action_net:post").values[:, 0]
    np.testing.assert_allclose(np.clip(post, -2, 2), toks["action"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_bad_input(policy, tmp_path):
    db = LatentDB(tmp_path / "bad.db")
    with pytest.raises(LayerNotFoundError, match="policy_net.0"):
        GymCollector(db, hook_layers=["policy_net.9"]).run(policy, gym.make("CartPole-v1"), steps=5)
    with pytest.raises(ShapeError, match="does not fit the policy"):
        GymCollector(db, hook_layers=["policy_net.0"]).run(policy, gym.make("Pendulum-v1"), steps=5)
    with pytest.raises(ConfigError, match="steps"):
        GymCollector(db, hook_layers=["policy_net.0"]).run(policy, gym.make("CartPole-v1"))

    class NaNAfter(nn.Module):  # fine for a while, then NaN
        def __init__(self):
            super().__init__()
            self.inner = policy
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.inner(x)
            return out * float("nan") if self.calls > 600 else out

    nan_db = LatentDB(tmp_path / "nan.db")
    bad = NaNAfter()
    with pytest.raises(ConfigError, match="non-finite .* at episode 1, step 100"):
        GymCollector(nan_db, hook_layers=["inner.policy_net.0"]).run(bad, gym.make("CartPole-v1"), steps=2000, seed=0)
    assert nan_db.runs()["status"].tolist() == ["interrupted"]
    finished = nan_db.sequences()
    assert len(finished) == 1 and finished["context"][0]["length"] == 500  # the first episode is intact
