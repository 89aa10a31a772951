"""A backfilled latent layer in the layouts other tools read.

* :func:`export_neuronpedia` — the feature JSON SAEDashboard's Neuronpedia runner writes and
  Neuronpedia uploads: ``batch-{i}.json`` files of ``{model_id, layer, sae_set, features}`` whose
  features carry ``feature_index``, the top activating prompts (``activations``: tokens and
  per-token values, ``bin_min = -1`` / ``bin_max`` = the top value / ``bin_contains = -1`` as the
  runner's "TOP ACTIVATIONS" group), ``frac_nonzero``, the activation-density histogram
  (``freq_hist_data_bar_values/heights``), decoder-to-unembedding logits (``pos_str/values``,
  ``neg_str/values``, ``logits_hist_*``; only with ``model=``), neuron alignment from the decoder
  rows, and ``skipped_indexes.json`` for the latents left out as dead.
* :func:`export_delphi` — EleutherAI delphi's latent cache (``LatentCache.save_splits``): one
  folder per hook point with ``{start}_{end}.safetensors`` files splitting the latents by index,
  each holding ``locations`` ``[n, 3]`` (prompt, position, latent - start; uint16 when both
  fit, else uint32), ``activations`` ``[n]`` float16 and ``tokens`` ``[prompts, positions]``,
  plus the ``config.json`` (delphi's ``CacheConfig`` fields and ``model_name``) its
  ``LatentDataset`` reads.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from interlatent import naming
from interlatent.errors import ConfigError

log = logging.getLogger(__name__)

NEURONPEDIA_FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values",
    "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt",
    "dataset", "decoder_weights_dist", "activations",
)
"""The keys of one feature in a Neuronpedia batch file, in SAEDashboard's order."""


def _round(values: Any) -> list[float]:
    return [round(float(v), 3) for v in np.asarray(values, dtype=np.float64).ravel()]


def _module_of(db: Any, layer: str) -> Any:
    info = db.layer_info(layer)
    if info.artifact_id is None:
        return None
    from interlatent.analysis.models import load_module

    try:
        return load_module(db.get_artifact(info.artifact_id)["path"])
    except Exception as exc:  # the latents export without the decoder's figures
        log.warning("export: could not load the artifact of %s (%s); decoder-based fields stay empty", layer, exc)
        return None


class _LatentScan:
    """What the Neuronpedia export needs of every latent, from streaming passes over the stored
    sequences (never the whole ``[tokens, d_sae]`` matrix at once)."""

    def __init__(self, db: Any, layer: str, width: int, n_examples: int, n_bins: int) -> None:
        self.n_tokens = 0
        self.fired = np.zeros(width, dtype=np.int64)
        self.top = np.full(width, -np.inf)
        self.low = np.full(width, np.inf)  # smallest nonzero value
        self.best_values = np.full((width, n_examples), -np.inf)  # each latent's best prompts, by their peak
        self.best_prompts = np.full((width, n_examples), -1, dtype=np.int64)
        for prompt, block in db.iter_sequence_blocks(layer):
            self.n_tokens += block.shape[0]
            nz = block != 0
            self.fired += nz.sum(0)
            self.top = np.maximum(self.top, block.max(0))
            self.low = np.minimum(self.low, np.where(nz, block, np.inf).min(0))
            peak = np.where(nz.any(0) & (block.max(0) > 0), block.max(0), -np.inf)
            values = np.concatenate([self.best_values, peak[:, None]], axis=1)
            prompts = np.concatenate([self.best_prompts, np.full((width, 1), prompt)], axis=1)
            keep = np.argsort(-values, axis=1, kind="stable")[:, :n_examples]
            self.best_values = np.take_along_axis(values, keep, axis=1)
            self.best_prompts = np.take_along_axis(prompts, keep, axis=1)
        self.hist = np.zeros((width, n_bins), dtype=np.int64)
        span = np.where(self.top > self.low, self.top - self.low, 1.0)
        for _, block in db.iter_sequence_blocks(layer):  # second pass: histograms of the nonzero values
            rows, cols = np.nonzero(block)
            where = np.clip(((block[rows, cols] - self.low[cols]) / span[cols] * n_bins).astype(np.int64), 0,
                            n_bins - 1)
            np.add.at(self.hist, (cols, where), 1)
        self.span, self.n_bins = span, n_bins

    def centres(self, c: int) -> np.ndarray:
        edges = self.low[c] + self.span[c] * np.arange(self.n_bins + 1) / self.n_bins
        return (edges[:-1] + edges[1:]) / 2


def export_neuronpedia(db: Any, latent_layer: str, folder: str | Path, *, model_id: str | None = None,
                       layer: int | None = None, sae_set: str | None = None, model: Any = None,
                       features_per_batch: int = 128, n_examples: int = 20, log_sparsity_threshold: float = -6.0,
                       n_bins: int = 40, n_logits: int = 10, dataset: str = "") -> Path:
    """Write ``latent_layer`` as Neuronpedia feature JSON into ``folder`` (see the module docstring).

    Latents whose frequency is at most ``10 ** log_sparsity_threshold`` (never firing, at the
    default) go to ``skipped_indexes.json`` instead of a batch, as the runner does with its
    sparsity threshold. ``model`` (a ``HookedTransformer``) adds the logit tables: each decoder
    row times ``W_U``. ``layer`` defaults to the source layer's block; ``model_id`` to the
    recorded model; ``sae_set`` to a name made from the latent layer. The store is read in
    streaming passes over its sequences. Returns ``folder``.
    """
    if features_per_batch < 1 or n_examples < 1 or n_bins < 1:
        raise ConfigError(f"features_per_batch, n_examples and n_bins must be >= 1, got {features_per_batch}, "
                          f"{n_examples}, {n_bins}")
    info = db.layer_info(latent_layer)
    source = info.source or naming.split_latent(info.name)[1]
    block = layer if layer is not None else naming.block_of(source)
    if block is None:
        raise ConfigError(f"{latent_layer!r} reads {source!r}, which has no block index; pass layer=")
    scan = _LatentScan(db, info.name, info.width, n_examples, n_bins)
    if scan.n_tokens == 0:
        raise ConfigError(f"{latent_layer!r} holds no tokens to export")
    model_id = str(model_id or info.meta.get("model") or db.recorded_model(info.name, source) or "unknown")
    sae_set = sae_set or re.sub(r"[^A-Za-z0-9_.-]+", "-", info.name).strip("-")
    module = _module_of(db, info.name)
    seqs = db.sequences()
    freq = scan.fired / scan.n_tokens
    threshold = 10.0 ** log_sparsity_threshold
    alive = [int(c) for c in np.flatnonzero(freq > threshold)]
    skipped = [int(c) for c in np.flatnonzero(freq <= threshold)]
    logit_table = None
    if model is not None and module is not None:
        import torch

        with torch.no_grad():
            logit_table = (module.W_dec.detach().float() @ model.W_U.detach().float()).numpy()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for batch_index, start in enumerate(range(0, len(alive), features_per_batch)):
        chosen = alive[start:start + features_per_batch]
        wanted = sorted({int(p) for c in chosen for p in scan.best_prompts[c] if p >= 0})
        values = dict(db.iter_sequence_blocks(info.name, prompt_indices=wanted, channels=chosen))
        toks = db.tokens(prompt_index=wanted, metrics=False) if wanted else None
        texts = {int(p): g.sort_values("position")["token"].fillna("").astype(str).tolist()
                 for p, g in toks.groupby("prompt_index")} if toks is not None else {}
        features = []
        for j, c in enumerate(chosen):
            examples = [(int(p), float(v)) for p, v in zip(scan.best_prompts[c], scan.best_values[c]) if p >= 0]
            activations = [{"bin_min": -1, "bin_max": round(v, 3), "bin_contains": -1, "tokens": texts[p],
                            "values": _round(values[p][:, j])} for p, v in examples]
            features.append(_feature(c, activations, float(freq[c]), scan.centres(c), scan.hist[c], module,
                                     logit_table, model, n_bins, n_logits, len(seqs),
                                     int(seqs["n_positions"].max()), dataset))
        batch = {"model_id": model_id, "layer": int(block), "sae_set": sae_set, "features": features}
        (folder / f"batch-{batch_index}.json").write_text(json.dumps(batch, allow_nan=False))
    (folder / "skipped_indexes.json").write_text(json.dumps(
        {"model_id": model_id, "layer": str(block), "sae_set": sae_set, "log_sparsity": log_sparsity_threshold,
         "skipped_indexes": skipped}))
    return folder


def _feature(c: int, activations: list[dict[str, Any]], frac_nonzero: float, centres: np.ndarray, heights: np.ndarray,
             module: Any, logit_table: np.ndarray | None, model: Any, n_bins: int, n_logits: int, n_prompts: int,
             n_tokens_in_prompt: int, dataset: str) -> dict[str, Any]:
    feature: dict[str, Any] = dict.fromkeys(NEURONPEDIA_FEATURE_KEYS)
    feature.update({
        "feature_index": c, "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [], "frac_nonzero": frac_nonzero,
        "freq_hist_data_bar_values": _round(centres), "freq_hist_data_bar_heights": _round(heights),
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "n_prompts_total": n_prompts,
        "n_tokens_in_prompt": n_tokens_in_prompt, "dataset": dataset, "decoder_weights_dist": [],
        "activations": activations,
    })
    if module is not None:
        w = module.W_dec[c].detach().float().numpy()
        top = np.argsort(-np.abs(w), kind="stable")[:3]
        l1 = float(np.abs(w).sum()) or 1.0
        feature.update({"neuron_alignment_indices": [int(i) for i in top], "neuron_alignment_values": _round(w[top]),
                        "neuron_alignment_l1": _round(w[top] / l1)})
    if logit_table is not None:
        row = logit_table[c]
        order = np.argsort(row, kind="stable")
        pos, neg = order[::-1][:n_logits], order[:n_logits]
        to_str = model.to_single_str_token if getattr(model, "tokenizer", None) is not None else str
        bars, edges = np.histogram(row, bins=n_bins)
        feature.update({"pos_str": [to_str(int(t)) for t in pos], "pos_values": _round(row[pos]),
                        "neg_str": [to_str(int(t)) for t in neg], "neg_values": _round(row[neg]),
                        "logits_hist_data_bar_heights": _round(bars),
                        "logits_hist_data_bar_values": _round((edges[:-1] + edges[1:]) / 2)})
    return feature


def delphi_module_name(source: str) -> str:
    """delphi names a cache by the Hugging Face module it hooks: ``llm.layer.N`` -> ``layers.N``,
    ``llm.layer.N.mlp_out`` -> ``layers.N.mlp``, ``llm.layer.N.attn_out`` -> ``layers.N.self_attn``;
    other names with characters a folder cannot hold replaced."""
    block = naming.block_of(source)
    canonical = naming.canonical_hook_name(source)
    if block is not None and canonical.startswith(naming.PREFIX):
        kind = canonical.split(".")[3] if canonical.count(".") >= 3 else None
        suffix = {None: "", "mlp_out": ".mlp", "attn_out": ".self_attn"}.get(kind, f".{kind}")
        return f"layers.{block}{suffix}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source)


def export_delphi(db: Any, latent_layer: str, folder: str | Path, *, n_splits: int = 5, module_name: str | None = None,
                  model_name: str | None = None, pad_token_id: int = 0, ctx_multiple: int = 1) -> Path:
    """Write ``latent_layer`` as a delphi latent cache under ``folder`` (see the module docstring):
    ``folder/{module_name}/{start}_{end}.safetensors`` for ``n_splits`` latent ranges and
    ``config.json``. Prompts become rows of ``tokens`` in prompt order, right-padded with
    ``pad_token_id`` to the longest, rounded up to a multiple of ``ctx_multiple`` (no latent is
    ever located at a padded position). delphi cuts ``tokens`` into windows of its
    ``example_ctx_len``: pass that as ``ctx_multiple`` so windows never span two prompts. Returns
    the module's folder; ``LatentDataset(folder, ..., tokenizer=tok)`` reads it."""
    from safetensors.numpy import save_file

    info = db.layer_info(latent_layer)
    width = info.width
    if not 1 <= n_splits <= width:
        raise ConfigError(f"n_splits must be between 1 and the layer's width {width}, got {n_splits}")
    if ctx_multiple < 1:
        raise ConfigError(f"ctx_multiple must be >= 1, got {ctx_multiple}")
    meta = db.tokens(metrics=False)[["prompt_index", "position", "token_id"]]
    prompts = [int(p) for p in db.prompt_indices(info.name)]
    row_of = {p: i for i, p in enumerate(prompts)}
    meta = meta[meta["prompt_index"].isin(row_of)]
    ctx = -(-(int(meta["position"].max()) + 1) // ctx_multiple) * ctx_multiple
    token_matrix = np.full((len(prompts), ctx), pad_token_id, dtype=np.int64)
    token_matrix[meta["prompt_index"].map(row_of).to_numpy(), meta["position"].to_numpy(dtype=np.int64)] = \
        meta["token_id"].fillna(pad_token_id).to_numpy(dtype=np.int64)
    parts_loc, parts_act = [], []
    n_tokens = 0
    for prompt, block in db.iter_sequence_blocks(info.name):  # one sequence at a time: memory ~ nonzeros
        rows, latents = np.nonzero(block)
        parts_loc.append(np.stack([np.full(rows.shape, row_of[int(prompt)]), rows, latents], axis=1))
        parts_act.append(block[rows, latents])
        n_tokens += block.shape[0]
    locations = np.concatenate(parts_loc) if parts_loc else np.zeros((0, 3), dtype=np.int64)
    acts = np.concatenate(parts_act) if parts_act else np.zeros(0, dtype=np.float32)
    if np.abs(acts).max(initial=0.0) > 65504:
        log.warning("export_delphi: latent values beyond float16's range (65504) become inf in delphi's float16 cache")
    source = info.source or naming.split_latent(info.name)[1]
    module_dir = Path(folder) / (module_name or delphi_module_name(source))
    module_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, width, n_splits + 1).astype(np.int64)  # as delphi's _generate_split_indices
    for start, stop in zip(bounds[:-1], bounds[1:]):
        end = int(stop) - 1
        mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
        part = locations[mask].copy()
        part[:, 2] -= start
        small = part.size == 0 or (part[:, 2].max() < 2 ** 16 and part[:, 0].max() < 2 ** 16)
        save_file({"locations": part.astype(np.uint16 if small else np.uint32),
                   "activations": acts[mask].astype(np.float16), "tokens": token_matrix},
                  str(module_dir / f"{int(start)}_{end}.safetensors"))
    model_name = model_name or db.recorded_model(info.name, source)
    config = {"dataset_repo": str(db.path), "dataset_split": "stored prompts", "dataset_name": "",
              "dataset_column": "text", "batch_size": len(prompts), "cache_ctx_len": ctx, "ctx_len": ctx,
              "n_tokens": n_tokens, "n_splits": n_splits, "model_name": model_name or "",
              "interlatent_layer": info.name}
    (module_dir / "config.json").write_text(json.dumps(config, allow_nan=False))
    return module_dir


__all__ = ["NEURONPEDIA_FEATURE_KEYS", "delphi_module_name", "export_delphi", "export_neuronpedia"]
