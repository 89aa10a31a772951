"""Measured effects of interventions, each against a control.

* :func:`measure` — next-token loss change, KL divergence from the clean distribution and an answer
  logit difference, for one intervention on a batch of prompts.
* :func:`ablation_effect` — the same for ablating chosen latents, next to a control: as many
  randomly chosen latents of similar activation frequency, over several seeds, with mean and spread.
  Controls are drawn only from latents active where the ablation acts (a latent that never fires
  there changes nothing when ablated, so it cannot fail as a control).
* :func:`splice_quality` — CE loss with the reconstruction spliced in, against clean and against
  zero- and mean-ablating the hook point: ``loss_recovered = (CE_abl - CE_spliced) / (CE_abl - CE_clean)``
  (the zero-ablation score is SAELens's ``ce_loss_score``) and the KL score likewise.

The answer logit difference is read at ``answer_position`` (default ``-1``: each prompt's last real
token). An effect that cannot be non-zero is refused with a :class:`ConfigError` before anything runs:
in a causal model an edit at position ``p`` changes logits only at ``p`` and later, and after a point
of the final block past its attention (``resid_mid``, ``attn_out``, ``mlp_in``, ``mlp_out``,
``resid_post``) nothing mixes positions, so an edit there changes logits only where it is made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int
from torch import Tensor

from interlatent.errors import ConfigError, NotEnoughDataError, ShapeError
from interlatent.hooks import HookPoint, resolve
from interlatent.patch.core import LatentPatch, _is_hooked_transformer, at_hook, describe, logits_of

log = logging.getLogger(__name__)

Intervention = Callable[[], AbstractContextManager[Any]]
#: an answer position: one column for every prompt, or a ``[batch]`` tensor of columns
AnswerPosition = int | Tensor | None


def _loss_mask(mask: Tensor | None) -> Tensor | None:
    """``[batch, pos - 1]``: the logits at ``t`` predict a real token ``t + 1`` from a real token ``t``."""
    return None if mask is None else mask[:, :-1] * mask[:, 1:]


def _loss_per_token(logits: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if mask is not None:
        nll = nll * _loss_mask(mask)
    return nll


def _mean_loss(logits: Tensor, tokens: Tensor, mask: Tensor | None) -> float:
    nll = _loss_per_token(logits, tokens, mask)
    denom = _loss_mask(mask).sum() if mask is not None else torch.tensor(nll.numel())
    return float(nll.sum() / denom.clamp_min(1))


def _kl_per_position(clean: Tensor, other: Tensor) -> Tensor:
    """``[batch, pos]`` KL(clean || other) of the next-token distributions."""
    p = torch.log_softmax(clean.float(), dim=-1)
    q = torch.log_softmax(other.float(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def _kl(clean: Tensor, other: Tensor, mask: Tensor | None) -> float:
    """Mean KL(clean || other) over (real) positions."""
    kl = _kl_per_position(clean, other)
    if mask is not None:
        return float((kl * mask).sum() / mask.sum().clamp_min(1))
    return float(kl.mean())


def _last_index(tokens: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    positions = torch.arange(tokens.shape[1]).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def _real(tokens: Int[Tensor, "batch pos"], mask: Tensor | None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` True at real (unpadded) tokens."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


def _describe_position(answer_position: AnswerPosition) -> int | list[int]:
    """An answer position as JSON: the int, or the per-prompt list."""
    if answer_position is None:
        return -1
    if isinstance(answer_position, Tensor):
        return [int(v) for v in answer_position.reshape(-1)]
    return int(answer_position)


def answer_columns(tokens: Int[Tensor, "batch pos"], mask: Tensor | None = None,
                   answer_position: AnswerPosition = None) -> Int[Tensor, " batch"]:
    """``[batch]`` column of each prompt's answer position.

    ``answer_position``: ``None`` or ``-1`` is each prompt's last real token (padding on either side
    respected); a negative int counts back from the end of each prompt's real tokens; an int ``>= 0``
    is that column of ``tokens`` (the same columns as ``positions=``); a ``[batch]`` integer tensor
    gives one such position per prompt. A position outside the sequence or on padding raises."""
    n_rows, seq = tokens.shape[0], tokens.shape[1]
    if answer_position is None:
        answer_position = -1
    if isinstance(answer_position, Tensor):
        want = answer_position.reshape(-1).long()
        if want.shape[0] != n_rows or answer_position.ndim > 1 or answer_position.is_floating_point():
            raise ShapeError(f"answer_position as a tensor needs one integer column per prompt, shape [{n_rows}]; "
                             f"got {answer_position.dtype} of shape {tuple(answer_position.shape)}")
    elif isinstance(answer_position, (int, np.integer)) and not isinstance(answer_position, bool):
        want = torch.full((n_rows,), int(answer_position), dtype=torch.long)
    else:
        raise ConfigError(f"answer_position must be an int or a [batch] integer tensor, got {answer_position!r}")
    last = _last_index(tokens, mask)
    cols = torch.where(want < 0, last + 1 + want, want)
    outside = [int(v) for v in want[(cols < 0) | (cols >= seq)]]
    if outside:
        raise ConfigError(f"answer_position {sorted(set(outside))} is outside the sequence (length {seq}; valid "
                          f"0..{seq - 1}, or negative from the end of each prompt's real tokens)")
    on_pad = ~_real(tokens, mask)[torch.arange(n_rows), cols]
    if on_pad.any():
        rows = [int(r) for r in torch.nonzero(on_pad).flatten()]
        raise ConfigError(f"answer_position lands on padding in prompts {rows[:10]} (columns "
                          f"{[int(cols[r]) for r in rows[:10]]}); give a negative position (from each prompt's "
                          "last real token) or one column per prompt")
    return cols


def logit_diff(logits: Tensor, tokens: Tensor, answer: tuple[int, int], mask: Tensor | None = None,
               answer_position: AnswerPosition = None) -> Tensor:
    """Per prompt: ``logit[answer[0]] - logit[answer[1]]`` at ``answer_position`` (default: the last
    real token; see :func:`answer_columns`)."""
    cols = answer_columns(tokens, mask, answer_position)
    final = logits[torch.arange(logits.shape[0]), cols]
    return final[:, answer[0]] - final[:, answer[1]]


# --------------------------------------------------------------------------- where an edit can act
# points of the final block after which nothing mixes positions (its attention has already run)
_POSITIONWISE_KINDS = {"resid_mid", "attn_out", "mlp_in", "mlp_out", "resid_post"}
_POSITIONWISE_RAW = {"attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale",
                     "ln2.hook_normalized", "hook_mlp_in", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
                     "hook_mlp_out", "hook_resid_post"}
# raw points whose activation is not [batch, pos, ...]
_NOT_BY_POSITION = ("attn.hook_pattern", "attn.hook_attn_scores")


def _n_blocks(model: Any) -> int:
    if _is_hooked_transformer(model):
        return int(model.cfg.n_layers)
    from interlatent.llm.backends import find_blocks

    return len(find_blocks(model))


def _is_causal(model: Any) -> bool:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "attention_dir"):
        return cfg.attention_dir == "causal"
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _as_point(model: Any, point: HookPoint | LatentPatch | str | None) -> HookPoint | None:
    if point is None or isinstance(point, HookPoint):
        return point
    if isinstance(point, LatentPatch):
        return point.check_model(model)[1]
    hook_names = model.hook_dict.keys() if _is_hooked_transformer(model) else None
    return resolve(point, _n_blocks(model), hook_names)


def positionwise_after(model: Any, point: HookPoint) -> bool:
    """True when nothing downstream of ``point`` mixes positions: a point of the final block past its
    attention (then only position-wise layers, the final norm and the unembedding follow)."""
    if point.block != _n_blocks(model) - 1:
        return False
    if point.kind == "raw":
        return point.tl_name.split(".", 2)[2] in _POSITIONWISE_RAW
    return point.kind in _POSITIONWISE_KINDS


def reachable_logits(model: Any, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
                     positions: Sequence[int] | None, point: HookPoint | None = None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` True where an edit at ``positions`` (columns; None: every real token) of
    ``point`` can change the logits: every real position if nothing is known; in a causal model only
    the edited position and later ones; after a position-wise point, only the edited positions."""
    real = _real(tokens, mask)
    seq = tokens.shape[1]
    if point is not None and point.tl_name.endswith(_NOT_BY_POSITION):
        return real  # its second axis is heads, not positions: nothing is known
    if positions is None:
        edited = real.clone()
    else:
        at = torch.zeros(seq, dtype=torch.bool)
        at[[int(p) % seq for p in positions]] = True
        edited = real & at[None, :]
    if point is not None and positionwise_after(model, point):
        return edited
    any_edit = edited.any(1, keepdim=True)
    if not _is_causal(model):
        return real & any_edit
    first = torch.where(edited, torch.arange(seq)[None, :], seq).min(1, keepdim=True).values
    return real & any_edit & (torch.arange(seq)[None, :] >= first)


def _read_positions(kind: str, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
                    answer_cols: Int[Tensor, " batch"] | None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` logits a metric reads: the answer position, the loss's predicting positions, or
    every real position (KL)."""
    real = _real(tokens, mask)
    if kind == "answer":
        out = torch.zeros_like(real)
        out[torch.arange(real.shape[0]), answer_cols] = True
        return out
    if kind == "loss":
        out = torch.zeros_like(real)
        out[:, :-1] = real[:, :-1] & real[:, 1:]
        return out
    return real


def require_effect_can_be_nonzero(model: Any, tokens: Tensor, mask: Tensor | None, positions: Sequence[int] | None,
                                  point: HookPoint | None, kind: str, answer_cols: Tensor | None = None,
                                  what: str = "the effect") -> Tensor:
    """Raise :class:`ConfigError` when an edit at ``positions`` of ``point`` cannot change what a metric
    of ``kind`` (``"answer"``, ``"loss"``, ``"kl"``) reads on any prompt; log a warning naming the
    prompts where it cannot. Returns the ``[batch, pos]`` reachable-and-read mask."""
    reach = reachable_logits(model, tokens, mask, positions, point)
    reads = _read_positions(kind, tokens, mask, answer_cols)
    hit = reach & reads
    per_row = hit.any(1)
    if per_row.all():
        return hit
    where = "every real position" if positions is None else f"positions {list(positions)}"
    hook = f" of {point.tl_name}" if point is not None else ""
    if kind == "answer":
        columns = sorted(set(answer_cols.tolist()))[:10]
        reads_text = f"the answer logit difference at answer_position (columns {columns})"
    elif kind == "loss":
        reads_text = "the next-token loss (the logits of every real token but each prompt's last)"
    else:
        reads_text = "the KL divergence (logits at real positions)"
    if not reach.any():
        reason = "every edited position is padding"
    elif point is not None and positionwise_after(model, point):
        reason = (f"{point.tl_name} is past the final block's attention: nothing after it mixes positions (only "
                  "position-wise layers, the final norm and the unembedding), so an edit there changes logits only "
                  "at the positions it edits, and it edits none that is read")
    elif _is_causal(model) and kind == "answer":
        reason = ("every edited position is after the answer position, and in a causal model a position only "
                  "affects logits at itself and later ones")
    else:
        reason = "in a causal model a position only affects logits at itself and later ones, and none of those is read"
    fix = {"answer": "edit at or before the answer position (include it in positions= for a final-block point), "
                     "or pass answer_position= where the edit can reach",
           "loss": "edit earlier positions, or measure metric='kl' / an answer logit difference",
           "kl": "edit real (unpadded) positions"}[kind]
    if not per_row.any():
        raise ConfigError(f"{what} cannot change: it edits {where}{hook} and reads {reads_text}; {reason}. "
                          f"Fix: {fix}.")
    rows = [int(r) for r in torch.nonzero(~per_row).flatten()]
    log.warning("%s cannot change on %d of %d prompts (%s, first %s): it edits %s%s; %s", what, len(rows),
                per_row.numel(), reads_text, rows[:10], where, hook, reason)
    return hit


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
def measure(model: Any, tokens: Tensor, intervention: Intervention, *, answer: tuple[int, int] | None = None,
            answer_position: AnswerPosition = None, attention_mask: Tensor | None = None,
            clean_logits: Tensor | None = None, positions: Sequence[int] | None = None,
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


def _measure(model: Any, tokens: Tensor, intervention: Intervention, answer: tuple[int, int] | None,
             cols: Tensor | None, attention_mask: Tensor | None, clean_logits: Tensor | None,
             positions: Sequence[int] | None, hook: HookPoint | None) -> Effect:
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
def edit_effect(patch: LatentPatch, model: Any, tokens: Tensor, *, ablate: Sequence[int] | None = None,
                mode: str = "zero", clamp: dict[int, float] | None = None, steer: dict[int, float] | None = None,
                positions: Sequence[int] | int | None = None, keep_error: bool = True,
                answer: tuple[int, int] | None = None, answer_position: AnswerPosition = None,
                attention_mask: Tensor | None = None) -> Effect:
    """:func:`measure` for one edit of ``patch`` (ablate / clamp / steer at ``positions``, or a splice
    with ``keep_error=False``), with the edit's positions and output hook passed on: an answer it
    cannot reach is refused before anything runs, and ``*_affected`` cover the positions it reaches.
    A splice without the error term rewrites every position, whatever ``positions`` says."""
    edits = patch.edits(ablate, mode, clamp, steer, positions, keep_error)
    _, p_out = patch.check_model(model)
    LatentPatch.check_positions(edits, tokens.shape[-1])
    if edits.empty and keep_error:
        raise ConfigError("edit_effect got no edit: a patch that keeps the error term and edits no latent leaves "
                          "the model unchanged; pass ablate=, clamp=, steer= or keep_error=False")
    reach = None if not keep_error else edits.positions
    return measure(model, tokens, lambda: patch.applied(model, ablate, mode, clamp, steer, positions, keep_error),
                   answer=answer, answer_position=answer_position, attention_mask=attention_mask, positions=reach,
                   point=p_out)


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
def ablation_effect(patch: LatentPatch, model: Any, tokens: Tensor, latents: Sequence[int], *,
                    mode: str = "zero", answer: tuple[int, int] | None = None, positions: Sequence[int] | None = None,
                    answer_position: AnswerPosition = None, frequencies: np.ndarray | None = None,
                    n_control: int = 5, seed: int = 0, attention_mask: Tensor | None = None,
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
    acts = capture_latents(patch, model, tokens, attention_mask, positions)  # [ablated sites, d_sae]
    n_sites = int(acts.shape[0])
    active = (acts > 0).sum(0).numpy()
    fill = torch.zeros(patch.d_sae) if mode == "zero" else patch.latent_means.to(acts.dtype)
    changes = (acts != fill[None, :].to(acts.dtype)).any(0).numpy() if n_sites else np.zeros(patch.d_sae, bool)
    where = "every real position" if positions is None else f"positions {list(edits.positions)}"
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
        if positions is not None:
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
        at = sorted({p % acts.shape[1] for p in positions})  # a column named twice is one site
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


__all__ = ["ControlledEffect", "Effect", "ablation_effect", "answer_columns", "capture_latents", "edit_effect",
           "latent_frequencies", "logit_diff", "matched_control_latents", "measure", "positionwise_after",
           "reachable_logits", "require_effect_can_be_nonzero", "splice_quality"]
