"""``LLMCollector``: run prompts through a language model and store activations at hook points.

One forward pass per batch reads only the requested hook points (TransformerLens: a names filter and
``stop_at_layer`` past the deepest block; Hugging Face: module hooks and an early stop), and one
store write per batch keeps every real token — never a pad — with its prompt index, position,
token id and text, prompt-level context (once per prompt) and per-token metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interlatent.db import LatentDB, SequenceRecord
from interlatent.errors import ConfigError, ShapeError
from interlatent.hooks import KINDS, HookPoint, expand
from interlatent.llm.backends import Backend, make_backend

log = logging.getLogger(__name__)

PromptContextFn = Callable[[str, int], dict[str, Any]]
TokenMetricsFn = Callable[[str, int, list[str]], dict[str, Any]]
BUILTIN_METRICS = ("next_token_loss", "next_token_entropy")


class LLMCollector:
    """Collect activations of a ``HookedTransformer`` or a Hugging Face causal LM into a store.

    Args:
        db: the store to write into.
        layer_indices: block indices (negative counts from the end); each gives ``llm.layer.N``.
        hooks: hook kinds applied to every index (``"resid_post"``, ``"resid_pre"``, ``"resid_mid"``,
            ``"attn_out"``, ``"mlp_in"``, ``"mlp_out"``), and/or full names (``"llm.layer.2.mlp_out"``,
            raw TransformerLens names such as ``"blocks.2.hook_mlp_out"``). Default: resid_post.
        max_channels: store only the first ``max_channels`` channels of each hook point.
        prompt_context_fn: ``(prompt_text, prompt_idx) -> dict`` stored once per prompt; its
            ``"label"`` entry becomes the prompt's label.
        token_metrics_fn: ``(prompt_text, prompt_idx, tokens) -> {name: value}`` with a scalar
            (the same for every token) or one number per token.
        batch_size: prompts per forward pass.
        dtype: storage dtype: ``"float16"`` (default), ``"float32"`` or ``"bfloat16"``.
        metrics: built-in per-token metrics from the logits: ``"next_token_loss"``,
            ``"next_token_entropy"`` (they need the full forward pass, unembedding included).
        padding_side: ``"right"`` (default) or ``"left"``; pads are masked and never stored.
        prepend_bos: None follows the model (TransformerLens ``cfg.default_prepend_bos``; for
            Hugging Face, what its tokenizer does).

    ``prompt_idx`` passed to the functions is the prompt's position in ``prompts``. Prompts longer
    than the model's context are truncated to it, with a logged warning.
    """

    def __init__(
        self,
        db: LatentDB,
        layer_indices: Sequence[int] = (-1,),
        *,
        hooks: Sequence[str] | None = None,
        max_channels: int | None = None,
        prompt_context_fn: PromptContextFn | None = None,
        token_metrics_fn: TokenMetricsFn | None = None,
        batch_size: int = 8,
        dtype: str = "float16",
        metrics: Sequence[str] = (),
        padding_side: str = "right",
        prepend_bos: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_channels is not None and max_channels < 1:
            raise ConfigError(f"max_channels must be a positive int or None, got {max_channels}")
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        unknown = [m for m in metrics if m not in BUILTIN_METRICS]
        if unknown:
            raise ConfigError(f"unknown built-in metrics {unknown}; available: {list(BUILTIN_METRICS)}")
        for h in hooks or ():
            if "." not in h and h not in KINDS:
                from interlatent.errors import unknown_name

                raise unknown_name("hook kind", h, KINDS, hint="or pass a full name like 'llm.layer.2.mlp_out'")
        self.db = db
        self.layer_indices = list(layer_indices)
        self.hooks = list(hooks) if hooks else None
        self.max_channels = max_channels
        self.prompt_context_fn = prompt_context_fn
        self.token_metrics_fn = token_metrics_fn
        self.batch_size = batch_size
        self.dtype = dtype
        self.metrics = tuple(metrics)
        self.padding_side = padding_side
        self.prepend_bos = prepend_bos
        self.last_run_id: int | None = None

    # ------------------------------------------------------------------ tokenisation
    def _encode(self, backend: Backend, prompts: Sequence[str], room: int) -> list[list[int]]:
        tok = backend.tokenizer
        bos_id = getattr(tok, "bos_token_id", None)
        prepend = backend.default_prepend_bos() if self.prepend_bos is None else self.prepend_bos
        if prepend and bos_id is None:
            raise ConfigError("prepend_bos is set but the tokenizer has no bos_token_id; pass prepend_bos=False")
        limit = backend.n_ctx - room
        out = []
        for i, ids in enumerate(_tokenize(tok, prompts)):
            if prepend:
                ids = [bos_id, *ids]
            if not ids:
                raise ConfigError(f"prompt {i} tokenizes to nothing; drop it or pass prepend_bos=True")
            if len(ids) > limit:
                log.warning("prompt %d has %d tokens; truncated to the model's context (%d%s)", i, len(ids),
                            limit, f" minus {room} generated" if room else "")
                ids = ids[:limit]
            out.append(ids)
        return out

    @staticmethod
    def _pad(batch: list[list[int]], side: str, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, ids in enumerate(batch):
            sl = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
            tokens[b, sl] = torch.tensor(ids, dtype=torch.long)
            mask[b, sl] = 1
        return tokens.to(device), mask.to(device)

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _generate(backend: Backend, tokens: torch.Tensor, mask: torch.Tensor, n_new: int,
                  temperature: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
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

    # ------------------------------------------------------------------ the run
    def run(
        self,
        llm: Any,
        tok: Any = None,
        *,
        prompts: Sequence[str],
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        seed: int = 0,
        prompt_indices: Sequence[int] | None = None,
        show_progress: bool | None = None,
    ) -> int:
        """Run ``prompts`` through ``llm`` and store the activations. Returns the run id.

        Args:
            llm: a ``HookedTransformer`` or a Hugging Face causal LM.
            tok: the tokenizer (None: the HookedTransformer's own).
            prompts: the texts. Empty strings are refused before anything runs.
            max_new_tokens: generate this many tokens after each prompt (greedy, or sampled at
                ``temperature`` with ``seed``) and store their activations too, marked generated.
            prompt_indices: the store's prompt index of each prompt. Default: 0..n-1 when the store
                is empty or already holds these prompts at those indices (more layers over the same
                prompts), else the next free indices.
        """
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
        if not prompts:
            raise ConfigError("prompts is empty: pass at least one prompt text")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ConfigError(f"prompt {i} is a {type(p).__name__}, expected str")
            if not p:
                raise ConfigError(f"prompt {i} is an empty string; remove it (an empty prompt has no tokens)")
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        backend = make_backend(llm, tok)
        points = self._points(backend)
        indices = self._prompt_indices(prompts, prompt_indices)
        contexts = [dict(self.prompt_context_fn(p, i)) if self.prompt_context_fn else {} for i, p in enumerate(prompts)]
        labels = [c.get("label") for c in contexts]
        string_labels = sorted({lb for lb in labels if isinstance(lb, str)})
        if string_labels:
            self.db.register_label_classes(string_labels)
        encoded = self._encode(backend, prompts, max_new_tokens)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths batch together
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        need_logits = bool(self.metrics)
        side = "left" if max_new_tokens else self.padding_side
        pad_id = self._pad_id(backend)
        token_text = _TokenText(backend.tokenizer)
        config = {
            "hook_points": [p.name for p in points], "hook_names": {p.name: p.tl_name for p in points},
            "batch_size": self.batch_size, "dtype": self.dtype, "max_channels": self.max_channels,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "metrics": list(self.metrics),
            "n_prompts": len(prompts), "backend": type(backend).__name__, "n_blocks": backend.n_blocks,
        }
        layer_meta = {p.name: {"hook_name": p.tl_name, "n_blocks": backend.n_blocks, "block": p.block,
                               "hook_kind": p.kind, "model": backend.name} for p in points}
        dtypes = {p.name: self.dtype for p in points}
        generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
        bar = tqdm(total=len(prompts), desc="collect", unit="prompt", disable=None if show_progress is None
                   else not show_progress)
        checked_widths = False
        with torch.inference_mode(), self.db.run(kind="llm", model=backend.name, config=config) as run:
            self.last_run_id = run.run_id
            for batch in batches:
                tokens, mask = self._pad([encoded[i] for i in batch], side, pad_id, backend.device)
                n_prompt = mask.sum(dim=1)
                if max_new_tokens:
                    tokens, mask = self._generate(backend, tokens, mask, max_new_tokens, temperature, generator)
                captured, logits = backend.forward(tokens, mask, points, need_logits)
                missing = [p.tl_name for p in points if p.tl_name not in captured]
                if missing:
                    raise ConfigError(f"hook points {missing} never fired during the forward pass; "
                                      "check that the model computes them")
                if not checked_widths:
                    self._check_widths(points, captured)
                    checked_widths = True
                records = self._records(batch, prompts, indices, contexts, labels, tokens, mask, n_prompt, points,
                                        captured, logits, token_text)
                run.write(records, dtypes=dtypes, layer_meta=layer_meta)
                bar.update(len(batch))
        bar.close()
        return run.run_id

    def _points(self, backend: Backend) -> list[HookPoint]:
        seen: dict[str, HookPoint] = {}
        for spec in expand(self.layer_indices, self.hooks):
            point = backend.resolve(spec)
            seen.setdefault(point.name, point)
        if not seen:
            raise ConfigError("no hook points requested: pass layer_indices and/or hooks")
        return list(seen.values())

    def _prompt_indices(self, prompts: list[str], given: Sequence[int] | None) -> list[int]:
        if given is not None:
            given = [int(i) for i in given]
            if len(given) != len(prompts) or len(set(given)) != len(given):
                raise ConfigError(f"prompt_indices must be {len(prompts)} distinct ints (one per prompt)")
            return given
        existing = self.db.sequences()
        if existing.empty:
            return list(range(len(prompts)))
        texts = dict(zip(existing["prompt_index"], existing["text"]))
        if all(texts.get(i) == p for i, p in enumerate(prompts)):
            return list(range(len(prompts)))
        start = int(existing["prompt_index"].max()) + 1
        log.info("store already holds other prompts; these take prompt indices %d..%d", start,
                 start + len(prompts) - 1)
        return list(range(start, start + len(prompts)))

    @staticmethod
    def _pad_id(backend: Backend) -> int:
        tok = backend.tokenizer
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tok, attr, None)
            if value is not None:
                return int(value)
        return 0  # any id works: pads are masked out and never stored

    def _check_widths(self, points: Sequence[HookPoint], captured: dict[str, torch.Tensor]) -> None:
        if self.max_channels is None:
            return
        for p in points:
            width = int(np.prod(captured[p.tl_name].shape[2:]))
            if self.max_channels > width:
                raise ConfigError(f"max_channels={self.max_channels} exceeds the width {width} of {p.name}; "
                                  "pass max_channels=None to store every channel")

    def _records(self, batch: list[int], prompts: list[str], indices: list[int], contexts: list[dict[str, Any]],
                 labels: list[Any], tokens: torch.Tensor, mask: torch.Tensor, n_prompt: torch.Tensor,
                 points: Sequence[HookPoint], captured: dict[str, torch.Tensor], logits: torch.Tensor | None,
                 token_text: _TokenText) -> list[SequenceRecord]:
        host = {}
        for p in points:
            act = captured[p.tl_name]
            act = act.reshape(act.shape[0], act.shape[1], -1)  # raw hooks with head dims: flatten
            if self.max_channels is not None:
                act = act[..., : self.max_channels]
            if self.dtype == "float16":  # cast here (cheaper copies) unless a value would overflow
                lo, hi = torch.aminmax(act)
                act = act.half() if max(float(hi), -float(lo)) <= 65504.0 else act.float()
            host[p.name] = act.cpu().numpy() if act.dtype == torch.float16 else act.float().cpu().numpy()
        lp = torch.log_softmax(logits.float(), dim=-1) if logits is not None else None
        mask_np = mask.cpu().numpy().astype(bool)
        tokens_np = tokens.cpu().numpy()
        records = []
        for b, i in enumerate(batch):
            real = np.flatnonzero(mask_np[b])
            ids = tokens_np[b, real].tolist()
            toks = token_text(ids)
            metrics: dict[str, np.ndarray] = {}
            if lp is not None:
                metrics.update(_logit_metrics(lp[b, real], tokens[b, real], self.metrics))
            if self.token_metrics_fn is not None:
                for name, value in (self.token_metrics_fn(prompts[i], i, toks) or {}).items():
                    metrics[name] = _per_token(name, value, len(ids), i)
            generated = None
            if tokens.shape[1] > 0 and int(n_prompt[b]) < len(ids):
                generated = np.arange(len(ids)) >= int(n_prompt[b])
            records.append(SequenceRecord(
                token_ids=ids, tokens=toks, activations={name: arr[b, real] for name, arr in host.items()},
                text=prompts[i], label=labels[i], context=contexts[i], prompt_index=indices[i], metrics=metrics,
                generated=generated,
            ))
        return records


def _tokenize(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens; one call into a fast tokenizer's backend."""
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [enc.ids for enc in backend.encode_batch(list(texts), add_special_tokens=False)]
    return [list(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]


def _per_token(name: str, value: Any, n: int, prompt: int) -> np.ndarray:
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


def _logit_metrics(logprobs: torch.Tensor, ids: torch.Tensor, wanted: Sequence[str]) -> dict[str, np.ndarray]:
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


class _TokenText:
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
