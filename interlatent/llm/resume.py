"""Resuming an interrupted collection: find the run to continue and check it collected the same thing.

``LLMCollector.run(..., resume=True)`` looks for the latest interrupted ``llm`` run of the store
(a run whose process was killed is marked interrupted when the store is opened writable) whose
config matches this collection on everything that decides what is stored: the model, the hook
points, the storage dtype and channels, generation, metrics and the prompt list itself (its count
and a SHA-256 of the texts). Batch size and the background writer may differ. Stored prompts are
then skipped without a forward pass, the rest are collected into a new run, and the interrupted
run is marked ``resumed`` (its data is whole again).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from interlatent.db import LatentDB
from interlatent.errors import ResumeError

#: config entries that must agree between the interrupted run and its resumption
RESUME_KEYS = ("hook_points", "dtype", "max_channels", "max_new_tokens", "temperature", "metrics", "backend",
               "n_blocks", "n_prompts", "prompts_sha256")


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of the prompt list (texts in order, length-prefixed so no two lists collide)."""
    h = hashlib.sha256()
    for text in prompts:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _differences(model: str, config: dict[str, Any], run_model: Any, run_config: dict[str, Any]) -> list[str]:
    diffs = [] if run_model == model else [f"model {run_model!r} (now {model!r})"]
    for key in RESUME_KEYS:
        if key in run_config and run_config[key] != config.get(key):
            shown = "another prompt list" if key == "prompts_sha256" else f"{run_config[key]!r} (now {config.get(key)!r})"
            diffs.append(f"{key} {shown}" if key != "prompts_sha256" else shown)
    return diffs


def find_resumable(db: LatentDB, model: str, config: dict[str, Any]) -> int:
    """The id of the latest interrupted ``llm`` run collected with this ``model`` and ``config``.

    Raises :class:`~interlatent.errors.ResumeError` when the store holds no interrupted collection,
    or when none matches (the message names what differs in the latest one)."""
    runs = db.runs()
    gone = (runs["status"] == "interrupted") | ((runs["status"] == "running") & runs["stale"])  # stale: killed
    candidates = runs[(runs["kind"] == "llm") & gone].sort_values("run_id")
    if candidates.empty:
        live = runs[(runs["kind"] == "llm") & (runs["status"] == "running") & ~runs["stale"]]
        more = (f"; runs {live['run_id'].tolist()} are still running in a live process, so they are not "
                "interrupted" if not live.empty else "")
        raise ResumeError(f"resume=True: {str(db.path)!r} holds no interrupted collection to resume{more}; "
                          "run without resume=True to collect from the start")
    latest_diffs: list[str] = []
    for row in reversed(list(candidates.itertuples())):
        diffs = _differences(model, config, row.model, row.config)
        if not diffs:
            return int(row.run_id)
        if not latest_diffs:
            latest_diffs = [f"run {int(row.run_id)} collected {', '.join(diffs)}"]
    raise ResumeError(f"resume=True: no interrupted collection in {str(db.path)!r} matches this one; "
                      f"{latest_diffs[0]}. Resume with the same model, points, dtype and prompts, or run "
                      "without resume=True (stored prompts are still skipped, see duplicates=)")
