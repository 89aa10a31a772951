"""Datasets over the store for training: activation vectors, (input, output) pairs, probe targets.

``ActivationVectorDataset`` and ``ActivationPairDataset`` stream shuffled chunks (they never need a
layer in memory); ``LinearProbeDataset`` materialises features and targets, token-level or pooled per
prompt, with each row's prompt index kept so splits can be made by prompt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from interlatent.db import LatentDB
from interlatent.errors import ConfigError, NotEnoughDataError

log = logging.getLogger(__name__)

POOLS = (None, "mean", "last")


class ActivationVectorDataset(IterableDataset):
    """Chunks ``[<=chunk_size, width]`` of one layer, shuffled with a seed (new order each epoch)."""

    def __init__(self, db: LatentDB, layer: str, *, chunk_size: int = 4096, shuffle: bool = True, seed: int = 0,
                 prompt_indices: Sequence[int] | None = None) -> None:
        self.db, self.layer = db, db.resolve_layer(layer)
        self.chunk_size, self.shuffle, self.seed = chunk_size, shuffle, seed
        self.prompt_indices = prompt_indices
        self.epoch = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        seed = self.seed + self.epoch
        self.epoch += 1
        for values in self.db.iter_activations(self.layer, chunk_size=self.chunk_size, shuffle=self.shuffle,
                                               seed=seed, prompt_indices=self.prompt_indices):
            yield torch.from_numpy(values)

    def __len__(self) -> int:
        return self.db.n_tokens(self.layer)


class ActivationPairDataset(IterableDataset):
    """Aligned chunks ``(x [n, d_in], y [n, d_out])`` of two layers stored for the same tokens."""

    def __init__(self, db: LatentDB, in_layer: str, out_layer: str, *, chunk_size: int = 4096,
                 shuffle: bool = True, seed: int = 0, prompt_indices: Sequence[int] | None = None) -> None:
        self.db = db
        self.layers = [db.resolve_layer(in_layer), db.resolve_layer(out_layer)]
        self.chunk_size, self.shuffle, self.seed = chunk_size, shuffle, seed
        self.prompt_indices = prompt_indices
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = self.seed + self.epoch
        self.epoch += 1
        for (x, y), _ in self.db.iter_activation_chunks(self.layers, chunk_size=self.chunk_size, shuffle=self.shuffle,
                                                        seed=seed, prompt_indices=self.prompt_indices):
            yield torch.from_numpy(x), torch.from_numpy(y)


@dataclass
class ProbeData:
    """Features ``x [n, d]``, targets ``y [n]``, and each row's prompt index (for splits)."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    classes: list[Any] | None  # classification: the original value of each class index
    dropped_nonfinite: int = 0  # rows left out because their features (or regression target) hold NaN or inf


class LinearProbeDataset:
    """Probe features from a layer and a target, per token or pooled per prompt.

    Args:
        target_key: ``"label"`` / ``"prompt_label"`` (the prompt's label; string labels by their stored
            class ids), a per-token metric name, or a key of the prompt context.
        pool: None (one row per token), ``"mean"`` or ``"last"`` (one row per prompt; a per-token
            target is pooled the same way).
        task: ``"classification"`` or ``"regression"``.
    """

    def __init__(self, db: LatentDB, layer: str, target_key: str, *, pool: str | None = None,
                 task: str = "classification", prompt_indices: Sequence[int] | None = None) -> None:
        if pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {pool!r}")
        if task not in ("classification", "regression"):
            raise ConfigError(f"task must be 'classification' or 'regression', got {task!r}")
        self.db, self.layer, self.target_key, self.pool, self.task = db, db.resolve_layer(layer), target_key, pool, task
        self.prompt_indices = prompt_indices

    def _sequence_targets(self) -> dict[int, Any] | None:
        seqs = self.db.sequences()
        key = self.target_key
        if key in ("label", "prompt_label"):  # the labels as given (JSON), never their class ids
            return dict(zip(seqs["prompt_index"], seqs["label"]))
        if key.startswith("prompt_") and key not in self.db.metric_names():
            key = key[len("prompt_"):]
        if any(key in c for c in seqs["context"]):
            return {p: c.get(key) for p, c in zip(seqs["prompt_index"], seqs["context"])}
        return None

    def prompt_level(self) -> bool:
        """True when the target has one value per prompt: the prompt label, a prompt-context key,
        or a token metric that is constant within every prompt."""
        if self._sequence_targets() is not None:
            return True
        if self.target_key not in self.db.metric_names():
            return False
        tokens = self.db.tokens(prompt_index=self.prompt_indices)
        return bool((tokens.groupby("prompt_index")[self.target_key].nunique(dropna=True) <= 1).all())

    def load(self) -> ProbeData:
        seq_targets = self._sequence_targets()
        metric = None if seq_targets is not None else self.target_key
        if metric is not None and metric not in self.db.metric_names():
            ctx_keys = sorted({k for c in self.db.sequences()["context"] for k in c})
            raise ConfigError(f"unknown target {self.target_key!r}: not 'label', a token metric "
                              f"{self.db.metric_names()} or a context key {ctx_keys}")
        xs, ys, gs = [], [], []
        tokens = self.db.tokens(prompt_index=self.prompt_indices) if metric else None
        by_prompt = dict(tuple(tokens.groupby("prompt_index"))) if metric else {}
        for index, block in self.db.iter_sequence_blocks(self.layer, prompt_indices=self.prompt_indices):
            if metric:
                y_tok = by_prompt[index][metric].to_numpy(dtype=np.float64)
            else:
                y_tok = np.full(block.shape[0], np.nan, dtype=object)
                y_tok[:] = [seq_targets.get(index)] * block.shape[0]
            if self.pool is None:
                xs.append(block)
                ys.append(y_tok)
                gs.append(np.full(block.shape[0], index))
            else:
                xs.append(block.mean(0, keepdims=True) if self.pool == "mean" else block[-1:])
                y = y_tok[-1] if (self.pool == "last" or not metric) else np.nanmean(y_tok)
                ys.append(np.array([y], dtype=object))
                gs.append(np.array([index]))
        if not xs:
            raise NotEnoughDataError(f"no activations stored for {self.layer!r}")
        x = np.concatenate(xs).astype(np.float32)
        y_raw = np.concatenate(ys)
        groups = np.concatenate(gs)
        keep = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in y_raw])
        x, y_raw, groups = x[keep], y_raw[keep], groups[keep]
        if len(y_raw) == 0:
            raise NotEnoughDataError(f"target {self.target_key!r} is undefined for every row")
        finite = np.isfinite(x).all(axis=1)
        y_num = None
        if self.task == "regression":
            try:
                y_num = y_raw.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"target {self.target_key!r} is not numeric; use task='classification'") from exc
            finite &= np.isfinite(y_num)
        dropped = int((~finite).sum())
        note = ""
        if dropped:
            bad_prompts = sorted(int(p) for p in np.unique(groups[~finite]))
            note = (f" ({dropped} of {len(finite)} rows were dropped for NaN or inf features"
                    f"{' or targets' if y_num is not None else ''}, in prompts {bad_prompts[:20]}"
                    f"{' …' if len(bad_prompts) > 20 else ''})")
            log.warning("probe on %r -> %r: dropped %d of %d rows with non-finite features%s (prompts %s)",
                        self.layer, self.target_key, dropped, len(finite), " or targets" if y_num is not None else "",
                        bad_prompts[:20])
            x, y_raw, groups = x[finite], y_raw[finite], groups[finite]
            y_num = None if y_num is None else y_num[finite]
            if len(y_raw) < 2:
                raise NotEnoughDataError(f"{len(y_raw)} probe row(s) of {self.layer!r} left after dropping the "
                                         f"non-finite ones{note}; a held-out score needs at least 2")
        if y_num is not None:
            return ProbeData(x, y_num, groups, None, dropped)
        keys = [class_key(v) for v in y_raw.tolist()]
        shown: dict[tuple[int, Any], Any] = {}
        for key, value in zip(keys, y_raw.tolist()):
            shown.setdefault(key, value.item() if isinstance(value, np.generic) else value)
        order = sorted(shown)
        classes = [shown[k] for k in order]
        if len(classes) < 2:
            raise NotEnoughDataError(f"target {self.target_key!r} has a single class ({classes[0]!r}): a classifier "
                                     f"needs at least two{note}")
        lookup = {k: i for i, k in enumerate(order)}
        return ProbeData(x, np.array([lookup[k] for k in keys], dtype=np.int64), groups, classes, dropped)


def class_key(value: Any) -> tuple[int, Any]:
    """A class's identity by JSON type and value: ``True``, ``1`` and ``"1"`` are three classes
    (Python's ``True == 1`` would merge the first two); ``1`` and ``1.0`` are one JSON number."""
    if isinstance(value, (bool, np.bool_)):
        return 0, bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return 1, float(value)
    if isinstance(value, str):
        return 2, value
    return 3, json.dumps(value, sort_keys=True, default=str)
