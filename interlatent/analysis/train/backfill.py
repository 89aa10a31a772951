"""Backfill: run a dictionary (trained here, loaded from SAELens / sparsify, or saved) over a stored
layer and write its latents for every stored token as a latent layer, with top examples (and
optionally per-latent statistics). The layer is built under a temporary name and swapped in with
one commit, so a crash keeps the previous layer.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from interlatent import naming
from interlatent.analysis.models import (
    SparseCoder,
    Transcoder,
    save_module,
)
from interlatent.db import LatentDB, SparseActs
from interlatent.errors import (
    ConfigError,
    LayerNotFoundError,
    ShapeError,
)

log = logging.getLogger(__name__)

from interlatent.analysis.train.splits import (
    _safe,
    artifact_parent,
    new_artifact_folder,
    weights_sha256,
)


def _latent_prefix(module: SparseCoder) -> str:
    return naming.TRANSCODER_PREFIX if isinstance(module, Transcoder) else naming.SAE_PREFIX


@torch.no_grad()
def backfill(db: LatentDB, module: SparseCoder, layer: str | None = None, *, name: str | None = None,
             source: str | None = None, artifact_id: int | None = None, out_dir: str | Path | None = None,
             latent_dtype: str = "float16", examples_top: int = 32, chunk_tokens: int = 16_384,
             stats: bool = True) -> str:
    """Run a dictionary that was not trained here (loaded with ``load_saelens`` / ``load_sparsify``,
    or any saved module) over a stored layer: its latents for every stored token, the top activating
    examples of every latent and (``stats=True``) per-latent statistics, as one latent layer.

    Args:
        db: the store (writable). module: an SAE, JumpReLU SAE or transcoder.
        layer: the stored layer it reads (a transcoder: its input layer), in any spelling the store
            resolves; default: the module's ``metadata["in_layer"]`` (set by the loaders).
        name: the latent layer (default ``latent_sae:{source}`` / ``latent:{source}``).
        source: the layer the latents describe (default: ``metadata["layer"]``, else ``layer``).
        artifact_id: the module's artifact in the store; without it the module is saved
            (safetensors + JSON) under ``out_dir`` (default ``{db}_artifacts/``) and recorded, so
            ``LatentPatch.from_db(db, name)`` loads it back.
        latent_dtype, examples_top, chunk_tokens: storage dtype, examples kept per latent, tokens
            written per transaction.

    The layer is written under a building name and swapped in for a stored ``name`` in one
    transaction: a crash before the swap keeps the previous layer, its examples and explanations;
    the next backfill of the name clears the leftover. Returns the latent layer's name.
    """
    if not isinstance(module, SparseCoder):
        raise ConfigError(f"backfill needs a SparseAutoencoder, JumpReLUSAE or Transcoder, got {type(module).__name__}")
    meta = module.cfg.metadata or {}
    wanted = layer or meta.get("in_layer") or meta.get("layer")
    if wanted is None:
        raise ConfigError("the module records no layer it reads; pass layer= (a stored layer, see db.layers())")
    in_layer = db.resolve_layer(wanted)
    info = db.layer_info(in_layer)
    if info.width != module.cfg.d_in:
        raise ShapeError(f"the dictionary reads width {module.cfg.d_in}, but stored layer {in_layer!r} has width "
                         f"{info.width}; backfill it over the layer it was trained on")
    if artifact_id is None:  # a pipeline checked its layers before training
        db.check_complete(in_layer, what="backfill")
    if source is None:
        recorded = meta.get("layer")
        source = in_layer if recorded is None else recorded
        with contextlib.suppress(LayerNotFoundError):
            source = db.resolve_layer(source)
    name = name or naming.latent_layer_name(_latent_prefix(module), source)
    module = module.eval()
    kind = "transcoder" if isinstance(module, Transcoder) else "sae"
    if artifact_id is None:
        hook_name = meta.get("hook_name") or info.hook_name or naming.tl_hook_name(in_layer)
        module.cfg.metadata.update({"layer": source, "in_layer": in_layer, "hook_name": hook_name,
                                    "model": meta.get("model") or info.meta.get("model")})
        path = new_artifact_folder(artifact_parent(db, out_dir), f"{kind}_{_safe(source)}", len(db.artifacts()))
        try:
            save_module(module, path)
            artifact_id = db.add_artifact(
                f"{kind}:{source}", kind, architecture=module.architecture, layer=source, path=path.resolve(),
                config={**module.config_dict(), "weights_sha256": weights_sha256(path)},
                metrics={"imported": meta.get("imported")} if meta.get("imported") else {})
        except BaseException:  # the folder is this call's own: nothing recorded points at it
            shutil.rmtree(path, ignore_errors=True)
            raise
    built = naming.building_name(name)
    with contextlib.suppress(LayerNotFoundError):  # the leftover of a backfill that was killed
        db.delete_layer(built)
    layer_meta = {"kind": _latent_prefix(module).rstrip(":"), "source": source, "artifact_id": artifact_id,
                  "in_layer": in_layer, "activation": module.cfg.activation, "k": module.cfg.k}
    with db.run(kind="train", model=f"{kind}:{source}",
                config={"artifact_id": artifact_id, "layer": name}) as run:
        pending: list[tuple[int, Any]] = []
        size = 0
        for index, block in db.iter_sequence_blocks(in_layer):
            enc = module.encode(torch.from_numpy(block).to(module.W_enc.dtype))
            if enc.latent_indices is not None:
                acts: Any = SparseActs(enc.latent_indices.numpy(), enc.latent_acts.numpy(), module.d_sae)
            else:
                acts = enc.latent_acts.numpy()
            pending.append((index, acts))
            size += block.shape[0]
            if size >= chunk_tokens:
                db.write_activations(run.run_id, built, pending, dtype=latent_dtype, layer_meta=layer_meta)
                pending, size = [], 0
        if pending:
            db.write_activations(run.run_id, built, pending, dtype=latent_dtype, layer_meta=layer_meta)
        db.compute_latent_examples(built, top=examples_top)
        if stats:
            db.compute_stats(layers=[built])
        db.replace_layer(built, name)
    return name
