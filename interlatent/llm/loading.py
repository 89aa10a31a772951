"""Loading real models without a hub: local Hugging Face checkpoints converted to TransformerLens.

``load_model(name_or_path)`` takes a local checkpoint directory (``save_pretrained`` output, GPT-2 or
Llama family) and converts it offline. On TransformerLens 3 the ``HookedTransformer`` config is
built from the HF config by hand and the weights go through TransformerLens's converters with no
weight processing; on TransformerLens 4 the HF model is wrapped by
``TransformerBridge.boot_transformers`` from its directory. Either way activations and logits match
the HF model. Anything else is treated as a TransformerLens model name (which works where its
weights are cached or reachable).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from interlatent.errors import ModelLoadError

log = logging.getLogger(__name__)

SUPPORTED = ("gpt2", "llama")


def _rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(hf_config, "rope_theta", 10000.0))


def tl_config_from_hf(hf_config: Any, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A ``HookedTransformerConfig`` equivalent to a GPT-2 or Llama Hugging Face config."""
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        fields = dict(
            d_model=hf_config.n_embd, d_head=hf_config.n_embd // hf_config.n_head, n_heads=hf_config.n_head,
            d_mlp=hf_config.n_inner or 4 * hf_config.n_embd, n_layers=hf_config.n_layer,
            n_ctx=hf_config.n_positions, eps=hf_config.layer_norm_epsilon, d_vocab=hf_config.vocab_size,
            act_fn=hf_config.activation_function, normalization_type="LN",
            use_attn_scale=getattr(hf_config, "scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=getattr(hf_config, "scale_attn_by_inverse_layer_idx", False),
            original_architecture="GPT2LMHeadModel", default_prepend_bos=True,
        )
    elif kind == "llama":
        n_heads = hf_config.num_attention_heads
        d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
        n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
        fields = dict(
            d_model=hf_config.hidden_size, d_head=d_head, n_heads=n_heads, d_mlp=hf_config.intermediate_size,
            n_layers=hf_config.num_hidden_layers, n_ctx=hf_config.max_position_embeddings,
            eps=hf_config.rms_norm_eps, d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_act,
            n_key_value_heads=n_kv if n_kv != n_heads else None, normalization_type="RMS",
            positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d_head,
            rotary_base=_rope_theta(hf_config), final_rms=True, gated_mlp=True,
            original_architecture="LlamaForCausalLM", default_prepend_bos=True,
        )
    else:
        raise ModelLoadError(f"offline conversion supports model types {SUPPORTED}; this checkpoint is {kind!r}. "
                             "Collect from the Hugging Face model directly: LLMCollector accepts it")
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**fields, dtype=dtype, device=device,
                                   model_name=str(getattr(hf_config, "_name_or_path", "") or kind))


def _bridge_from_hf(hf_model: Any, tokenizer: Any, device: str) -> Any:
    """TransformerLens 4: the HF model wrapped by a ``TransformerBridge`` (from its local directory)."""
    from transformer_lens import TransformerBridge

    path = Path(str(getattr(hf_model.config, "_name_or_path", "") or ""))
    if not (path / "config.json").is_file():
        raise ModelLoadError("on TransformerLens 4 a Hugging Face model is wrapped from its save_pretrained "
                             f"directory, and this one has none (config._name_or_path={str(path)!r}); save it with "
                             "save_pretrained first, or collect from the Hugging Face model directly")
    bridge = TransformerBridge.boot_transformers(str(path.resolve()), hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device, dtype=next(hf_model.parameters()).dtype)
    bridge.eval()
    return bridge


def hooked_from_hf(hf_model: Any, tokenizer: Any = None, *, device: str = "cpu") -> Any:
    """Convert an in-memory GPT-2 or Llama HF model to an equivalent TransformerLens model: a
    ``HookedTransformer`` on TransformerLens 3, a ``TransformerBridge`` on 4."""
    from interlatent.llm.demo_model import has_hooked_transformer

    if not has_hooked_transformer():
        return _bridge_from_hf(hf_model, tokenizer, device)
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights, convert_llama_weights

    cfg = tl_config_from_hf(hf_model.config, dtype=next(hf_model.parameters()).dtype, device=device)
    convert = convert_gpt2_weights if hf_model.config.model_type == "gpt2" else convert_llama_weights
    state = {k: v.detach().clone() for k, v in convert(hf_model, cfg).items()}
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    return model


def load_local_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a checkpoint directory, loaded from an absolute path (TransformerLens
    re-loads tokenizers by ``name_or_path``; a relative one breaks after ``chdir``)."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.init_kwargs["name_or_path"] = str(path)
    return tok


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A TransformerLens model (tokenizer attached) from a local HF checkpoint directory or a
    TransformerLens model name: ``HookedTransformer`` on TransformerLens 3, ``TransformerBridge`` on 4.
    Raises :class:`ModelLoadError` saying what was tried."""
    path = Path(name_or_path).expanduser()
    tried = []
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is a directory without config.json: expected a save_pretrained "
                                 "checkpoint")
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            hf_config = AutoConfig.from_pretrained(str(path.resolve()), local_files_only=True)
            if getattr(hf_config, "model_type", None) not in SUPPORTED:
                tl_config_from_hf(hf_config)  # raises with the supported list
            hf = AutoModelForCausalLM.from_pretrained(str(path.resolve()), local_files_only=True, dtype=dtype)
            tok = load_local_tokenizer(path) if _has_tokenizer(path) else None
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not load the checkpoint in {str(path)!r}: {exc}") from exc
        model = hooked_from_hf(hf, tok, device=device)
        if tok is None:
            log.warning("%s has no tokenizer files; pass a tokenizer to the collector", path)
        return model
    tried.append(f"a local checkpoint directory {str(path)!r} (no such directory)")
    try:
        from interlatent.llm.demo_model import has_hooked_transformer

        if not has_hooked_transformer():
            from transformer_lens import TransformerBridge

            return TransformerBridge.boot_transformers(str(name_or_path), device=device, dtype=dtype)
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(str(name_or_path), device=device, dtype=dtype)
    except Exception as exc:  # network, unknown name, missing cache ...
        tried.append(f"the TransformerLens model name {str(name_or_path)!r} ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")
    raise ModelLoadError("could not load a model; tried " + "; and ".join(tried)
                         + ". Pass a save_pretrained directory, or a TransformerLens name whose weights are cached")


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
