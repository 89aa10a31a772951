"""Attribution patching (AtP) for model components: the attention and MLP outputs of every block
and single attention heads (TransformerLens ``hook_z``), scored like latents in
:mod:`interlatent.patch.attribution` — ``(baseline - clean) * gradient`` of the same metric, with
zero, mean or corrupted-run baselines — so components and latents can be ranked side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from interlatent.backends import make_backend
from interlatent.backends.readout import hook_point_names
from interlatent.errors import ConfigError, ShapeError
from interlatent.hooks import HookPoint, resolve
from interlatent.patch.attribution import Baseline, Metric, _scored_positions, metric_of
from interlatent.patch.core import at_hook, logits_of
from interlatent.patch.effects import AnswerPosition


# --------------------------------------------------------------------------- components
COMPONENTS = ("attn_out", "mlp_out", "heads")


def _component_points(model: Any, components: Sequence[str]) -> list[tuple[str, HookPoint]]:
    bad = [c for c in components if c not in COMPONENTS]
    if bad:
        raise ConfigError(f"unknown components {bad}; choose from {COMPONENTS}")
    n, names = make_backend(model).n_blocks, hook_point_names(model)
    if names is None:
        if "heads" in components:
            raise ConfigError("per-head attribution reads attn.hook_z, which only TransformerLens models have; "
                              "pass components=('attn_out', 'mlp_out') for this model")
    out = []
    for block in range(n):
        for c in components:
            spec = f"blocks.{block}.attn.hook_z" if c == "heads" else f"llm.layer.{block}.{c}"
            out.append((c, resolve(spec, n, names)))
    return out


def component_attribution(model: Any, tokens: Tensor, *, answer: tuple[int, int] | None = None,
                          metric: Metric | None = None, answer_position: AnswerPosition = None,
                          baseline: Baseline = "zero", components: Sequence[str] = COMPONENTS,
                          positions: Sequence[int] | None = None,
                          attention_mask: Tensor | None = None) -> pd.DataFrame:
    """AtP for model components: every block's attention output, MLP output and (TransformerLens)
    attention heads (``attn.hook_z`` per head). ``score = sum over positions and width of (baseline -
    clean activation) * gradient`` of the metric (a mean over prompts): the first-order estimate of the metric's
    change when that component is patched to its baseline (``"zero"``, ``"mean"``: its mean over the
    batch's real positions, or corrupted tokens' activations) at the scored positions.

    Returns one row per component: ``component``, ``kind``, ``block``, ``head`` (-1 for whole
    outputs), ``score``, ``abs_score``; sorted by ``abs_score``."""
    points = _component_points(model, components)
    reduce = metric_of(tokens, answer=answer, metric=metric, answer_position=answer_position,
                       attention_mask=attention_mask)
    where = _scored_positions(tokens, attention_mask, positions)

    def run(toks: Tensor, with_grad: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        acts: dict[str, Tensor] = {}
        zeros: dict[str, Tensor] = {}

        def hook(point: HookPoint) -> Callable[[Tensor], Tensor]:
            def fn(act: Tensor) -> Tensor:
                acts[point.tl_name] = act.detach()
                if not with_grad:
                    return act
                zeros[point.tl_name] = torch.zeros_like(act).requires_grad_(True)
                return act + zeros[point.tl_name]
            return fn

        with ExitStack() as stack:
            if with_grad:
                stack.enter_context(torch.enable_grad())
            else:
                stack.enter_context(torch.no_grad())
            for _, point in points:
                stack.enter_context(at_hook(model, point, hook(point)))
            value = reduce(logits_of(model, toks, attention_mask))
            if not with_grad:
                return acts, {}
            names = list(zeros)
            got = torch.autograd.grad(value, [zeros[n] for n in names], allow_unused=True)
        return acts, {n: torch.zeros_like(zeros[n]) if g is None else g for n, g in zip(names, got)}

    clean, grad = run(tokens, True)
    if isinstance(baseline, Tensor):
        if baseline.shape != tokens.shape:
            raise ShapeError(f"corrupted tokens must have the clean tokens' shape {tuple(tokens.shape)}, got "
                             f"{tuple(baseline.shape)}")
        base, _ = run(baseline, False)
    elif baseline in ("zero", "mean"):
        base = {}
        for name, act in clean.items():
            if baseline == "zero":
                base[name] = torch.zeros_like(act)
            else:
                w = where.reshape(*where.shape, *([1] * (act.ndim - 2)))
                real = torch.ones(tokens.shape[:2]) if attention_mask is None else attention_mask.float()
                rw = real.reshape(w.shape)
                base[name] = ((act * rw).sum((0, 1)) / rw.sum().clamp_min(1)).expand_as(act)
    else:
        raise ConfigError(f"baseline must be 'zero', 'mean' or a [batch, pos] tensor of corrupted tokens, got "
                          f"{baseline!r}")
    rows = []
    for kind, point in points:
        name = point.tl_name
        act = clean[name]
        w = where.reshape(*where.shape, *([1] * (act.ndim - 2)))
        contrib = ((base[name] - act) * grad[name] * w).float()
        if kind == "heads":
            per_head = contrib.sum(-1).sum((0, 1))  # [head]; the metric's mean over prompts is in the gradient
            rows += [{"component": f"{name}[{h}]", "kind": "head", "block": point.block, "head": h,
                      "score": float(per_head[h])} for h in range(per_head.shape[0])]
        else:
            rows.append({"component": point.name, "kind": kind, "block": point.block, "head": -1,
                         "score": float(contrib.sum())})
    df = pd.DataFrame(rows)
    df["abs_score"] = df["score"].abs()
    return df.sort_values("abs_score", ascending=False, kind="stable").reset_index(drop=True)


__all__ = ["COMPONENTS", "component_attribution"]
