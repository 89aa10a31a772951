"""Hugging Face causal LMs reached through removable ``nn.Module`` hooks on their decoder blocks.

A hook point maps to a module and a side: ``resid_post`` is decoder block N's output, ``resid_pre``
its input, ``attn_out`` / ``mlp_out`` the attention / MLP module's output, ``mlp_in`` the MLP's
input (after its norm), ``resid_mid`` the second norm's input. Collection hooks return None (they
never change the output); the early stop raises from the deepest block's hook. GPT-2-style models
get ``position_ids`` from the mask, so left padding gives the same activations as right padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from jaxtyping import Float, Int, Shaped
from torch import Tensor, nn

from interlatent.backends.base import Backend, HookFn, StopForward, first_tensor
from interlatent.errors import ConfigError, LayerNotFoundError
from interlatent.hooks import HookPoint, resolve

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LN2_NAMES = ("post_attention_layernorm", "ln_2", "ln2", "post_attention_norm")
_GPT2_STYLE = ("gpt2", "gpt_neo", "gptj", "codegen")
_KINDS_HELP = "use llm.layer.N[.resid_pre|resid_mid|attn_out|mlp_in|mlp_out]"


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The blocks: the ``nn.ModuleList`` whose length is ``config.num_hidden_layers``."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for _, mod in candidates:
        if n is not None and len(mod) == n:
            return mod
    lists = ", ".join(f"{name} ({len(m)})" for name, m in candidates) or "none"
    raise ConfigError(f"could not find the blocks of {type(model).__name__}: expected an nn.ModuleList "
                      f"of length config.num_hidden_layers={n}; module lists found: {lists}")


def child(block: nn.Module, names: Sequence[str], what: str, block_index: int) -> nn.Module:
    """The first of ``names`` that is a submodule of ``block``; raises naming what it has."""
    for name in names:
        mod = block.get_submodule(name) if _has(block, name) else None
        if isinstance(mod, nn.Module):
            return mod
    children = ", ".join(n for n, _ in block.named_children())
    raise LayerNotFoundError(f"block {block_index} ({type(block).__name__}) has no {what} module "
                             f"(looked for {', '.join(names)}; it has {children})")


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
    except AttributeError:
        return False
    return True


def hf_module_for(blocks: nn.ModuleList, point: HookPoint) -> tuple[nn.Module, str]:
    """(module, "pre" | "post"): which module of a Hugging Face decoder carries a hook point, and
    whether the point is that module's input (pre) or output (post)."""
    block = blocks[point.block]
    if point.kind == "resid_post":
        return block, "post"
    if point.kind == "resid_pre":
        return block, "pre"
    if point.kind == "attn_out":
        return child(block, _ATTN_NAMES, "attention", point.block), "post"
    if point.kind == "mlp_out":
        return child(block, _MLP_NAMES, "MLP", point.block), "post"
    if point.kind == "mlp_in":
        return child(block, _MLP_NAMES, "MLP", point.block), "pre"
    if point.kind == "resid_mid":
        return child(block, _LN2_NAMES, "second layer norm", point.block), "pre"
    raise LayerNotFoundError(f"hook kind {point.kind!r} has no Hugging Face module equivalent; {_KINDS_HELP}")


@contextmanager
def module_hook(module: nn.Module, side: str, fn: HookFn) -> Iterator[None]:
    """``fn`` on a module's output (``"post"``) or first input (``"pre"``); a tensor it returns
    replaces that value. The hook is removed on leaving."""
    if side == "post":
        def post(_m: nn.Module, _args: Any, out: Any) -> Any:
            new = fn(first_tensor(out))
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = module.register_forward_hook(post)
    else:
        def pre(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class ModuleHookBackend(Backend):
    """A Hugging Face model whose hook points are module inputs and outputs."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.blocks = find_blocks(model)
        self.n_blocks = len(self.blocks)
        cfg = model.config
        self.n_ctx = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))
        self.name = str(getattr(cfg, "_name_or_path", None) or type(model).__name__)
        self.d_vocab = getattr(cfg, "vocab_size", None)
        self.tokenizer = tokenizer

    def module_for(self, point: HookPoint) -> tuple[nn.Module, str]:
        return hf_module_for(self.blocks, point)

    def resolve(self, spec: str | int) -> HookPoint:
        point = resolve(spec, self.n_blocks, None)
        if point.kind == "raw":
            raise LayerNotFoundError(f"{spec!r} is a TransformerLens hook name without a Hugging Face equivalent; "
                                     f"{_KINDS_HELP}")
        self.module_for(point)  # fail early if the block lacks the module
        return point

    def width(self, point: HookPoint) -> int | None:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)) or None

    def model_kwargs(self, mask: Shaped[Tensor, "batch pos"] | None) -> dict[str, Any]:
        """Keyword arguments of the model's forward besides the token ids."""
        return {"attention_mask": mask, "use_cache": False}

    def forward(self, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None,
                points: Sequence[HookPoint], need_logits: bool
                ) -> tuple[dict[str, Tensor], Float[Tensor, "batch pos vocab"] | None]:
        captured: dict[str, Tensor] = {}

        def keep(point: HookPoint) -> HookFn:
            def fn(act: Tensor) -> None:
                captured[point.tl_name] = act
            return fn

        def stop(_mod: nn.Module, _args: Any, _output: Any) -> None:
            raise StopForward

        deepest = max((p.block for p in points), default=-1)
        with ExitStack() as stack:
            for point in points:
                module, side = self.module_for(point)
                stack.enter_context(module_hook(module, side, keep(point)))
            if not need_logits and deepest >= 0:
                stack.callback(self.blocks[deepest].register_forward_hook(stop).remove)
            try:
                out = self.model(input_ids=tokens, **self.model_kwargs(mask))
            except StopForward:
                out = None
        return captured, (self._logits_of(out) if need_logits and out is not None else None)

    def _logits_of(self, out: Any) -> Tensor:
        return out.logits

    @contextmanager
    def at_hook(self, point: HookPoint, fn: HookFn) -> Iterator[None]:
        module, side = self.module_for(point)
        with module_hook(module, side, fn):
            yield

    def logits(self, tokens: Int[Tensor, "batch pos"],
               mask: Shaped[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos vocab"]:
        return self._logits_of(self.model(input_ids=tokens, **self.model_kwargs(mask)))


class HFBackend(ModuleHookBackend):
    """A Hugging Face causal LM (``...ForCausalLM``, ``GPT2LMHeadModel``)."""

    is_causal = True

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__(model, tokenizer)
        self._gpt2_style = getattr(model.config, "model_type", "") in _GPT2_STYLE

    @staticmethod
    def position_ids(mask: Tensor) -> Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def model_kwargs(self, mask: Shaped[Tensor, "batch pos"] | None) -> dict[str, Any]:
        kwargs = super().model_kwargs(mask)
        if self._gpt2_style and mask is not None:
            kwargs["position_ids"] = self.position_ids(mask)
        return kwargs
