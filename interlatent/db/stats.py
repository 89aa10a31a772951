"""Streaming per-channel moments and channel x metric Pearson correlations.

One pass over ``[tokens, channels]`` chunks with their ``[tokens, metrics]`` values (NaN where a
metric is undefined for a token). Everything accumulates in float64 as sums, so chunks can arrive
in any order and size, and accumulators of disjoint parts of a layer merge into the accumulator of
the whole (:meth:`MomentAccumulator.merge`: sums add, extremes take the min / max). Each (channel, metric) correlation uses only the tokens where both the
activation and the metric are finite (an inf or NaN on either side leaves that token out of that
pair), and the number of tokens used is kept with it. Moments (count, mean, std, min, max, fraction
active) skip the same NaN activations, channel by channel, and ``count`` says how many values each
channel used; infinities are kept: a channel with an infinite activation has an infinite mean (and
an undefined std) and keeps it as its min or max. A channel whose every value is NaN has count 0 and
NaN moments.
:func:`metric_matrix` lays out the ``[tokens, metrics]`` values of a group of sequences: their token
metrics, then a one-vs-rest indicator per string label class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from interlatent.errors import ShapeError


@dataclass
class StatBlock:
    """Summary of one channel of one layer, as stored by :meth:`LatentDB.compute_stats`."""

    layer: str
    channel: int
    count: int  # values used: the tokens where the channel is not NaN
    active_count: int  # tokens where the channel is > 0
    mean: float
    std: float
    min: float
    max: float
    top_correlations: list[tuple[str, float]] = field(default_factory=list)  # strongest |r| first
    correlation_counts: dict[str, int] = field(default_factory=dict)  # metric -> tokens its r used

    @property
    def frac_active(self) -> float:
        return self.active_count / self.count if self.count else 0.0


class MomentAccumulator:
    """Accumulates the sums needed for moments and correlations, chunk by chunk."""

    def __init__(self, n_channels: int, n_metrics: int) -> None:
        c, k = n_channels, n_metrics
        self.count = 0  # tokens seen
        self.used = np.zeros(c, dtype=np.int64)  # tokens per channel whose value is not NaN
        self.nonzero = np.zeros(c, dtype=np.int64)
        self.active = np.zeros(c, dtype=np.int64)
        self.sum = np.zeros(c)
        self.sumsq = np.zeros(c)
        self.min = np.full(c, np.inf)
        self.max = np.full(c, -np.inf)
        # masked sums per (channel, metric), over the tokens where both values are finite
        self.n = np.zeros((c, k))
        self.m_sum = np.zeros((c, k))
        self.m_sumsq = np.zeros((c, k))
        self.x_sum_w = np.zeros((c, k))
        self.x_sumsq_w = np.zeros((c, k))
        self.xm_sum = np.zeros((c, k))

    def update(self, x: np.ndarray, m: np.ndarray) -> None:
        """Add a chunk: ``x`` is ``[tokens, channels]``, ``m`` is ``[tokens, metrics]``."""
        if x.shape[0] == 0:
            return
        x = x.astype(np.float64, copy=False)
        nan = np.isnan(x)
        present = None if not nan.any() else ~nan  # None: every value counts (the common case)
        self.count += x.shape[0]
        self.used += x.shape[0] if present is None else present.sum(axis=0)
        self.nonzero += np.count_nonzero(x, axis=0) - (0 if present is None else nan.sum(axis=0))  # NaN != 0
        self.active += (x > 0).sum(axis=0)
        where = True if present is None else present
        with np.errstate(invalid="ignore", over="ignore"):
            x2 = x * x
            self.sum += x.sum(axis=0, where=where)
            self.sumsq += x2.sum(axis=0, where=where)
        np.fmin(self.min, x.min(axis=0, initial=np.inf, where=where), out=self.min)
        np.fmax(self.max, x.max(axis=0, initial=-np.inf, where=where), out=self.max)
        if m.shape[1] == 0:
            return
        m = m.astype(np.float64, copy=False)
        fm = np.isfinite(m)
        mz = np.where(fm, m, 0.0)
        wf = fm.astype(np.float64)
        fx = np.isfinite(x)
        if fx.all():  # the common case: every token counts for every channel of a metric
            xz, xz2 = x, x2
            self.n += wf.sum(axis=0)[None, :]
            self.m_sum += mz.sum(axis=0)[None, :]
            self.m_sumsq += (mz * mz).sum(axis=0)[None, :]
        else:
            xz = np.where(fx, x, 0.0)
            xz2 = xz * xz
            xf = fx.astype(np.float64)
            self.n += xf.T @ wf
            self.m_sum += xf.T @ mz
            self.m_sumsq += xf.T @ (mz * mz)
        self.x_sum_w += xz.T @ wf
        self.x_sumsq_w += xz2.T @ wf
        self.xm_sum += xz.T @ mz

    def merge(self, other: MomentAccumulator) -> None:
        """Add ``other``'s tokens, as if its chunks had been passed to :meth:`update` here."""
        if self.sum.shape != other.sum.shape or self.n.shape != other.n.shape:
            raise ShapeError(f"cannot merge statistics of {other.n.shape} (channels, metrics) into {self.n.shape}: "
                             "merge accumulators of the same layer over the same metrics")
        self.count += other.count
        for name in ("used", "nonzero", "active", "sum", "sumsq", "n", "m_sum", "m_sumsq", "x_sum_w", "x_sumsq_w",
                     "xm_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        np.fmin(self.min, other.min, out=self.min)
        np.fmax(self.max, other.max, out=self.max)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and (population) std per channel over its non-NaN values; NaN where it has none."""
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            mean = self.sum / self.used
            var = np.maximum(self.sumsq / self.used - mean * mean, 0.0)
        return mean, np.sqrt(var)

    def extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """Min and max per channel over its non-NaN values; NaN where it has none."""
        none = self.used == 0
        return np.where(none, np.nan, self.min), np.where(none, np.nan, self.max)

    def correlations(self) -> tuple[np.ndarray, np.ndarray]:
        """Pearson r ``[channels, metrics]`` (NaN where undefined) and the tokens each used
        (``[channels, metrics]``: those where both the activation and the metric are finite)."""
        n = self.n
        cov = n * self.xm_sum - self.x_sum_w * self.m_sum
        var_x = n * self.x_sumsq_w - self.x_sum_w**2
        var_m = n * self.m_sumsq - self.m_sum**2
        denom = np.sqrt(np.maximum(var_x, 0.0) * np.maximum(var_m, 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(denom > 1e-12 * np.maximum(np.abs(n) ** 2, 1.0), cov / denom, np.nan)
        return np.clip(r, -1.0, 1.0), n.astype(np.int64)


def metric_matrix(lengths: Sequence[int], metric_values: Iterable[tuple[int, int, np.ndarray]], n_metrics: int,
                  label_ids: Sequence[int | None], n_classes: int) -> np.ndarray:
    """``[tokens, n_metrics + n_classes]`` float64 for sequences of ``lengths`` positions, rows in order.

    ``metric_values`` gives ``(sequence, metric column, [positions] values)``; a metric a sequence
    lacks stays NaN. Column ``n_metrics + c`` is 1 where the sequence's label class is ``c``, 0 where
    it is another class, and NaN where the sequence has no string label."""
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out = np.full((int(starts[-1]), n_metrics + n_classes), np.nan, dtype=np.float64)
    for seq, col, values in metric_values:
        out[starts[seq] : starts[seq] + lengths[seq], col] = values
    if n_classes:
        for seq, class_id in enumerate(label_ids):
            if class_id is not None:
                out[starts[seq] : starts[seq + 1], n_metrics:] = 0.0
                out[starts[seq] : starts[seq + 1], n_metrics + class_id] = 1.0
    return out
