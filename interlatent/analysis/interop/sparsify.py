"""EleutherAI sparsify's on-disk format: :func:`load_sparsify` reads one of its dictionaries.

sparsify saves one folder per hook point, named after the module it hooks (``layers.8``,
``layers.8.mlp``, ``h.3``), each holding ``cfg.json`` (its ``SparseCoderConfig`` plus ``d_in``) and
``sae.safetensors`` with ``encoder.weight`` ``[num_latents, d_in]``, ``encoder.bias``, ``W_dec``
``[num_latents, d_in]``, ``b_dec`` and, with ``skip_connection``, ``W_skip`` ``[d_in, d_in]``.

Its TopK encoder is ``TopK_k(ReLU(encoder(x - b_dec)))`` for an SAE and ``TopK_k(ReLU(encoder(x)))``
for a transcoder (``transcode=True``: the input is not centred); decoding is
``W_dec^T f + b_dec (+ W_skip x)``. An SAE becomes a :class:`SparseAutoencoder` (TopK), a transcoder
(or an SAE with a skip connection) a :class:`Transcoder` whose input bias is ``0`` (or ``b_dec``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from interlatent import naming
from interlatent.analysis.interop.saelens import _expect_shapes, _read_json, _read_weights
from interlatent.analysis.models import SparseAutoencoder, SparseCoder, SparseCoderConfig, Transcoder
from interlatent.errors import ArtifactError

log = logging.getLogger(__name__)

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
# the module path of a Hugging Face decoder block, optionally one of its sub-modules
_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:h|layers|layer|blocks)\.(?P<block>\d+)(?:\.(?P<sub>mlp|attn|self_attn))?$")


def hookpoint_layers(hookpoint: str, transcode: bool) -> tuple[str, str, str | None]:
    """``(layer, in_layer, out_layer)`` in the store's names for a sparsify hook point.

    An SAE on ``layers.N`` reads ``llm.layer.N`` (the block's output), on ``layers.N.mlp``
    ``llm.layer.N.mlp_out``, on ``layers.N.self_attn`` / ``h.N.attn`` ``llm.layer.N.attn_out``. A
    transcoder on ``layers.N.mlp`` maps the MLP's input to its output (``llm.layer.N.mlp_in`` ->
    ``llm.layer.N.mlp_out``, under the layer ``llm.layer.N``, as Interlatent's transcoders); on
    ``layers.N`` the block's input to its output. Other names are kept as they are.
    """
    m = _HOOKPOINT.match(hookpoint)
    if not m:
        return hookpoint, hookpoint, (hookpoint if transcode else None)
    block, sub = m["block"], m["sub"]
    base = f"{naming.PREFIX}{block}"
    if not transcode:
        name = base if sub is None else f"{base}.{'mlp_out' if sub == 'mlp' else 'attn_out'}"
        return name, name, None
    if sub == "mlp":
        return base, f"{base}.mlp_in", f"{base}.mlp_out"
    if sub is None:
        return base, f"{base}.resid_pre", base
    return f"{base}.attn_out", f"{base}.resid_mid", f"{base}.attn_out"


def _hook_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if (p / SPARSIFY_CFG).is_file()) if folder.is_dir() else []


def load_sparsify(path: str | Path, *, hookpoint: str | None = None, layer: str | None = None) -> SparseCoder:
    """A dictionary saved by sparsify (``SparseCoder.save_to_disk(folder)``) as an Interlatent module.

    ``path`` is a hook point's folder (``.../layers.8.mlp``), or the run folder above it with
    ``hookpoint=`` naming one (not needed when it holds one). The hook point (the folder's name unless given) maps to the store's
    layer names (:func:`hookpoint_layers`), recorded in the module's metadata; ``layer=`` overrides
    the layer an SAE reads. Raises :class:`ArtifactError` for a folder that is not a sparsify
    dictionary, or a ``groupmax`` one (not supported).
    """
    folder = Path(path)
    if not (folder / SPARSIFY_CFG).is_file():
        inside = _hook_folders(folder)
        if hookpoint is not None:
            folder = folder / hookpoint
        elif len(inside) == 1:  # a run folder with one hook point
            folder = folder / inside[0]
    fix = "point load_sparsify at a folder written by sparsify's SparseCoder.save_to_disk(folder)"
    cfg_path, w_path = folder / SPARSIFY_CFG, folder / SPARSIFY_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        inside = _hook_folders(Path(path))
        if inside:
            raise ArtifactError(f"{str(path)!r} holds several sparsify hook points; pass hookpoint= one of {inside}")
        raise ArtifactError(f"{str(folder)!r} is not a sparsify dictionary: expected {SPARSIFY_CFG} and "
                            f"{SPARSIFY_WEIGHTS}; {fix}")
    cfg = _read_json(cfg_path, fix)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ArtifactError(f"{cfg_path} uses activation {activation!r}; only 'topk' sparsify dictionaries load")
    try:
        d_in, k = int(cfg["d_in"]), int(cfg["k"])
        d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{cfg_path} needs integer 'd_in', 'k' and 'num_latents' (or 'expansion_factor'); "
                            f"{fix}") from None
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    state = _read_weights(w_path, fix)
    want = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if skip:
        want["W_skip"] = (d_in, d_in)
    _expect_shapes(w_path, state, want, fix)
    state = {name: tensor.to(torch.float32) for name, tensor in state.items()}
    hook = hookpoint or folder.name
    name, in_layer, out_layer = hookpoint_layers(hook, transcode)
    if layer is not None:
        name = layer
        in_layer = layer if not transcode else in_layer
    if not transcode and skip:  # an SAE with a skip connection: a transcoder from the layer to itself
        out_layer = in_layer
    metadata: dict[str, Any] = {
        "layer": name, "in_layer": in_layer, "out_layer": out_layer,
        "hook_name": naming.tl_hook_name(in_layer),
        "block": naming.block_of(in_layer),
        "model": None,
        "imported": {"format": "sparsify", "hookpoint": hook, "path": str(folder.resolve()),
                     "transcode": transcode, "skip_connection": skip, "multi_topk": bool(cfg.get("multi_topk"))},
    }
    if transcode or skip:
        config = SparseCoderConfig(d_in=d_in, d_sae=d_sae, k=k, d_out=d_in, skip=skip, metadata=metadata)
        module: SparseCoder = Transcoder(config)
    else:
        module = SparseAutoencoder(SparseCoderConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata))
    with torch.no_grad():
        module.W_enc.copy_(state["encoder.weight"])
        module.b_enc.copy_(state["encoder.bias"])
        module.W_dec.copy_(state["W_dec"])
        module.b_dec.copy_(state["b_dec"])
        if isinstance(module, Transcoder):
            module.b_in.copy_(state["b_dec"] if not transcode else torch.zeros(d_in))
            if skip:
                module.W_skip.copy_(state["W_skip"].t())
    if name == hook and not _HOOKPOINT.match(hook):
        log.warning("load_sparsify: hook point %r is not a decoder block or its mlp/attention; kept as the layer "
                    "name (pass layer= to name it)", hook)
    return module.eval()
