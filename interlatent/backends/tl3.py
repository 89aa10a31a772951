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


def _hooked(module: torch.nn.Module) -> bool:
    """Whether ``module`` carries a forward or backward hook (TransformerLens's hooks are these)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    """Whether a hook registered for every module (``torch.nn.modules.module.register_module_*``) is set."""
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, name, None) for name in
               ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks"))


class TL3Backend(HookedBackend):
    """A TransformerLens 3 ``HookedTransformer``. A pass splits at a block's ``hook_resid_post``:
    ``forward(stop_at_layer=)`` returns the residual stream there and ``forward(start_at_layer=)``
    continues from one; for logits at one column per row, the last block runs narrowed to those
    columns (:meth:`_last_block_at`)."""

    def resumes_at(self, point: HookPoint) -> bool:
        # shortformer models add their positional embedding inside every attention layer, from the tokens
        return (point.kind == "resid_post" and point.tl_name == f"blocks.{point.block}.hook_resid_post"
                and getattr(self.model.cfg, "positional_embedding_type", "standard") != "shortformer")

    @contextmanager
    def _last_block_at(self, rows: Tensor, columns: Tensor, point: HookPoint) -> Iterator[bool]:
        """While the block runs, the model's last block computes its attention output and MLP only
        at one column per row (its keys and values still at every position): the attention scores'
        query rows and ``hook_resid_mid`` are narrowed to ``columns``, so the block returns ``[batch,
        1, d_model]``, which position-wise layers keep exact. Yields whether it did: only for a
        standard block after ``point`` with a ``hook_resid_mid`` (not attention-only or parallel)
        where no hook of any kind could see narrowed shapes: none on the block's modules (forward or
        backward) or on the model itself, and no global module hook."""
        block = self.model.blocks[-1]
        attn = getattr(block, "attn", None)
        plain = (point.block + 1 < self.n_blocks and type(block).__name__ == "TransformerBlock"
                 and hasattr(block, "hook_resid_mid") and hasattr(attn, "hook_attn_scores")
                 and not any(_hooked(m) for m in (self.model, *block.modules())) and not _global_hooks())
        if not plain:
            yield False
            return

        def queries(module: Any, args: Any, scores: Tensor) -> Tensor:
            at = rows.to(scores.device), columns.to(scores.device)  # a block may sit on its own device
            return scores[at[0], :, at[1]][:, :, None, :]  # [batch, head, 1, key_pos]

        def resid_mid(module: Any, args: Any, resid: Tensor) -> Tensor:
            # resid_pre + the attention output at the columns (broadcast over positions), read at the columns
            return resid[rows.to(resid.device), columns.to(resid.device)][:, None]

        handles = [attn.hook_attn_scores.register_forward_hook(queries),
                   block.hook_resid_mid.register_forward_hook(resid_mid)]
        try:
            yield True
        finally:
            for handle in handles:
                handle.remove()

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
        rows = torch.arange(activation.shape[0], device=activation.device)
        columns = columns.to(activation.device)
        with self._last_block_at(rows, columns, point) as narrowed:
            resid = model(activation, start_at_layer=point.block + 1, stop_at_layer=self.n_blocks, **kwargs)
        final = resid if narrowed else resid[rows, columns][:, None]
        if cfg.normalization_type is not None:
            final = model.ln_final(final)
        logits = model.unembed(final)[:, 0]
        cap = getattr(cfg, "output_logits_soft_cap", None)
        return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits
