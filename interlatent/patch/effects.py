"""Measured effects of interventions, each against a control.

* :func:`measure` — next-token loss change, KL divergence from the clean distribution and an answer
  logit difference, for one intervention on a batch of prompts.
* :func:`ablation_effect` — the same for ablating chosen latents, next to a control: as many
  randomly chosen latents of similar activation frequency, over several seeds, with mean and spread.
* :func:`splice_quality` — CE loss with the reconstruction spliced in, against clean and against
  zero- and mean-ablating the hook point: ``loss_recovered = (CE_abl - CE_spliced) / (CE_abl - CE_clean)``
  (the zero-ablation score is SAELens's ``ce_loss_score``) and the KL score likewise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from interlatent.errors import ConfigError
from interlatent.patch.core import LatentPatch, at_hook, describe, logits_of

Intervention = Callable[[], AbstractContextManager[Any]]


def _loss_per_token(logits: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if mask is not None:
        nll = nll * mask[:, 1:]
    return nll


def _mean_loss(logits: Tensor, tokens: Tensor, mask: Tensor | None) -> float:
    nll = _loss_per_token(logits, tokens, mask)
    denom = mask[:, 1:].sum() if mask is not None else torch.tensor(nll.numel())
    return float(nll.sum() / denom.clamp_min(1))


def _kl(clean: Tensor, other: Tensor, mask: Tensor | None) -> float:
    """Mean KL(clean || other) over (real) positions."""
    p = torch.log_softmax(clean.float(), dim=-1)
    q = torch.log_softmax(other.float(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1)
    if mask is not None:
        return float((kl * mask).sum() / mask.sum().clamp_min(1))
    return float(kl.mean())


def _last_index(tokens: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(tokens.shape[1]).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def logit_diff(logits: Tensor, tokens: Tensor, answer: tuple[int, int], mask: Tensor | None = None) -> Tensor:
    """Per prompt: logit[answer[0]] - logit[answer[1]] at the last real position."""
    last = _last_index(tokens, mask)
    final = logits[torch.arange(logits.shape[0]), last]
    return final[:, answer[0]] - final[:, answer[1]]


@dataclass
class Effect:
    """One intervention's measured effect (patched minus clean where it is a change)."""

    loss_clean: float
    loss_patched: float
    delta_loss: float
    kl: float
    logit_diff_clean: float | None = None
    logit_diff_patched: float | None = None
    delta_logit_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def measure(model: Any, tokens: Tensor, intervention: Intervention, *, answer: tuple[int, int] | None = None,
            attention_mask: Tensor | None = None, clean_logits: Tensor | None = None) -> Effect:
    """Run ``tokens`` clean and inside ``intervention()`` (a context manager) and compare."""
    clean = logits_of(model, tokens, attention_mask) if clean_logits is None else clean_logits
    with intervention():
        patched = logits_of(model, tokens, attention_mask)
    mask = attention_mask.float() if attention_mask is not None else None
    lc, lpatch = _mean_loss(clean, tokens, mask), _mean_loss(patched, tokens, mask)
    eff = Effect(lc, lpatch, lpatch - lc, _kl(clean, patched, mask))
    if answer is not None:
        a = float(logit_diff(clean, tokens, answer, attention_mask).mean())
        b = float(logit_diff(patched, tokens, answer, attention_mask).mean())
        eff.logit_diff_clean, eff.logit_diff_patched, eff.delta_logit_diff = a, b, b - a
    return eff


def matched_control_latents(frequencies: np.ndarray, chosen: Sequence[int], rng: np.random.Generator,
                            n_bins: int = 10) -> list[int]:
    """For each chosen latent, a random other latent from the same activation-frequency bin."""
    freq = np.asarray(frequencies, dtype=np.float64)
    order = np.argsort(freq, kind="stable")
    bins = np.empty(len(freq), dtype=np.int64)
    bins[order] = np.minimum(np.arange(len(freq)) * n_bins // max(len(freq), 1), n_bins - 1)
    chosen_set = set(int(c) for c in chosen)
    picked: list[int] = []
    for c in chosen:
        pool = [i for i in np.flatnonzero(bins == bins[c]) if i not in chosen_set and i not in picked]
        if not pool:
            pool = [i for i in range(len(freq)) if i not in chosen_set and i not in picked]
        if not pool:
            raise ConfigError("not enough other latents to draw a control from")
        picked.append(int(rng.choice(pool)))
    return picked


@dataclass
class ControlledEffect:
    """An intervention's effect next to a random-latent control over several seeds."""

    latents: list[int]
    effect: Effect
    control: list[Effect]
    control_latents: list[list[int]]
    metric: str

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
    def exceeds_control(self) -> bool:
        """True when the effect lies beyond the control's mean by more than two of its spreads."""
        spread = max(self.control_std, 1e-12)
        return abs(self.value - self.control_mean) > 2 * spread and abs(self.value) > abs(self.control_mean)

    def to_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "metric": self.metric, "value": self.value,
                "control_mean": self.control_mean, "control_std": self.control_std,
                "exceeds_control": self.exceeds_control, "effect": self.effect.to_dict(),
                "control": [e.to_dict() for e in self.control], "control_latents": self.control_latents}


@torch.no_grad()
def ablation_effect(patch: LatentPatch, model: Any, tokens: Tensor, latents: Sequence[int], *,
                    mode: str = "zero", answer: tuple[int, int] | None = None, positions: Sequence[int] | None = None,
                    frequencies: np.ndarray | None = None, n_control: int = 5, seed: int = 0,
                    attention_mask: Tensor | None = None, metric: str | None = None,
                    db: Any = None) -> ControlledEffect:
    """Ablate ``latents`` and measure; do the same for ``n_control`` random sets of as many latents
    of similar activation frequency (seeded). ``frequencies`` default: with ``positions``, measured
    on ``tokens`` at those positions (a control must be active where the ablation acts, or it
    changes nothing by construction); otherwise from the store when ``db=`` is given, else measured
    on ``tokens``. ``metric`` picks the reported field (default ``delta_logit_diff`` with an answer,
    else ``delta_loss``). Recorded in ``db`` if given."""
    latents = [int(i) for i in latents]
    patch.edits(ablate=latents, mode=mode, positions=positions)  # validate before any forward pass
    patch.check_model(model)
    if positions is not None:
        LatentPatch.check_positions(patch.edits(ablate=latents, mode=mode, positions=positions), tokens.shape[-1])
    source = "given"
    if frequencies is None:
        if positions is not None:
            source = "tokens at positions"
            frequencies = latent_frequencies(patch, model, tokens, attention_mask, positions)
        elif db is not None:
            source = "store"
            frequencies = _frequencies_from_db(db, patch)
        else:
            source = "tokens"
            frequencies = latent_frequencies(patch, model, tokens, attention_mask)
    metric = metric or ("delta_logit_diff" if answer is not None else "delta_loss")
    clean = logits_of(model, tokens, attention_mask)

    def run(chosen: list[int]) -> Effect:
        return measure(model, tokens, lambda: patch.applied(model, ablate=chosen, mode=mode, positions=positions),
                       answer=answer, attention_mask=attention_mask, clean_logits=clean)

    effect = run(latents)
    rng = np.random.default_rng(seed)
    control_sets = [matched_control_latents(frequencies, latents, rng) for _ in range(n_control)]
    result = ControlledEffect(latents, effect, [run(c) for c in control_sets], control_sets, metric)
    if db is not None:
        db.add_intervention(patch.name, "ablation", {**describe(patch.edits(ablate=latents, mode=mode,
                                                                              positions=positions)),
                                                       "n_control": n_control, "seed": seed,
                                                       "control_frequencies": source,
                                                       "answer": list(answer) if answer else None},
                            result.to_dict())
    return result


def _frequencies_from_db(db: Any, patch: LatentPatch) -> np.ndarray:
    from interlatent.patch.core import latent_frequencies_from_db

    return latent_frequencies_from_db(db, patch.name)


@torch.no_grad()
def latent_frequencies(patch: LatentPatch, model: Any, tokens: Tensor, attention_mask: Tensor | None = None,
                       positions: Sequence[int] | None = None) -> np.ndarray:
    """Fraction of (real) positions on which each latent is active, measured on ``tokens``
    (only at ``positions``, if given)."""
    acts = capture_latents(patch, model, tokens, attention_mask, positions)
    return (acts > 0).float().mean(0).numpy()


@torch.no_grad()
def capture_latents(patch: LatentPatch, model: Any, tokens: Tensor, attention_mask: Tensor | None = None,
                    positions: Sequence[int] | None = None) -> Tensor:
    """Dense latents ``[real positions, d_sae]`` of ``tokens`` at the patch's input hook."""
    p_in, _ = patch.check_model(model)
    flat = _activations_at(model, p_in, tokens, attention_mask, positions)
    return patch.module.encode_dense(flat.to(patch.module.W_enc.dtype))


def _capture(model: Any, point: Any, store: dict[str, Tensor]) -> AbstractContextManager[None]:
    """Keep the activation at ``point`` in ``store["x"]`` during the block."""
    return at_hook(model, point, lambda act: store.__setitem__("x", act))


def _ablate_point(model: Any, point: Any, value: Tensor | float) -> AbstractContextManager[None]:
    """Replace a hook point's activation by ``value`` (0, or a mean vector) everywhere."""
    return at_hook(model, point, lambda act: torch.zeros_like(act) + (value.to(act.dtype)
                                                                      if isinstance(value, Tensor) else value))


def _activations_at(model: Any, point: Any, tokens: Tensor, attention_mask: Tensor | None,
                    positions: Sequence[int] | None = None) -> Tensor:
    """``[real positions, width]`` activations at ``point`` for ``tokens`` (only ``positions``, if given)."""
    store: dict[str, Tensor] = {}
    with _capture(model, point, store):
        logits_of(model, tokens, attention_mask)
    acts, mask = store["x"], attention_mask
    if positions is not None:
        at = [p % acts.shape[1] for p in positions]
        acts = acts[:, at]
        mask = mask[:, at] if mask is not None else None
    flat = acts.reshape(-1, acts.shape[-1])
    return flat[mask.reshape(-1).bool()] if mask is not None else flat


@torch.no_grad()
def splice_quality(patch: LatentPatch, model: Any, tokens: Tensor, *, attention_mask: Tensor | None = None,
                   db: Any = None) -> dict[str, float]:
    """CE loss and KL with the reconstruction spliced in (no error term) vs clean and vs zero- and
    mean-ablating the patched output hook. Recorded in ``db`` if given."""
    _, p_out = patch.check_model(model)
    mask = attention_mask.float() if attention_mask is not None else None
    clean = logits_of(model, tokens, attention_mask)
    with patch.applied(model, keep_error=False):
        spliced = logits_of(model, tokens, attention_mask)
    with _ablate_point(model, p_out, 0.0):
        zeroed = logits_of(model, tokens, attention_mask)
    flat = _activations_at(model, p_out, tokens, attention_mask)
    with _ablate_point(model, p_out, flat.mean(0)):
        meaned = logits_of(model, tokens, attention_mask)
    ce = {name: _mean_loss(lg, tokens, mask) for name, lg in
          (("clean", clean), ("spliced", spliced), ("zero_ablated", zeroed), ("mean_ablated", meaned))}
    kl = {name: _kl(clean, lg, mask) for name, lg in (("spliced", spliced), ("zero_ablated", zeroed),
                                                      ("mean_ablated", meaned))}

    def recovered(abl: float, spl: float, cln: float) -> float:
        return (abl - spl) / (abl - cln) if abs(abl - cln) > 1e-12 else float("nan")

    out = {
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablated": ce["zero_ablated"],
        "ce_mean_ablated": ce["mean_ablated"],
        "loss_recovered_zero": recovered(ce["zero_ablated"], ce["spliced"], ce["clean"]),
        "loss_recovered_mean": recovered(ce["mean_ablated"], ce["spliced"], ce["clean"]),
        "kl_spliced": kl["spliced"], "kl_zero_ablated": kl["zero_ablated"], "kl_mean_ablated": kl["mean_ablated"],
        "kl_score_zero": (kl["zero_ablated"] - kl["spliced"]) / kl["zero_ablated"] if kl["zero_ablated"] else float("nan"),
        "kl_score_mean": (kl["mean_ablated"] - kl["spliced"]) / kl["mean_ablated"] if kl["mean_ablated"] else float("nan"),
    }
    if db is not None:
        db.add_intervention(patch.name, "splice_quality", {"keep_error": False, "n_prompts": int(tokens.shape[0])}, out)
    return out


__all__ = ["ControlledEffect", "Effect", "ablation_effect", "capture_latents", "latent_frequencies", "logit_diff",
           "matched_control_latents", "measure", "splice_quality"]
