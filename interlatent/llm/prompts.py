"""Checks and per-token helpers of :class:`~interlatent.llm.LLMCollector`: prompts, labels and
layer indices validated before anything runs, padded batches, generation, per-token metrics and
decoded token text."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interlatent.backends import Backend
from interlatent.db import SequenceRecord
from interlatent.errors import ConfigError, ShapeError


def pad_batch(batch: list[list[int]], side: str, pad_id: int, device: torch.device
              ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(tokens, mask)``: the prompts padded on ``side`` to the longest, mask 1 at real tokens."""
    width = max(len(ids) for ids in batch)
    lengths = np.array([len(ids) for ids in batch], dtype=np.int64)
    cols = np.arange(width)[None, :]
    # right padding: real tokens at columns < length; left padding: at columns >= width - length
    real = cols < lengths[:, None] if side == "right" else cols >= (width - lengths)[:, None]
    tokens = np.full((len(batch), width), pad_id, dtype=np.int64)
    tokens[real] = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum()))
    tokens, mask = torch.from_numpy(tokens), torch.from_numpy(real.astype(np.int64))
    return tokens.to(device), mask.to(device)


def generate(backend: Backend, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], n_new: int,
             temperature: float, generator: torch.Generator | None
             ) -> tuple[Int[Tensor, "batch new_pos"], Int[Tensor, "batch new_pos"]]:
    """Left-padded greedy (or sampled) continuation by ``n_new`` tokens."""
    for _ in range(n_new):
        logits = backend.logits(tokens, mask)[:, -1, :].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        tokens = torch.cat([tokens, nxt.to(tokens.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt, dtype=mask.dtype)], dim=1)
    return tokens, mask


def short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def check_layer_indices(layer_indices: Any) -> list[int]:
    if isinstance(layer_indices, (int, np.integer)) and not isinstance(layer_indices, (bool, np.bool_)):
        layer_indices = [layer_indices]
    if isinstance(layer_indices, (str, bytes, Mapping)) or not hasattr(layer_indices, "__iter__"):
        raise ConfigError(f"layer_indices must be a list of block indices (ints); got {short(layer_indices)}")
    layer_indices = list(layer_indices)
    out = []
    for value in layer_indices:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"layer_indices must be ints (block indices, negative from the end); got {value!r} "
                              f"({type(value).__name__}) in {short(layer_indices)}; pass e.g. [0, -1]")
        out.append(int(value))
    return out


def check_prompt(i: int, text: Any) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"prompt {i} is a {type(text).__name__}, expected str")
    if not text:
        raise ConfigError(f"prompt {i} is an empty string; remove it (an empty prompt has no tokens)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"prompt {i} is not valid Unicode: {exc.reason} {text[exc.start:exc.end]!r} at "
                          f"character {exc.start} of {short(text)}; a lone surrogate usually comes from "
                          "decoding bytes with errors='surrogateescape' — decode with errors='replace'") from exc


def check_label(label: Any, what: str) -> None:
    if label is None or isinstance(label, str):
        return
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (Real, np.number)):
        raise ConfigError(f"{what} is {short(label)} ({type(label).__name__}); a label must be a str, an int, "
                          "a float or None")
    if isinstance(label, float) and not math.isfinite(label):
        raise ConfigError(f"{what} is {label!r}; a numeric label must be finite (use None for no label)")


def check_labels(labels: Any, n: int) -> list[Any]:
    if isinstance(labels, (str, bytes, Mapping)) or not hasattr(labels, "__iter__"):
        raise ConfigError(f"labels must be a list with one label per prompt; got {short(labels)}")
    out = [lb.item() if isinstance(lb, np.generic) else lb for lb in labels]
    if len(out) != n:
        raise ConfigError(f"labels has {len(out)} entries for {n} prompts; pass one label (or None) per prompt")
    for i, lb in enumerate(out):
        check_label(lb, f"labels[{i}]")
    return out


def check_positions(batch: list[int], records: list[SequenceRecord], mask: torch.Tensor,
                     expected: list[int]) -> None:
    """Every record stores exactly the attention mask's real positions (no pad, none lost)."""
    real = mask.sum(dim=1).tolist()
    for b, (i, rec) in enumerate(zip(batch, records)):
        if not rec.n_positions == len(rec.token_ids) == int(real[b]) == expected[b]:
            raise ShapeError(f"prompt {i}: {rec.n_positions} positions to store, the attention mask has "
                             f"{int(real[b])} real tokens and tokenisation gave {expected[b]}; refusing to "
                             "write (an internal inconsistency: please report it)")


def per_token(name: str, value: Any, n: int, prompt: int) -> np.ndarray:
    if np.isscalar(value) or value is None:
        try:
            return np.full(n, np.nan if value is None else float(value), dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"token metric {name!r} of prompt {prompt} is {value!r}; metrics must be numeric "
                              "(put text in prompt_context_fn instead)") from exc
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise ShapeError(f"token metric {name!r} of prompt {prompt} has shape {arr.shape}; expected a scalar or "
                         f"one value per token ({n})")
    return arr


def logit_metrics(logprobs: Float[Tensor, "pos vocab"], ids: Int[Tensor, " pos"],
                  wanted: Sequence[str]) -> dict[str, np.ndarray]:
    """Next-token loss (NaN at the last position) and entropy from one prompt's log-probs [pos, vocab]."""
    out = {}
    if "next_token_loss" in wanted:
        loss = torch.full((ids.shape[0],), math.nan)
        if ids.shape[0] > 1:
            loss[:-1] = -logprobs[:-1].gather(-1, ids[1:, None]).squeeze(-1).cpu()
        out["next_token_loss"] = loss.numpy()
    if "next_token_entropy" in wanted:
        out["next_token_entropy"] = (-(logprobs.exp() * logprobs).sum(-1)).cpu().numpy()
    return out


class TokenText:
    """Decoded text of single token ids, cached (the same ids repeat across a corpus)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        new = [i for i in set(ids) if i not in self.cache]
        if new:
            backend = getattr(self.tokenizer, "_tokenizer", None)
            if backend is not None and hasattr(backend, "decode_batch"):
                texts = backend.decode_batch([[i] for i in new], skip_special_tokens=False)
            else:
                texts = self.tokenizer.batch_decode([[i] for i in new])
            self.cache.update(zip(new, texts))
        return [self.cache[i] for i in ids]
