"""Interop: write a trained SAE in SAELens's on-disk format, so SAELens users can load it.

SAELens reads a folder with ``cfg.json`` and ``sae_weights.safetensors`` holding ``W_enc``
``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]`` and ``b_dec`` ``[d_in]``
(``SAE.load_from_disk(folder)``). TopK SAEs map to architecture ``"topk"`` with ``k``; ReLU SAEs to
``"standard"``. Both apply ``b_dec`` to the input, as ours do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from interlatent.analysis.models import SparseAutoencoder
from interlatent.errors import ConfigError

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"


def export_saelens(sae: SparseAutoencoder, folder: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None, hook_layer: int | None = None,
                   context_size: int | None = None, prepend_bos: bool | None = True) -> Path:
    """Write ``sae`` to ``folder`` as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout).

    ``hook_name`` is the TransformerLens hook the SAE reads (e.g. ``blocks.8.hook_resid_post``);
    when omitted it is taken from the SAE's metadata where the pipeline recorded it.
    """
    if not isinstance(sae, SparseAutoencoder):
        raise ConfigError(f"only SparseAutoencoder exports to SAELens; got {type(sae).__name__}")
    meta = sae.cfg.metadata or {}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach().t().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    save_file(tensors, str(folder / SAELENS_WEIGHTS))
    cfg: dict[str, Any] = {
        "architecture": "topk" if sae.cfg.activation == "topk" else "standard",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name or meta.get("model"),
            "hook_name": hook_name or meta.get("hook_name"),
            "hook_layer": hook_layer if hook_layer is not None else meta.get("block"),
            "context_size": context_size,
            "prepend_bos": prepend_bos,
            # the layout written here is SAELens 6's; without a version it would be read as a
            # pre-6 config and lose this metadata
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
        },
    }
    if sae.cfg.activation == "topk":
        cfg["k"] = sae.cfg.k
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))
    return folder
