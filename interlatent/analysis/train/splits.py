"""Held-out splits by prompt and the artifact folders of trained dictionaries and probes.

Splits never put tokens of one prompt, nor copies of one text (nor one ``split_key`` group), on
both sides. Artifact folders are created fresh (never written into an existing one) and the weights'
sha256 is recorded, so a swapped file is caught on load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interlatent.analysis.models import (
    WEIGHTS_NAME,
)
from interlatent.db import LatentDB
from interlatent.errors import (
    ConfigError,
    ReadOnlyError,
)

log = logging.getLogger(__name__)


def split_prompts(indices: Sequence[Any], val_fraction: float, seed: int,
                  groups: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """A seeded split of prompt indices (or any ids, e.g. dilemma ids) into train and held-out (at least one each when possible).

    ``groups`` (one sortable label per index, e.g. from :func:`split_groups`) keeps prompts with
    one label on one side; the fraction then counts groups. Without it every prompt is its own group.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    units: dict[Any, list[int]] = {}
    for label, index in sorted(zip(indices if groups is None else groups, indices)):
        units.setdefault(label, []).append(index)
    members = list(units.values())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(members))
    n_val = int(round(len(members) * val_fraction))
    if val_fraction > 0 and len(members) >= 2:
        n_val = min(max(n_val, 1), len(members) - 1)
    val = sorted(i for u in order[:n_val] for i in members[u])
    train = sorted(i for u in order[n_val:] for i in members[u])
    return train, val


def split_groups(db: LatentDB, indices: list[int], split_key: str | None = None) -> list[Any]:
    """One label per prompt of ``indices`` such that prompts with the same text (a store may hold
    a text several times) share a label, and with ``split_key`` so do prompts with the same value
    of that context key. A group's label is the smallest of its members' own labels (the prompt
    index, or ``str`` of the ``split_key`` value), so without duplicates nothing is merged."""
    seqs = db.sequences()
    text_of = dict(zip(seqs["prompt_index"], seqs["text"]))
    own: dict[int, Any] = ({p: p for p in indices} if split_key is None else
                           {p: str(c.get(split_key)) for p, c in zip(seqs["prompt_index"], seqs["context"])})
    parent = {p: p for p in indices}

    def find(p: int) -> int:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    first: dict[Any, int] = {}
    for p in indices:
        for key in (("text", text_of.get(p)), ("group", own.get(p, p)) if split_key is not None else None):
            if key is None or key[1] is None or key[1] != key[1]:  # no text (a Gym episode): its own group
                continue
            if key in first:
                parent[find(p)] = find(first[key])
            else:
                first[key] = p
    label: dict[int, Any] = {}
    for p in indices:
        root = find(p)
        mine = own.get(p, p)
        label[root] = mine if root not in label else min(label[root], mine)
    return [label[find(p)] for p in indices]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def artifact_parent(db: LatentDB, out_dir: str | Path | None) -> Path:
    """The folder artifact folders go into: ``out_dir``, else ``{db}_artifacts/`` next to the store."""
    return Path(out_dir) if out_dir is not None else db.path.parent / f"{db.path.stem}_artifacts"


def require_artifact_writable(db: LatentDB, parent: Path, what: str, fix: str) -> None:
    """Refuse, before any training, work whose artifact could not be recorded: a store opened
    read-only, or an artifact folder that cannot be created. Raises :class:`ReadOnlyError`."""
    if db.mode != "rw":
        raise ReadOnlyError(f"{what} records its artifact in the store, but {db!r} was opened read-only; open it "
                            f"with mode='rw' to train and record, {fix}")
    existing = parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ReadOnlyError(f"{what} writes its artifact under {str(parent)!r}, but {str(existing)!r} is not a "
                            f"writable folder; pass out_dir= a writable folder, {fix}")


def new_artifact_folder(parent: Path, stem: str, first: int) -> Path:
    """Create and return a fresh folder ``{n:03d}_{stem}`` under ``parent``, ``n`` counting up from
    ``first``. The folder is made with one ``mkdir`` that fails if it exists, so an artifact never
    lands in a folder another store, or another process training into this one, already made."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise ReadOnlyError(f"cannot create the artifact folder {str(parent)!r} ({exc}); pass out_dir= a "
                            "writable folder") from exc
    n = first
    while True:
        path = parent / f"{n:03d}_{stem}"
        try:
            path.mkdir()
        except FileExistsError:
            n += 1
            continue
        except PermissionError as exc:
            raise ReadOnlyError(f"cannot create the artifact folder {str(path)!r} ({exc}); pass out_dir= a "
                                "writable folder") from exc
        return path


def weights_sha256(folder: str | Path) -> str:
    """The sha256 of a saved module's weights file, recorded with its artifact (``config["weights_sha256"]``)."""
    digest = hashlib.sha256()
    with (Path(folder) / WEIGHTS_NAME).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
