"""Ablation effects next to a random-latent control: as many randomly chosen latents of similar
activation frequency, over several seeds, with mean and spread. Controls are drawn only from latents
active where the ablation acts (a latent that never fires there changes nothing when ablated, so it
cannot fail as a control)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Int, Shaped
from torch import Tensor

from interlatent.errors import ConfigError, NotEnoughDataError, ShapeError
from interlatent.patch.core import LatentPatch, describe, latent_frequencies_from_db, logits_of
from interlatent.patch.measure import METRIC_READS, Effect, _measure, capture_latents
from interlatent.patch.reach import (
    AnswerPosition,
    _describe_position,
    ablated_sites,
    answer_columns,
    influential_sites,
    require_effect_can_be_nonzero,
)

log = logging.getLogger(__name__)


def matched_control_latents(frequencies: np.ndarray, chosen: Sequence[int], rng: np.random.Generator,
                            n_bins: int = 10, *, eligible: np.ndarray | None = None, exclude: Sequence[int] = (),
                            allow_fewer: bool = False) -> list[int]:
    """For each chosen latent, a random other latent of similar activation frequency.

    Only ``eligible`` latents (a ``[d_sae]`` bool mask; default: frequency > 0) that are neither
    chosen nor in ``exclude`` can be drawn: a latent that never fires is no control. Frequencies are
    binned by value into ``n_bins`` quantile bins of the candidates and the chosen latents (ties share
    a bin); a chosen latent whose bin has no candidate left takes the nearest frequency. Fewer
    candidates than chosen latents raise :class:`NotEnoughDataError`, or with ``allow_fewer`` give
    as many controls as there are candidates."""
    freq = np.asarray(frequencies, dtype=np.float64)
    ok = freq > 0 if eligible is None else np.asarray(eligible, dtype=bool)
    if ok.shape != freq.shape:
        raise ShapeError(f"eligible must be a [{len(freq)}] mask like frequencies, got shape {ok.shape}")
    chosen = [int(c) for c in chosen]
    taken = set(chosen) | {int(c) for c in exclude}
    candidates = [i for i in np.flatnonzero(ok) if int(i) not in taken]
    if len(candidates) < len(chosen) and not allow_fewer:
        raise NotEnoughDataError(f"a control needs {len(chosen)} other latents, but only {len(candidates)} active "
                                 "ones are left to draw from; ablate fewer latents, measure on more prompts, or "
                                 "pass allow_fewer=True")
    population = freq[np.array(candidates + chosen, dtype=np.int64)]
    edges = np.quantile(population, np.linspace(0, 1, n_bins + 1)[1:-1]) if len(population) else np.array([])
    bins = np.searchsorted(edges, freq, side="right")
    picked: list[int] = []
    for c in chosen:
        left = [i for i in candidates if i not in picked]
        if not left:
            break
        pool = [i for i in left if bins[i] == bins[c]]
        if not pool:
            dist = np.abs(freq[left] - freq[c])
            pool = [i for i, d in zip(left, dist) if d == dist.min()]
        picked.append(int(rng.choice(pool)))
    return picked


@dataclass
class ControlledEffect:
    """An intervention's effect next to a random-latent control over several seeds.

    ``latent_activity`` / ``control_activity``: the fraction of ablated (prompt, position) sites at
    which each chosen / control latent is active (> 0), measured on the prompts of the experiment;
    ``inactive_latents``: chosen latents never active there (ablating them changes nothing);
    ``n_control_candidates``: the other latents active there, that controls are drawn from;
    ``controls_wanted_per_set``: the chosen latents that act, each matched by one control latent;
    ``controls_per_set``: the size of the control sets drawn (smaller only with ``allow_fewer_controls``)."""

    latents: list[int]
    effect: Effect
    control: list[Effect]
    control_latents: list[list[int]]
    metric: str
    latent_activity: list[float] = field(default_factory=list)
    control_activity: list[list[float]] = field(default_factory=list)
    inactive_latents: list[int] = field(default_factory=list)
    n_ablated_positions: int | None = None
    n_control_candidates: int | None = None
    controls_wanted_per_set: int | None = None
    answer_position: int | list[int] | None = None

    def _values(self, eff: Effect) -> float:
        value = getattr(eff, self.metric)
        return float("nan") if value is None else float(value)

    @property
    def value(self) -> float:
        return self._values(self.effect)

    @property
    def control_mean(self) -> float:
        return float(np.mean([self._values(e) for e in self.control]))

    @property
    def control_std(self) -> float:
        return float(np.std([self._values(e) for e in self.control], ddof=1)) if len(self.control) > 1 else 0.0

    @property
    def controls_per_set(self) -> int:
        return min((len(c) for c in self.control_latents), default=0)

    @property
    def exceeds_control(self) -> bool:
        """True when the effect lies beyond the control's mean by more than two of its spreads."""
        spread = max(self.control_std, 1e-12)
        return abs(self.value - self.control_mean) > 2 * spread and abs(self.value) > abs(self.control_mean)

    def to_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "metric": self.metric, "value": self.value,
                "control_mean": self.control_mean, "control_std": self.control_std,
                "exceeds_control": self.exceeds_control, "effect": self.effect.to_dict(),
                "control": [e.to_dict() for e in self.control], "control_latents": self.control_latents,
                "latent_activity": self.latent_activity, "control_activity": self.control_activity,
                "inactive_latents": self.inactive_latents, "n_ablated_positions": self.n_ablated_positions,
                "n_control_candidates": self.n_control_candidates,
                "controls_wanted_per_set": self.controls_wanted_per_set, "controls_per_set": self.controls_per_set,
                "answer_position": self.answer_position}


@torch.no_grad()
def ablation_effect(patch: LatentPatch, model: Any, tokens: Int[Tensor, "batch pos"], latents: Sequence[int], *,
                    mode: str = "zero", answer: tuple[int, int] | None = None, positions: Sequence[int] | None = None,
                    answer_position: AnswerPosition = None, frequencies: np.ndarray | None = None,
                    n_control: int = 5, seed: int = 0, attention_mask: Shaped[Tensor, "batch pos"] | None = None,
                    metric: str | None = None, allow_fewer_controls: bool = False, db: Any = None) -> ControlledEffect:
    """Ablate ``latents`` and measure; do the same for ``n_control`` random sets of as many latents
    of similar activation frequency (seeded).

    Controls are drawn only from latents active (> 0) where the ablation acts: at ``positions``
    (columns; None: every real position) on ``tokens``, never from the chosen ones. Frequencies for
    the matching: ``frequencies`` if given; else with ``positions`` measured on ``tokens`` there;
    else from the store when ``db=`` is given; else measured on ``tokens``. Fewer active candidates
    than latents to match raise :class:`NotEnoughDataError`; ``allow_fewer_controls=True`` uses the
    ones there are (with a warning; the count is in the result). Chosen latents that never change
    where the ablation acts are named in a warning and get no control; if none would change, the
    call is refused.

    ``answer`` is read at ``answer_position`` (default ``-1``: each prompt's last real token; an
    int column, negative from each prompt's real end, or a ``[batch]`` tensor). ``metric`` picks the
    reported field (default ``delta_logit_diff`` with an answer, else ``delta_loss``); an ablation
    that cannot change it (an answer before every ablated position, or on a final-block point past
    attention at a position not ablated; a loss read nowhere the ablation reaches) raises
    :class:`ConfigError` before any forward pass. Recorded in ``db`` if given."""
    latents = [int(i) for i in latents]
    edits = patch.edits(ablate=latents, mode=mode, positions=positions)  # validate before any forward pass
    _, p_out = patch.check_model(model)
    LatentPatch.check_positions(edits, tokens.shape[-1])
    if not latents:
        raise ConfigError("ablation_effect needs at least one latent to ablate, got none")
    metric = metric or ("delta_logit_diff" if answer is not None else "delta_loss")
    if metric not in METRIC_READS:
        raise ConfigError(f"metric must be one of {sorted(METRIC_READS)}, got {metric!r}")
    if METRIC_READS[metric] == "answer" and answer is None:
        raise ConfigError(f"metric {metric!r} reads an answer logit difference: pass answer=(correct, wrong)")
    cols = answer_columns(tokens, attention_mask, answer_position) if answer is not None else None
    require_effect_can_be_nonzero(model, tokens, attention_mask, edits.positions, p_out, METRIC_READS[metric], cols,
                                  what=f"ablation_effect's {metric}")
    # the ablated sites whose edit can change what the metric reads: activity is counted, and
    # controls are drawn, only there (elsewhere an ablation is zero by construction)
    sites = influential_sites(model, tokens, attention_mask, edits.positions, p_out, METRIC_READS[metric], cols)
    acts = capture_latents(patch, model, tokens, attention_mask, sites=sites)  # [sites, d_sae]
    n_sites = int(acts.shape[0])
    active = (acts > 0).sum(0).numpy()
    fill = torch.zeros(patch.d_sae) if mode == "zero" else patch.latent_means.to(acts.dtype)
    changes = (acts != fill[None, :].to(acts.dtype)).any(0).numpy() if n_sites else np.zeros(patch.d_sae, bool)
    where = "every real position" if positions is None else f"positions {list(edits.positions)}"
    narrowed = n_sites < int(ablated_sites(tokens, attention_mask, edits.positions).sum())
    if narrowed:
        where += f" where the ablation can change {metric}"
    inactive = [c for c in latents if not changes[c]]
    if len(inactive) == len(latents):
        raise ConfigError(f"latents {inactive} are never active at {where} on these {tokens.shape[0]} prompts "
                          f"({n_sites} (prompt, position) sites), so ablating them changes nothing by construction; "
                          "pick latents active where the ablation acts")
    if inactive:
        log.warning("latents %s are never active at %s on these %d prompts: ablating them changes nothing; "
                    "they get no control", inactive, where, tokens.shape[0])
    acting = [c for c in latents if changes[c]]
    eligible = active > 0
    n_candidates = int(eligible.sum() - eligible[np.unique(latents)].sum())
    if n_candidates < len(acting):
        msg = (f"a control for {len(acting)} latents needs {len(acting)} other latents active at {where} on these "
               f"{tokens.shape[0]} prompts; only {n_candidates} are")
        if not allow_fewer_controls:
            raise NotEnoughDataError(f"{msg}. Measure on more prompts or positions, ablate fewer latents, or pass "
                                     "allow_fewer_controls=True to use the ones there are")
        if n_candidates == 0:
            raise NotEnoughDataError(f"{msg}: no control can be drawn. Measure on more prompts or positions")
        log.warning("%s: each control set uses %d (fewer than the %d ablated latents)", msg, n_candidates, len(acting))
    source = "given"
    if frequencies is None:
        if narrowed:
            source = "tokens at the sites that matter"
            frequencies = active / max(n_sites, 1)
        elif positions is not None:
            source = "tokens at positions"
            frequencies = active / max(n_sites, 1)
        elif db is not None:
            source = "store"
            frequencies = _frequencies_from_db(db, patch)
        else:
            source = "tokens"
            frequencies = active / max(n_sites, 1)
    clean = logits_of(model, tokens, attention_mask)

    def run(chosen: list[int]) -> Effect:
        return _measure(model, tokens, lambda: patch.applied(model, ablate=chosen, mode=mode, positions=positions),
                        answer, cols, attention_mask, clean, edits.positions, p_out)

    effect = run(latents)
    rng = np.random.default_rng(seed)
    control_sets = [matched_control_latents(frequencies, acting, rng, eligible=eligible, exclude=latents,
                                            allow_fewer=allow_fewer_controls) for _ in range(n_control)]

    def activity(chosen: list[int]) -> list[float]:
        return [float(active[c]) / max(n_sites, 1) for c in chosen]

    result = ControlledEffect(latents, effect, [run(c) for c in control_sets], control_sets, metric,
                              latent_activity=activity(latents), control_activity=[activity(c) for c in control_sets],
                              inactive_latents=inactive, n_ablated_positions=n_sites,
                              n_control_candidates=n_candidates, controls_wanted_per_set=len(acting),
                              answer_position=_describe_position(answer_position) if answer is not None else None)
    if db is not None:
        db.add_intervention(patch.name, "ablation", {**describe(edits), "n_control": n_control, "seed": seed,
                                                     "control_frequencies": source,
                                                     "control_activity": "active at the ablated positions",
                                                     "allow_fewer_controls": allow_fewer_controls,
                                                     "answer": list(answer) if answer else None,
                                                     "answer_position": result.answer_position}, result.to_dict())
    return result


def _frequencies_from_db(db: Any, patch: LatentPatch) -> np.ndarray:
    return latent_frequencies_from_db(db, patch.name)
