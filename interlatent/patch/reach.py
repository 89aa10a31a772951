"""Where an edit can change the logits, and where a metric reads them.

An effect that cannot be non-zero is refused before anything runs: in a causal model an edit at
position ``p`` changes logits only at ``p`` and later; in a bidirectional (encoder) model any
position can change every other, so no causal rule applies; and after a point of the final block
past its attention (``resid_mid``, ``attn_out``, ``mlp_in``, ``mlp_out``, ``resid_post``) nothing
mixes positions, so an edit there changes logits only where it is made. The answer logit
difference is read at ``answer_position`` (default ``-1``: each prompt's last real token).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from interlatent.backends import make_backend
from interlatent.errors import ConfigError, ShapeError
from interlatent.hooks import HookPoint, indexed_by_position

log = logging.getLogger(__name__)

#: an answer position: one column for every prompt, or a ``[batch]`` tensor of columns
AnswerPosition = int | Tensor | None


def _last_index(tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None) -> Tensor:
    if mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    positions = torch.arange(tokens.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def _real(tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` True at real (unpadded) tokens."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()


def _describe_position(answer_position: AnswerPosition) -> int | list[int]:
    """An answer position as JSON: the int, or the per-prompt list."""
    if answer_position is None:
        return -1
    if isinstance(answer_position, Tensor):
        return [int(v) for v in answer_position.reshape(-1)]
    return int(answer_position)


def answer_columns(tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None = None,
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


def logit_diff(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], answer: tuple[int, int],
               mask: Shaped[Tensor, "batch pos"] | None = None, answer_position: AnswerPosition = None) -> Tensor:
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


def positionwise_after(model: Any, point: HookPoint) -> bool:
    """True when nothing downstream of ``point`` mixes positions: a point of the final block past its
    attention (then only position-wise layers, the final norm and the unembedding follow)."""
    if point.block != make_backend(model).n_blocks - 1:
        return False
    if point.kind == "raw":
        return point.tl_name.split(".", 2)[2] in _POSITIONWISE_RAW
    return point.kind in _POSITIONWISE_KINDS


def reachable_logits(model: Any, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None,
                     positions: Sequence[int] | None, point: HookPoint | None = None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` True where an edit at ``positions`` (columns; None: every real token) of
    ``point`` can change the logits: every real position if nothing is known; in a causal model only
    the edited position and later ones; after a position-wise point, only the edited positions."""
    real = _real(tokens, mask)
    seq = tokens.shape[1]
    if point is not None and not indexed_by_position(point):
        return real  # its second axis is heads, not positions: nothing is known
    if positions is None:
        edited = real.clone()
    else:
        at = torch.zeros(seq, dtype=torch.bool, device=tokens.device)
        at[[int(p) % seq for p in positions]] = True
        edited = real & at[None, :]
    if point is not None and positionwise_after(model, point):
        return edited
    any_edit = edited.any(1, keepdim=True)
    if not make_backend(model).is_causal:
        return real & any_edit
    first = torch.where(edited, torch.arange(seq, device=tokens.device)[None, :], seq).min(1, keepdim=True).values
    return real & any_edit & (torch.arange(seq, device=tokens.device)[None, :] >= first)


def _read_positions(kind: str, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None,
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


def ablated_sites(tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None,
                  positions: Sequence[int] | None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` True at the real tokens of the ``positions`` columns (None: every real token)."""
    real = _real(tokens, mask)
    if positions is None:
        return real.clone()
    at = torch.zeros(tokens.shape[1], dtype=torch.bool, device=tokens.device)
    at[[int(p) % tokens.shape[1] for p in positions]] = True
    return real & at[None, :]


def influential_sites(model: Any, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None,
                      positions: Sequence[int] | None, point: HookPoint | None, kind: str,
                      answer_cols: Tensor | None = None) -> Bool[Tensor, "batch pos"]:
    """``[batch, pos]`` True at each edited real site (``positions`` columns; None: every real token)
    whose edit at ``point`` can change what a metric of ``kind`` reads: after a position-wise point
    only a read position itself; in a causal model a site at or before a read position of its row;
    otherwise any site of a row the metric reads."""
    seq = tokens.shape[1]
    edited = ablated_sites(tokens, mask, positions)
    reads = _read_positions(kind, tokens, mask, answer_cols)
    if point is not None and not indexed_by_position(point):
        return edited & reads.any(1, keepdim=True)
    if point is not None and positionwise_after(model, point):
        return edited & reads
    if not make_backend(model).is_causal:
        return edited & reads.any(1, keepdim=True)
    cols = torch.arange(seq, device=tokens.device)[None, :]
    last_read = torch.where(reads, cols, -1).max(1, keepdim=True).values
    return edited & (cols <= last_read)


def require_effect_can_be_nonzero(model: Any, tokens: Int[Tensor, "batch pos"],
                                  mask: Shaped[Tensor, "batch pos"] | None, positions: Sequence[int] | None,
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
    elif make_backend(model).is_causal and kind == "answer":
        reason = ("every edited position is after the answer position, and in a causal model a position only "
                  "affects logits at itself and later ones")
    elif make_backend(model).is_causal:
        reason = "in a causal model a position only affects logits at itself and later ones, and none of those is read"
    else:
        reason = "no edited position is a real token that the metric reads"
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
