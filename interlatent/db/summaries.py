"""Per-channel summaries the store computes from a layer and keeps: statistics and top examples.

:meth:`Summaries.compute_stats` streams each layer once through
:class:`~interlatent.db.stats.MomentAccumulator` (moments, fraction active, and the correlation of
every channel with every metric and label class); :meth:`Summaries.compute_latent_examples` streams
it through :class:`~interlatent.db.topk.TopK`. Both replace what was stored for the layer in one
transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from interlatent.db.catalog import Catalog
from interlatent.db.columns import pd
from interlatent.db.layers import LayerInfo
from interlatent.db.reader import Reader
from interlatent.db.stats import MomentAccumulator, StatBlock, metric_matrix
from interlatent.db.topk import TopExamples, TopK

log = logging.getLogger(__name__)


class ExampleRow(NamedTuple):
    """One stored top example of a channel."""

    channel: int
    rank: int  # 0 = the highest activation
    seq_id: int
    prompt_index: int
    position: int
    value: float


class StatsInputs(NamedTuple):
    """What the statistics of any part of a layer read besides its activations."""

    names: list[str]  # numeric token metrics, in column order
    col_of: dict[int, int]  # metric_id -> column
    label_of: dict[int, int | None]  # seq_id -> label class id
    n_classes: int  # string label classes (one indicator column each)
    metric_labels: list[str]  # every column's name: the metrics, then label==CLASS


class Summaries(Reader, Catalog):
    """The part of :class:`~interlatent.db.store.LatentDB` that computes and reads channel summaries."""

    # ------------------------------------------------------------------ stats
    def compute_stats(self, min_count: int = 5, layers: Sequence[str] | None = None,
                      chunk_tokens: int = 16_384) -> dict[str, int]:
        """Per-channel count, mean, std, min, max, fraction active (> 0) and the Pearson correlation
        of every channel with every numeric token metric, plus one-vs-rest indicators
        ``label==NAME`` of string labels — one streaming pass per layer, stored in the store.

        NaN activations are left out channel by channel (``count`` is the number of values a channel
        used; see :mod:`interlatent.db.stats`), as each correlation leaves out non-finite pairs.
        Channels with fewer than ``min_count`` nonzero values get no statblock (dead latents).
        Returns the number of channels stored per layer.
        """
        self._require_writable()
        inputs = self._stats_inputs()
        done: dict[str, int] = {}
        for layer in (layers or self.layers()):
            info = self.layer_info(layer)
            acc = self._accumulate_stats(info, [row.seq_id for row in self._layer_rows(info)], inputs, chunk_tokens)
            done[info.name] = self._store_stats(info, acc, inputs.metric_labels, min_count)
        return done

    def _stats_inputs(self) -> StatsInputs:
        """What every part of a layer's statistics reads besides its activations."""
        names = self.metric_names()
        classes = list(self.label_classes())
        return StatsInputs(names, {mid: names.index(name) for mid, name in self._q("SELECT metric_id, name FROM metrics")},
                           dict(self._q("SELECT seq_id, label_id FROM sequences")), len(classes),
                           names + [f"label=={c}" for c in classes])

    def _accumulate_stats(self, info: LayerInfo, seq_ids: Sequence[int], inputs: StatsInputs,
                          chunk_tokens: int = 16_384) -> MomentAccumulator:
        """The sums of :meth:`compute_stats` over the layer's rows of ``seq_ids`` (a part of a layer
        gives a part that :meth:`MomentAccumulator.merge` adds up), read ``chunk_tokens`` at a time."""
        acc = MomentAccumulator(info.width, len(inputs.metric_labels))
        lengths = dict(self._q("SELECT seq_id, n_positions FROM activations WHERE layer_id=?", (info.layer_id,)))
        group: list[int] = []
        for i, sid in enumerate(seq_ids):
            group.append(sid)
            if sum(lengths[g] for g in group) >= chunk_tokens or i == len(seq_ids) - 1:
                seq_of = {g: j for j, g in enumerate(group)}
                x = np.concatenate([b for _, b in self._iter_layer_rows(info, group, None)])
                m = metric_matrix([lengths[g] for g in group],
                                  ((seq_of[g], inputs.col_of[mid], np.frombuffer(data, dtype="<f4"))
                                   for g, mid, data in self._metric_blobs(group)),
                                  len(inputs.names), [inputs.label_of.get(g) for g in group], inputs.n_classes)
                acc.update(x, m)
                group = []
        return acc

    def _store_stats(self, info: LayerInfo, acc: MomentAccumulator, metric_labels: list[str], min_count: int) -> int:
        """Replace the layer's stored statistics with ``acc``'s (its metric columns named by
        ``metric_labels``); returns the channels stored."""
        mean, std = acc.moments()
        lo, hi = acc.extremes()
        r, n_metric = acc.correlations()
        keep = np.flatnonzero(acc.nonzero >= min_count)
        with self.atomic() as conn:
            conn.execute("DELETE FROM stats WHERE layer_id=?", (info.layer_id,))
            conn.execute("DELETE FROM correlations WHERE layer_id=?", (info.layer_id,))
            conn.executemany(
                "INSERT INTO stats(layer_id, channel, count, active_count, mean, std, min, max)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(info.layer_id, int(c), int(acc.used[c]), int(acc.active[c]), float(mean[c]), float(std[c]),
                  float(lo[c]), float(hi[c])) for c in keep])
            conn.executemany(
                "INSERT INTO correlations(layer_id, channel, metric, r, n) VALUES (?, ?, ?, ?, ?)",
                [(info.layer_id, int(c), metric_labels[j], float(r[c, j]), int(n_metric[c, j]))
                 for c in keep for j in range(len(metric_labels)) if np.isfinite(r[c, j])])
        log.info("stats for %s: %d of %d channels", info.name, keep.size, info.width)
        return int(keep.size)

    def iter_statblocks(self, layer: str | None = None, *, top: int | None = None) -> Iterator[StatBlock]:
        """Stored per-channel stats (see :meth:`compute_stats`), by layer then channel; each with
        ``top_correlations`` as ``[(metric, r), ...]`` strongest first (``top`` caps the list)."""
        infos = [self.layer_info(layer)] if layer is not None else [self.layer_info(n) for n in self.layers()]
        for info in infos:
            corr: dict[int, list[tuple[str, float]]] = {}
            used: dict[int, dict[str, int]] = {}
            for ch, metric, r, n in self._q("SELECT channel, metric, r, n FROM correlations WHERE layer_id=?",
                                            (info.layer_id,)):
                corr.setdefault(ch, []).append((metric, r))
                used.setdefault(ch, {})[metric] = n
            for ch, count, active, mean, std, lo, hi in self._q(
                "SELECT channel, count, active_count, mean, std, min, max FROM stats WHERE layer_id=?"
                " ORDER BY channel", (info.layer_id,)
            ):
                pairs = sorted(corr.get(ch, []), key=lambda p: -abs(p[1]))
                yield StatBlock(info.name, ch, count, active, mean, std, lo, hi, pairs[:top] if top else pairs,
                                used.get(ch, {}))

    def stats_frame(self, layer: str) -> pd.DataFrame:
        """Stored stats of a layer as a DataFrame (channel, count, active_count, frac_active, mean, std,
        min, max, top_metric, top_r, top_n: the tokens that correlation used)."""
        blocks = list(self.iter_statblocks(layer, top=1))
        return pd.DataFrame([{
            "channel": b.channel, "count": b.count, "active_count": b.active_count, "frac_active": b.frac_active,
            "mean": b.mean, "std": b.std, "min": b.min, "max": b.max,
            "top_metric": b.top_correlations[0][0] if b.top_correlations else None,
            "top_r": b.top_correlations[0][1] if b.top_correlations else np.nan,
            "top_n": b.correlation_counts.get(b.top_correlations[0][0]) if b.top_correlations else None,
        } for b in blocks], columns=["channel", "count", "active_count", "frac_active", "mean", "std", "min",
                                     "max", "top_metric", "top_r", "top_n"])

    # ------------------------------------------------------------------ top examples
    def compute_latent_examples(self, layer: str, top: int = 32, chunk_tokens: int = 8192) -> int:
        """Store the ``top`` highest activating (prompt, position, value) of every channel of a layer.
        Returns the number of example rows written."""
        self._require_writable()
        info = self.layer_info(layer)
        return self._store_examples(info, self._mine_examples(info, None, top, chunk_tokens))

    def _mine_examples(self, info: LayerInfo, seq_ids: Sequence[int] | None, top: int,
                       chunk_tokens: int = 8192) -> TopExamples:
        """The best ``top`` values of each channel over the layer's rows of ``seq_ids`` (None: all);
        parts over disjoint sequences merge with :meth:`TopK.add_examples`."""
        best = TopK(info.width, top, merge_rows=chunk_tokens)
        for sid, block in self._iter_layer_rows(info, seq_ids, None):
            best.add(block, sid)
        return best.result()

    def _store_examples(self, info: LayerInfo, found: TopExamples) -> int:
        """Replace the layer's stored top examples with ``found``'s positive values; returns the rows written."""
        positions = {row.seq_id: row.position_array() for row in self._token_rows(np.unique(found.seq_ids).tolist())}
        rows = []
        for ch in range(info.width):
            rank = 0
            for val, sid, at in zip(found.values[:, ch].tolist(), found.seq_ids[:, ch].tolist(),
                                    found.rows[:, ch].tolist()):
                if not val > 0:  # the -inf fill, NaN and inactive; +inf is a real top value
                    continue
                rows.append((info.layer_id, ch, rank, sid, int(positions[sid][at]), val))
                rank += 1
        with self.atomic() as conn:
            conn.execute("DELETE FROM latent_examples WHERE layer_id=?", (info.layer_id,))
            conn.executemany("INSERT INTO latent_examples(layer_id, channel, rank, seq_id, position, value)"
                             " VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def _example_rows(self, layer: str, channel: int | None = None, top: int | None = None) -> list[ExampleRow]:
        """Stored top examples, by channel then rank."""
        info = self.layer_info(layer)
        sql = ("SELECT e.channel, e.rank, e.seq_id, s.prompt_index, e.position, e.value FROM latent_examples e"
               " JOIN sequences s ON s.seq_id = e.seq_id WHERE e.layer_id=?")
        params: list[Any] = [info.layer_id]
        if channel is not None:
            sql += " AND e.channel=?"
            params.append(int(channel))
        if top is not None:
            sql += " AND e.rank < ?"
            params.append(int(top))
        return [ExampleRow(*r) for r in self._q(sql + " ORDER BY e.channel, e.rank", params)]

    def latent_example_rows(self, layer: str, top: int | None = None) -> list[tuple[int, int, int, int, float]]:
        """Stored top examples as ``(channel, rank, prompt_index, position, value)`` tuples."""
        return [(e.channel, e.rank, e.prompt_index, e.position, e.value) for e in self._example_rows(layer, top=top)]

    def latent_examples(self, layer: str, channel: int | None = None, top: int | None = None) -> pd.DataFrame:
        """Stored top examples: channel, rank, prompt_index, position, token, value (best first)."""
        df = pd.DataFrame(self._example_rows(layer, channel, top), columns=list(ExampleRow._fields))
        token_at: dict[tuple[int, int], str] = {}
        for row in self._token_rows(df["seq_id"].unique().tolist()):
            token_at.update({(row.seq_id, int(p)): t for p, t in zip(row.position_array(), row.token_texts())})
        df.insert(4, "token", [token_at.get((s, p)) for s, p in zip(df["seq_id"], df["position"])])
        return df.drop(columns=["seq_id"])
