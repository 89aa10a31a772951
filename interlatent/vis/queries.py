"""Pure query functions over a store, returning pandas DataFrames.

The command-line tools and the dashboard are thin layers over these. Nothing here imports torch or
matplotlib, so the reading commands start fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from interlatent.db import LatentDB
from interlatent.db.columns import token_contains
from interlatent.errors import ConfigError, closest, unknown_name

class _LazyPandas:
    """pandas, imported on first use (it costs most of a reading command's start-up)."""

    def __getattr__(self, name: str) -> Any:
        import pandas

        return getattr(pandas, name)


pd = _LazyPandas()


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
    """Per-channel stats of a layer (when computed), strongest correlation first, with the stored
    explanation of each channel where there is one."""
    name = db.resolve_layer(layer)
    df = db.stats_frame(name)
    if df.empty:
        return df
    explained = db.explanations(name)
    if len(explained):
        text = dict(zip(explained["channel"].astype(int), explained["text"]))
        df["explanation"] = [text.get(int(c)) for c in df["channel"]]
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


SEARCH_COLUMNS = ["layer", "channel", "value", "prompt_index", "position", "token", "context", "label"]


def search(db: LatentDB, *, layer: str | None = None, layer_prefix: str | None = None,
           channel: int | Sequence[int] | None = None, token_like: str | None = None, prompt_like: str | None = None,
           label: Any = None, top: int = 20, window: int = 6) -> pd.DataFrame:
    """The ``top`` highest activations over the chosen layers and channels, with filters.

    Columns: layer, channel, value, prompt_index, position, token, context (the token marked
    ``[[like this]]`` among its neighbours), label.
    """
    rows = search_rows(db, layer=layer, layer_prefix=layer_prefix, channel=channel, token_like=token_like,
                       prompt_like=prompt_like, label=label, top=top, window=window)
    return pd.DataFrame(rows, columns=SEARCH_COLUMNS)


def search_rows(db: LatentDB, *, layer: str | None = None, layer_prefix: str | None = None,
                channel: int | Sequence[int] | None = None, token_like: str | None = None,
                prompt_like: str | None = None, label: Any = None, top: int = 20, window: int = 6,
                use_index: bool = True) -> list[dict]:
    """:func:`search` as a list of row dicts, without pandas (what the command-line tool prints).

    Order: value descending, then prompt index, position, layer (in name order) and channel
    ascending; NaN never ranks. ``token_like`` keeps positions whose token text contains it
    (case-insensitively). A search of a dense layer answers from the store's search index
    (:mod:`interlatent.db.search_index`) when ``top`` is within its depth and, filtered (by
    prompt, label or token), when the index proves no value it dropped could enter the answer
    (:func:`~interlatent.db.search_index.filtered_top`; frequent tokens usually pass); an
    unfiltered one of a sparse layer from its stored top examples when they are deep enough.
    Anything else scans the stored activations of only the sequences the filters leave: those
    holding a matching token come from the token index (:mod:`interlatent.db.token_index`), and
    of those only the matching rows are read. ``use_index=False`` scans without either index (the
    token texts matched over the token list of every sequence the other filters leave, whole
    blocks read): the same rows, slower — the reference the indexed answers are tested against."""
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    layers = select_layers(db, layer, layer_prefix)
    channels = None if channel is None else np.atleast_1d(np.asarray(channel, dtype=np.int64))
    unfiltered = token_like is None and prompt_like is None and label is None
    found: list[tuple[float, int, int, int, int]] = []  # (value, prompt, row, layer number, channel)
    for at, name in enumerate(layers):
        info = db.layer_info(name)
        if channels is not None and (channels.min() < 0 or channels.max() >= info.width):
            raise ConfigError(f"layer {name!r} has channels 0..{info.width - 1}; got {channels.tolist()}")
        if use_index:
            allowed = None if prompt_like is None and label is None else \
                db.matching_prompts(prompt_like=prompt_like, label=label)
            hits = db.index_top(name, top, channels, prompts=allowed, token_like=token_like)
            if hits is not None:
                found += [(float(v), int(p), int(r), at, int(c)) for v, p, r, c in hits.tolist()]
                continue
        if unfiltered and use_index:
            examples = _from_examples(db, name, channels, top)
            if examples is not None:
                found += [(v, p, r, at, c) for v, p, r, c in examples]
                continue
        found += [(v, p, r, at, c) for v, p, r, c in _scan(db, name, channels, token_like, prompt_like, label, top,
                                                           use_index)]
    found.sort(key=_rank_key)
    return _rows_for(db, layers, found[:top], window)


def _rank_key(item: tuple) -> tuple:
    return (-item[0], *item[1:])


def _scan(db: LatentDB, name: str, channels: np.ndarray | None, token_like: str | None, prompt_like: str | None,
          label: Any, top: int, use_index: bool = False) -> list[tuple[float, int, int, int]]:
    """The ``top`` best (value, prompt, row, channel) of one layer by reading its stored blocks (only
    those of the sequences that pass the filters), in the order of :func:`search_rows`. The
    positions whose token matches come from the token index with ``use_index`` (where it is
    current), else from the token lists of every sequence the filters leave."""
    allowed = None
    if prompt_like is not None or label is not None:
        allowed = db.matching_prompts(prompt_like=prompt_like, label=label)
    matches = None
    if token_like is not None:
        if use_index:
            matches = db.token_positions(token_like, allowed)
        if matches is None:
            matches = _token_matches(db, db.prompt_indices(name) if allowed is None else allowed, token_like)
        allowed = sorted(matches)
    if allowed is not None and not allowed:
        return []
    best: list[tuple[float, int, int, int]] = []
    if matches is None:
        blocks = ((p, np.arange(b.shape[0]), b) for p, b in
                  db.iter_sequence_blocks(name, prompt_indices=allowed, channels=channels))
    elif use_index:  # only the matching rows of each block are read
        blocks = ((p, matches[p], sub) for p, sub in db.iter_sequence_rows(name, matches, channels=channels))
    else:
        blocks = ((p, matches[p], b[matches[p]]) for p, b in
                  db.iter_sequence_blocks(name, prompt_indices=allowed, channels=channels))
    for part in _chunks(blocks):  # a few thousand rows at a time
        prompts = np.concatenate([np.full(len(rows), pidx, np.int64) for pidx, rows, _ in part])
        rows = np.concatenate([rows for _, rows, _ in part])
        sub = np.concatenate([block for _, _, block in part])
        r, c = np.nonzero(~np.isnan(sub))
        vals = sub[r, c]
        if vals.size > top:  # every entry tied with the top-th value stays a candidate
            keep = vals >= np.partition(vals, vals.size - top)[vals.size - top]
            r, c, vals = r[keep], c[keep], vals[keep]
        chans = channels[c] if channels is not None else c
        best += [(v, p, rr, ch) for v, p, rr, ch in
                 zip(vals.tolist(), prompts[r].tolist(), rows[r].tolist(), chans.tolist())]
        if len(best) > 4 * top:
            best.sort(key=_rank_key)
            del best[top:]
    best.sort(key=_rank_key)
    return best[:top]


def _chunks(blocks: Iterable[tuple[int, np.ndarray, np.ndarray]], rows: int = 8192
            ) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
    """Lists of ``(prompt, rows, block)`` from ``blocks`` holding about ``rows`` rows each."""
    part: list[tuple[int, np.ndarray, np.ndarray]] = []
    held = 0
    for item in blocks:
        part.append(item)
        held += item[2].shape[0]
        if held >= rows:
            yield part
            part, held = [], 0
    if part:
        yield part


def _token_matches(db: LatentDB, prompts: list[int], token_like: str) -> dict[int, np.ndarray]:
    """``prompt_index -> rows`` whose token contains ``token_like`` (case-insensitively), from the
    token lists of ``prompts``."""
    matches = {p: np.flatnonzero(token_contains(toks, token_like)).astype(np.int64)
               for p, (_, toks, _) in db.token_lists(prompts, token_like).items()}
    return {p: m for p, m in matches.items() if m.size}


def _from_examples(db: LatentDB, name: str, channels: np.ndarray | None, top: int
                   ) -> list[tuple[float, int, int, int]] | None:
    """Answer an unfiltered search from the stored top examples when they are deep enough: every
    global top-N activation is among its own channel's top N. None where they are not."""
    rows = db.latent_example_rows(name)
    if not rows:
        return None
    if channels is not None:
        wanted = set(channels.tolist())
        rows = [r for r in rows if r[0] in wanted]
    depth: dict[int, int] = {}
    for ch, *_ in rows:
        depth[ch] = depth.get(ch, 0) + 1
    if not depth or min(depth.values()) < min(top, max(depth.values())):
        return None
    chosen = sorted(rows, key=lambda r: (-r[4], r[2], r[3], r[0]))[:top]
    positions = db.token_lists(sorted({r[2] for r in chosen}))
    return [(float(value), int(pidx), int(np.searchsorted(positions[pidx][0], pos)), int(ch))
            for ch, _rank, pidx, pos, value in chosen]


def _rows_for(db: LatentDB, layers: list[str], best: list[tuple], window: int) -> list[dict]:
    if not best:
        return []
    tokens = db.token_lists(sorted({b[1] for b in best}))
    rows = []
    for value, pidx, row, at, ch in best:
        positions, words, label = tokens[pidx]
        words = [w or "" for w in words]
        rows.append({"layer": layers[at], "channel": ch, "value": value, "prompt_index": pidx,
                     "position": int(positions[row]), "token": words[row], "context": _token_context(words, row, window),
                     "label": label})
    return rows


def examples_table(db: LatentDB, layer: str, *, channel: int | Sequence[int] | None = None, top: int = 10
                   ) -> pd.DataFrame:
    """Each channel's ``top`` highest activations: channel, rank, prompt_index, position, token, value
    — the stored top examples of a latent layer where backfill wrote them, else the search index,
    else (``top`` beyond its depth, or a read-only store without one) a scan, in the order of
    :func:`search_rows`."""
    if top < 1:
        raise ConfigError(f"top must be >= 1, got {top}")
    name = db.resolve_layer(layer)
    info = db.layer_info(name)
    channels = None if channel is None else np.atleast_1d(np.asarray(channel, dtype=np.int64))
    if channels is not None and (channels.min() < 0 or channels.max() >= info.width):
        raise ConfigError(f"layer {name!r} has channels 0..{info.width - 1}; got {channels.tolist()}")
    rows = db.latent_example_rows(name, top=top) or db.index_examples(name, top, scan=True) or []
    if channels is not None:
        wanted = set(channels.tolist())
        rows = [r for r in rows if r[0] in wanted]
    tokens = db.token_lists(sorted({r[2] for r in rows}))
    out = []
    for c, rank, pidx, pos, value in rows:
        positions, words, _ = tokens[pidx]
        out.append({"channel": c, "rank": rank, "prompt_index": pidx, "position": pos,
                    "token": words[int(np.searchsorted(positions, pos))], "value": value})
    return pd.DataFrame(out, columns=["channel", "rank", "prompt_index", "position", "token", "value"])


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
        if not prompts and lab is not None and db.sequences(label=lab).empty:
            raise _unknown_label(db, lab, g)
        s = ss = None
        n = 0
        for _, block in db.iter_sequence_blocks(name, prompt_indices=prompts, channels=channels):
            b64 = block.astype(np.float64)
            with np.errstate(invalid="ignore", over="ignore"):  # +inf and -inf in one channel sum to NaN
                s = b64.sum(0) if s is None else s + b64.sum(0)
                ss = (b64 * b64).sum(0) if ss is None else ss + (b64 * b64).sum(0)
            n += block.shape[0]
        groups[g] = (s, ss, n, len(prompts))
    (sa, ssa, na, _), (sb, ssb, nb, _) = groups["a"], groups["b"]
    chans = np.arange(db.layer_info(name).width) if channels is None else np.asarray(channels)
    if na == 0 or nb == 0:
        return pd.DataFrame(columns=["channel", "mean_a", "mean_b", "diff", "pooled_std", "std_diff", "n_a", "n_b"])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # an inf activation: NaN, not a warning
        ma, mb = sa / na, sb / nb
        va = np.maximum(ssa / na - ma**2, 0) * na / max(na - 1, 1)
        vb = np.maximum(ssb / nb - mb**2, 0) * nb / max(nb - 1, 1)
        pooled = np.sqrt(((na - 1) * va + (nb - 1) * vb) / max(na + nb - 2, 1))
        d = np.where(pooled > 0, (ma - mb) / pooled, np.where(np.isnan(pooled), np.nan, 0.0))
    df = pd.DataFrame({"channel": chans, "mean_a": ma, "mean_b": mb, "diff": ma - mb, "pooled_std": pooled,
                       "std_diff": d, "n_a": na, "n_b": nb})
    df = df.reindex(df["std_diff"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return df.head(top) if top else df


def _unknown_label(db: LatentDB, label: Any, group: str) -> ConfigError:
    """A label no stored prompt has: an error naming the labels there are, closest first."""
    known = sorted({str(v) for v in db.sequences()["label"].dropna()})
    ranked = closest(str(label), known, n=len(known))
    ranked += [k for k in known if k not in ranked]
    shown = ", ".join(repr(k) for k in ranked[:12]) + (" …" if len(ranked) > 12 else "")
    where = f"the labels stored are {shown} (closest first)" if known else "no stored prompt has a label"
    return ConfigError(f"unknown label {label!r} for group {group.upper()}: {where}; give one of them as "
                       f"--label-{group}, or select the group with --prompt-like-{group}")


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows ready for strict JSON, as the commands print them: numpy scalars made plain, non-finite
    numbers None, infinities named in a ``"nonfinite"`` entry of their row."""
    from interlatent.vis._cli import json_records

    return json_records(df)
