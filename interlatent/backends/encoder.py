"""Encoder models (BERT-style, bidirectional): TransformerLens ``HookedEncoder`` and Hugging Face
``BertModel`` / ``AutoModel`` encoders (with or without a masked-LM head).

Every position sees every other, so nothing here assumes causality: collection stores every real
position, and effects apply no causal reachability rule (``is_causal`` is False).

Hook points of block N. A BERT block normalises *after* each residual addition, so the names mean:

=============  ===================================  =========================================
kind           ``HookedEncoder`` hook               Hugging Face ``BertLayer`` module
=============  ===================================  =========================================
resid_pre      ``blocks.N.hook_resid_pre``          input of layer N
resid_mid      ``blocks.N.hook_resid_mid``          (none: the sum is inside a LayerNorm call)
attn_out       ``blocks.N.hook_attn_out``           output of ``attention.output.dense``
mlp_in         ``blocks.N.ln1.hook_normalized``     input of ``intermediate`` (the MLP's input)
mlp_out        ``blocks.N.hook_mlp_out``            output of ``output.dense``
resid_post     ``blocks.N.hook_resid_post``         output of layer N
=============  ===================================  =========================================

``resid_post`` differs between the two: TransformerLens names the sum before the block's final
LayerNorm ``hook_resid_post`` (the normalised value, which the next block reads, is
``blocks.N.hook_normalized_resid_post``), while a Hugging Face layer's output is after that norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxtyping import Shaped
from torch import Tensor, nn

from interlatent.backends.base import StopForward
from interlatent.backends.hf import ModuleHookBackend, child
from interlatent.backends.tl3 import HookedBackend
from interlatent.errors import ConfigError, LayerNotFoundError
from interlatent.hooks import TL_HOOKS, HookPoint, resolve

#: kind -> HookedEncoder hook inside block N (the MLP's input is the first norm's output)
ENCODER_TL_HOOKS = {**TL_HOOKS, "mlp_in": "ln1.hook_normalized"}
_ENCODER_TO_KIND = {v: k for k, v in ENCODER_TL_HOOKS.items()}


def _refuse_left_padding(mask: Shaped[Tensor, "batch pos"] | None) -> None:
    """``HookedEncoder`` numbers positions from the first column, so a left-padded row would see
    its tokens at shifted positions."""
    if mask is None:
        return
    starts = mask[:, 0] == 0
    if bool((starts & mask.bool().any(1)).any()):
        raise ConfigError("a HookedEncoder numbers positions from the first column, so left-padded prompts get "
                          "shifted position embeddings; pad on the right (padding_side='right')")


class TLEncoderBackend(HookedBackend):
    """A TransformerLens ``HookedEncoder`` (BERT): bidirectional, masked by ``one_zero_attention_mask``."""

    kind = "HookedEncoder"
    is_causal = False

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        super().__init__(model, tokenizer)
        self.is_causal = False

    def resolve(self, spec: str | int) -> HookPoint:
        point = resolve(spec, self.n_blocks, self.model.hook_dict.keys())
        if isinstance(spec, str) and spec.startswith("blocks."):
            rest = point.tl_name.split(".", 2)[2]
            kind = _ENCODER_TO_KIND.get(rest, "raw")
            if point.tl_name not in self.model.hook_dict:
                raise LayerNotFoundError(f"{spec!r} is not a hook point of this HookedEncoder")
            return HookPoint(point.block, kind, point.tl_name)
        if point.kind == "raw":
            return point
        return HookPoint(point.block, point.kind, f"blocks.{point.block}.{ENCODER_TL_HOOKS[point.kind]}")

    def _run_kwargs(self, mask: Shaped[Tensor, "batch pos"] | None) -> dict[str, Any]:
        _refuse_left_padding(mask)
        return {} if mask is None else {"one_zero_attention_mask": mask}

    def _stop_early(self, points: Sequence[HookPoint], hooks: list[tuple[str, Any]], kwargs: dict[str, Any]) -> None:
        """``HookedEncoder`` has no ``stop_at_layer``: raise from the next block's first hook."""
        deepest = max((p.block for p in points), default=-1)
        if 0 <= deepest < self.n_blocks - 1:
            def stop(act: Tensor, hook: Any) -> None:
                raise StopForward

            hooks.append((f"blocks.{deepest + 1}.hook_resid_pre", stop))


#: (module path inside a layer, side) per kind, for BERT-style Hugging Face layers
_HF_ENCODER_MODULES: dict[str, tuple[tuple[str, ...], str]] = {
    "attn_out": (("attention.output.dense",), "post"),
    "mlp_in": (("intermediate",), "pre"),
    "mlp_out": (("output.dense",), "post"),
}


class HFEncoderBackend(ModuleHookBackend):
    """A Hugging Face BERT-style encoder (``BertModel``, ``AutoModel``, ``BertForMaskedLM``).

    Positions come from the mask (``position_ids``), so left and right padding give the same
    activations at real tokens. :meth:`logits` needs an output head (a masked-LM model); a bare
    encoder has hidden states only."""

    is_causal = False

    def module_for(self, point: HookPoint) -> tuple[nn.Module, str]:
        block = self.blocks[point.block]
        if point.kind == "resid_post":
            return block, "post"
        if point.kind == "resid_pre":
            return block, "pre"
        if point.kind in _HF_ENCODER_MODULES:
            names, side = _HF_ENCODER_MODULES[point.kind]
            return child(block, names, point.kind, point.block), side
        raise LayerNotFoundError(f"hook kind {point.kind!r} has no module of its own in a BERT-style layer (its "
                                 "residual sums happen inside LayerNorm calls); use llm.layer.N[.resid_pre|"
                                 "attn_out|mlp_in|mlp_out]")

    def model_kwargs(self, mask: Shaped[Tensor, "batch pos"] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"attention_mask": mask}
        if mask is not None:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    def _logits_of(self, out: Any) -> Tensor:
        logits = getattr(out, "logits", None)
        if logits is None:
            raise ConfigError(f"{type(self.model).__name__} has no output head, so it has no logits; load the model "
                              "with its head (e.g. BertForMaskedLM / AutoModelForMaskedLM) to measure effects on "
                              "logits, or read its hidden states through a hook point")
        return logits

