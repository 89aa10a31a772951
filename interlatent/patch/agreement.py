"""Exact single-latent patching, and how far attribution scores agree with it: the check a user runs
to see how much to trust :func:`~interlatent.patch.attribution.attribute` on their own model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from interlatent.errors import ConfigError
from interlatent.patch.attribution import (AttributionResult, Baseline, Metric, _latent_baseline, _scored_positions,
                                           attribute, metric_of, spliced)
from interlatent.patch.core import LatentPatch, logits_of
from interlatent.patch.effects import AnswerPosition


@torch.no_grad()
def exact_latent_effects(patch: LatentPatch, model: Any, tokens: Tensor, latents: Sequence[int], *,
                         answer: tuple[int, int] | None = None, metric: Metric | None = None,
                         answer_position: AnswerPosition = None, baseline: Baseline = "zero",
                         positions: Sequence[int] | None = None, attention_mask: Tensor | None = None) -> np.ndarray:
    """The exact change of the metric when each latent alone is patched to its baseline at every
    scored position of every prompt (one forward pass per latent): what :attr:`AttributionResult.scores`
    estimates."""
    reduce = metric_of(tokens, answer=answer, metric=metric, answer_position=answer_position,
                       attention_mask=attention_mask)
    where = _scored_positions(tokens, attention_mask, positions)[..., None] > 0
    rec: dict[str, Tensor] = {}
    with spliced(patch, model, lambda f_, e_: (f_, e_), rec):
        clean = float(reduce(logits_of(model, tokens, attention_mask)))
    b_lat, _, _ = _latent_baseline(patch, model, baseline, tokens, attention_mask, rec["f"], rec["e"])
    out = np.zeros(len(latents))
    for n, i in enumerate(int(v) for v in latents):
        def edit(f: Tensor, e: Tensor, i: int = i) -> tuple[Tensor, Tensor]:
            g = f.clone()
            g[..., i] = torch.where(where[..., 0].to(f.device), b_lat[..., i], f[..., i])
            return g, e

        with spliced(patch, model, edit):
            out[n] = float(reduce(logits_of(model, tokens, attention_mask))) - clean
    return out


@dataclass
class Agreement:
    """How far attribution scores agree with exact single-latent patching, on ``latents``."""

    latents: list[int]
    estimated: list[float]
    exact: list[float]
    spearman: float
    pearson: float
    top_k_recall: float
    k: int
    method: str
    seconds_estimate: float
    seconds_exact: float

    @property
    def time_ratio(self) -> float:
        """Seconds to score every latent over seconds of the exact sweep."""
        return self.seconds_estimate / self.seconds_exact if self.seconds_exact > 0 else float("nan")

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame({"latent": self.latents, "estimated": self.estimated, "exact": self.exact})

    def to_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "estimated": self.estimated, "exact": self.exact,
                "spearman": self.spearman, "pearson": self.pearson, "top_k_recall": self.top_k_recall,
                "k": self.k, "method": self.method, "seconds_estimate": self.seconds_estimate,
                "seconds_exact": self.seconds_exact, "time_ratio": self.time_ratio}


def _correlations(est: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    if len(est) < 2 or np.std(est) == 0 or np.std(exact) == 0:
        return float("nan"), float("nan")
    r_est = pd.Series(est).rank().to_numpy()
    r_exact = pd.Series(exact).rank().to_numpy()
    return float(np.corrcoef(r_est, r_exact)[0, 1]), float(np.corrcoef(est, exact)[0, 1])


def top_k_recall(estimated: ArrayLike, exact: ArrayLike,
                 k: int) -> float:
    """Of the ``k`` latents with the largest exact effects (by magnitude), the fraction that are
    among the ``k`` largest estimates."""
    est, ex = np.abs(np.asarray(estimated, float)), np.abs(np.asarray(exact, float))
    k = min(int(k), len(ex))
    if k == 0:
        return float("nan")
    truth = set(np.argsort(-ex, kind="stable")[:k].tolist())
    found = set(np.argsort(-est, kind="stable")[:k].tolist())
    return len(truth & found) / k


def attribution_agreement(patch: LatentPatch, model: Any, tokens: Tensor, *, answer: tuple[int, int] | None = None,
                          metric: Metric | None = None, answer_position: AnswerPosition = None,
                          baseline: Baseline = "zero", method: str = "ig", steps: int = 8, path: str = "latent",
                          seed: int = 0, positions: Sequence[int] | None = None, latents: Sequence[int] | None = None,
                          k: int = 20, attention_mask: Tensor | None = None,
                          result: AttributionResult | None = None, db: Any = None) -> Agreement:
    """Attribution scores next to exact single-latent patching, on ``latents`` (default: every latent
    active at a scored position): Spearman and Pearson correlation and top-``k`` recall, and the time
    of each. ``result``: scores already computed with the same arguments (else :func:`attribute` runs).
    Recorded in ``db`` (kind ``"attribution_agreement"``) if given."""
    kwargs = dict(answer=answer, metric=metric, answer_position=answer_position, baseline=baseline,
                  positions=positions, attention_mask=attention_mask)
    if result is None:
        result = attribute(patch, model, tokens, method=method, steps=steps, path=path, seed=seed, db=db, **kwargs)
    chosen = [int(i) for i in torch.nonzero(result.active).flatten()] if latents is None else [int(i) for i in latents]
    if not chosen:
        raise ConfigError("no latent is active at the scored positions of these prompts, so there is nothing to "
                          "compare; pass more prompts, other positions, or latents=")
    start = time.perf_counter()
    exact = exact_latent_effects(patch, model, tokens, chosen, **kwargs)
    seconds_exact = time.perf_counter() - start
    est = result.scores[chosen].numpy().astype(np.float64)
    spearman, pearson = _correlations(est, exact)
    agreement = Agreement(chosen, [float(v) for v in est], [float(v) for v in exact], spearman, pearson,
                          top_k_recall(est, exact, k), min(k, len(chosen)), result.method, result.seconds,
                          seconds_exact)
    if db is not None:
        db.add_intervention(patch.name, "attribution_agreement", result.spec, agreement.to_dict())
    return agreement


__all__ = ["Agreement", "attribution_agreement", "exact_latent_effects", "top_k_recall"]
