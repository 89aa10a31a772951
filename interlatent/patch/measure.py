"""One intervention's measured effect: next-token loss change, KL divergence from the clean
distribution and an answer logit difference, each also over only the positions it can reach; and
reading activations / latents at a hook point."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from interlatent.backends import make_backend
from interlatent.errors import ConfigError
from interlatent.hooks import HookPoint
from interlatent.patch.core import Edits, LatentPatch, at_hook, logits_of
from interlatent.patch.reach import (AnswerPosition, _read_positions, _real, answer_columns, logit_diff,
                                     reachable_logits, require_effect_can_be_nonzero)

Intervention = Callable[[], AbstractContextManager[Any]]


def _loss_mask(mask: Shaped[Tensor, "batch pos"] | None) -> Tensor | None:
    """``[batch, pos - 1]``: the logits at ``t`` predict a real token ``t + 1`` from a real token ``t``."""
    return None if mask is None else mask[:, :-1] * mask[:, 1:]


def _loss_per_token(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"],
                    mask: Shaped[Tensor, "batch pos"] | None) -> Tensor:
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if mask is not None:
        nll = nll * _loss_mask(mask)
    return nll


def _mean_loss(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"],
               mask: Shaped[Tensor, "batch pos"] | None) -> float:
    nll = _loss_per_token(logits, tokens, mask)
    denom = _loss_mask(mask).sum() if mask is not None else torch.tensor(nll.numel())
    return float(nll.sum() / denom.clamp_min(1))


def _kl_per_position(clean: Tensor, other: Tensor) -> Tensor:
    """``[batch, pos]`` KL(clean || other) of the next-token distributions."""
    p = torch.log_softmax(clean.float(), dim=-1)
    q = torch.log_softmax(other.float(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def _kl(clean: Tensor, other: Tensor, mask: Shaped[Tensor, "batch pos"] | None) -> float:
    """Mean KL(clean || other) over (real) positions."""
    kl = _kl_per_position(clean, other)
    if mask is not None:
        return float((kl * mask).sum() / mask.sum().clamp_min(1))
    return float(kl.mean())


def _as_point(model: Any, point: HookPoint | LatentPatch | str | None) -> HookPoint | None:
    if point is None or isinstance(point, HookPoint):
        return point
    if isinstance(point, LatentPatch):
        return point.check_model(model)[1]
    return make_backend(model).resolve(point)


@dataclass
class Effect:
    """One intervention's measured effect (patched minus clean where it is a change).

    ``delta_loss`` and ``kl`` are means over every real position; ``delta_loss_affected`` and
    ``kl_affected`` only over the positions whose logits the intervention can change (see
    :func:`reachable_logits`; None where no such position is read)."""

    loss_clean: float
    loss_patched: float
    delta_loss: float
    kl: float
    logit_diff_clean: float | None = None
    logit_diff_patched: float | None = None
    delta_logit_diff: float | None = None
    delta_loss_affected: float | None = None
    kl_affected: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: what each reportable metric reads: the answer position, the next-token loss, or every position (KL)
METRIC_READS = {"delta_logit_diff": "answer", "logit_diff_patched": "answer", "delta_loss": "loss",
                "loss_patched": "loss", "delta_loss_affected": "loss", "kl": "kl", "kl_affected": "kl"}


def _masked_mean(values: Tensor, where: Tensor) -> float | None:
    return float(values[where].mean()) if where.any() else None


@torch.no_grad()
def measure(model: Any, tokens: Int[Tensor, "batch pos"], intervention: Intervention, *,
            answer: tuple[int, int] | None = None, answer_position: AnswerPosition = None,
            attention_mask: Shaped[Tensor, "batch pos"] | None = None,
            clean_logits: Float[Tensor, "batch pos vocab"] | None = None, positions: Sequence[int] | None = None,
            point: HookPoint | LatentPatch | str | None = None) -> Effect:
    """Run ``tokens`` clean and inside ``intervention()`` (a context manager) and compare.

    Args:
        answer: ``(correct, wrong)`` token ids; their logit difference is read at ``answer_position``
            (default ``-1``: each prompt's last real token; see :func:`answer_columns`).
        positions: the columns the intervention edits (None: every position), and ``point`` the hook
            point it writes (a name, a :class:`HookPoint`, or the :class:`LatentPatch` applied). With
            them an answer the edit cannot reach is refused before anything runs, and
            ``delta_loss_affected`` / ``kl_affected`` average only where the logits can change.
    """
    hook = _as_point(model, point)
    cols = answer_columns(tokens, attention_mask, answer_position) if answer is not None else None
    if answer is not None and (positions is not None or hook is not None):
        require_effect_can_be_nonzero(model, tokens, attention_mask, positions, hook, "answer", cols,
                                      what="the answer logit difference")
    return _measure(model, tokens, intervention, answer, cols, attention_mask, clean_logits, positions, hook)


def _measure(model: Any, tokens: Int[Tensor, "batch pos"], intervention: Intervention,
             answer: tuple[int, int] | None, cols: Tensor | None, attention_mask: Shaped[Tensor, "batch pos"] | None,
             clean_logits: Float[Tensor, "batch pos vocab"] | None, positions: Sequence[int] | None,
             hook: HookPoint | None) -> Effect:
    """:func:`measure` after its checks: ``cols`` are the answer's columns, ``hook`` a resolved point."""
    clean = logits_of(model, tokens, attention_mask) if clean_logits is None else clean_logits
    with intervention():
        patched = logits_of(model, tokens, attention_mask)
    mask = attention_mask.float() if attention_mask is not None else None
    lc, lpatch = _mean_loss(clean, tokens, mask), _mean_loss(patched, tokens, mask)
    eff = Effect(lc, lpatch, lpatch - lc, _kl(clean, patched, mask))
    reach = reachable_logits(model, tokens, attention_mask, positions, hook)
    eff.kl_affected = _masked_mean(_kl_per_position(clean, patched), reach & _real(tokens, attention_mask))
    loss_reads = _read_positions("loss", tokens, attention_mask, None)[:, :-1] & reach[:, :-1]
    d_nll = _loss_per_token(patched, tokens, None) - _loss_per_token(clean, tokens, None)
    eff.delta_loss_affected = _masked_mean(d_nll, loss_reads)
    if answer is not None:
        a = float(logit_diff(clean, tokens, answer, attention_mask, cols).mean())
        b = float(logit_diff(patched, tokens, answer, attention_mask, cols).mean())
        eff.logit_diff_clean, eff.logit_diff_patched, eff.delta_logit_diff = a, b, b - a
    return eff


@torch.no_grad()
def edit_effect(patch: LatentPatch, model: Any, tokens: Int[Tensor, "batch pos"], *,
                ablate: Sequence[int] | None = None, mode: str | None = None, clamp: dict[int, float] | None = None,
                steer: dict[int, float] | None = None, positions: Sequence[int] | int | None = None,
                keep_error: bool | None = None, edits: Edits | None = None, answer: tuple[int, int] | None = None,
                answer_position: AnswerPosition = None,
                attention_mask: Shaped[Tensor, "batch pos"] | None = None) -> Effect:
    """:func:`measure` for one edit of ``patch`` (an :class:`Edits` as ``edits=``, or the edit
    keywords: ablate / clamp / steer at ``positions``, or a splice with ``keep_error=False``), with
    the edit's positions and output hook passed on: an answer it cannot reach is refused before
    anything runs, and ``*_affected`` cover the positions it reaches. A splice without the error
    term rewrites every position, whatever ``positions`` says."""
    value = patch.edits(ablate, mode, clamp, steer, positions, keep_error, edits=edits)
    _, p_out = patch.check_model(model)
    value.check_positions(tokens.shape[-1])
    if value.empty and value.keep_error:
        raise ConfigError("edit_effect got no edit: a patch that keeps the error term and edits no latent leaves "
                          "the model unchanged; pass ablate=, clamp=, steer= or keep_error=False")
    reach = None if not value.keep_error else value.positions
    return measure(model, tokens, lambda: patch.applied(model, edits=value),
                   answer=answer, answer_position=answer_position, attention_mask=attention_mask, positions=reach,
                   point=p_out)


@torch.no_grad()
def latent_frequencies(patch: LatentPatch, model: Any, tokens: Int[Tensor, "batch pos"],
                       attention_mask: Shaped[Tensor, "batch pos"] | None = None,
                       positions: Sequence[int] | None = None) -> Float[np.ndarray, " d_sae"]:
    """Fraction of (real) positions on which each latent is active, measured on ``tokens``
    (only at ``positions``, if given)."""
    acts = capture_latents(patch, model, tokens, attention_mask, positions)
    return (acts > 0).float().mean(0).numpy()


@torch.no_grad()
def capture_latents(patch: LatentPatch, model: Any, tokens: Int[Tensor, "batch pos"],
                    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
                    positions: Sequence[int] | None = None,
                    sites: Bool[Tensor, "batch pos"] | None = None) -> Float[Tensor, "sites d_sae"]:
    """Dense latents ``[real positions, d_sae]`` of ``tokens`` at the patch's input hook (only at
    ``positions`` if given; only at the ``[batch, pos]`` ``sites`` mask if given instead)."""
    p_in, _ = patch.check_model(model)
    flat = _activations_at(model, p_in, tokens, attention_mask, positions, sites)
    return patch.module.encode_dense(flat.to(patch.module.W_enc.dtype))


def _capture(model: Any, point: Any, store: dict[str, Tensor]) -> AbstractContextManager[None]:
    """Keep the activation at ``point`` in ``store["x"]`` during the block."""
    return at_hook(model, point, lambda act: store.__setitem__("x", act))


def _ablate_point(model: Any, point: Any, value: Tensor | float) -> AbstractContextManager[None]:
    """Replace a hook point's activation by ``value`` (0, or a mean vector) everywhere."""
    return at_hook(model, point, lambda act: torch.zeros_like(act) + (value.to(act.dtype)
                                                                      if isinstance(value, Tensor) else value))


def _activations_at(model: Any, point: Any, tokens: Int[Tensor, "batch pos"],
                    attention_mask: Shaped[Tensor, "batch pos"] | None,
                    positions: Sequence[int] | None = None,
                    sites: Bool[Tensor, "batch pos"] | None = None) -> Float[Tensor, "sites width"]:
    """``[real positions, width]`` activations at ``point`` for ``tokens`` (only ``positions``, if given;
    only the ``sites`` mask, if given instead)."""
    store: dict[str, Tensor] = {}
    with _capture(model, point, store):
        logits_of(model, tokens, attention_mask)
    acts, mask = store["x"], attention_mask
    if sites is not None:
        return acts[sites.to(acts.device)]
    if positions is not None:
        at = sorted({p % acts.shape[1] for p in positions})  # a column named twice is one site
        acts = acts[:, at]
        mask = mask[:, at] if mask is not None else None
    flat = acts.reshape(-1, acts.shape[-1])
    return flat[mask.reshape(-1).bool()] if mask is not None else flat
