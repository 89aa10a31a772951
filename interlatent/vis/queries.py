"""Pure query functions over a store, returning pandas DataFrames.

The command-line tools and the dashboard are thin layers over these. Nothing here imports torch or
matplotlib, so the reading commands start fast.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from interlatent.db import LatentDB
from interlatent.errors import ConfigError, unknown_name

MARK_LEFT, MARK_RIGHT = "[[", "]]"


def select_layers(db: LatentDB, layer: str | None = None, layer_prefix: str | None = None) -> list[str]:
    """Layers named by ``layer`` (resolved, with close-name suggestions) or all with ``layer_prefix``."""
    if layer is not None:
        return [db.resolve_layer(layer)]
    names = db.layers(prefix=layer_prefix)
    if not names:
        raise unknown_name("layer prefix", layer_prefix or "", db.layers(), hint="db.layers() lists what is stored")
    return names


# ---------------------------------------------------------------------------- summary
def runs_table(db: LatentDB) -> pd.DataFrame:
    df = db.runs()
    return df[["run_id", "kind", "model", "status", "created_at", "finished_at", "error"]]


def layers_table(db: LatentDB, layer_prefix: str | None = None) -> pd.DataFrame:
    return db.layer_table(prefix=layer_prefix)


def artifacts_table(db: LatentDB) -> pd.DataFrame:
    """Artifacts with their headline evaluation metrics as columns."""
    df = db.artifacts()
    keys = ("fvu", "explained_variance", "l0", "dead_fraction", "accuracy", "baseline_accuracy", "r2", "steps")
    for key in keys:
        values = df["metrics"].map(lambda m, key=key: m.get(key) if isinstance(m, dict) else None)
        if values.notna().any():
            df[key] = values
    return df.drop(columns=["config", "metrics"])


def stats_table(db: LatentDB, layer: str, top: int | None = None) -> pd.DataFrame:
    """Per-channel stats of a layer (when computed), strongest correlation first."""
    df = db.stats_frame(db.resolve_layer(layer))
    if df.empty:
        return df
    df = df.reindex(df["top_r"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return df.head(top) if top else df


def counts(db: LatentDB) -> dict[str, int]:
    seqs = db.sequences()
    return {"runs": len(db.runs()), "sequences": len(seqs), "tokens": int(seqs["n_positions"].sum()) if len(seqs) else 0,
            "layers": len(db.layers()), "artifacts": len(db.artifacts())}


# ---------------------------------------------------------------------------- search
def _token_context(tokens: list[str], pos: int, window: int) -> str:
    left = "".join(tokens[max(0, pos - window) : pos])
    right = "".join(tokens[pos + 1 : pos + 1 + window])
    return f"{left}{MARK_LEFT}{tokens[pos]}{MARK_RIGHT}{right}"


def search(db: LatentDB, *, layer: str | None = None, layer_prefix: str | None = None,
           channel: int | Sequence[int] | None = None, token_like: str | None = None, prompt_like: str | None = None,
           label: Any = None, top: int = 20, window: int = 6) -> pd.DataFrame:
    """The ``top`` highest activations over the chosen layers and channels, with filters.

    Columns: layer, channel, value, prompt_index, position, token, context (the token marked
    ``[[like this]]`` among its neighbours), label.
    """
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    layers = select_layers(db, layer, layer_prefix)
    channels = None if channel is None else np.atleast_1d(np.asarray(channel, dtype=np.int64))
    unfiltered = token_like is None and prompt_like is None and label is None
    best: list[tuple[Any, ...]] = []  # (value, tiebreak, layer, channel, prompt, row or position, is_row)
    counter = 0
    for name in layers:
        info = db.layer_info(name)
        if channels is not None and (channels.min() < 0 or channels.max() >= info.width):
            raise ConfigError(f"layer {name!r} has channels 0..{info.width - 1}; got {channels.tolist()}")
        examples = db.latent_examples(name) if unfiltered else None
        if examples is not None and len(examples):
            if channels is not None:
                examples = examples[examples["channel"].isin(channels)]
            # every global top-N entry is in its channel's stored top-N, when enough are stored
            per_channel = examples.groupby("channel").size()
            if len(per_channel) and per_channel.min() >= min(top, per_channel.max()):
                for row in examples.nlargest(top, "value").itertuples():
                    counter += 1
                    item = (float(row.value), -counter, name, int(row.channel), int(row.prompt_index),
                            int(row.position), False)
                    _push(best, item, top)
                continue
        allowed = None
        if prompt_like is not None or label is not None:
            allowed = db.sequences(prompt_like=prompt_like, label=label)["prompt_index"].tolist()
        token_rows = None
        if token_like is not None:
            toks = db.tokens(token_like=token_like, metrics=False, prompt_index=allowed)
            token_rows = {}
            for p, pos in zip(toks["prompt_index"], toks["position"]):
                token_rows.setdefault(int(p), set()).add(int(pos))
            allowed = sorted(token_rows)
        if allowed is not None and not allowed:
            continue
        for pidx, block in db.iter_sequence_blocks(name, prompt_indices=allowed, channels=channels):
            if token_rows is not None:
                positions = db.tokens(prompt_index=pidx, metrics=False)["position"].to_numpy()
                rows = np.flatnonzero(np.isin(positions, list(token_rows[pidx])))
                if rows.size == 0:
                    continue
                sub = block[rows]
            else:
                rows = np.arange(block.shape[0])
                sub = block
            flat = sub.reshape(-1)
            k = min(top, flat.size)
            idx = np.argpartition(-flat, k - 1)[:k]
            for j in idx:
                r, c = divmod(int(j), sub.shape[1])
                counter += 1
                ch = int(channels[c]) if channels is not None else c
                _push(best, (float(flat[j]), -counter, name, ch, int(pidx), int(rows[r]), True), top)
    best.sort(reverse=True)
    return _search_frame(db, best, window)


def _push(heap: list, item: tuple, top: int) -> None:
    if len(heap) < top:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _search_frame(db: LatentDB, best: list[tuple], window: int) -> pd.DataFrame:
    cols = ["layer", "channel", "value", "prompt_index", "position", "token", "context", "label"]
    if not best:
        return pd.DataFrame(columns=cols)
    prompts = sorted({b[4] for b in best})
    toks = db.tokens(prompt_index=prompts, metrics=False)
    by_prompt = {p: g for p, g in toks.groupby("prompt_index")}
    rows = []
    for value, _, layer, ch, pidx, index, is_row in best:
        g = by_prompt[pidx]
        positions = g["position"].to_numpy()
        words = g["token"].fillna("").tolist()
        # a scan of stored blocks gives a row index; stored latent examples give the position
        row = index if is_row else int(np.searchsorted(positions, index))
        rows.append({"layer": layer, "channel": ch, "value": value, "prompt_index": pidx,
                     "position": int(positions[row]), "token": words[row], "context": _token_context(words, row, window),
                     "label": g["label"].iloc[0]})
    return pd.DataFrame(rows, columns=cols)


# ---------------------------------------------------------------------------- traces
def trace(db: LatentDB, layer: str, prompt_index: int, channels: Sequence[int]) -> pd.DataFrame:
    """Per-token values of ``channels`` over one prompt: position, token, then one column per channel."""
    acts = db.fetch_activations(layer, prompt_index=prompt_index, channels=list(channels), metrics=False)
    if acts.values.shape[0] == 0:
        raise ConfigError(f"prompt {prompt_index} has no activations in {db.resolve_layer(layer)!r}; prompts stored: "
                          f"{db.prompt_indices(layer)[:10]}...")
    df = acts.tokens[["position", "token"]].copy()
    for j, c in enumerate(acts.channels):
        df[f"ch{int(c)}"] = acts.values[:, j]
    return df


# ---------------------------------------------------------------------------- group differences
def diff(db: LatentDB, layer: str, *, channels: Sequence[int] | None = None, prompt_like_a: str | None = None,
         prompt_like_b: str | None = None, label_a: Any = None, label_b: Any = None, top: int | None = None) -> pd.DataFrame:
    """Mean activation per channel in group A vs group B of prompts, with effect sizes.

    Columns: channel, mean_a, mean_b, diff (a - b), pooled_std, std_diff (Cohen's d), n_a, n_b —
    sorted by |std_diff|.
    """
    if prompt_like_a is None and label_a is None:
        raise ConfigError("group A is empty: give prompt_like_a or label_a")
    if prompt_like_b is None and label_b is None:
        raise ConfigError("group B is empty: give prompt_like_b or label_b")
    name = db.resolve_layer(layer)
    groups = {}
    for g, like, lab in (("a", prompt_like_a, label_a), ("b", prompt_like_b, label_b)):
        prompts = db.sequences(prompt_like=like, label=lab)["prompt_index"].tolist()
        s = ss = None
        n = 0
        for _, block in db.iter_sequence_blocks(name, prompt_indices=prompts, channels=channels):
            b64 = block.astype(np.float64)
            s = b64.sum(0) if s is None else s + b64.sum(0)
            ss = (b64 * b64).sum(0) if ss is None else ss + (b64 * b64).sum(0)
            n += block.shape[0]
        groups[g] = (s, ss, n, len(prompts))
    (sa, ssa, na, _), (sb, ssb, nb, _) = groups["a"], groups["b"]
    chans = np.arange(db.layer_info(name).width) if channels is None else np.asarray(channels)
    if na == 0 or nb == 0:
        return pd.DataFrame(columns=["channel", "mean_a", "mean_b", "diff", "pooled_std", "std_diff", "n_a", "n_b"])
    ma, mb = sa / na, sb / nb
    va = np.maximum(ssa / na - ma**2, 0) * na / max(na - 1, 1)
    vb = np.maximum(ssb / nb - mb**2, 0) * nb / max(nb - 1, 1)
    pooled = np.sqrt(((na - 1) * va + (nb - 1) * vb) / max(na + nb - 2, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, (ma - mb) / pooled, 0.0)
    df = pd.DataFrame({"channel": chans, "mean_a": ma, "mean_b": mb, "diff": ma - mb, "pooled_std": pooled,
                       "std_diff": d, "n_a": na, "n_b": nb})
    df = df.reindex(df["std_diff"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return df.head(top) if top else df


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows (numpy scalars and NaN made plain)."""
    return json.loads(df.to_json(orient="records"))
