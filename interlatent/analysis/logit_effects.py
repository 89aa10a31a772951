"""Logit effects: the tokens a latent's decoder direction promotes and suppresses.

A dictionary latent ``i`` writes ``W_dec[i]`` into the residual stream (an SAE on ``resid_*`` or a
transcoder / SAE on ``mlp_out`` / ``attn_out``). Read straight through the model's final norm and
unembedding it changes the logits by

    effect[i] = (center(W_dec[i]) * w_norm) @ W_U

per unit of activation, up to the final norm's per-token scale (``1 / std`` of the residual): the
direct logit attribution of the direction, the first thing a latent page shows. ``center`` is the
final LayerNorm's mean subtraction (none for RMSNorm); ``w_norm`` its weight (none without one).
For dictionaries of other points (``mlp_in``, a Gym policy) the product means nothing, and
:func:`compute_logit_effects` refuses them.

    from interlatent.analysis.logit_effects import compute_logit_effects
    compute_logit_effects(db, "latent_sae:llm.layer.1", model)   # stores top promoted / suppressed
    db.logit_effects("latent_sae:llm.layer.1", channel=3)
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from interlatent.backends.readout import final_norm, unembedding
from interlatent.db import LatentDB
from interlatent.errors import ConfigError, ShapeError

#: stored layers whose dictionary decodes into the residual stream's basis
RESIDUAL_WRITE = re.compile(r"^llm\.layer\.-?\d+(?:\.(?:resid_pre|resid_mid|resid_post|mlp_out|attn_out))?$")


def decoder_output_layer(db: LatentDB, layer: str) -> tuple[str, Any]:
    """The stored layer a latent layer's decoder writes into, and the loaded dictionary."""
    from interlatent.analysis.models import load_module

    info = db.layer_info(layer)
    artifact_id = info.artifact_id if info.artifact_id is not None else info.meta.get("artifact_id")
    if artifact_id is None:
        raise ConfigError(f"{info.name!r} has no recorded dictionary (kind {info.kind!r}); logit effects need the "
                          "decoder of an SAE or transcoder layer, e.g. one SAEPipeline(...).run() backfilled")
    artifact = db.get_artifact(int(artifact_id))
    module = load_module(artifact["path"])
    meta = getattr(getattr(module, "cfg", None), "metadata", None) or {}
    out_layer = meta.get("out_layer") or meta.get("in_layer") or info.source
    return str(out_layer), module


@torch.no_grad()
def direction_logits(directions: Float[Tensor, "n d_model"], model: Any) -> Float[Tensor, "n d_vocab"]:
    """``directions`` read through the model's final norm (centring and weight) and unembedding."""
    kind, weight = final_norm(model)
    w_u = unembedding(model).to(torch.float64)
    d = directions.to(torch.float64)
    if d.shape[-1] != w_u.shape[0]:
        raise ShapeError(f"decoder directions have width {d.shape[-1]}, the model's residual stream "
                         f"{w_u.shape[0]}; give the model the dictionary was trained on")
    if kind == "ln":
        d = d - d.mean(-1, keepdim=True)
    if weight is not None:
        d = d * weight.detach().to(torch.float64)
    return d @ w_u


def _token_texts(model: Any, tokenizer: Any, ids: np.ndarray) -> dict[int, str]:
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        return {}
    return {int(i): tok.decode([int(i)]) for i in np.unique(ids)}


@torch.no_grad()
def compute_logit_effects(db: LatentDB, layer: str, model: Any, *, top: int = 10, tokenizer: Any = None,
                          chunk: int = 256) -> int:
    """Compute and store the ``top`` promoted and suppressed tokens of every latent of ``layer``
    (a backfilled SAE / transcoder layer) through ``model``'s unembedding. Returns the rows written.

    Raises :class:`ConfigError` for a dictionary whose decoder does not write into the residual
    stream (``mlp_in``, Gym layers): there the product with ``W_U`` has no meaning."""
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    name = db.resolve_layer(layer)
    out_layer, module = decoder_output_layer(db, name)
    if not RESIDUAL_WRITE.match(out_layer):
        raise ConfigError(f"{name!r} decodes into {out_layer!r}, not the residual stream; logit effects are defined "
                          "for dictionaries of llm.layer.N (resid_pre / resid_mid / resid_post), .mlp_out or .attn_out")
    w_dec = module.W_dec.detach()
    k = min(top, unembedding(model).shape[1])
    ids = {"promoted": [], "suppressed": []}
    vals = {"promoted": [], "suppressed": []}
    for lo in range(0, w_dec.shape[0], chunk):
        logits = direction_logits(w_dec[lo: lo + chunk], model)
        up, down = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
        ids["promoted"].append(up.indices.numpy())
        vals["promoted"].append(up.values.numpy())
        ids["suppressed"].append(down.indices.numpy())
        vals["suppressed"].append(-down.values.numpy())
    token_ids = {d: np.concatenate(v) for d, v in ids.items()}
    values = {d: np.concatenate(v) for d, v in vals.items()}
    texts = _token_texts(model, tokenizer, np.concatenate(list(token_ids.values())))
    return db.set_logit_effects(name, token_ids, values, tokens=texts or None)


__all__ = ["RESIDUAL_WRITE", "compute_logit_effects", "decoder_output_layer", "direction_logits"]
