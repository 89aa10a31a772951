"""TransformerLens 3 ``HookedTransformer``: hook points by name, ``run_with_hooks`` with a names
filter and ``stop_at_layer`` past the deepest requested block, rewrites through the model's own
hook context (``model.hooks``), which undoes them on leaving."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from interlatent.backends.base import Backend, HookFn, StopForward
from interlatent.errors import ConfigError
from interlatent.hooks import HookPoint, flag_needed, resolve

#: the model.set_use_* call that makes a hook fire -> the config flag it sets
_FLAGS = {"set_use_hook_mlp_in(True)": "use_hook_mlp_in", "set_use_attn_in(True)": "use_attn_in",
          "set_use_split_qkv_input(True)": "use_split_qkv_input", "set_use_attn_result(True)": "use_attn_result"}


class HookedBackend(Backend):
    """A model with TransformerLens hook points (``hook_dict``, ``run_with_hooks``, ``hooks``)."""

    kind = "HookedTransformer"

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model = model
        self.n_blocks = int(model.cfg.n_layers)
        self.n_ctx = int(model.cfg.n_ctx)
        self.d_vocab = int(model.cfg.d_vocab)
        self.name = str(getattr(model.cfg, "model_name", None) or self.kind)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.is_causal = getattr(model.cfg, "attention_dir", "causal") == "causal"

    def default_prepend_bos(self) -> bool:
        return bool(getattr(self.model.cfg, "default_prepend_bos", True))

    def hook_name(self, point: HookPoint) -> str:
        """The name this model's hooks take for ``point``."""
        return point.tl_name

    def resolve(self, spec: str | int) -> HookPoint:
        point = resolve(spec, self.n_blocks, self.model.hook_dict.keys())
        call = flag_needed(point.tl_name)
        if call is not None and not getattr(self.model.cfg, _FLAGS[call.split(".", 1)[1]], False):
            raise ConfigError(
                f"hook point {point.tl_name!r} does not fire unless enabled: call {call} first "
                "(or collect 'llm.layer.N.mlp_in', the MLP's normalized input, which always fires)"
            )
        return point

    def width(self, point: HookPoint) -> int | None:
        return int(self.model.cfg.d_model) if point.kind != "raw" else None

    def _run_kwargs(self, mask: Shaped[Tensor, "batch pos"] | None) -> dict[str, Any]:
        return {} if mask is None else {"attention_mask": mask}

    def forward(self, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None,
                points: Sequence[HookPoint], need_logits: bool
                ) -> tuple[dict[str, Tensor], Float[Tensor, "batch pos vocab"] | None]:
        captured: dict[str, Tensor] = {}

        def keep(point: HookPoint) -> Any:
            def hook(act: Tensor, hook: Any) -> None:
                captured[point.tl_name] = act
            return hook

        hooks = [(self.hook_name(p), keep(p)) for p in {p.tl_name: p for p in points}.values()]
        kwargs = {**self._run_kwargs(mask), "return_type": "logits" if need_logits else None}
        if not need_logits:
            self._stop_early(points, hooks, kwargs)
        try:
            out = self.model.run_with_hooks(tokens, fwd_hooks=hooks, **kwargs)
        except StopForward:
            out = None
        return captured, (out if need_logits else None)

    def _stop_early(self, points: Sequence[HookPoint], hooks: list[tuple[str, Any]], kwargs: dict[str, Any]) -> None:
        """Make the pass end after the deepest point's block: ``stop_at_layer``."""
        deepest = max((p.block for p in points), default=self.n_blocks - 1)
        if deepest + 1 < self.n_blocks:
            kwargs["stop_at_layer"] = deepest + 1

    @contextmanager
    def at_hook(self, point: HookPoint, fn: HookFn) -> Iterator[None]:
        with self.model.hooks(fwd_hooks=[(self.hook_name(point), lambda act, hook: fn(act))]):
            yield

    @contextmanager
    def at_hooks(self, pairs: Sequence[tuple[HookPoint, HookFn]]) -> Iterator[None]:
        def wrap(fn: HookFn) -> Any:
            return lambda act, hook: fn(act)

        with self.model.hooks(fwd_hooks=[(self.hook_name(p), wrap(fn)) for p, fn in pairs]):
            yield

    def run_with_cache(self, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None = None,
                       **kwargs: Any) -> tuple[Float[Tensor, "batch pos vocab"], Any]:
        return self.model.run_with_cache(tokens, **self._run_kwargs(mask), **kwargs)

    def logits(self, tokens: Int[Tensor, "batch pos"],
               mask: Shaped[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos vocab"]:
        return self.model(tokens, **self._run_kwargs(mask))


class TL3Backend(HookedBackend):
    """A TransformerLens 3 ``HookedTransformer``. A pass splits at a block's ``hook_resid_post``:
    ``forward(stop_at_layer=)`` returns the residual stream there and ``forward(start_at_layer=)``
    continues from one."""

    def resumes_at(self, point: HookPoint) -> bool:
        # shortformer models add their positional embedding inside every attention layer, from the tokens
        return (point.kind == "resid_post" and point.tl_name == f"blocks.{point.block}.hook_resid_post"
                and getattr(self.model.cfg, "positional_embedding_type", "standard") != "shortformer")

    def run_to(self, point: HookPoint, tokens: Int[Tensor, "batch pos"],
               mask: Shaped[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos d_model"]:
        return self.model(tokens, stop_at_layer=point.block + 1, **self._run_kwargs(mask))

    def run_from(self, point: HookPoint, activation: Float[Tensor, "batch pos d_model"],
                 tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None = None,
                 columns: Int[Tensor, " batch"] | None = None) -> Tensor:
        model, cfg = self.model, self.model.cfg
        if mask is None and getattr(model.tokenizer, "padding_side", None) == "left":
            # what the model's own pass derives from left-padded tokens (its embedding step is skipped here)
            try:
                from transformer_lens.utilities import get_attention_mask
            except ImportError:  # releases before the utilities package
                from transformer_lens.utils import get_attention_mask

            mask = get_attention_mask(model.tokenizer, tokens, cfg.default_prepend_bos)
        kwargs = self._run_kwargs(None if mask is None else mask.to(activation.device))
        if columns is None:
            return model(activation, start_at_layer=point.block + 1, **kwargs)
        resid = model(activation, start_at_layer=point.block + 1, stop_at_layer=self.n_blocks, **kwargs)
        final = resid[torch.arange(resid.shape[0], device=resid.device), columns.to(resid.device)][:, None]
        if cfg.normalization_type is not None:
            final = model.ln_final(final)
        logits = model.unembed(final)[:, 0]
        cap = getattr(cfg, "output_logits_soft_cap", None)
        return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits
