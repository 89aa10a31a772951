"""Steering with controls, and dose-response curves of ablation.

* :func:`steering_effect` — add a latent's decoder direction (``steer={latent: scale}``) or any
  direction at the patch's output hook, and measure the logit difference / loss / KL change next to
  controls: frequency-matched random latents active where the steering acts, each scaled so that the
  vector added has the same norm, or random directions of the same norm (seeded).
* :func:`dose_response` — the effect of ablating the top 1, 2, 4 ... 64 latents of a ranking (by
  attribution, selectivity, anything), each next to its frequency-matched random-latent control.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from interlatent.errors import ConfigError, NotEnoughDataError, ShapeError
from interlatent.hooks import HookPoint
from interlatent.patch.core import LatentPatch, at_hook, logits_of
from interlatent.patch.effects import (METRIC_READS, AnswerPosition, Effect, ablation_effect, capture_latents,
                                       matched_control_latents, measure)

log = logging.getLogger(__name__)

DOSES = (1, 2, 4, 8, 16, 32, 64)


def _spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclass
class SteeringEffect:
    """A steering intervention's effect next to its controls.

    ``latent``: the steered latent (None for a direction); ``scale``: the steering coefficient;
    ``norm``: the norm of the vector added at each steered position (controls add vectors of this
    norm too); ``control_latents``: the latent of each control (latent steering), else None."""

    latent: int | None
    scale: float
    norm: float
    effect: Effect
    control: list[Effect]
    metric: str
    control_latents: list[int] | None = None
    control_scales: list[float] = field(default_factory=list)
    seed: int = 0
    positions: list[int] | None = None

    def _v(self, eff: Effect) -> float:
        value = getattr(eff, self.metric)
        return float("nan") if value is None else float(value)

    @property
    def value(self) -> float:
        return self._v(self.effect)

    @property
    def control_values(self) -> list[float]:
        return [self._v(e) for e in self.control]

    @property
    def control_mean(self) -> float:
        return float(np.mean(self.control_values))

    @property
    def control_std(self) -> float:
        return _spread(self.control_values)

    @property
    def exceeds_control(self) -> bool:
        """True when the effect lies beyond the control's mean by more than two of its spreads."""
        spread = max(self.control_std, 1e-12)
        return abs(self.value - self.control_mean) > 2 * spread and abs(self.value) > abs(self.control_mean)

    @property
    def percentile(self) -> float:
        """Fraction of controls whose effect is smaller in magnitude than the steering's."""
        return float(np.mean([abs(v) < abs(self.value) for v in self.control_values]))

    def to_dict(self) -> dict[str, Any]:
        return {"latent": self.latent, "scale": self.scale, "norm": self.norm, "metric": self.metric,
                "value": self.value, "control_mean": self.control_mean, "control_std": self.control_std,
                "exceeds_control": self.exceeds_control, "percentile": self.percentile,
                "effect": self.effect.to_dict(), "control": [e.to_dict() for e in self.control],
                "control_values": self.control_values, "control_latents": self.control_latents,
                "control_scales": self.control_scales, "seed": self.seed, "positions": self.positions}


def _add_at(model: Any, point: HookPoint, vector: Tensor,
            positions: Sequence[int] | None) -> AbstractContextManager[None]:
    """Add ``vector`` ``[d]`` to the activation at ``point`` at ``positions`` (None: every position)."""
    def fn(act: Tensor) -> Tensor:
        if act.shape[-1] != vector.shape[-1]:
            raise ShapeError(f"the direction has width {vector.shape[-1]}, but the activation at {point.name} has "
                             f"width {act.shape[-1]}")
        out = act.clone()
        cols = slice(None) if positions is None else [int(p) % act.shape[1] for p in positions]
        out[:, cols] = out[:, cols] + vector.to(act.dtype)
        return out

    return at_hook(model, point, fn)


@torch.no_grad()
def steering_effect(patch: LatentPatch, model: Any, tokens: Tensor, *, latent: int | None = None,
                    direction: Tensor | np.ndarray | None = None, scale: float = 1.0,
                    positions: Sequence[int] | int | None = None, answer: tuple[int, int] | None = None,
                    answer_position: AnswerPosition = None, metric: str | None = None, n_control: int = 8,
                    seed: int = 0, frequencies: np.ndarray | None = None, attention_mask: Tensor | None = None,
                    db: Any = None) -> SteeringEffect:
    """Steer and measure, next to ``n_control`` seeded controls.

    ``latent``: add ``scale`` to that latent at ``positions`` (the decoder row times ``scale`` is added
    at the patch's output hook, the error term kept); controls steer other latents active at those
    positions (> 0 somewhere there, frequency-matched like :func:`ablation_effect`'s), each by the
    coefficient that adds a vector of the same norm. ``direction``: add ``scale * direction`` at the
    patch's output hook; controls add random Gaussian directions rescaled to the same norm.
    ``metric``: ``delta_logit_diff`` (default with ``answer``), ``delta_loss`` (default without),
    ``kl`` or any field of :class:`Effect`. Recorded in ``db`` (kind ``"steering"``) if given."""
    if (latent is None) == (direction is None):
        raise ConfigError(f"steering_effect needs exactly one of latent= (an index) or direction= (a vector); got "
                          f"latent={latent!r} and direction={'a vector' if direction is not None else None}")
    if n_control < 1:
        raise ConfigError(f"n_control must be >= 1 (the random controls beside the steering), got {n_control}")
    metric = metric or ("delta_logit_diff" if answer is not None else "delta_loss")
    if metric not in METRIC_READS:
        raise ConfigError(f"metric must be one of {sorted(METRIC_READS)}, got {metric!r}")
    if METRIC_READS[metric] == "answer" and answer is None:
        raise ConfigError(f"metric {metric!r} reads an answer logit difference: pass answer=(correct, wrong)")
    pos = None if positions is None else [int(p) for p in np.atleast_1d(positions)]
    _, p_out = patch.check_model(model)
    rng = np.random.default_rng(seed)
    clean = logits_of(model, tokens, attention_mask)

    def run(intervention: Any) -> Effect:
        return measure(model, tokens, intervention, answer=answer, answer_position=answer_position,
                       attention_mask=attention_mask, clean_logits=clean, positions=pos, point=p_out)

    if latent is not None:
        latent = int(latent)
        patch.edits(steer={latent: scale}, positions=pos)  # validates the index and positions
        row_norm = patch.module.W_dec.detach().norm(dim=-1).cpu().numpy().astype(np.float64)
        norm = abs(float(scale)) * float(row_norm[latent])
        effect = run(lambda: patch.applied(model, steer={latent: scale}, positions=pos))
        acts = capture_latents(patch, model, tokens, attention_mask, pos)
        eligible = (acts > 0).sum(0).numpy() > 0
        freq = (acts > 0).float().mean(0).numpy() if frequencies is None else np.asarray(frequencies)
        if int(eligible.sum() - eligible[latent]) < 1:
            raise NotEnoughDataError(f"no other latent is active at the steered positions of these {tokens.shape[0]} "
                                     "prompts, so no control latent can be drawn; measure on more prompts or positions")
        chosen = [matched_control_latents(freq, [latent], rng, eligible=eligible, exclude=[latent])[0]
                  for _ in range(n_control)]
        scales = [float(np.sign(scale) * norm / max(row_norm[c], 1e-12)) for c in chosen]
        control = [run(lambda c=c, s=s: patch.applied(model, steer={c: s}, positions=pos))
                   for c, s in zip(chosen, scales)]
        result = SteeringEffect(latent, float(scale), norm, effect, control, metric, chosen, scales, seed, pos)
    else:
        vec = torch.as_tensor(np.asarray(direction), dtype=torch.float32).reshape(-1)
        if vec.shape[0] != patch.module.cfg.out_dim:
            raise ShapeError(f"direction must have the width of {p_out.name} ({patch.module.cfg.out_dim}), got "
                             f"{vec.shape[0]}")
        if not torch.isfinite(vec).all() or float(vec.norm()) == 0:
            raise ConfigError("direction must be a finite, non-zero vector")
        vec = vec * float(scale)
        norm = float(vec.norm())
        if pos is not None:
            LatentPatch.check_positions(patch.edits(positions=pos), tokens.shape[-1])
        effect = run(lambda: _add_at(model, p_out, vec, pos))
        control = []
        for _ in range(n_control):
            r = torch.as_tensor(rng.standard_normal(vec.shape[0]), dtype=torch.float32)
            r = r * (norm / float(r.norm()))
            control.append(run(lambda r=r: _add_at(model, p_out, r, pos)))
        result = SteeringEffect(None, float(scale), norm, effect, control, metric, None, [], seed, pos)
    if db is not None:
        db.add_intervention(patch.name, "steering", {"latent": result.latent, "direction": latent is None,
                                                     "scale": float(scale), "positions": pos, "n_control": n_control,
                                                     "seed": seed, "answer": list(answer) if answer else None,
                                                     "control": "matched latents, same norm" if latent is not None
                                                     else "random directions, same norm"}, result.to_dict())
    return result


@dataclass
class DoseResponse:
    """Effect of ablating the top ``n`` latents of a ranking, for each ``n``, beside its control."""

    ranking: list[int]
    rows: list[dict[str, Any]]
    metric: str
    ranked_by: str

    def to_pandas(self) -> pd.DataFrame:
        """One row per dose: ``n_latents``, ``value``, ``control_mean``, ``control_std``,
        ``control_lo`` / ``control_hi`` (the smallest / largest control), ``exceeds_control``."""
        cols = ["n_latents", "value", "control_mean", "control_std", "control_lo", "control_hi", "exceeds_control",
                "n_acting"]
        return pd.DataFrame([{c: r[c] for c in cols} for r in self.rows], columns=cols)

    def to_dict(self) -> dict[str, Any]:
        return {"ranking": self.ranking, "metric": self.metric, "ranked_by": self.ranked_by, "rows": self.rows}


def dose_response(patch: LatentPatch, model: Any, tokens: Tensor, ranking: Sequence[int] | Any, *,
                  sizes: Sequence[int] = DOSES, sign: str = "abs", mode: str = "zero",
                  answer: tuple[int, int] | None = None, answer_position: AnswerPosition = None,
                  positions: Sequence[int] | None = None, metric: str | None = None, n_control: int = 5,
                  seed: int = 0, frequencies: np.ndarray | None = None, attention_mask: Tensor | None = None,
                  ranked_by: str | None = None, db: Any = None) -> DoseResponse:
    """Ablate the top ``n`` latents of ``ranking`` for each ``n`` in ``sizes`` with
    :func:`ablation_effect` (controls: as many frequency-matched random latents active where the
    ablation acts, ``n_control`` sets, seeded; fewer when not enough are active, said in the rows).

    ``ranking``: latent indices, best first, or an :class:`~interlatent.patch.attribution.AttributionResult`
    (its active latents ordered by ``sign``: ``"abs"``, ``"positive"`` or ``"negative"``). Sizes beyond
    the ranking's length are dropped with a warning. Recorded in ``db`` (kind ``"dose_response"``)."""
    if hasattr(ranking, "top") and hasattr(ranking, "scores"):
        ranked_by = ranked_by or f"attribution ({ranking.method}, {sign})"
        ranking = ranking.top(max(sizes), sign=sign)
    order = [int(i) for i in ranking]
    if len(set(order)) != len(order):
        raise ConfigError("ranking names a latent twice; give each latent once, best first")
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"sizes must be positive counts of latents, got {sizes}")
    kept = [s for s in sizes if s <= len(order)]
    if len(kept) < len(sizes):
        log.warning("dose_response: the ranking has %d latents, so doses %s are dropped", len(order),
                    [s for s in sizes if s > len(order)])
    if not kept:
        raise ConfigError(f"the ranking has {len(order)} latents, fewer than the smallest dose {sizes[0]}")
    rows = []
    for n in kept:
        eff = ablation_effect(patch, model, tokens, order[:n], mode=mode, answer=answer, positions=positions,
                              answer_position=answer_position, frequencies=frequencies, n_control=n_control,
                              seed=seed, attention_mask=attention_mask, metric=metric, allow_fewer_controls=True)
        values = [float("nan") if getattr(e, eff.metric) is None else float(getattr(e, eff.metric))
                  for e in eff.control]
        rows.append({"n_latents": n, "latents": order[:n], "value": eff.value, "control_mean": eff.control_mean,
                     "control_std": eff.control_std, "control_lo": float(np.min(values)),
                     "control_hi": float(np.max(values)), "control_values": values,
                     "exceeds_control": eff.exceeds_control, "n_acting": eff.controls_wanted_per_set,
                     "controls_per_set": eff.controls_per_set, "control_latents": eff.control_latents})
        metric = eff.metric
    result = DoseResponse(order[: kept[-1]], rows, metric, ranked_by or "given")
    if db is not None:
        db.add_intervention(patch.name, "dose_response", {"sizes": kept, "mode": mode, "n_control": n_control,
                                                          "seed": seed, "ranked_by": result.ranked_by,
                                                          "positions": None if positions is None
                                                          else [int(p) for p in positions],
                                                          "answer": list(answer) if answer else None},
                            result.to_dict())
    return result


__all__ = ["DOSES", "DoseResponse", "SteeringEffect", "dose_response", "steering_effect"]
