"""Labelled prompts: ``PromptExample`` and ``PromptDataset``.

String labels map to stable integer class ids: the sorted label names, numbered from 0 — the same
in every process (never Python's salted ``hash``). The collector stores the names with their ids.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from interlatent.errors import ConfigError, NotEnoughDataError


class PromptExample:
    """One prompt: its text, an optional label, and any other metadata as keyword arguments."""

    __slots__ = ("label", "meta", "text")

    def __init__(self, text: str, label: Any = None, **meta: Any) -> None:
        if not isinstance(text, str):
            raise ConfigError(f"PromptExample text must be a str, got {type(text).__name__}")
        self.text = text
        self.label = label
        self.meta = meta

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.meta.items())
        return f"PromptExample({self.text!r}, label={self.label!r}{extra})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PromptExample) and (self.text, self.label, self.meta)
                == (other.text, other.label, other.meta))


class PromptDataset(Sequence[PromptExample]):
    """A list of :class:`PromptExample` with the helpers the collector takes."""

    def __init__(self, examples: Iterable[PromptExample]) -> None:
        self.examples = list(examples)
        for i, ex in enumerate(self.examples):
            if not isinstance(ex, PromptExample):
                raise ConfigError(f"item {i} is a {type(ex).__name__}; expected PromptExample")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_pairs(cls, texts: Sequence[str], labels: Sequence[Any] | None = None) -> PromptDataset:
        """From parallel lists of texts and labels (labels may be None)."""
        texts = list(texts)
        if labels is None:
            labels = [None] * len(texts)
        labels = list(labels)
        if len(labels) != len(texts):
            raise ConfigError(f"from_pairs got {len(texts)} texts but {len(labels)} labels")
        return cls(PromptExample(t, label=lb) for t, lb in zip(texts, labels))

    @classmethod
    def from_csv(cls, path: str | Path, text_col: str = "text", label_col: str | None = "label",
                 **csv_kwargs: Any) -> PromptDataset:
        """From a CSV with a header row; every other column becomes metadata (numbers parsed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no CSV at {str(path)!r}")
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, **csv_kwargs)
            cols = reader.fieldnames or []
            if text_col not in cols:
                raise ConfigError(f"{path.name} has no column {text_col!r}; columns are {cols}")
            if label_col is not None and label_col not in cols:
                raise ConfigError(f"{path.name} has no column {label_col!r}; columns are {cols} "
                                  "(pass label_col=None for unlabelled prompts)")
            examples = []
            for row in reader:
                meta = {k: _parse(v) for k, v in row.items() if k not in (text_col, label_col) and k is not None}
                label = _parse(row[label_col]) if label_col is not None else None
                examples.append(PromptExample(row[text_col], label=label, **meta))
        return cls(examples)

    def to_csv(self, path: str | Path) -> Path:
        """Write text, label and metadata columns (readable back with :meth:`from_csv`)."""
        path = Path(path)
        meta_cols: list[str] = []
        for ex in self.examples:
            meta_cols += [k for k in ex.meta if k not in meta_cols]
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label", *meta_cols])
            for ex in self.examples:
                writer.writerow([ex.text, "" if ex.label is None else ex.label, *[ex.meta.get(k, "") for k in meta_cols]])
        return path

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return PromptDataset(self.examples[i])
        return self.examples[i]

    def __iter__(self) -> Iterator[PromptExample]:
        return iter(self.examples)

    @property
    def texts(self) -> list[str]:
        return [ex.text for ex in self.examples]

    @property
    def labels(self) -> list[Any]:
        return [ex.label for ex in self.examples]

    @property
    def label_classes(self) -> dict[str, int]:
        """Sorted string label names -> class id (0, 1, ...)."""
        names = sorted({lb for lb in self.labels if isinstance(lb, str)})
        return {name: i for i, name in enumerate(names)}

    def label_ids(self) -> list[int | None]:
        classes = self.label_classes
        return [classes.get(lb) if isinstance(lb, str) else None for lb in self.labels]

    def split(self, test_fraction: float = 0.25, seed: int = 0, group: str | None = None
              ) -> tuple[PromptDataset, PromptDataset]:
        """A seeded train/test split; with ``group`` (a metadata key), whole groups go to one side."""
        import numpy as np

        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
        rng = np.random.default_rng(seed)
        keys = [ex.meta.get(group) if group else i for i, ex in enumerate(self.examples)]
        uniq = sorted(set(keys), key=str)
        if len(uniq) < 2:
            raise NotEnoughDataError("need at least two prompts (or groups) to split")
        n_test = max(1, int(round(len(uniq) * test_fraction)))
        test_keys = set(uniq[j] for j in rng.permutation(len(uniq))[:n_test])
        train = [ex for ex, k in zip(self.examples, keys) if k not in test_keys]
        test = [ex for ex, k in zip(self.examples, keys) if k in test_keys]
        return PromptDataset(train), PromptDataset(test)

    # ------------------------------------------------------------------ collector hooks
    def prompt_context_fn(self) -> Callable[[str, int], dict[str, Any]]:
        """``(prompt_text, prompt_idx) -> {"label": ..., "label_id": ..., **meta}`` for the collector."""
        classes = self.label_classes

        def context(text: str, idx: int) -> dict[str, Any]:
            ex = self._example(text, idx)
            out: dict[str, Any] = {"label": ex.label, **ex.meta}
            if isinstance(ex.label, str):
                out["label_id"] = classes[ex.label]
            return out

        return context

    def token_metrics_fn(self, *names: str) -> Callable[[str, int, list[str]], dict[str, float]]:
        """Per-token metrics ``prompt_{name}`` from the prompt's label (``"label"``, as its class id
        for string labels) or numeric metadata fields, the same value on every token."""
        if not names:
            raise ConfigError("token_metrics_fn needs at least one field name, e.g. token_metrics_fn('label')")
        classes = self.label_classes

        def metrics(text: str, idx: int, tokens: list[str]) -> dict[str, float]:
            ex = self._example(text, idx)
            out = {}
            for name in names:
                value = ex.label if name == "label" else ex.meta.get(name)
                if isinstance(value, str):
                    if name != "label":
                        raise ConfigError(f"metadata field {name!r} is text ({value!r}); metrics must be numeric")
                    value = classes[value]
                out[f"prompt_{name}"] = float("nan") if value is None else float(value)
            return out

        return metrics

    def _example(self, text: str, idx: int) -> PromptExample:
        if 0 <= idx < len(self.examples) and self.examples[idx].text == text:
            return self.examples[idx]
        for ex in self.examples:  # the collector was given a reordered or filtered prompt list
            if ex.text == text:
                return ex
        raise ConfigError(f"prompt {idx} ({text[:40]!r}) is not in this PromptDataset; collect ds.texts")


def _parse(value: str | None) -> Any:
    if value is None or value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return value
