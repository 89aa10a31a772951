"""The model side of collection: what one forward pass over a batch of prompts stores, without a store.

:class:`Capture` holds the settings of :class:`~interlatent.llm.LLMCollector` that shape a record
(hook points, channels, dtype, metrics, padding). :meth:`Capture.facts` resolves the hook points on a
model and checks it can give what was asked; :meth:`Capture.records` pads one :class:`PromptBatch`,
runs the forward pass through the model's backend and returns its
:class:`~interlatent.db.SequenceRecord`\\ s. The collector calls both in its own process; the workers
of :mod:`interlatent.distributed` call them on their model replicas, so every path stores the same
records. A ``Capture`` pickles (its settings and the user's ``token_metrics_fn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from interlatent.backends import Backend
from interlatent.db import SequenceRecord
from interlatent.errors import ConfigError
from interlatent.hooks import HookPoint, expand, indexed_by_position
from interlatent.llm.prompts import (
    TokenText,
    check_positions,
    generate,
    logit_metrics,
    pad_batch,
    per_token,
)

TokenMetricsFn = Callable[[str, int, list[str]], dict[str, Any]]


@dataclass(frozen=True)
class ModelFacts:
    """What planning a collection needs to know about the model (the model itself stays where it runs)."""

    name: str  # the model's name for records
    backend_type: str  # the backend's class name, kept in the run's config
    n_blocks: int
    points: tuple[HookPoint, ...]  # the resolved hook points, in request order
    pad_id: int


@dataclass
class PromptBatch:
    """The prompts of one forward pass and what their records carry, one entry per prompt."""

    positions: list[int]  # each prompt's position in the caller's list (``prompt_idx``)
    ids: list[list[int]]  # token ids, BOS included, truncated to the context
    texts: list[str]
    labels: list[Any]
    contexts: list[dict[str, Any]]
    prompt_indices: list[int | None]  # explicit store indices, or None to let the store choose
    hints: list[int]  # the index each prompt would like when the store chooses


@dataclass(frozen=True)
class Capture:
    """The record-shaping settings of a collection (see :class:`~interlatent.llm.LLMCollector`)."""

    layer_indices: tuple[int, ...]
    hooks: tuple[str, ...] | None
    max_channels: int | None
    token_metrics_fn: TokenMetricsFn | None
    dtype: str
    metrics: tuple[str, ...]
    padding_side: str
    prepend_bos: bool | None

    # ------------------------------------------------------------------ the model
    def facts(self, backend: Backend, max_new_tokens: int) -> ModelFacts:
        """Resolve the hook points on ``backend`` and check it can give the metrics and generation asked for."""
        self._check_backend(backend, max_new_tokens)
        return ModelFacts(backend.name, type(backend).__name__, backend.n_blocks, tuple(self._points(backend)),
                          backend.pad_id())

    def prompt_ids(self, backend: Backend, texts: list[str], max_new_tokens: int,
                   positions: list[int]) -> list[list[int]]:
        """Token ids of each prompt as the collector stores them (see :meth:`Backend.prompt_ids`)."""
        return backend.prompt_ids(texts, self.prepend_bos, max_new_tokens, positions)

    def _check_backend(self, backend: Backend, max_new_tokens: int) -> None:
        """Next-token metrics and generation need a causal model."""
        if backend.is_causal:
            return
        if self.metrics:
            raise ConfigError(f"metrics {list(self.metrics)} read next-token predictions, which a bidirectional "
                              f"{backend.name} does not make; collect without metrics=")
        if max_new_tokens:
            raise ConfigError(f"max_new_tokens={max_new_tokens} generates text, which a bidirectional {backend.name} "
                              "does not do; pass max_new_tokens=0")

    def _points(self, backend: Backend) -> list[HookPoint]:
        seen: dict[str, HookPoint] = {}
        for spec in expand(list(self.layer_indices), list(self.hooks) if self.hooks else None):
            point = backend.resolve(spec)
            if not indexed_by_position(point):
                raise ConfigError(f"{point.tl_name} is not indexed by token position (its activation is [batch, head, "
                                  "query, key]); the store keeps one row per token: collect a per-position point "
                                  "such as attn.hook_z or hook_attn_out, or read patterns with run_with_cache")
            seen.setdefault(point.name, point)
        if not seen:
            raise ConfigError("no hook points requested: pass layer_indices and/or hooks")
        return list(seen.values())

    # ------------------------------------------------------------------ one batch
    def records(self, backend: Backend, facts: ModelFacts, batch: PromptBatch, max_new_tokens: int,
                temperature: float, generator: torch.Generator | None, token_text: TokenText) -> list[SequenceRecord]:
        """Pad ``batch``, generate ``max_new_tokens`` if asked, run one forward pass and build its records
        (every real token, never a pad). Call it under ``torch.inference_mode()``."""
        return self.forward(backend, facts, batch, max_new_tokens, temperature, generator, token_text).build()

    def forward(self, backend: Backend, facts: ModelFacts, batch: PromptBatch, max_new_tokens: int,
                temperature: float, generator: torch.Generator | None, token_text: TokenText) -> CapturedBatch:
        """The model's part of :meth:`records`: the forward pass, its activations copied out to numpy in
        the storage dtype; :meth:`CapturedBatch.build` then makes the records (in any thread, when no
        ``token_metrics_fn`` and no logit metrics take part)."""
        points = facts.points
        side = "left" if max_new_tokens else self.padding_side
        tokens, mask = pad_batch(batch.ids, side, facts.pad_id, backend.device)
        n_prompt = mask.sum(dim=1)
        if max_new_tokens:
            tokens, mask = generate(backend, tokens, mask, max_new_tokens, temperature, generator)
        captured, logits = backend.forward(tokens, mask, points, bool(self.metrics))
        missing = [p.tl_name for p in points if p.tl_name not in captured]
        if missing:
            raise ConfigError(f"hook points {missing} never fired during the forward pass; "
                              "check that the model computes them")
        self._check_positions_axis(points, captured, tuple(tokens.shape))
        self._check_widths(points, captured)
        return CapturedBatch(self, batch, tokens.cpu(), mask.cpu(), n_prompt.cpu(), self._host(points, captured),
                             logits, token_text, [len(ids) + max_new_tokens for ids in batch.ids])

    @staticmethod
    def _check_positions_axis(points: tuple[HookPoint, ...], captured: dict[str, torch.Tensor],
                              shape: tuple[int, ...]) -> None:
        """Every captured activation must be ``[batch, pos, ...]`` like the tokens (``shape``)."""
        for p in points:
            got = tuple(captured[p.tl_name].shape)
            if got[:2] != tuple(shape[:2]):
                raise ConfigError(f"{p.tl_name} gave an activation of shape {list(got)} for tokens of shape "
                                  f"{list(shape)}: it is not indexed by token position, and the store keeps one "
                                  "row per token; collect a per-position point")

    def _check_widths(self, points: tuple[HookPoint, ...], captured: dict[str, torch.Tensor]) -> None:
        if self.max_channels is None:
            return
        for p in points:
            width = int(np.prod(captured[p.tl_name].shape[2:]))
            if self.max_channels > width:
                raise ConfigError(f"max_channels={self.max_channels} exceeds the width {width} of {p.name}; "
                                  "pass max_channels=None to store every channel")

    def _host(self, points: tuple[HookPoint, ...], captured: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Each point's ``[batch, pos, channels]`` activations as numpy, cast once to the storage dtype."""
        host = {}
        for p in points:
            act = captured[p.tl_name]
            act = act.reshape(act.shape[0], act.shape[1], -1)  # raw hooks with head dims: flatten
            if self.max_channels is not None:
                act = act[..., : self.max_channels]
            if self.dtype == "float16":  # cast here (cheaper copies) unless a value would overflow
                lo, hi = torch.aminmax(act)
                act = act.half() if max(float(hi), -float(lo)) <= 65504.0 else act.float()
            out = act.cpu() if act.dtype == torch.float16 else act.float().cpu()
            # a copy, never a view: a background writer reads it while the model runs on
            host[p.name] = (out.clone() if out.data_ptr() == captured[p.tl_name].data_ptr() else out).numpy()
        return host

    def _assemble(self, batch: PromptBatch, tokens: torch.Tensor, mask: torch.Tensor, n_prompt: torch.Tensor,
                  host: dict[str, np.ndarray], logits: torch.Tensor | None,
                  token_text: TokenText) -> list[SequenceRecord]:
        lp = torch.log_softmax(logits.float(), dim=-1) if logits is not None else None
        mask_np = mask.cpu().numpy().astype(bool)
        tokens_np = tokens.cpu().numpy()
        records = []
        for b, i in enumerate(batch.positions):
            real = np.flatnonzero(mask_np[b])
            rows = slice(real[0], real[-1] + 1) if len(real) and real[-1] - real[0] + 1 == len(real) else real
            ids = tokens_np[b, real].tolist()
            toks = token_text(ids)
            metrics: dict[str, np.ndarray] = {}
            if lp is not None:
                metrics.update(logit_metrics(lp[b, real], tokens[b, real], self.metrics))
            if self.token_metrics_fn is not None:
                for name, value in (self.token_metrics_fn(batch.texts[b], i, toks) or {}).items():
                    metrics[name] = per_token(name, value, len(ids), i)
            generated = None
            if tokens.shape[1] > 0 and int(n_prompt[b]) < len(ids):
                generated = np.arange(len(ids)) >= int(n_prompt[b])
            records.append(SequenceRecord(
                token_ids=ids, tokens=toks, activations={name: arr[b, rows] for name, arr in host.items()},
                text=batch.texts[b], label=batch.labels[b], context=batch.contexts[b], metrics=metrics,
                generated=generated, prompt_index=batch.prompt_indices[b], index_hint=batch.hints[b],
            ))
        return records


@dataclass
class CapturedBatch:
    """One forward pass's activations (numpy, storage dtype) and what its records need besides."""

    capture: Capture
    batch: PromptBatch
    tokens: torch.Tensor
    mask: torch.Tensor
    n_prompt: torch.Tensor
    host: dict[str, np.ndarray]
    logits: torch.Tensor | None
    token_text: TokenText
    expected: list[int]  # each prompt's positions: its ids plus the tokens generated after it

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.host.values())

    def build(self) -> list[SequenceRecord]:
        """The batch's records (every real token, never a pad), checked against the attention mask."""
        records = self.capture._assemble(self.batch, self.tokens, self.mask, self.n_prompt, self.host, self.logits,
                                         self.token_text)
        check_positions(self.batch.positions, records, self.mask, self.expected)
        return records
