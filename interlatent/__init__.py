"""Interlatent: log, label, compress, visualize and intervene on model activations.

Heavy parts (torch, TransformerLens) load lazily, so ``from interlatent import LatentDB`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LatentDB": "interlatent.db",
    "SequenceRecord": "interlatent.db",
    "SparseActs": "interlatent.db",
    "LLMCollector": "interlatent.llm",
    "GymCollector": "interlatent.gym",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interlatent' has no attribute {name!r}")
