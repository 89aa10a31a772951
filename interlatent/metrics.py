"""Per-step metrics for RL collection: ``LambdaMetric`` and ``EpisodeAccumulator``.

A metric is called once per environment step with keyword arguments ``obs`` (the observation the
policy acted on), ``action``, ``reward``, ``info``, ``step`` (index within the episode),
``terminated`` and ``truncated``, and returns a number. Metrics are stored per step and can be probe
targets and ``compute_stats`` correlations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from interlatent.errors import ConfigError


class Metric:
    """Base class: a named per-step number. ``reset()`` is called at the start of every episode."""

    name: str

    def reset(self) -> None:
        """Forget per-episode state."""

    def __call__(self, **step: Any) -> float:
        raise NotImplementedError


class LambdaMetric(Metric):
    """A metric from a function: ``LambdaMetric("pole_angle", lambda obs, **_: float(obs[2]))``."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        if not name or not isinstance(name, str):
            raise ConfigError(f"a metric needs a non-empty name, got {name!r}")
        if not callable(fn):
            raise ConfigError(f"metric {name!r}: fn must be callable, got {type(fn).__name__}")
        self.name = name
        self.fn = fn

    def __call__(self, **step: Any) -> float:
        value = self.fn(**step)
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metric {self.name!r} returned {value!r}; metrics must be numbers") from exc

    def __repr__(self) -> str:
        return f"LambdaMetric({self.name!r})"


class EpisodeAccumulator(Metric):
    """A running total over the episode of a per-step value (default: the reward, giving the return
    so far, this step's reward included)."""

    def __init__(self, name: str = "return_so_far", fn: Callable[..., Any] | None = None,
                 discount: float = 1.0) -> None:
        self.name = name
        self.fn = fn or (lambda reward, **_: reward)
        self.discount = discount
        self.total = 0.0
        self.weight = 1.0

    def reset(self) -> None:
        self.total = 0.0
        self.weight = 1.0

    def __call__(self, **step: Any) -> float:
        self.total += self.weight * float(self.fn(**step))
        self.weight *= self.discount
        return self.total

    def __repr__(self) -> str:
        return f"EpisodeAccumulator({self.name!r})"
