"""What the rest of Interlatent needs from a model, and the tokenisation every backend shares.

A :class:`Backend` wraps one model and answers: which hook point a name means (:meth:`resolve`),
the activations at some points from one forward pass that stops after the deepest one
(:meth:`forward`), a hook point rewritten in place while a block runs (:meth:`at_hook`), the
logits (:meth:`logits`, attention mask respected), the token ids of texts whatever state earlier
calls left the tokenizer in (:meth:`encode`), the device, the block count and context length, and
whether the model is causal. Collection, latent patching, activation patching and effect
measurement reach models only through it; :func:`interlatent.backends.make_backend` picks the
implementation, and no other module tests a model's type.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int, Shaped
from torch import Tensor

from interlatent.errors import ConfigError, ShapeError
from interlatent.hooks import HookPoint

log = logging.getLogger(__name__)

#: a function called with a hook point's activation; a tensor it returns replaces the activation
HookFn = Callable[[Tensor], Tensor | None]


class StopForward(Exception):
    """Raised from the deepest needed hook to skip the rest of a forward pass."""


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


def first_tensor(output: Any) -> Tensor:
    """Modules return a Tensor or a tuple whose first element is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


class Backend:
    """One model, seen through the operations Interlatent needs.

    Attributes:
        model: the wrapped model.
        n_blocks: its number of blocks (layers).
        n_ctx: its context length.
        d_vocab: its vocabulary size (None where it does not say).
        name: a name for records (the model's name or class).
        tokenizer: the tokenizer (None when none was given and the model has none).
        is_causal: True when a position only sees itself and earlier ones.
    """

    model: Any
    n_blocks: int
    n_ctx: int
    d_vocab: int | None
    name: str
    tokenizer: Any
    is_causal: bool = True

    # ---------------------------------------------------------------- hook points
    def resolve(self, spec: str | int) -> HookPoint:
        """The hook point ``spec`` names on this model; raises for names it lacks."""
        raise NotImplementedError

    def width(self, point: HookPoint) -> int | None:
        """The activation width at ``point`` (None where the model does not say)."""
        raise NotImplementedError

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        mask: Shaped[Tensor, "batch pos"] | None,
        points: Sequence[HookPoint],
        need_logits: bool,
    ) -> tuple[dict[str, Tensor], Float[Tensor, "batch pos vocab"] | None]:
        """One forward pass: the activation at each point (keyed by its ``tl_name``), and the logits
        when ``need_logits``; without logits the pass stops after the deepest point's block."""
        raise NotImplementedError

    def at_hook(self, point: HookPoint, fn: HookFn) -> Any:
        """A context manager: while it runs, ``fn(activation)`` is called at ``point`` on every
        forward pass, and a tensor it returns replaces the activation. Leaving it (also on an
        exception) removes the hook."""
        raise NotImplementedError

    @contextmanager
    def at_hooks(self, pairs: Sequence[tuple[HookPoint, HookFn]]) -> Iterator[None]:
        """:meth:`at_hook` for several points at once, installed in order."""
        with ExitStack() as stack:
            for point, fn in pairs:
                stack.enter_context(self.at_hook(point, fn))
            yield

    def logits(self, tokens: Int[Tensor, "batch pos"],
               mask: Shaped[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos vocab"]:
        """The model's logits on ``tokens`` (``mask``: 1 at real tokens, 0 at pads)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- a pass split at a point
    def resumes_at(self, point: HookPoint) -> bool:
        """Whether a forward pass can stop at ``point`` (:meth:`run_to`) and continue from an
        activation given there (:meth:`run_from`). Where it cannot (False, the default), callers
        run the whole pass and rewrite ``point`` with a hook."""
        return False

    def run_to(self, point: HookPoint, tokens: Int[Tensor, "batch pos"],
               mask: Shaped[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos d"]:
        """The activation at ``point``, from a pass that stops there (only where :meth:`resumes_at`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot stop a forward pass at {point.tl_name}")

    def run_from(self, point: HookPoint, activation: Float[Tensor, "batch pos d"], tokens: Int[Tensor, "batch pos"],
                 mask: Shaped[Tensor, "batch pos"] | None = None, columns: Int[Tensor, " batch"] | None = None
                 ) -> Tensor:
        """The logits of the rest of the pass with ``activation`` at ``point`` (``tokens``: the
        prompts it came from, for the attention mask the model would derive from them): ``[batch,
        pos, vocab]``, or ``[batch, vocab]`` at one column per row when ``columns`` is given (only
        where :meth:`resumes_at`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot start a forward pass at {point.tl_name}")

    def run_with_cache(self, tokens: Int[Tensor, "batch pos"], mask: Shaped[Tensor, "batch pos"] | None = None,
                       **kwargs: Any) -> tuple[Float[Tensor, "batch pos vocab"], Any]:
        """``(logits, cache)``: the model's own activation cache where it has one (TransformerLens
        ``run_with_cache``), else None."""
        return self.logits(tokens, mask), None

    # ---------------------------------------------------------------- model facts
    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    def default_prepend_bos(self) -> bool:
        """Whether prompts start with BOS when the caller does not say."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        ids = encode_texts(self.tokenizer, ["a"], add_special_tokens=True)[0].ids
        return bos is not None and len(ids) > 0 and ids[0] == bos

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Token ids of each text without special tokens, whatever state earlier calls left the
        tokenizer in (padding, truncation, padding side, pad token)."""
        return encode_texts(self.tokenizer, texts)

    def prompt_ids(self, prompts: Sequence[str], prepend_bos: bool | None = None, room: int = 0,
                   positions: Sequence[int] | None = None) -> list[list[int]]:
        """Token ids of each prompt: BOS first when ``prepend_bos`` (None: the model's default),
        truncated to the context less ``room`` (tokens to generate), with a logged warning.
        ``positions`` are the prompts' positions in the caller's list, for messages."""
        tok = self.tokenizer
        bos_id = getattr(tok, "bos_token_id", None)
        prepend = self.default_prepend_bos() if prepend_bos is None else prepend_bos
        if prepend and bos_id is None:
            raise ConfigError("prepend_bos is set but the tokenizer has no bos_token_id; pass prepend_bos=False")
        limit = self.n_ctx - room
        out = []
        for i, enc in zip(range(len(prompts)) if positions is None else positions, self.encode(prompts)):
            if len(enc.ids) != enc.n_real:
                raise ShapeError(f"prompt {i} encodes to {len(enc.ids)} ids but the tokenizer's attention mask "
                                 f"counts {enc.n_real} real tokens: the encoding was padded. This is a bug in "
                                 "Interlatent's tokenisation; please report it with the tokenizer used")
            ids = [bos_id, *enc.ids] if prepend else list(enc.ids)
            if not ids:
                raise ConfigError(f"prompt {i} tokenizes to nothing; drop it or pass prepend_bos=True")
            if len(ids) > limit:
                log.warning("prompt %d has %d tokens; truncated to the model's context (%d%s)", i, len(ids),
                            limit, f" minus {room} generated" if room else "")
                ids = ids[:limit]
            out.append(ids)
        return out

    def pad_id(self) -> int:
        """The id pads are filled with (any id works: pads are masked out and never stored)."""
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self.tokenizer, attr, None)
            if value is not None:
                return int(value)
        return 0
