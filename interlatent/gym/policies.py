"""Small policies trained here, without downloads.

``cartpole_policy()`` behaviour-clones a hand-written CartPole controller
(push right when ``theta + 0.5 theta_dot + 0.01 x + 0.1 x_dot > 0``) into a 4-64-64-2 MLP named like
Stable-Baselines3's (``policy_net`` then ``action_net``), in a few seconds, deterministically. It
reaches CartPole-v1's maximum return of 500.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def cartpole_controller(obs: np.ndarray) -> int:
    """The hand-written controller: 1 (push right) or 0 (push left)."""
    x, x_dot, theta, theta_dot = (float(v) for v in obs[:4])
    return int(theta + 0.5 * theta_dot + 0.01 * x + 0.1 * x_dot > 0)


class MLPPolicy(nn.Module):
    """``policy_net`` (Linear-Tanh-Linear-Tanh) then ``action_net`` (Linear to logits or actions)."""

    def __init__(self, obs_dim: int, n_out: int, hidden: int = 64) -> None:
        super().__init__()
        self.policy_net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.action_net = nn.Linear(hidden, n_out)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.action_net(self.policy_net(obs))


def _states(n: int, rng: np.random.Generator) -> np.ndarray:
    """States from controller rollouts with random pushes, so the clone sees recoveries too."""
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    out = []
    obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
    while len(out) < n:
        out.append(obs)
        action = cartpole_controller(obs) if rng.random() > 0.2 else int(rng.integers(2))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
    env.close()
    return np.asarray(out, dtype=np.float32)


def cartpole_policy(seed: int = 0, n_states: int = 20_000, epochs: int = 30) -> MLPPolicy:
    """A CartPole-v1 policy behaviour-cloned from :func:`cartpole_controller` (a few seconds)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    states = _states(n_states, rng)
    labels = np.array([cartpole_controller(s) for s in states])
    x, y = torch.from_numpy(states), torch.from_numpy(labels)
    policy = MLPPolicy(4, 2)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 256):
            idx = order[i : i + 256]
            loss = nn.functional.cross_entropy(policy(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return policy.eval()
