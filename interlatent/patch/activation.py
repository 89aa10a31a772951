"""Activation patching between prompts: the clean / corrupted experiment, per hook point.

``activation_patching(model, clean, corrupted, points, positions, answer)`` runs the clean prompt,
keeps its activations at the chosen hook points, then runs the corrupted prompt with the activation
at each point (one point at a time) replaced by the clean one — or shifted by the clean-minus-corrupted
difference scaled by ``alpha`` — at the chosen positions, and reports how far that moves an answer
logit difference, read at ``answer_position`` (default: the last position), back towards the clean run
(``1`` = fully restored, ``0`` = no change). A point and positions that cannot move the answer (every
position after it, or a final-block point past attention that does not patch it) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from interlatent.backends import make_backend
from interlatent.errors import ConfigError, ShapeError
from interlatent.patch.measure import _capture
from interlatent.patch.reach import AnswerPosition, answer_columns, logit_diff, require_effect_can_be_nonzero


@torch.no_grad()
def activation_patching(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "corrupted_batch corrupted_pos"],
    points: Sequence[str | int],
    *,
    answer: tuple[int, int],
    positions: Sequence[int] | None = None,
    answer_position: AnswerPosition = None,
    mode: str = "replace",
    alpha: float = 1.0,
) -> pd.DataFrame:
    """Patch clean activations into the corrupted run, one hook point at a time.

    Args:
        clean_tokens, corrupted_tokens: ``[batch, pos]`` token ids of the same length.
        points: hook points (``llm.layer.N[.kind]``, block indices, raw TransformerLens names).
        answer: ``(correct, wrong)`` token ids; the metric is their logit difference at ``answer_position``.
        positions: positions to patch (default: every position).
        answer_position: where the answer is read: default ``-1`` (the last position); an int column
            (negative from the end), or a ``[batch]`` tensor of columns.
        mode: ``"replace"`` (corrupted activation := clean) or ``"add_delta"`` (corrupted +
            ``alpha`` x (clean - corrupted)).

    Returns one row per hook point: the clean, corrupted and patched logit differences, the answer
    position, and the fraction restored, ``(patched - corrupted) / (clean - corrupted)``.

    Raises:
        ConfigError: a point whose patch at ``positions`` cannot change the answer logits (checked for
            every point before anything runs).
    """
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ShapeError(f"clean and corrupted prompts must have one shape; got {tuple(clean_tokens.shape)} and "
                         f"{tuple(corrupted_tokens.shape)} (pad or pick prompts that tokenize to equal lengths)")
    if mode not in ("replace", "add_delta"):
        raise ConfigError(f"mode must be 'replace' or 'add_delta', got {mode!r}")
    seq = clean_tokens.shape[-1]
    pos = list(range(seq)) if positions is None else [int(p) for p in positions]
    bad = [p for p in pos if not -seq <= p < seq]
    if bad:
        raise ConfigError(f"positions {bad} are outside the sequence (length {seq})")
    backend = make_backend(model)
    pts = [backend.resolve(p) for p in points]
    cols = answer_columns(corrupted_tokens, None, answer_position)
    for point in pts:
        require_effect_can_be_nonzero(backend, corrupted_tokens, None, positions, point, "answer", cols,
                                      what=f"activation patching at {point.name}")
    where = int(cols[0]) if bool((cols == cols[0]).all()) else [int(c) for c in cols]
    clean_logits = backend.logits(clean_tokens)
    corrupt_logits = backend.logits(corrupted_tokens)
    ld_clean = float(logit_diff(clean_logits, clean_tokens, answer, answer_position=cols).mean())
    ld_corrupt = float(logit_diff(corrupt_logits, corrupted_tokens, answer, answer_position=cols).mean())
    rows = []
    for point in pts:
        store: dict[str, Tensor] = {}
        with _capture(backend, point, store):
            backend.logits(clean_tokens)
        clean_act = store["x"].clone()

        def rewrite(act: Tensor, clean_act: Tensor = clean_act) -> Tensor:
            out = act.clone()
            if mode == "replace":
                out[:, pos] = clean_act[:, pos].to(act.dtype)
            else:
                out[:, pos] = act[:, pos] + alpha * (clean_act[:, pos].to(act.dtype) - act[:, pos])
            return out

        with backend.at_hook(point, rewrite):
            patched = backend.logits(corrupted_tokens)
        ld = float(logit_diff(patched, corrupted_tokens, answer, answer_position=cols).mean())
        gap = ld_clean - ld_corrupt
        rows.append({"point": point.name, "hook_name": point.tl_name, "block": point.block, "answer_position": where,
                     "logit_diff_clean": ld_clean, "logit_diff_corrupted": ld_corrupt, "logit_diff_patched": ld,
                     "restored": (ld - ld_corrupt) / gap if abs(gap) > 1e-9 else float("nan")})
    return pd.DataFrame(rows)
