"""Model backends: one adapter per kind of model, and the one place that tells them apart.

:func:`make_backend` wraps a model in the :class:`Backend` for its kind — TransformerLens 3
``HookedTransformer`` (:mod:`.tl3`), TransformerLens 4 ``TransformerBridge`` (:mod:`.tl4`), a
Hugging Face causal LM (:mod:`.hf`), or an encoder: TransformerLens ``HookedEncoder`` or a Hugging
Face BERT-style model (:mod:`.encoder`). Everything else in Interlatent reaches models through the
backend; no other module tests a model's type.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interlatent.backends.base import Backend, Encoding, HookFn, StopForward, encode_texts, stateless_backend
from interlatent.backends.encoder import HFEncoderBackend, TLEncoderBackend
from interlatent.backends.hf import HFBackend, find_blocks, hf_module_for
from interlatent.backends.tl3 import TL3Backend
from interlatent.backends.tl4 import TL4Backend
from interlatent.errors import ConfigError

#: Hugging Face model types whose attention is bidirectional (BERT-style encoders)
HF_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _transformer_lens_classes() -> list[tuple[type, type[Backend]]]:
    """(model class, backend) for each TransformerLens model class this installation has."""
    import transformer_lens

    pairs: list[tuple[type, type[Backend]]] = []
    for name, backend in (("HookedTransformer", TL3Backend), ("HookedEncoder", TLEncoderBackend)):
        try:
            pairs.append((getattr(transformer_lens, name), backend))
        except (AttributeError, ImportError):  # TransformerLens 4 has neither
            pass
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TransformerLens 3
        pass
    else:
        pairs.append((TransformerBridge, TL4Backend))
    return pairs


def backend_class(model: Any) -> type[Backend]:
    """The backend class for ``model``; raises :class:`ConfigError` for a model no backend handles."""
    for cls, backend in _transformer_lens_classes():
        if isinstance(model, cls):
            return backend
    config = getattr(model, "config", None)
    if isinstance(model, nn.Module) and config is not None:
        causal = type(model).__name__.endswith(_CAUSAL_SUFFIXES) or getattr(config, "is_decoder", False)
        if not causal and getattr(config, "model_type", None) in HF_ENCODER_TYPES:
            return HFEncoderBackend
        return HFBackend
    raise ConfigError(f"expected a TransformerLens HookedTransformer / TransformerBridge / HookedEncoder or a Hugging "
                      f"Face causal LM or BERT-style encoder; got {type(model).__name__}")


def make_backend(model: Any, tokenizer: Any = None, *, need_tokenizer: bool = False) -> Backend:
    """The backend for ``model`` (a backend is returned as it is); with ``need_tokenizer``, one
    without a tokenizer is refused."""
    backend = model if isinstance(model, Backend) else backend_class(model)(model, tokenizer)
    if need_tokenizer and backend.tokenizer is None:
        raise ConfigError(f"the {type(model).__name__} has no tokenizer attached: pass one "
                          "(collector.run(model, tokenizer, ...))")
    return backend


def model_from(thing: Any) -> Any:
    """``thing`` when it is a model (an ``nn.Module``) or a backend, else ``thing()``: a factory
    building one, as a distributed worker is given (models too large to ship are built there)."""
    if isinstance(thing, (Backend, nn.Module)) or not callable(thing):
        return thing
    return thing()


__all__ = ["Backend", "Encoding", "HFBackend", "HFEncoderBackend", "HookFn", "StopForward", "TL3Backend", "TL4Backend",
           "TLEncoderBackend", "backend_class", "encode_texts", "find_blocks", "hf_module_for", "make_backend",
           "model_from", "stateless_backend"]
