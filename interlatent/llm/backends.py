"""Reaching hook points of a model: TransformerLens hook points or Hugging Face module hooks.

A backend runs one forward pass over a padded batch and returns the activations of the requested
hook points as ``[batch, pos, width]`` tensors (and the logits when asked). Collection hooks never
change the model's output: TransformerLens hook functions and ``nn.Module`` hooks here return None.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from interlatent.errors import ConfigError, LayerNotFoundError
from interlatent.hooks import HookPoint, flag_needed, resolve

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from the deepest needed hook to skip the rest of a Hugging Face forward pass."""


class Encoding(NamedTuple):
    """One text's token ids (no special tokens) and the tokenizer's own count of real tokens
    (the sum of its attention mask), which must equal ``len(ids)``."""

    ids: list[int]
    n_real: int


_CLEAN_COPIES: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], Any]] = weakref.WeakKeyDictionary()


def stateless_backend(tokenizer: Any) -> Any:
    """The fast tokenizer's Rust backend with padding and truncation switched off, or None for a
    slow tokenizer.

    TransformerLens' ``to_tokens`` / ``to_str_tokens`` and any ``tokenizer(..., padding=True,
    truncation=True)`` leave both switched on in ``tokenizer._tokenizer``. The user's tokenizer is
    never changed: when either is on, a copy with both off is used instead. The copy (from the
    backend's JSON: ~20 ms for a 4k vocabulary, ~70 ms for 11k on a loaded core) is cached per
    tokenizer and taken again when the backend object or its vocabulary size changes (``add_tokens``).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if backend.padding is None and backend.truncation is None:
        return backend
    key = (id(backend), backend.get_vocab_size(with_added_tokens=True))
    try:
        cached = _CLEAN_COPIES.get(tokenizer)
    except TypeError:  # not weak-referenceable: copy every time
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    from tokenizers import Tokenizer

    clean = Tokenizer.from_str(backend.to_str())
    clean.no_padding()
    clean.no_truncation()
    try:
        _CLEAN_COPIES[tokenizer] = (key, clean)
    except TypeError:
        pass
    return clean


def encode_texts(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool = False) -> list[Encoding]:
    """Token ids of each text, independent of the tokenizer's padding / truncation state."""
    texts = list(texts)
    backend = stateless_backend(tokenizer)
    if backend is not None:
        return [Encoding(list(enc.ids), int(sum(enc.attention_mask)))
                for enc in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    out = tokenizer(texts, add_special_tokens=add_special_tokens, padding=False, truncation=False)
    masks = out.get("attention_mask") or [[1] * len(ids) for ids in out["input_ids"]]
    return [Encoding(list(ids), int(sum(m))) for ids, m in zip(out["input_ids"], masks)]


def _first(output: Any) -> Tensor:
    """Modules return a Tensor or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Backend:
    """What the collector needs from a model."""

    n_blocks: int
    n_ctx: int
    name: str
    tokenizer: Any

    def resolve(self, spec: str | int) -> HookPoint:
        raise NotImplementedError

    def widths(self, point: HookPoint) -> int | None:
        raise NotImplementedError

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        mask: Int[Tensor, "batch pos"],
        points: Sequence[HookPoint],
        need_logits: bool,
    ) -> tuple[dict[str, Tensor], Float[Tensor, "batch pos vocab"] | None]:
        raise NotImplementedError

    def logits(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]) -> Tensor:
        return self.forward(tokens, mask, [], True)[1]  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def default_prepend_bos(self) -> bool:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Token ids of each text without special tokens, whatever state earlier calls left the
        tokenizer in (padding, truncation, padding side, pad token)."""
        return encode_texts(self.tokenizer, texts)


class TLBackend(Backend):
    """A ``HookedTransformer``: one ``run_with_hooks`` per batch, only the requested hook names,
    ``stop_at_layer`` just past the deepest requested block unless logits are needed."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model = model
        self.n_blocks = int(model.cfg.n_layers)
        self.n_ctx = int(model.cfg.n_ctx)
        self.name = str(getattr(model.cfg, "model_name", None) or "HookedTransformer")
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def default_prepend_bos(self) -> bool:
        return bool(getattr(self.model.cfg, "default_prepend_bos", True))

    def resolve(self, spec: str | int) -> HookPoint:
        point = resolve(spec, self.n_blocks, self.model.hook_dict.keys())
        call = flag_needed(point.tl_name)
        if call is not None:
            flag = {"set_use_hook_mlp_in(True)": "use_hook_mlp_in", "set_use_attn_in(True)": "use_attn_in",
                    "set_use_split_qkv_input(True)": "use_split_qkv_input",
                    "set_use_attn_result(True)": "use_attn_result"}[call.split(".", 1)[1]]
            if not getattr(self.model.cfg, flag, False):
                raise ConfigError(
                    f"hook point {point.tl_name!r} does not fire unless enabled: call {call} first "
                    "(or collect 'llm.layer.N.mlp_in', the MLP's normalized input, which always fires)"
                )
        return point

    def widths(self, point: HookPoint) -> int | None:
        cfg = self.model.cfg
        return int(cfg.d_model) if point.kind != "raw" else None

    def forward(self, tokens, mask, points, need_logits):
        captured: dict[str, Tensor] = {}
        names = {p.tl_name for p in points}

        def hook(act: Tensor, hook: Any) -> None:
            captured[hook.name] = act

        kwargs: dict[str, Any] = {"attention_mask": mask}
        if need_logits:
            kwargs["return_type"] = "logits"
        else:
            kwargs["return_type"] = None
            deepest = max(p.block for p in points)
            if deepest + 1 < self.n_blocks:
                kwargs["stop_at_layer"] = deepest + 1
        out = self.model.run_with_hooks(
            tokens, fwd_hooks=[(lambda n: n in names, hook)] if names else [], **kwargs
        )
        return captured, (out if need_logits else None)


# ---------------------------------------------------------------------------- Hugging Face
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_LN2_NAMES = ("post_attention_layernorm", "ln_2", "ln2", "post_attention_norm")


def hf_module_for(blocks: nn.ModuleList, point: HookPoint) -> tuple[nn.Module, str]:
    """(module, "pre" | "post"): which module of a Hugging Face model carries a hook point, and
    whether the point is that module's input (pre) or output (post)."""
    block = blocks[point.block]
    if point.kind == "resid_post":
        return block, "post"
    if point.kind == "resid_pre":
        return block, "pre"
    if point.kind == "attn_out":
        return _child(block, _ATTN_NAMES, "attention", point.block), "post"
    if point.kind == "mlp_out":
        return _child(block, _MLP_NAMES, "MLP", point.block), "post"
    if point.kind == "mlp_in":
        return _child(block, _MLP_NAMES, "MLP", point.block), "pre"
    if point.kind == "resid_mid":
        return _child(block, _LN2_NAMES, "second layer norm", point.block), "pre"
    raise LayerNotFoundError(f"hook kind {point.kind!r} has no Hugging Face module equivalent")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ``nn.ModuleList`` whose length is ``config.num_hidden_layers``."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for _, mod in candidates:
        if n is not None and len(mod) == n:
            return mod
    lists = ", ".join(f"{name} ({len(m)})" for name, m in candidates) or "none"
    raise ConfigError(f"could not find the decoder blocks of {type(model).__name__}: expected an nn.ModuleList "
                      f"of length config.num_hidden_layers={n}; module lists found: {lists}")


def _child(block: nn.Module, names: Sequence[str], what: str, block_index: int) -> nn.Module:
    for name in names:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    children = ", ".join(n for n, _ in block.named_children())
    raise LayerNotFoundError(f"block {block_index} ({type(block).__name__}) has no {what} module "
                             f"(looked for {', '.join(names)}; it has {children})")


class HFBackend(Backend):
    """A Hugging Face causal LM reached through removable ``nn.Module`` forward hooks on its blocks."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        if tokenizer is None:
            raise ConfigError("a Hugging Face model needs its tokenizer: collector.run(model, tokenizer, ...)")
        self.model = model
        self.blocks = find_blocks(model)
        self.n_blocks = len(self.blocks)
        cfg = model.config
        self.n_ctx = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024))
        self.name = str(getattr(cfg, "_name_or_path", None) or type(model).__name__)
        self.tokenizer = tokenizer
        self._gpt2_style = getattr(cfg, "model_type", "") in ("gpt2", "gpt_neo", "gptj", "codegen")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def default_prepend_bos(self) -> bool:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        ids = encode_texts(self.tokenizer, ["a"], add_special_tokens=True)[0].ids
        return bos is not None and len(ids) > 0 and ids[0] == bos

    def resolve(self, spec: str | int) -> HookPoint:
        point = resolve(spec, self.n_blocks, None)
        if point.kind == "raw":
            raise LayerNotFoundError(f"{spec!r} is a TransformerLens hook name without a Hugging Face equivalent; "
                                     "use llm.layer.N[.resid_pre|resid_mid|attn_out|mlp_in|mlp_out]")
        self._module_for(point)  # fail early if the block lacks the module
        return point

    def widths(self, point: HookPoint) -> int | None:
        return int(getattr(self.model.config, "hidden_size", 0) or getattr(self.model.config, "n_embd", 0)) or None

    def _module_for(self, point: HookPoint) -> tuple[nn.Module, str]:
        return hf_module_for(self.blocks, point)

    def position_ids(self, mask: Tensor) -> Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, tokens, mask, points, need_logits):
        captured: dict[str, Tensor] = {}
        deepest = max((p.block for p in points), default=-1)

        def make(point: HookPoint, side: str) -> Callable[..., None]:
            if side == "post":
                def post(_mod: nn.Module, _args: Any, output: Any) -> None:
                    captured[point.tl_name] = _first(output)
                return post

            def pre(_mod: nn.Module, args: Any, kwargs: Any) -> None:
                captured[point.tl_name] = args[0] if args else kwargs["hidden_states"]
            return pre

        def stop(_mod: nn.Module, _args: Any, _output: Any) -> None:
            raise _StopForward

        kwargs: dict[str, Any] = {"attention_mask": mask, "use_cache": False}
        if self._gpt2_style:
            kwargs["position_ids"] = self.position_ids(mask)
        with ExitStack() as stack:
            for point in points:
                module, side = self._module_for(point)
                handle = (module.register_forward_hook(make(point, "post")) if side == "post"
                          else module.register_forward_pre_hook(make(point, "pre"), with_kwargs=True))
                stack.callback(handle.remove)
            if not need_logits and deepest >= 0:
                stack.callback(self.blocks[deepest].register_forward_hook(stop).remove)
            try:
                out = self.model(input_ids=tokens, **kwargs)
            except _StopForward:
                out = None
        return captured, (out.logits if need_logits and out is not None else None)


def make_backend(model: Any, tokenizer: Any = None) -> Backend:
    """A backend for a ``HookedTransformer`` or a Hugging Face causal LM."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover - a hard dependency
        HookedTransformer = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(model, HookedTransformer):
        backend: Backend = TLBackend(model, tokenizer)
    elif isinstance(model, nn.Module) and hasattr(model, "config"):
        backend = HFBackend(model, tokenizer)
    else:
        raise ConfigError(f"expected a transformer_lens.HookedTransformer or a Hugging Face causal LM; "
                          f"got {type(model).__name__}")
    if backend.tokenizer is None:
        raise ConfigError("the model has no tokenizer attached: pass one (collector.run(model, tokenizer, ...))")
    return backend
