"""Core metrics of a sparse dictionary on a model, matched to SAEBench's (``sae_lens.evals``).

:func:`evaluate` runs the model over tokens (stored prompts — the store keeps their token ids —
or a token file) with the dictionary spliced in at its hook point, and measures, from the final
weights:

=====================================  ==============================================================
metric                                 definition (``sae_lens.evals`` name where it agrees)
=====================================  ==============================================================
``ce_clean / ce_spliced``              next-token CE, mean over counted positions
                                       (``ce_loss_without_sae`` / ``ce_loss_with_sae``)
``ce_zero_ablation / ce_mean_ablation`` CE with the hook's activation zeroed (``ce_loss_with_ablation``)
                                       / replaced by its mean over the evaluated tokens
``ce_loss_score``                      ``(ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (same name)
``ce_loss_score_mean``                 the same against mean ablation (SAELens has none)
``kl_spliced / kl_zero_ablation``      ``KL(clean || patched)`` per position, mean
                                       (``kl_div_with_sae`` / ``kl_div_with_ablation``)
``kl_div_score``                       ``(kl_zero - kl_spliced) / kl_zero`` (same name);
                                       ``kl_div_score_mean`` against mean ablation
``explained_variance``                 ``1 - E|x - x_hat|^2 / (E|x|^2 - |E x|^2)``: around the mean of
                                       the whole evaluated set (same name, SAELens >= 6.x)
``sse_per_token``                      ``E |x - x_hat|^2`` summed over dimensions (SAELens's ``mse``)
``mse``                                the mean over dimensions as well (the pipelines' ``mse``)
``l0 / l1``                            active latents (``!= 0``) / sum of ``|f|``, mean per token
``l2_norm_in / l2_norm_out / l2_ratio`` ``|x|``, ``|x_hat|``, ``|x_hat| / |x|`` mean per token (same)
``relative_reconstruction_bias``       ``E|x_hat|^2 / E<x, x_hat>`` over the whole set
``cossim``                             mean cosine of ``x`` and ``x_hat`` (same)
``dead_fraction``                      latents that never fire on the evaluated tokens
=====================================  ==============================================================

Counted positions: real tokens (``attention_mask``) that are not special tokens (BOS, EOS, pad,
as SAELens's ``exclude_special_tokens=True``); the CE at a position also needs the next token to
be real. The splice replaces counted positions only (as SAELens's replacement hook), ablations
replace every position (as SAELens's ablation hooks).

Where the definitions differ from ``sae_lens.evals`` (6.54), and why:

* ``relative_reconstruction_bias``: SAELens takes the ratio per batch and averages the ratios;
  here it is one ratio over all tokens (the quantity of Rajamanoharan et al. eq. 10, independent
  of batching). They agree for a single batch.
* ``explained_variance_legacy`` (SAELens's old per-token formula, ``1 - |x - x_hat|^2 / |x -
  batch_mean|^2`` averaged over tokens) is not computed: it is dominated by tokens near the batch
  mean and is not an explained variance. SAELens releases before the fix of #659 reported
  explained variance around zero instead of the mean, which inflates it for activations with a
  large mean (the residual stream): compare with those numbers only after recomputing them.
* SAELens #518 compared a scaled input with an unscaled output when ``normalize_activations`` was
  set; the dictionaries here never rescale their input (the loader refuses such configs), so the
  two agree by construction.
* ``feature_density`` here is the fraction of counted tokens on which a latent fires, like
  SAELens's; its log10 histogram uses ``log10(density + 1e-10)`` as SAEBench's plots do.

:func:`seed_summary` turns the results of several dictionaries (seeds) per group into mean ± sd
and flags the metrics where two groups differ by less than two standard deviations.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interlatent.analysis.models import SparseCoder
from interlatent.errors import ConfigError, NotEnoughDataError, ShapeError
from interlatent.backends import make_backend
from interlatent.patch.core import LatentPatch, at_hook, logits_of

log = logging.getLogger(__name__)

METRICS = (
    "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "ce_loss_score", "ce_loss_score_mean",
    "kl_spliced", "kl_zero_ablation", "kl_mean_ablation", "kl_div_score", "kl_div_score_mean",
    "explained_variance", "sse_per_token", "mse", "l0", "l1", "l2_norm_in", "l2_norm_out", "l2_ratio",
    "relative_reconstruction_bias", "cossim", "dead_fraction",
)
"""Every scalar :func:`evaluate` reports, in order."""
DENSITY_BINS = np.linspace(-10.0, 0.0, 21)
"""Edges of the log10 feature-density histogram (``log10(density + 1e-10)``)."""


@dataclass
class EvalResult:
    """What :func:`evaluate` measured for one dictionary."""

    name: str
    metrics: dict[str, float]
    """The scalars of :data:`METRICS`."""
    feature_density: np.ndarray
    """``[d_sae]`` fraction of counted tokens on which each latent fires."""
    density_histogram: np.ndarray
    """Counts of latents per bin of ``log10(density + 1e-10)`` over :data:`DENSITY_BINS`."""
    n_tokens: int
    """Counted positions the activation metrics were measured on."""
    n_prompts: int
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One flat row: name, every metric, token and prompt counts."""
        return {"dictionary": self.name, **self.metrics, "n_tokens": self.n_tokens, "n_prompts": self.n_prompts}

    def to_dict(self) -> dict[str, Any]:
        return {**self.row(), "feature_density": self.feature_density.tolist(),
                "density_histogram": {"log10_edges": DENSITY_BINS.tolist(),
                                      "counts": self.density_histogram.tolist()}}


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the activations needed are captured."""


def special_token_ids(model: Any) -> list[int]:
    """BOS, EOS, pad and the other special tokens of the model's tokenizer (what SAELens excludes)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return []
    ids = {getattr(tok, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids |= set(getattr(tok, "all_special_ids", []) or [])
    return sorted(int(i) for i in ids if i is not None)


def _as_patch(dictionary: LatentPatch | SparseCoder) -> LatentPatch:
    if isinstance(dictionary, LatentPatch):
        return dictionary
    if isinstance(dictionary, SparseCoder):
        layer = (dictionary.cfg.metadata or {}).get("layer")
        if layer is None:
            raise ConfigError("the dictionary records no layer; pass LatentPatch(module, layer) instead")
        return LatentPatch(dictionary, layer)
    raise ConfigError(f"evaluate needs a LatentPatch or a SparseCoder, got {type(dictionary).__name__}")


def _keep_mask(tokens: Tensor, attention_mask: Tensor | None, ignore: Sequence[int]) -> Bool[Tensor, "batch pos"]:
    keep = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for t in ignore:
        keep &= tokens != t
    return keep


@contextmanager
def _spliced(model: Any, patch: LatentPatch, points: tuple[Any, Any], keep: Tensor) -> Iterator[None]:
    """The reconstruction replaces the output hook's activation at ``keep`` positions."""
    p_in, p_out = points
    same = p_in.name == p_out.name
    seen: dict[str, Tensor] = {}
    module = patch.module

    def write(act: Tensor) -> Tensor:
        x_in = act if same else seen.pop("x")
        flat = rearrange(x_in, "batch pos d -> (batch pos) d").to(module.W_enc.dtype)
        recon = module.decode(module.encode_dense(flat), x=flat)
        recon = rearrange(recon, "(batch pos) d -> batch pos d", batch=act.shape[0]).to(act.dtype)
        return torch.where(keep[..., None], recon, act)

    with ExitStack() as stack:
        if not same:
            stack.enter_context(at_hook(model, p_in, lambda act: seen.__setitem__("x", act)))
        stack.enter_context(at_hook(model, p_out, write))
        yield


def _ce_per_token(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Tensor:
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]


def _kl_per_position(clean: Tensor, other: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(other.double(), -1), F.log_softmax(clean.double(), -1), reduction="none",
                    log_target=True).sum(-1)


class _Sums:
    """Streaming float64 sums of the activation metrics over counted tokens."""

    def __init__(self, d_sae: int) -> None:
        self.n = 0
        self.sum_x: Tensor | None = None
        self.scalars = dict.fromkeys(("sq", "resid", "l0", "l1", "l2_in", "l2_out", "l2_ratio", "xhat_sq", "x_dot",
                                      "cossim"), 0.0)
        self.fired = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        s = self.scalars
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        s["sq"] += float(x.pow(2).sum())
        s["resid"] += float((x - x_hat).pow(2).sum())
        active = f != 0
        s["l0"] += float(active.sum())
        s["l1"] += float(f.abs().double().sum())
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        s["l2_in"] += float(n_in.sum())
        s["l2_out"] += float(n_out.sum())
        s["l2_ratio"] += float((n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum())
        s["xhat_sq"] += float(n_out.pow(2).sum())
        s["x_dot"] += float((x * x_hat).sum())
        s["cossim"] += float(((x / n_in[:, None]) * (x_hat / n_out[:, None])).sum())
        self.fired += active.sum(0).double()
        self.n += x.shape[0]


@torch.no_grad()
def evaluate(dictionary: LatentPatch | SparseCoder, model: Any, tokens: Int[Tensor, "*batch pos"], *,
             attention_mask: Tensor | None = None, exclude_special_tokens: bool | Sequence[int] = True,
             batch_size: int = 8, name: str | None = None, progress: bool | None = None) -> EvalResult:
    """SAEBench's core metrics of ``dictionary`` spliced into ``model`` on ``tokens`` (see the module
    docstring for every definition and where it differs from ``sae_lens.evals``).

    Args:
        dictionary: a :class:`LatentPatch`, or an SAE / JumpReLU SAE / transcoder whose metadata
            names its layer (the loaders and pipelines record it).
        model: a ``HookedTransformer`` or a Hugging Face causal LM.
        tokens: ``[batch, pos]`` token ids (right-padded, with ``attention_mask``, when ragged):
            see :func:`tokens_from_db` and :func:`load_token_file`.
        exclude_special_tokens: True to leave BOS / EOS / pad positions out (SAELens's default),
            False to count every real position, or the token ids to leave out.
        batch_size: prompts per forward pass.
    """
    patch = _as_patch(dictionary)
    points = patch.check_model(model)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ShapeError(f"tokens must be [batch, pos] with at least one prompt, got shape {tuple(tokens.shape)}")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ShapeError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    backend = make_backend(model)
    n_ctx = backend.n_ctx
    if tokens.shape[1] > n_ctx:
        raise ShapeError(f"prompts of {tokens.shape[1]} tokens exceed the model's context of {n_ctx}; "
                         "truncate them (or evaluate fewer tokens per prompt)")
    vocab = backend.d_vocab
    if (vocab is not None and int(tokens.max()) >= vocab) or int(tokens.min()) < 0:
        raise ConfigError(f"token ids run from {int(tokens.min())} to {int(tokens.max())}, but the model's vocabulary "
                          f"has {vocab} tokens: were these tokens made by another tokenizer?")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    ignore = (special_token_ids(model) if exclude_special_tokens is True else
              [] if exclude_special_tokens is False else [int(t) for t in exclude_special_tokens])
    module = patch.module
    p_in, p_out = points
    batches = [slice(i, i + batch_size) for i in range(0, tokens.shape[0], batch_size)]
    masks = [None if attention_mask is None else attention_mask[b] for b in batches]
    bar = tqdm(total=2 * len(batches), desc=f"eval {patch.name}", disable=None if progress is None else not progress,
               leave=False)

    # pass 1: activations at the hook points (the forward stops there) -> activation metrics, mean
    sums = _Sums(module.cfg.d_sae)
    out_sum: Tensor | None = None
    out_n = 0
    for b, mask in zip(batches, masks):
        seen: dict[str, Tensor] = {}

        def grab_out(act: Tensor) -> None:
            seen["out"] = act
            raise _Stop

        with ExitStack() as stack:
            if p_in.name != p_out.name:
                stack.enter_context(at_hook(model, p_in, lambda act: seen.__setitem__("in", act)))
            stack.enter_context(at_hook(model, p_out, grab_out))
            try:
                logits_of(model, tokens[b], mask)
            except _Stop:
                pass
        if "out" not in seen:
            raise ConfigError(f"hook point {p_out.name!r} did not fire")
        x_out = seen["out"]
        x_in = seen.get("in", x_out)
        real = torch.ones(x_out.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        flat_out = x_out[real].double()
        out_sum = flat_out.sum(0) if out_sum is None else out_sum + flat_out.sum(0)
        out_n += flat_out.shape[0]
        keep = _keep_mask(tokens[b], mask, ignore)
        xi = x_in[keep].to(module.W_enc.dtype)
        f = module.encode_dense(xi)
        sums.add(x_out[keep], module.decode(f, x=xi), f)
        bar.update()
    if sums.n == 0:
        raise NotEnoughDataError("no counted positions: every token is padding or a special token "
                                 "(pass exclude_special_tokens=False to count special tokens)")
    mean_out = (out_sum / out_n).float()

    # pass 2: logits clean, spliced, zero- and mean-ablated -> CE and KL
    totals = dict.fromkeys(("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "kl_spliced",
                            "kl_zero_ablation", "kl_mean_ablation"), 0.0)
    n_ce = n_kl = 0
    for b, mask in zip(batches, masks):
        t = tokens[b]
        keep = _keep_mask(t, mask, ignore)
        ce_mask = keep[:, :-1] & (torch.ones_like(keep[:, 1:]) if mask is None else mask[:, 1:].bool())
        clean = logits_of(model, t, mask)
        with _spliced(model, patch, points, keep):
            spliced = logits_of(model, t, mask)
        with at_hook(model, p_out, lambda act: torch.zeros_like(act)):
            zeroed = logits_of(model, t, mask)
        with at_hook(model, p_out, lambda act: mean_out.to(act.dtype).expand_as(act).clone()):
            meaned = logits_of(model, t, mask)
        for key, lg in (("clean", clean), ("spliced", spliced), ("zero_ablation", zeroed), ("mean_ablation", meaned)):
            totals[f"ce_{key}"] += float(_ce_per_token(lg, t)[ce_mask].sum())
            if key != "clean":
                totals[f"kl_{key}"] += float(_kl_per_position(clean, lg)[keep].sum())
        n_ce += int(ce_mask.sum())
        n_kl += int(keep.sum())
        bar.update()
    bar.close()

    def ratio(num: float | int, den: float | int) -> float:
        return num / den if den != 0 else float("nan")

    m: dict[str, float] = {k: ratio(v, n_ce if k.startswith("ce_") else n_kl) for k, v in totals.items()}
    m["ce_loss_score"] = ratio(m["ce_zero_ablation"] - m["ce_spliced"], m["ce_zero_ablation"] - m["ce_clean"])
    m["ce_loss_score_mean"] = ratio(m["ce_mean_ablation"] - m["ce_spliced"], m["ce_mean_ablation"] - m["ce_clean"])
    m["kl_div_score"] = ratio(m["kl_zero_ablation"] - m["kl_spliced"], m["kl_zero_ablation"])
    m["kl_div_score_mean"] = ratio(m["kl_mean_ablation"] - m["kl_spliced"], m["kl_mean_ablation"])
    s, n = sums.scalars, sums.n
    total_var = s["sq"] / n - float((sums.sum_x / n).pow(2).sum())
    m["explained_variance"] = 1.0 - ratio(s["resid"] / n, total_var)
    m["sse_per_token"] = s["resid"] / n
    m["mse"] = s["resid"] / (n * module.cfg.out_dim)
    m["l0"], m["l1"] = s["l0"] / n, s["l1"] / n
    m["l2_norm_in"], m["l2_norm_out"], m["l2_ratio"] = s["l2_in"] / n, s["l2_out"] / n, s["l2_ratio"] / n
    m["relative_reconstruction_bias"] = ratio(s["xhat_sq"], s["x_dot"])
    m["cossim"] = s["cossim"] / n
    density = (sums.fired / n).numpy()
    m["dead_fraction"] = float((density == 0).mean())
    # clipped, so that a latent firing on every token (log10(1 + 1e-10) > 0) lands in the last bin
    hist, _ = np.histogram(np.clip(np.log10(density + 1e-10), -10.0, 0.0), bins=DENSITY_BINS)
    metrics = {k: float(m[k]) for k in METRICS}
    return EvalResult(name or patch.name, metrics, density, hist, n, int(tokens.shape[0]),
                      extra={"excluded_token_ids": ignore, "ce_positions": n_ce})


# ---------------------------------------------------------------------------- where tokens come from
def tokens_from_db(db: Any, prompt_indices: Sequence[int] | None = None, *, max_prompts: int | None = None,
                   max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """The stored prompts' token ids, right-padded: ``(tokens [batch, pos], attention_mask)``.

    Prompts are those of ``prompt_indices`` (default: every stored prompt with tokens, in order),
    at most ``max_prompts``; ``max_len`` keeps each prompt's first tokens (a model's context)."""
    seqs = db.sequences()
    if prompt_indices is None:
        prompt_indices = [int(p) for p in seqs["prompt_index"]]
    prompt_indices = list(prompt_indices)[:max_prompts] if max_prompts is not None else list(prompt_indices)
    if not prompt_indices:
        raise NotEnoughDataError("the store holds no prompts to evaluate on")
    df = db.tokens(prompt_index=prompt_indices, metrics=False)
    if df.empty or df["token_id"].isna().all():
        raise NotEnoughDataError("the stored prompts keep no token ids (a Gym store?); pass a token file")
    rows = []
    for p in prompt_indices:
        part = df[df["prompt_index"] == p].sort_values("position")
        ids = part["token_id"].to_numpy(dtype=np.int64)
        if max_len is not None:
            ids = ids[:max_len]
        if len(ids):
            rows.append(ids)
    return _padded(rows)


def _padded(rows: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(np.asarray(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return tokens, mask


def load_token_file(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Token ids from a file: ``.npy`` / ``.pt`` / ``.safetensors`` (an integer ``[batch, pos]``
    array; safetensors: its ``tokens`` tensor or its only one) or text (one prompt per line,
    whitespace-separated ids, right-padded with a mask when ragged). Returns ``(tokens, mask)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"token file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".pt":
        array = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "tokens" not in tensors and len(tensors) != 1:
            raise ConfigError(f"{path} holds {sorted(tensors)}; expected a 'tokens' tensor or a single tensor")
        array = tensors.get("tokens", next(iter(tensors.values())))
    else:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
        try:
            rows = [np.array([int(v) for v in ln], dtype=np.int64) for ln in lines]
        except ValueError:
            raise ConfigError(f"{path} is not a token file: expected whitespace-separated integer ids per line") \
                from None
        if not rows:
            raise ConfigError(f"{path} holds no tokens")
        if len({len(r) for r in rows}) > 1:
            return _padded(rows)
        array = torch.from_numpy(np.stack(rows))
    if not isinstance(array, Tensor) or array.dtype.is_floating_point or array.dtype == torch.bool:
        raise ConfigError(f"{path} must hold integer token ids, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ShapeError(f"{path} holds an array of shape {tuple(array.shape)}; expected [batch, pos] token ids")
    return array.long(), None


# ---------------------------------------------------------------------------- several dictionaries
def seed_summary(groups: Mapping[str, Sequence[EvalResult]],
                 metrics: Sequence[str] = METRICS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Mean ± sd over the dictionaries (seeds) of each group, and every pair of groups compared.

    Returns ``(summary, comparisons)``: ``summary`` rows ``{group, metric, mean, sd, n}`` (``sd``
    with ``ddof=1``; NaN for one dictionary); ``comparisons`` rows ``{metric, group_a, group_b,
    difference, sd, within_2sd}`` where ``sd`` is the larger of the two groups' seed-to-seed sds
    and ``within_2sd`` flags a difference smaller than two of them (not told apart by these seeds;
    None when a group has a single dictionary)."""
    summary, stats = [], {}
    for group, results in groups.items():
        if not results:
            raise ConfigError(f"group {group!r} has no results")
        for metric in metrics:
            values = np.array([r.metrics[metric] for r in results], dtype=np.float64)
            mean = float(values.mean())
            sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            stats[group, metric] = (mean, sd)
            summary.append({"group": group, "metric": metric, "mean": mean, "sd": sd, "n": len(values)})
    comparisons = []
    for a, b in itertools.combinations(groups, 2):
        for metric in metrics:
            (ma, sa), (mb, sb) = stats[a, metric], stats[b, metric]
            sd = max(sa, sb) if not (math.isnan(sa) or math.isnan(sb)) else float("nan")
            diff = ma - mb
            comparisons.append({"metric": metric, "group_a": a, "group_b": b, "difference": diff, "sd": sd,
                                "within_2sd": None if math.isnan(sd) or math.isnan(diff) else bool(abs(diff) < 2 * sd)})
    return summary, comparisons


__all__ = ["DENSITY_BINS", "METRICS", "EvalResult", "evaluate", "load_token_file", "seed_summary",
           "special_token_ids", "tokens_from_db"]
