"""SAELens's on-disk format, both ways: :func:`export_saelens` writes a dictionary SAELens loads,
:func:`load_saelens` reads one SAELens wrote.

SAELens (6.x) keeps a folder with ``cfg.json`` and ``sae_weights.safetensors`` holding ``W_enc``
``[d_in, d_sae]``, ``b_enc`` ``[d_sae]``, ``W_dec`` ``[d_sae, d_in]``, ``b_dec`` ``[d_in]`` and, for
JumpReLU, ``threshold`` ``[d_sae]`` (``SAE.load_from_disk(folder)``); a transcoder's decoder writes
``d_out``. Architectures:

=========================  ===========================================  ==========================
SAELens                    encode                                       Interlatent
=========================  ===========================================  ==========================
``standard``               ``ReLU(W_enc^T (x - b_dec) + b_enc)``        SparseAutoencoder, relu
``topk``                   ``TopK_k(...)`` then ReLU                    SparseAutoencoder, topk
``jumprelu``               ``ReLU(pre) * (pre > threshold)``            JumpReLUSAE
``transcoder``             ``ReLU(W_enc^T x + b_enc)`` (not centred)    Transcoder, relu
``jumprelu_transcoder``    JumpReLU, input not centred                  JumpReLUTranscoder
=========================  ===========================================  ==========================

All decode ``W_dec^T f + b_dec``; ``skip_transcoder`` and ``jumprelu_skip_transcoder`` add
``W_skip x`` (a Transcoder with ``skip=True``). A transcoder reads ``metadata.hook_name`` and
writes ``metadata.hook_name_out``. ``apply_b_dec_to_input=False`` (the input is not centred on
``b_dec``) is folded into ``b_enc`` (``b_enc + b_dec W_enc``), and TopK's
``rescale_acts_by_decoder_norm`` into the encoder and decoder rows, so every loaded dictionary is
one of ours with the same outputs (float32 rounding apart). Activation normalisation and
attention-head reshaping change what the dictionary reads; those raise, naming the setting.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from interlatent import naming
from interlatent.analysis.models import (
    JumpReLUSAE,
    JumpReLUTranscoder,
    SparseAutoencoder,
    SparseCoder,
    SparseCoderConfig,
    Transcoder,
)
from interlatent.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_ARCHITECTURES = ("standard", "topk", "jumprelu", "transcoder", "skip_transcoder", "jumprelu_transcoder",
                         "jumprelu_skip_transcoder")
_TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}
_METADATA_KEYS = ("model_name", "hook_name", "hook_name_out", "hook_layer", "hook_head_index", "context_size",
                  "prepend_bos",
                  "dataset_path", "model_from_pretrained_kwargs", "sae_lens_training_version")


def _saelens_architecture(sae: SparseCoder) -> str:
    if isinstance(sae, Transcoder):
        if sae.cfg.activation == "topk":
            raise ConfigError("SAELens 6 has no TopK transcoder architecture; only ReLU and JumpReLU transcoders "
                              "export to it")
        return f"{'jumprelu_' if sae.cfg.activation == 'jumprelu' else ''}{'skip_' if sae.cfg.skip else ''}transcoder"
    if isinstance(sae, JumpReLUSAE):
        return "jumprelu"
    return "topk" if sae.cfg.activation == "topk" else "standard"


def export_saelens(sae: SparseCoder, folder: str | Path, *, hook_name: str | None = None,
                   model_name: str | None = None, hook_layer: int | None = None,
                   context_size: int | None = None, prepend_bos: bool | None = None) -> Path:
    """Write ``sae`` to ``folder`` as ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 layout).

    ``hook_name`` is the TransformerLens hook the SAE reads (e.g. ``blocks.8.hook_resid_post``);
    when omitted it is taken from the SAE's metadata: the hook the pipeline recorded from the
    stored layer, else the hook of its canonical layer name (``llm.layer.8`` ->
    ``blocks.8.hook_resid_post``). ``hook_layer`` defaults to that hook's block, ``prepend_bos`` to True. A dictionary
    loaded with :func:`load_saelens` keeps the SAELens metadata it came with, so exporting it again
    writes the same files byte for byte. A ReLU or JumpReLU transcoder exports as SAELens's
    (skip / jumprelu) transcoder, writing ``hook_name_out`` from its output layer; its input
    bias folds into ``b_enc`` (SAELens transcoders do not centre their input).
    """
    if not isinstance(sae, SparseCoder):
        raise ConfigError(f"only an SAE or transcoder exports to SAELens; got {type(sae).__name__}")
    architecture = _saelens_architecture(sae)
    is_transcoder = isinstance(sae, Transcoder)
    meta = sae.cfg.metadata or {}
    kept = dict(meta.get("saelens_metadata") or {})
    hook_name = hook_name or meta.get("hook_name") or naming.tl_hook_name(meta.get("in_layer") or meta.get("layer")
                                                                        or "")
    if hook_name is None:
        log.warning("export_saelens: the SAE records no TransformerLens hook; pass hook_name= so SAELens knows "
                    "where it reads")
    if hook_layer is None:
        hook_layer = meta.get("block") if meta.get("block") is not None else (
            naming.block_of(hook_name) if hook_name else None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    b_enc = sae.b_enc.detach()
    if is_transcoder and bool(sae.b_in.detach().any()):  # W_enc (x - b_in) + b_enc == W_enc x + (b_enc - W_enc b_in)
        b_enc = b_enc - sae.W_enc.detach() @ sae.b_in.detach()
    tensors = {
        "W_enc": sae.W_enc.detach().t().contiguous().cpu(),
        "b_enc": b_enc.contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    if is_transcoder and sae.cfg.skip:
        tensors["W_skip"] = sae.W_skip.detach().t().contiguous().cpu()
    if isinstance(sae, (JumpReLUSAE, JumpReLUTranscoder)):
        tensors["threshold"] = sae.threshold.detach().contiguous().cpu()
    save_file(tensors, str(folder / SAELENS_WEIGHTS))
    metadata: dict[str, Any] = {
        **kept,
        "model_name": model_name or meta.get("model") or kept.get("model_name"),
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "context_size": context_size if context_size is not None else kept.get("context_size"),
        "prepend_bos": prepend_bos if prepend_bos is not None else kept.get("prepend_bos", True),
        # the layout written here is SAELens 6's; without a version it would be read as a
        # pre-6 config and lose this metadata
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": kept.get("sae_lens_training_version"),
    }
    if is_transcoder:
        metadata["hook_name_out"] = (meta.get("hook_name_out") or kept.get("hook_name_out")
                                     or naming.tl_hook_name(meta.get("out_layer") or ""))
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not is_transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if sae.cfg.activation == "topk":
        cfg["k"] = sae.cfg.k
    if is_transcoder:
        cfg["d_out"] = sae.cfg.out_dim
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))
    return folder


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} holds a JSON {type(data).__name__}, expected an object; {fix}")
    return data


def _read_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"could not read the weights in {path}: {exc}; {fix}") from None


def _expect_shapes(path: Path, state: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]], fix: str) -> None:
    missing = sorted(set(want) - set(state))
    if missing:
        raise ArtifactError(f"{path} lacks {missing} (it holds {sorted(state)}); {fix}")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ArtifactError(f"tensor {name!r} in {path} has shape {tuple(state[name].shape)}, but the config "
                                f"says {shape}; {fix}")


def _transcoder_layer(in_layer: str | None, out_layer: str | None) -> str | None:
    """``llm.layer.N`` for the MLP of block N (as Interlatent's transcoders are named), else the input layer."""
    block = naming.block_of(in_layer or "")
    mlp = (f"{naming.PREFIX}{block}.mlp_in", f"{naming.PREFIX}{block}.mlp_out")
    if block is not None and (in_layer, out_layer) == mlp:
        return f"{naming.PREFIX}{block}"
    return in_layer


def load_saelens(path: str | Path, *, layer: str | None = None) -> SparseCoder:
    """A dictionary saved by SAELens (``sae.save_model(folder)``, or a downloaded release folder)
    as an Interlatent module, in float32: ``standard`` and ``topk`` become a
    :class:`SparseAutoencoder`, ``jumprelu`` a :class:`JumpReLUSAE`, ``transcoder`` /
    ``skip_transcoder`` a :class:`Transcoder`, ``jumprelu_transcoder`` /
    ``jumprelu_skip_transcoder`` a :class:`JumpReLUTranscoder`.

    The hook it reads (``metadata.hook_name``, e.g. ``blocks.8.hook_resid_post``) becomes the
    layer name in the module's metadata (``llm.layer.8``; a transcoder also records its output,
    ``hook_name_out``), so ``LatentPatch(module, module.cfg.metadata["layer"])`` and
    :func:`interlatent.analysis.train.backfill` find their hooks; ``layer=`` overrides it. Raises
    :class:`ArtifactError` for a folder that is not a SAELens dictionary or uses a setting that
    changes what the dictionary reads (activation normalisation, head reshaping).
    """
    folder = Path(path)
    fix = "point load_saelens at a folder written by SAELens's sae.save_model(folder)"
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else "nothing (no such folder)"
        raise ArtifactError(f"{str(folder)!r} is not a SAELens dictionary: expected {SAELENS_CFG} and "
                            f"{SAELENS_WEIGHTS}, found {found}; {fix}")
    cfg = _read_json(cfg_path, fix)
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise ArtifactError(f"SAELens architecture {arch!r} in {cfg_path} is not supported; supported: "
                            f"{list(SAELENS_ARCHITECTURES)}")
    for key, plain in (("normalize_activations", "none"), ("reshape_activations", "none")):
        value = cfg.get(key, plain)
        if value not in (plain, None):
            raise ArtifactError(f"{cfg_path} sets {key}={value!r}; only {plain!r} is supported (the dictionary "
                                "would read rescaled or reshaped activations, which Interlatent's hooks do not "
                                "produce); fold the scaling into the weights in SAELens first")
    if cfg.get("hook_head_index") is not None or (cfg.get("metadata") or {}).get("hook_head_index") is not None:
        raise ArtifactError(f"{cfg_path} reads one attention head (hook_head_index); only whole hook points "
                            "are supported")
    transcoder = _TRANSCODERS.get(arch)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg["d_out"]) if transcoder else d_in
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{cfg_path} needs integer 'd_in', 'd_sae'{' and d_out' if transcoder else ''}, got "
                            f"{cfg.get('d_in')!r}, {cfg.get('d_sae')!r}; {fix}") from None
    state = _read_weights(w_path, fix)
    jumprelu = arch == "jumprelu" or (transcoder is not None and transcoder[0] == "jumprelu")
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if jumprelu and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    if jumprelu:
        want["threshold"] = (d_sae,)
    if transcoder and transcoder[1]:
        want["W_skip"] = (d_out, d_in)
    _expect_shapes(w_path, state, want, fix)
    state = {k: v.to(torch.float32) for k, v in state.items()}
    w_enc, b_enc, w_dec, b_dec = state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"]
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # W_enc^T x + b_enc == W_enc^T (x - b_dec) + (b_enc + W_enc^T b_dec)
    k = None
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int):
            raise ArtifactError(f"{cfg_path} is a topk dictionary without an integer 'k' (got {k!r}); {fix}")
        if cfg.get("rescale_acts_by_decoder_norm"):  # pre * |W_dec|, then acts / |W_dec| at decode
            norms = w_dec.norm(dim=-1)
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    meta_in = dict(cfg.get("metadata") or {})
    for key in _METADATA_KEYS:  # pre-6 configs keep these at the top level
        if key not in meta_in and key in cfg:
            meta_in[key] = cfg[key]
    hook_name = meta_in.get("hook_name") if isinstance(meta_in.get("hook_name"), str) else None
    in_layer = naming.canonical_hook_name(hook_name) if hook_name else None
    out_layer = None
    if transcoder:
        hook_out = meta_in.get("hook_name_out")
        out_layer = naming.canonical_hook_name(hook_out) if isinstance(hook_out, str) else None
        if out_layer is None:
            log.warning("load_saelens: transcoder %s records no hook_name_out; pass out_layer= to LatentPatch",
                        cfg_path)
    source = layer or (_transcoder_layer(in_layer, out_layer) if transcoder else in_layer)
    in_layer = in_layer or (layer if not transcoder else None)
    if source is None:
        log.warning("load_saelens: %s records no hook_name; pass layer= to say which layer it reads", cfg_path)
    metadata: dict[str, Any] = {
        "layer": source, "in_layer": in_layer, "out_layer": out_layer,
        "hook_name": hook_name or naming.tl_hook_name(in_layer or ""),
        "block": meta_in.get("hook_layer") if meta_in.get("hook_layer") is not None else naming.block_of(source or ""),
        "model": meta_in.get("model_name"),
        "imported": {"format": "saelens", "architecture": arch, "path": str(folder.resolve()),
                     "dtype": cfg.get("dtype")},
        "saelens_metadata": meta_in,
    }
    if transcoder:
        metadata["hook_name_out"] = meta_in.get("hook_name_out")
        config = SparseCoderConfig(d_in=d_in, d_sae=d_sae, k=None, activation=transcoder[0], d_out=d_out,
                                   skip=transcoder[1], metadata=metadata)
        module: SparseCoder = JumpReLUTranscoder(config) if jumprelu else Transcoder(config)
    else:
        activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
        config = SparseCoderConfig(d_in=d_in, d_sae=d_sae, k=k, activation=activation, metadata=metadata)
        module = JumpReLUSAE(config) if jumprelu else SparseAutoencoder(config)
    with torch.no_grad():
        module.W_enc.copy_(w_enc.t())
        module.b_enc.copy_(b_enc)
        module.W_dec.copy_(w_dec)
        module.b_dec.copy_(b_dec)
        if jumprelu:
            module.threshold.copy_(state["threshold"])
        if transcoder and transcoder[1]:
            module.W_skip.copy_(state["W_skip"].t())
    return module.eval()
