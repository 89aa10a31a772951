"""``GymCollector``: run a torch policy in a Gymnasium environment and store what its modules see.

Forward hooks on named submodules record ``{layer}:pre`` (the module's input) and ``{layer}:post``
(its output) at every step; hooks return None, so they never change what the policy does. Each
episode is a sequence in the store and its steps are positions, with observation, action, reward and
terminated/truncated in the step context, episode index, length and return in the episode context,
and per-step metrics. Every finished episode is written in its own transaction, so an error later
leaves earlier episodes intact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from interlatent.db import LatentDB, SequenceRecord
from interlatent.db.background import batch_writer
from interlatent.errors import ConfigError, ShapeError, unknown_name
from interlatent.metrics import Metric

log = logging.getLogger(__name__)


def _flat(value: Any) -> np.ndarray:
    if isinstance(value, (tuple, list)):
        value = value[0]
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).float().cpu().numpy()
    return np.asarray(value, dtype=np.float32).reshape(-1)


def _is_sb3(policy: Any) -> bool:
    return hasattr(policy, "predict") and hasattr(policy, "observation_space") and isinstance(policy, nn.Module)


class GymCollector:
    """Collect per-step activations of a policy's submodules.

    Args:
        db: the store.
        hook_layers: names of submodules (as in ``policy.named_modules()``, e.g. ``"policy_net.0"``).
        metric_fns: :class:`~interlatent.metrics.Metric` objects computed at every step.
        dtype: storage dtype of the hooked layers (default float32: policies are small).
        record_obs: also store the observation as layer ``"obs"``.
        write_queue: episodes that may wait for the store (default 4): a background writer thread
            stores them while the policy runs the next (:mod:`interlatent.db.background`; its
            errors are raised here, Ctrl-C and SIGTERM write the queued episodes whole and mark the
            run interrupted). ``0`` or ``None``: write each episode before the next one starts.

    There is no ``resume=``: an episode is determined by the environment's state and random
    generators as the rollout left them, so a later process cannot continue a rollout where an
    interrupted one stopped (it would have to replay every earlier episode); the episodes stored
    before the interruption stay readable, and a new rollout is a new run.
    """

    def __init__(self, db: LatentDB, hook_layers: Sequence[str], metric_fns: Sequence[Metric] = (), *,
                 dtype: str = "float32", record_obs: bool = True, write_queue: int | None = 4) -> None:
        if not hook_layers:
            raise ConfigError("hook_layers is empty: name at least one submodule of the policy")
        names = [m.name for m in metric_fns]
        if len(set(names)) != len(names):
            raise ConfigError(f"metric names must be distinct, got {names}")
        self.db = db
        self.hook_layers = list(hook_layers)
        self.metric_fns = list(metric_fns)
        self.dtype = dtype
        self.record_obs = record_obs
        if write_queue is not None and (isinstance(write_queue, bool) or not isinstance(write_queue, int)
                                        or write_queue < 0):
            raise ConfigError(f"write_queue must be an int >= 0 or None (0/None: write in this thread), "
                              f"got {write_queue!r}")
        self.write_queue = write_queue or 0
        self.last_run_id: int | None = None

    def _modules(self, policy: nn.Module) -> dict[str, nn.Module]:
        modules = dict(policy.named_modules())
        out = {}
        for name in self.hook_layers:
            if name not in modules:
                raise unknown_name("submodule", name, [n for n in modules if n],
                                   hint=f"{type(policy).__name__}'s submodules are listed by policy.named_modules()")
            out[name] = modules[name]
        return out

    def _act(self, policy: nn.Module, obs: np.ndarray, env: Any, deterministic: bool,
             rng: np.random.Generator, where: str = "") -> Any:
        space = env.action_space
        if _is_sb3(policy):
            action, _ = policy.predict(obs, deterministic=deterministic)
            return action
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32)).reshape(1, -1)
        try:
            out = policy(x)
        except RuntimeError as exc:
            raise ShapeError(f"the observation (shape {np.shape(obs)}) does not fit the policy: {exc}") from exc
        out = out[0] if isinstance(out, (tuple, list)) else out
        out = out.detach().reshape(-1).cpu().numpy()
        if not np.all(np.isfinite(out)):
            raise ConfigError(f"the policy returned non-finite values {out.tolist()} at {where}; the episodes "
                              "finished before it are stored")
        if hasattr(space, "n"):  # Discrete: logits -> argmax (or a sample)
            if out.shape[0] != space.n:
                raise ShapeError(f"the policy gives {out.shape[0]} outputs for a Discrete({space.n}) action space")
            if deterministic:
                return int(out.argmax())
            p = np.exp(out - out.max())
            return int(rng.choice(space.n, p=p / p.sum()))
        low, high = np.asarray(space.low), np.asarray(space.high)
        if out.shape != low.reshape(-1).shape:
            raise ShapeError(f"the policy gives {out.shape[0]} outputs for a Box action space of shape {low.shape}")
        return np.clip(out.reshape(low.shape), low, high).astype(space.dtype)

    def run(self, policy: nn.Module, env: Any, *, steps: int | None = None, episodes: int | None = None,
            seed: int | None = None, deterministic: bool = True, show_progress: bool | None = None) -> int:
        """Roll out ``policy`` for ``steps`` environment steps and/or ``episodes`` episodes (whichever
        ends first). Returns the run id."""
        if steps is None and episodes is None:
            raise ConfigError("give steps= and/or episodes= to bound the rollout")
        if (steps is not None and steps < 1) or (episodes is not None and episodes < 1):
            raise ConfigError(f"steps and episodes must be >= 1, got steps={steps}, episodes={episodes}")
        modules = self._modules(policy)
        captured: dict[str, np.ndarray] = {}

        def make(name: str):
            def hook(_mod: nn.Module, inputs: Any, output: Any) -> None:
                captured[f"{name}:pre"] = _flat(inputs)
                captured[f"{name}:post"] = _flat(output)
            return hook

        env_id = getattr(getattr(env, "spec", None), "id", None) or type(env).__name__
        config = {"env": env_id, "hook_layers": self.hook_layers, "metrics": [m.name for m in self.metric_fns],
                  "seed": seed, "deterministic": deterministic, "policy": type(policy).__name__}
        rng = np.random.default_rng(seed)
        handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
        bar = tqdm(total=steps or episodes, desc="rollout", unit="step" if steps else "episode",
                   disable=None if show_progress is None else not show_progress)
        total_steps = 0
        episode = 0
        dtypes: dict[str, str] = {}  # filled from the first episode, read by the writer
        try:
            with torch.no_grad(), self.db.run(kind="gym", model=type(policy).__name__, config=config) as run, \
                    batch_writer(self.db, run.run_id, self.write_queue, {"dtypes": dtypes}) as sink:
                self.last_run_id = run.run_id
                obs, info = env.reset(seed=seed)
                while True:
                    record, n, done_steps = self._episode(policy, env, obs, info, captured, deterministic, rng,
                                                          episode, env_id, seed, None if steps is None
                                                          else steps - total_steps, bar if steps else None)
                    dtypes.update((k, self.dtype) for k in record.activations if k not in dtypes)
                    sink.submit([record])
                    total_steps += n
                    episode += 1
                    if not steps:
                        bar.update(1)
                    if (steps is not None and total_steps >= steps) or (episodes is not None and episode >= episodes):
                        break
                    obs, info = env.reset()
        finally:
            for h in handles:
                h.remove()
            bar.close()
        return self.last_run_id  # type: ignore[return-value]

    def _episode(self, policy: nn.Module, env: Any, obs: Any, info: Any, captured: dict[str, np.ndarray],
                 deterministic: bool, rng: np.random.Generator, episode: int, env_id: str, seed: int | None,
                 budget: int | None, bar: Any) -> tuple[SequenceRecord, int, bool]:
        for m in self.metric_fns:
            m.reset()
        layers: dict[str, list[np.ndarray]] = {}
        steps_ctx: list[dict[str, Any]] = []
        metrics: dict[str, list[float]] = {"reward": []}
        for m in self.metric_fns:
            metrics[m.name] = []
        actions: list[Any] = []
        total = 0.0
        t = 0
        finished = False
        while budget is None or t < budget:
            captured.clear()
            action = self._act(policy, obs, env, deterministic, rng, where=f"episode {episode}, step {t}")
            missing = [f"{n}:pre" for n in self.hook_layers if f"{n}:pre" not in captured]
            if missing:
                raise ConfigError(f"submodules {missing} never ran in the policy's forward pass")
            for name, value in captured.items():
                layers.setdefault(name, []).append(value)
            obs_vec = _flat(obs)
            if self.record_obs:
                layers.setdefault("obs", []).append(obs_vec)
            next_obs, reward, terminated, truncated, info = env.step(action)
            reward = float(reward)
            total += reward
            step = {"obs": obs, "action": action, "reward": reward, "info": info, "step": t,
                    "terminated": bool(terminated), "truncated": bool(truncated)}
            for m in self.metric_fns:
                metrics[m.name].append(m(**step))
            metrics["reward"].append(reward)
            act_arr = np.asarray(action, dtype=np.float64).reshape(-1)
            for j, a in enumerate(act_arr):
                metrics.setdefault("action" if act_arr.size == 1 else f"action_{j}", []).append(float(a))
            actions.append(act_arr.tolist() if act_arr.size > 1 else act_arr.item())
            steps_ctx.append({"obs": obs_vec.tolist(), "action": actions[-1], "reward": reward,
                              "terminated": bool(terminated), "truncated": bool(truncated)})
            t += 1
            if bar is not None:
                bar.update(1)
            obs = next_obs
            if terminated or truncated:
                finished = True
                break
        acts = {name: np.stack(v) for name, v in layers.items()}
        widths = {k: v.shape[1] for k, v in acts.items()}
        record = SequenceRecord(
            token_ids=[int(a) if isinstance(a, (int, np.integer)) else 0 for a in actions],
            tokens=[f"a={a if not isinstance(a, list) else [round(x, 3) for x in a]}" for a in actions],
            activations=acts,
            text=f"{env_id} episode {episode}",
            context={"episode": episode, "env": env_id, "seed": seed, "length": t, "return": total,
                     "finished": finished, "widths": widths},
            metrics={k: np.asarray(v, dtype=np.float32) for k, v in metrics.items()},
            token_context=steps_ctx,
            kind="episode",
        )
        return record, t, finished

