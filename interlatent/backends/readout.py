"""Where a model reads its residual stream out: the final norm and the unembedding, for each kind of
model (TransformerLens, TransformerBridge, Hugging Face), and the names of its hook points. Used to
read dictionary directions through to logits and to list a model's components.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from interlatent.errors import ConfigError


def final_norm(model: Any) -> tuple[str, Tensor | None]:
    """(``"ln"`` | ``"rms"`` | ``"none"``, weight or None) of the model's last norm."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(model, "ln_final"):  # TransformerLens
        kind = getattr(cfg, "normalization_type", None)
        weight = getattr(model.ln_final, "w", None)
        if kind in ("LN", "LNPre"):
            return "ln", weight
        if kind in ("RMS", "RMSPre"):
            return "rms", weight
        return "none", None
    for path in ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None:
            kind = "rms" if "rms" in type(module).__name__.lower() else "ln"
            return kind, getattr(module, "weight", None)
    return "none", None


def unembedding(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    if hasattr(model, "W_U"):
        return model.W_U.detach()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ConfigError(f"cannot find the unembedding of a {type(model).__name__}: expected a TransformerLens "
                          "model (W_U) or a Hugging Face causal LM (get_output_embeddings())")
    return head.weight.detach().T


def hook_point_names(model: Any) -> Any:
    """The model's named hook points (TransformerLens ``hook_dict`` keys), or None for a model that
    has none (Hugging Face: plain module hooks)."""
    return model.hook_dict.keys() if hasattr(model, "hook_dict") and hasattr(model, "cfg") else None
