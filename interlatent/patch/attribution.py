"""Which latents matter: attribution patching (AtP) and integrated gradients (IG) for dictionary
latents, validated against exact patching, and AtP for model components (attention / MLP outputs,
attention heads).

The dictionary is spliced in *with its error term*: at its output hook the activation becomes
``x + decode(g) - decode(f) + (e' - e)``, where ``f`` are the clean latents, ``g`` the latents the
method sets, ``e`` the error term ``x - decode(f)`` and ``e'`` the error the method sets. With
``g = f`` and ``e' = e`` every added term is exactly zero, so the forward pass is unchanged (checked
on every call: :attr:`AttributionResult.forward_max_diff`), and gradients reach every latent and the
error node at every position.

* **AtP** (attribution patching): ``score = (baseline - clean latent value) * d metric / d latent``
  at the clean run — the first-order estimate of the metric's change when that latent (at that
  position) is patched to its baseline. One forward and one backward pass score every latent.
* **IG** (integrated gradients): the same product with the gradient averaged along a path from the
  clean latents to the baseline, from ``steps`` gradient evaluations. Two paths:

  - ``path="latent"`` (the default): each latent's *own* path, the other latents staying clean —
    the path whose integral is exactly the effect of patching that latent alone (what the exact
    single-latent sweep measures). Its average gradient is read at the path's midpoint (the midpoint
    rule: exact when the metric is quadratic along the path) from ``steps`` probe points: the
    latents of each prompt are split into ``steps`` groups, and at probe ``k`` the latents of group
    ``k`` sit halfway to their baselines, ``f + 1/2 (baseline - f)``, while the others stay clean.
    Each latent's gradient is read from its own group's probe. What the other latents of that group
    add to it is the estimate's error, so the groups are built to keep apart the latents that move
    at the same positions (those that interact most): latents in descending order of their move's
    size, each into the group it overlaps least (``sum over positions |move_i| |move_j|`` with the
    group's latents; among equals the smallest group, then one drawn from ``seed``). With at least as many steps as latents
    moving on a prompt, every latent is alone in its probe (the prompts share probes, and a probe in
    which nothing moves is skipped: more steps than that cost no more). A ``metric`` that returns one value for the
    whole batch (not one per prompt) may couple the prompts, so its groups are drawn once for the
    batch, a latent moving on every prompt in the same probe (alone with as many steps as latents
    moving in the batch). The clean point rides along in the
    probes' first forward pass (its gradient scores the error node, by AtP). On the embedded demo
    model this ranks single latents better than AtP (``benchmarks/attribution_bench.py``, 8 steps:
    zero ablation, Spearman 0.977 and top-20 recall 0.906 against the exact sweep, AtP 0.899 and
    0.820; corrupted baseline 0.962 and 0.902, AtP 0.905 and 0.847).
  - ``path="joint"``: every latent moves together, at the ``steps`` midpoints ``alpha = (k + 0.5)
    / steps`` (the Riemann midpoint rule). The error node stays at its clean value for ``"zero"`` /
    ``"mean"`` baselines (its score is then the AtP one) and moves with the latents towards the
    corrupted run's error for a corrupted baseline. Its scores add up to the effect of patching
    every latent at once, but as estimates of each latent's effect *alone* they are worse than AtP
    (on the demo model, Spearman 0.66 and 0.62 against AtP's 0.90 and 0.91).

  Measure on your model with :func:`~interlatent.patch.agreement.attribution_agreement`.

Where the backend can split a forward pass at the dictionary's hook point
(:meth:`~interlatent.backends.base.Backend.resumes_at`: a ``resid_post`` point on TransformerLens
3), the model runs up to the hook point once, and every gradient pass starts there from the stacked
spliced activations (for an ``answer``, the last block's attention output and MLP and the unembedding
run only at the answer column); elsewhere every pass is the whole model with the splice as a hook.
Both give the same scores (tested).

Baselines: ``"zero"`` (a latent's value 0; the error 0), ``"mean"`` (the patch's latent means; the
error 0), or a ``[batch, pos]`` tensor of corrupted tokens (the latents and error of that run, per
position). The metric: an answer logit difference ``logit[a] - logit[b]`` at ``answer_position``
(default: each prompt's last real token), or ``metric(logits) -> Tensor`` (a scalar, or one value
per prompt: their mean is used); either way the mean over prompts. ``.scores[i]`` estimates the
change in that mean when latent ``i`` is patched to its baseline at every scored position of every
prompt, which :func:`~interlatent.patch.agreement.attribution_agreement` measures exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from interlatent.analysis.models.sparse import SparseCoder
from interlatent.backends import make_backend
from interlatent.errors import ConfigError, InterlatentError, ShapeError
from interlatent.hooks import HookPoint
from interlatent.patch.core import LatentPatch, logits_of
from interlatent.patch.effects import AnswerPosition, answer_columns, logit_diff
# _probe_groups and the splice's names stay importable from here
from interlatent.patch.probes import PROBE, _latent_path_midpoints, _per_prompt, _probe_groups  # noqa: F401
from interlatent.patch.reach import _describe_position
from interlatent.patch.splice import Edit, _encode, recorded, spliced  # noqa: F401

log = logging.getLogger(__name__)

METHODS = ("atp", "ig")
PATHS = ("latent", "joint")
#: IG stacks up to this many rows (path points x prompts) into one forward pass
IG_ROWS = 64
#: how far a spliced forward pass may drift from the clean one before attribution refuses to go on
FORWARD_TOLERANCE = 1e-4

Baseline = str | Tensor
Metric = Callable[[Tensor], Tensor]


class SpliceMismatchError(InterlatentError, RuntimeError):
    """The dictionary spliced with its error term changed the model's forward pass."""


_MISFIT = ("the dictionary does not fit this hook point, or decodes to inf / NaN (check its weights with "
           "torch.isfinite)")


# --------------------------------------------------------------------------- the metric
def metric_of(tokens: Tensor, *, answer: tuple[int, int] | None = None, metric: Metric | None = None,
              answer_position: AnswerPosition = None,
              attention_mask: Tensor | None = None, columns: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """The scalar an attribution explains: the mean answer logit difference at ``answer_position``,
    or the mean of ``metric(logits)``. Exactly one of ``answer`` / ``metric`` must be given.
    ``columns``: the answer columns where already known (``answer_columns``)."""
    if (answer is None) == (metric is None):
        raise ConfigError("attribution needs exactly one of answer=(correct, wrong) token ids or metric=callable "
                          f"(logits -> tensor); got answer={answer!r} and metric={metric!r}")
    if answer is not None:
        if len(answer) != 2:
            raise ConfigError(f"answer must be two token ids (correct, wrong), got {answer!r}")
        cols = answer_columns(tokens, attention_mask, answer_position) if columns is None else columns
        pair = (int(answer[0]), int(answer[1]))
        return lambda logits: logit_diff(logits, tokens, pair, attention_mask, cols).float().mean()

    def reduced(logits: Tensor) -> Tensor:
        value = metric(logits)
        if not isinstance(value, Tensor):
            raise ConfigError(f"metric must return a tensor (a scalar or one value per prompt) that depends on the "
                              f"logits, got {type(value).__name__}")
        return value.float().mean()

    return reduced


def _scored_positions(tokens: Tensor, attention_mask: Tensor | None,
                      positions: Sequence[int] | None) -> Tensor:
    """``[batch, pos]`` float mask of the (real) positions whose latents are scored and patched."""
    seq = tokens.shape[1]
    real = torch.ones(tokens.shape[:2], device=tokens.device) if attention_mask is None else attention_mask.float()
    if positions is None:
        return real
    cols = [int(p) for p in np.atleast_1d(positions)]
    bad = [p for p in cols if not -seq <= p < seq]
    if bad:
        raise ConfigError(f"positions {bad} are outside the sequence (length {seq}; valid -{seq}..{seq - 1})")
    at = torch.zeros(seq, device=real.device)
    at[[p % seq for p in cols]] = 1.0
    return real * at[None, :]


# --------------------------------------------------------------------------- the baseline
def _latent_baseline(patch: LatentPatch, model: Any, baseline: Baseline, tokens: Tensor,
                     attention_mask: Tensor | None, f: Tensor, e: Tensor,
                     stop_at: HookPoint | None = None) -> tuple[Tensor, Tensor, str]:
    """(latent baseline ``[batch, pos, d_sae]``, error baseline ``[batch, pos, d_out]``, its description).
    ``stop_at``: the patch's hook point, where the backend can stop the corrupted run (see
    :meth:`~interlatent.backends.base.Backend.resumes_at`)."""
    if isinstance(baseline, Tensor):
        if baseline.shape != tokens.shape:
            raise ShapeError(f"corrupted tokens for the baseline must have the clean tokens' shape "
                             f"{tuple(tokens.shape)}, got {tuple(baseline.shape)}; pick prompts that tokenize to "
                             "equal lengths, or pad both the same way")
        if stop_at is not None:
            with torch.no_grad():
                x = make_backend(model).run_to(stop_at, baseline, attention_mask)
                _, _, f_c, e_c = _encode(patch, x, x)
            return f_c, e_c, "corrupt_tokens"
        rec: dict[str, Tensor] = {}
        with spliced(patch, model, lambda f_, e_: (f_, e_), rec), torch.no_grad():
            logits_of(model, baseline, attention_mask)
        return rec["f"], rec["e"], "corrupt_tokens"
    if baseline == "zero":
        return torch.zeros_like(f), torch.zeros_like(e), "zero"
    if baseline == "mean":
        if patch.latent_means is None:
            raise ConfigError("baseline='mean' needs latent means: build the patch with LatentPatch.from_db(...) or "
                              "pass latent_means=")
        return patch.latent_means.to(f).expand_as(f).clone(), torch.zeros_like(e), "mean"
    raise ConfigError(f"baseline must be 'zero', 'mean' or a [batch, pos] tensor of corrupted tokens, got {baseline!r}")


# --------------------------------------------------------------------------- latent attribution
@dataclass
class AttributionResult:
    """Attribution scores of every latent of one dictionary.

    ``scores``: ``[d_sae]`` estimated change of the metric when the latent is patched to its baseline
    at every scored position of every prompt (the mean over prompts of the per-position sum).
    ``per_position``: ``[batch, pos, d_sae]`` the same per prompt and position (zero at unscored ones).
    ``error_scores``: ``[batch, pos]`` the error node's; ``error_score`` their per-prompt sum, averaged.
    ``active``: ``[d_sae]`` True for latents active (> 0) at some scored position.
    ``metric_clean``: the metric on the clean run; ``forward_max_diff``: the largest logit difference
    between the clean run and the run with the dictionary spliced (0 when bit-identical; where the
    pass is split at the hook point, the largest change the splice makes to the activation there)."""

    scores: Float[Tensor, " d_sae"]
    per_position: Float[Tensor, "batch pos d_sae"]
    error_scores: Float[Tensor, "batch pos"]
    error_score: float
    active: Tensor
    method: str
    baseline: str
    steps: int
    metric_clean: float
    forward_max_diff: float
    layer: str
    seconds: float = 0.0
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def position_scores(self) -> Float[Tensor, "pos d_sae"]:
        """``[pos, d_sae]``: each latent's score per position, averaged over prompts."""
        return self.per_position.mean(0)

    def top(self, k: int = 20, *, sign: str = "abs", active_only: bool = True) -> list[int]:
        """The ``k`` latents with the largest scores: by magnitude (``"abs"``), the most positive
        (``"positive"``: patching them raises the metric most) or most negative (``"negative"``)."""
        if sign not in ("abs", "positive", "negative"):
            raise ConfigError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
        key = {"abs": self.scores.abs(), "positive": self.scores, "negative": -self.scores}[sign].clone()
        if active_only:
            key[~self.active] = -float("inf")
        order = torch.argsort(key, descending=True, stable=True)
        n_ok = int(self.active.sum()) if active_only else len(order)
        return [int(i) for i in order[: min(k, n_ok)]]

    def to_pandas(self, *, active_only: bool = True) -> pd.DataFrame:
        """One row per latent: ``latent``, ``score``, ``abs_score``, ``rank`` (1 = largest magnitude),
        ``active``; sorted by rank."""
        scores = self.scores.numpy().astype(np.float64)
        df = pd.DataFrame({"latent": np.arange(len(scores)), "score": scores, "abs_score": np.abs(scores),
                           "active": self.active.numpy()})
        if active_only:
            df = df[df["active"]]
        df = df.sort_values("abs_score", ascending=False, kind="stable").reset_index(drop=True)
        df["rank"] = np.arange(1, len(df) + 1)
        return df[["latent", "score", "abs_score", "rank", "active"]]

    def position_frame(self, latents: Sequence[int] | None = None) -> pd.DataFrame:
        """Long form of :attr:`position_scores`: ``latent``, ``position``, ``score`` (non-zero rows)."""
        ps = self.position_scores
        chosen = self.top(20) if latents is None else [int(i) for i in latents]
        rows = [{"latent": i, "position": p, "score": float(ps[p, i])}
                for i in chosen for p in range(ps.shape[0]) if float(ps[p, i]) != 0.0]
        return pd.DataFrame(rows, columns=["latent", "position", "score"])

    def to_dict(self, top: int = 50) -> dict[str, Any]:
        """JSON-safe summary for the store: every latent's score, the top latents, the error node."""
        best = self.top(top)
        return {"method": self.method, "baseline": self.baseline, "steps": self.steps,
                "metric_clean": self.metric_clean, "error_score": self.error_score,
                "forward_max_diff": self.forward_max_diff, "n_active": int(self.active.sum()),
                "top_latents": best, "top_scores": [float(self.scores[i]) for i in best],
                "scores": [float(v) for v in self.scores], "active_latents": [int(i) for i in
                                                                              torch.nonzero(self.active).flatten()],
                "position_scores": {str(i): [float(v) for v in self.position_scores[:, i]] for i in best[:10]},
                "seconds": self.seconds}


def attribute(patch: LatentPatch, model: Any, tokens: Tensor, *, answer: tuple[int, int] | None = None,
              metric: Metric | None = None, answer_position: AnswerPosition = None, baseline: Baseline = "zero",
              method: str = "atp", steps: int = 8, path: str = "latent", seed: int = 0,
              positions: Sequence[int] | None = None, attention_mask: Tensor | None = None,
              db: Any = None) -> AttributionResult:
    """Score every latent of ``patch`` by its estimated effect on the metric (see the module doc).

    Args:
        answer: ``(correct, wrong)`` token ids: the metric is their mean logit difference, read at
            ``answer_position``. Or ``metric``: ``logits -> tensor``.
        baseline: ``"zero"``, ``"mean"``, or ``[batch, pos]`` corrupted tokens.
        method: ``"atp"`` (one backward pass) or ``"ig"`` (``steps`` gradient evaluations, stacked
            into as few forward passes as ``IG_ROWS`` allows).
        path: IG's path: ``"latent"`` (each latent's own) or ``"joint"`` (all together).
        seed: breaks ties when the latent path splits the latents into its probe groups.
        positions: columns whose latents are scored (and would be patched); None: every real token.
        db: a store to record the scores in (an ``interventions`` row of kind ``"attribution"``).

    Raises:
        SpliceMismatchError: the splice with the error term changed the forward pass.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1 (the path points of IG), got {steps!r}")
    if path not in PATHS:
        raise ConfigError(f"path must be one of {PATHS}, got {path!r}")
    p_in, p_out = patch.check_model(model)
    start = time.perf_counter()
    cols_answer = None if answer is None else answer_columns(tokens, attention_mask, answer_position)
    reduce = metric_of(tokens, answer=answer, metric=metric, answer_position=answer_position,
                       attention_mask=attention_mask, columns=cols_answer)
    where = _scored_positions(tokens, attention_mask, positions)[..., None]  # [batch, pos, 1]
    # the latent path reads the clean latents here and takes the clean gradient in its probes' pass
    latent_path = method == "ig" and path == "latent"
    n_prompts = tokens.shape[0]
    backend = make_backend(model)
    # where the backend splits a pass at the patch's hook point, the model runs up to it once and
    # every gradient pass only from there on (for an answer, unembedding just the answer column)
    resumed = p_in.tl_name == p_out.tl_name and backend.resumes_at(p_out)
    if resumed:
        with torch.no_grad():
            x_clean = backend.run_to(p_out, tokens, attention_mask)
            flat_clean, _, f_clean, e_clean = _encode(patch, x_clean, x_clean)
        if answer is not None:
            pair = (int(answer[0]), int(answer[1]))

            def reduce_resumed(logits: Tensor) -> Tensor:
                return (logits[:, pair[0]] - logits[:, pair[1]]).float().mean()

            per_prompt, clean_logits = True, None
            metric_clean = float("nan")  # read from the clean point's pass below
        else:
            reduce_resumed = reduce
            with torch.no_grad():
                clean_logits = backend.run_from(p_out, x_clean, tokens, attention_mask)
                metric_clean = float(reduce(clean_logits))
                per_prompt = not latent_path or _per_prompt(metric(clean_logits), n_prompts)
    else:
        clean_rec: dict[str, Tensor] = {}
        with torch.no_grad(), recorded(patch, model, clean_rec) if latent_path else nullcontext():
            clean_logits = logits_of(model, tokens, attention_mask)
            metric_clean = float(reduce(clean_logits))
            # a metric giving one value for the whole batch may couple its prompts: the latent path then
            # probes each latent on every prompt at once (one group per latent for the batch)
            per_prompt = answer is not None or not latent_path or _per_prompt(metric(clean_logits), n_prompts)
    splice_change: dict[str, float] = {}
    moving: dict[str, Tensor] = {}  # the latents whose move is non-zero somewhere (set below)
    affine = _decodes_affinely(patch.module)

    def grads(make: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
              copies: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One forward + backward over ``copies`` stacked copies of the batch (each its own path
        point; the metric is summed over copies): (d metric / d g, d metric / d e' — both
        ``[copies * batch, ...]`` —, clean f, clean e, logits of the first copy)."""
        leaves: dict[str, Tensor] = {}
        rec: dict[str, Tensor] = {}
        toks = tokens.repeat(copies, 1) if copies > 1 else tokens
        mask = attention_mask.repeat(copies, 1) if attention_mask is not None and copies > 1 else attention_mask

        def edit(f: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
            g, e_new = make(f, e)
            leaves["g"] = g.detach().requires_grad_(True)
            leaves["e"] = e_new.detach().requires_grad_(True)
            return leaves["g"], leaves["e"]

        with torch.enable_grad(), spliced(patch, model, edit, rec):
            logits = logits_of(model, toks, mask)
            value = sum(reduce(logits[k * n_prompts:(k + 1) * n_prompts]) for k in range(copies))
            if not value.requires_grad:
                raise ConfigError("the metric does not depend on the logits through the patched hook point, so no "
                                  "latent can change it; check answer_position, positions and the patch's layer")
            dg, de = torch.autograd.grad(value, [leaves["g"], leaves["e"]], allow_unused=True)
        dg = torch.zeros_like(leaves["g"]) if dg is None else dg
        de = torch.zeros_like(leaves["e"]) if de is None else de
        return dg, de, rec["f"][:n_prompts], rec["e"][:n_prompts], logits[:n_prompts].detach()

    def grads_resumed(make: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None,
                      copies: int = 1, offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:func:`grads` where the backend resumes at the hook point: the stacked copies start from
        the clean activation there, ``x + decode(g) - decode(f) + (e' - e)``. For a dictionary that
        decodes affinely (every :class:`SparseCoder`: ``f @ W_dec + b_dec``, plus a skip term of the
        input) the change is ``(g - f) @ W_dec`` over the latents that move (the gradient of the
        others multiplies a zero move); otherwise ``decode(f)`` is read from the same decoding call
        as ``decode(g)`` (the first row block when it is the clean point). Either way the clean
        point's change is exactly zero. ``offsets`` (affine only, in place of ``make``): ``g - f``
        at the moving latents, ``[copies * batch, pos, moving]``, the error clean; d metric / d g
        then comes back at those latents only."""
        module = patch.module
        f_rep = f_clean.repeat(copies, 1, 1) if copies > 1 else f_clean
        e_rep = e_clean.repeat(copies, 1, 1) if copies > 1 else e_clean
        if offsets is None:
            g, e_new = make(f_rep, e_rep)
            clean_first = torch.equal(g[:n_prompts].detach(), f_clean)
        else:
            g, e_new = None, e_rep
            clean_first = not bool(offsets[:n_prompts].any())
        e_leaf = e_new.detach().requires_grad_(True)
        toks = tokens.repeat(copies, 1) if copies > 1 else tokens
        mask = attention_mask.repeat(copies, 1) if attention_mask is not None and copies > 1 else attention_mask
        with torch.enable_grad():
            if affine:
                cols = moving["cols"]
                move = (g.detach() - f_rep)[..., cols] if offsets is None else offsets.detach().to(f_clean.dtype)
                leaf = move.requires_grad_(True)
                delta = leaf @ module.W_dec.detach()[cols] + (e_leaf - e_rep)
            else:
                leaf = g.detach().requires_grad_(True)
                stack = leaf if clean_first else torch.cat([f_clean, leaf])
                blocks = stack.shape[0] // n_prompts
                recon = module.decode(rearrange(stack, "batch pos s -> (batch pos) s"),
                                      x=flat_clean.repeat(blocks, 1))
                recon = rearrange(recon, "(batch pos) d -> batch pos d", batch=stack.shape[0])
                recon_g = recon if clean_first else recon[n_prompts:]
                delta = recon_g - recon[:n_prompts].detach().repeat(copies, 1, 1) + (e_leaf - e_rep)
            if clean_first:
                splice_change["clean"] = float(delta[:n_prompts].detach().abs().max()) if delta.numel() else 0.0
            resid = x_clean.repeat(copies, 1, 1) + delta.to(x_clean.dtype)
            logits = backend.run_from(p_out, resid, toks, mask, None if cols_answer is None else cols_answer.repeat(copies))
            value = sum(reduce_resumed(logits[k * n_prompts:(k + 1) * n_prompts]) for k in range(copies))
            if not value.requires_grad:
                raise ConfigError("the metric does not depend on the logits through the patched hook point, so no "
                                  "latent can change it; check answer_position, positions and the patch's layer")
            dleaf, de = torch.autograd.grad(value, [leaf, e_leaf], allow_unused=True)
        dleaf = torch.zeros_like(leaf) if dleaf is None else dleaf
        if offsets is not None:
            dg = dleaf
        elif affine:
            dg = torch.zeros_like(g)
            dg[..., moving["cols"]] = dleaf.to(dg.dtype)
        else:
            dg = dleaf
        de = torch.zeros_like(e_leaf) if de is None else de
        return dg, de, f_clean, e_clean, logits[:n_prompts].detach()

    def check_drift(spliced_logits: Tensor) -> float:
        if resumed:  # the clean point's activation is unchanged when its splice adds exactly zero
            change = splice_change["clean"]
            if not change <= FORWARD_TOLERANCE * max(1.0, float(x_clean.abs().max()) if x_clean.numel() else 0.0):
                raise SpliceMismatchError(f"splicing {patch.name} with its error term changed the activation at "
                                          f"{p_out.tl_name} by up to {change:.3g} (expected no change); {_MISFIT}")
            return change
        drift = float((spliced_logits.float() - clean_logits.float()).abs().max()) if clean_logits.numel() else 0.0
        scale = float(clean_logits.float().abs().max()) if clean_logits.numel() else 0.0
        # a NaN drift from finite clean logits: the dictionary decodes to inf or NaN
        if drift > FORWARD_TOLERANCE * max(1.0, scale) or (drift != drift and scale == scale):
            raise SpliceMismatchError(f"splicing {patch.name} with its error term changed the logits by up to "
                                      f"{drift:.3g} (expected an unchanged forward pass); {_MISFIT}")
        return drift

    gradients = grads_resumed if resumed else grads  # the same contract; resumed: from the hook point on
    if resumed:
        f, e = f_clean, e_clean
    elif latent_path:
        f, e = clean_rec["f"], clean_rec["e"]
    else:
        g0, ge0, f, e, spliced_logits = grads(lambda f_, e_: (f_, e_))
        drift = check_drift(spliced_logits)
    b_lat, b_err, base_name = _latent_baseline(patch, model, baseline, tokens, attention_mask, f, e,
                                               stop_at=p_out if resumed else None)
    where = where.to(f)  # the dictionary's dtype (the path points are decoded) and device
    d_lat = (b_lat - f) * where
    d_err = (b_err - e) * where.to(e)
    moving["cols"] = cols = torch.nonzero(d_lat.ne(0).flatten(0, 1).any(0)).flatten()

    def probe(offsets: Tensor, copies: int) -> tuple[Tensor, Tensor, Tensor]:
        """The latent path's gradient pass with the moving latents shifted by ``offsets`` ``[copies
        * batch, pos, moving]``: (d metric / d those latents, d metric / d error, first copy's logits)."""
        if resumed and affine:
            dg, de, _, _, logits = grads_resumed(None, copies, offsets)
            return dg, de, logits
        dg, de, _, _, logits = gradients(lambda f_, e_: (f_.index_add(-1, cols, offsets.to(f_.dtype)), e_), copies)
        return dg[..., cols], de, logits
    if resumed and not latent_path:  # the clean point's pass (AtP's only one)
        g0, ge0, _, _, spliced_logits = gradients(lambda f_, e_: (f_, e_))
        drift = check_drift(spliced_logits)
        if answer is not None:
            metric_clean = float(reduce_resumed(spliced_logits))
    if method == "atp":
        grad_lat, grad_err = g0, ge0
    elif path == "latent":
        ge0, spliced_logits, grad_moving = _latent_path_midpoints(probe, d_lat[..., cols], steps, n_prompts, seed,
                                                                  per_prompt, rows=IG_ROWS)
        grad_lat = torch.zeros_like(d_lat, dtype=grad_moving.dtype).index_copy_(-1, cols, grad_moving)
        drift = check_drift(spliced_logits)
        if resumed and answer is not None:
            metric_clean = float(reduce_resumed(spliced_logits))
        grad_err = ge0
    else:
        moves_error = isinstance(baseline, Tensor)
        grad_lat = torch.zeros_like(g0)
        grad_err = torch.zeros_like(ge0) if moves_error else ge0
        per_pass = max(1, min(steps, IG_ROWS // n_prompts))  # path points stacked into one forward pass
        for k0 in range(0, steps, per_pass):
            alphas = (torch.arange(k0, min(k0 + per_pass, steps), dtype=d_lat.dtype, device=d_lat.device) + 0.5) / steps
            c = len(alphas)
            a = alphas.repeat_interleave(n_prompts)[:, None, None]  # [copies * batch, 1, 1]
            gk, gek, *_ = gradients(lambda f_, e_, a=a, c=c: (f_ + a * d_lat.repeat(c, 1, 1),
                                                              e_ + a * d_err.repeat(c, 1, 1) if moves_error else e_), c)
            grad_lat = grad_lat + gk.reshape(c, *g0.shape).sum(0) / steps
            if moves_error:
                grad_err = grad_err + gek.reshape(c, *ge0.shape).sum(0) / steps
    # the metric is a mean over prompts: per prompt, its gradient is n_prompts times smaller than its own
    per_position = (d_lat.float() * grad_lat.float()).detach().cpu() * n_prompts  # results live on the CPU
    error_scores = (d_err.float() * grad_err.float()).sum(-1).detach().cpu() * n_prompts
    active = ((f > 0) & (where > 0)).any(1).any(0).cpu()
    ig = method == "ig"
    spec = {"method": method, "baseline": base_name, "steps": int(steps) if ig else 1,
            "path": path if ig else None, "seed": int(seed) if ig and path == "latent" else None,
            "answer": None if answer is None else [int(answer[0]), int(answer[1])],
            "metric": "logit_diff" if answer is not None else getattr(metric, "__name__", "custom"),
            "answer_position": _describe_position(answer_position) if answer is not None else None,
            "positions": None if positions is None else [int(p) for p in np.atleast_1d(positions)],
            "n_prompts": int(tokens.shape[0]),
            "integration": None if not ig else "midpoint" if path == "joint" else "grouped midpoint"}
    result = AttributionResult(per_position.sum(1).mean(0), per_position, error_scores,
                               float(error_scores.sum(1).mean()), active, method, base_name, spec["steps"],
                               metric_clean, drift, patch.name, time.perf_counter() - start, spec)
    if db is not None:
        db.add_intervention(patch.name, "attribution", spec, result.to_dict())
    return result


def _decodes_affinely(module: Any) -> bool:
    """Whether ``module.decode(f)`` is ``f @ module.W_dec`` plus terms that do not depend on ``f``
    (every :class:`SparseCoder`: SAEs, transcoders, JumpReLU)."""
    return isinstance(module, SparseCoder)


_MOVED = ("Agreement", "attribution_agreement", "exact_latent_effects", "top_k_recall", "_correlations")


def __getattr__(name: str) -> Any:
    """Exact patching and the agreement check live in :mod:`interlatent.patch.agreement`; their old
    import path here keeps working."""
    if name in _MOVED:
        from interlatent.patch import agreement

        return getattr(agreement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttributionResult", "SpliceMismatchError", "attribute", "metric_of", "recorded", "spliced"]
