"""The dashboard's payload: typed records built from a store, written as JSON objects with named
fields (:func:`plain` for the JSON encoder), which the page's script reads by name.

Columns of one kind (a context's activations, a token's top latents) are arrays under a named key;
no record is a positional list whose layout the two sides agree on by convention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import numpy as np

from interlatent.db import LatentDB

QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
CONTEXT = 24
"""Tokens of context either side of an example's token (cut back to word boundaries)."""
HIST_BINS = 24
TOP_TOKENS = 8
HEADER_KEYS = ("fvu", "explained_variance", "l0", "dead_fraction", "mse", "eval_tokens", "ce_loss_score",
               "loss_recovered_zero", "loss_recovered_mean", "ce_clean", "ce_spliced")


def num(x: Any, digits: int = 4) -> float | int:
    """``x`` rounded for display (an exact zero as ``0``); infinities and NaN pass through."""
    x = float(x)
    if x == 0:
        return 0
    return round(x, digits) if np.isfinite(x) else x


# ---------------------------------------------------------------------------- records
@dataclass
class Correlation:
    metric: str
    r: float
    n: int | None


@dataclass
class LatentSummary:
    """One row of the index."""

    latent: int
    count: int          # tokens where the latent is > 0, among those scanned
    max: float
    min: float
    density: float      # count / tokens scanned
    label_corr: Correlation | None
    explanation: str | None


@dataclass
class Example:
    """A token with its context: ``acts[i]`` is the latent at row ``start + i`` of the prompt."""

    prompt: int
    position: int       # the stored position of the token
    row: int            # its index in the prompt's token list
    value: float
    start: int
    acts: list[float]
    quantile: float | None = None


@dataclass
class Histogram:
    lo: float
    hi: float
    counts: list[int]
    signed: bool        # all values (dense channel) or only the active ones (> 0)
    nonfinite: int
    n: int


@dataclass
class TokenMean:
    token: str
    mean: float
    count: int


@dataclass
class LabelMean:
    label: str
    mean: float
    count: int


@dataclass
class TokenEffect:
    token: str | None
    token_id: int
    value: float


@dataclass
class LogitEffects:
    promoted: list[TokenEffect]
    suppressed: list[TokenEffect]


@dataclass
class LatentDetail:
    top: list[Example]
    quantiles: list[Example]
    histogram: Histogram | None
    top_tokens: list[TokenMean]
    correlations: list[Correlation]
    by_label: list[LabelMean]
    logit_effects: LogitEffects | None


@dataclass
class Stat:
    key: str
    label: str
    value: float | int | str | None
    note: str | None = None


@dataclass
class LayerRecord:
    name: str
    kind: str
    width: int
    dtype: str
    tokens: int
    scanned_tokens: int
    source: str | None
    signed: bool
    incomplete: str | None
    header: list[Stat]
    labels: list[str]
    prompt_view_prompts: int
    prompt_view_total: int
    prompt_view_per_token: int
    prompt_view_complete: bool   # every active latent of every token is listed (sparse, k <= per_token)


@dataclass
class PromptRecord:
    prompt: int
    text: str | None
    label: str | None
    tokens: list[str]
    positions: list[int]


@dataclass
class PromptLatents:
    """Per token of one prompt, its strongest latents (``latents[i]``) and their values."""

    latents: list[list[int]]
    values: list[list[float]]


@dataclass
class Field:
    key: str
    value: Any


@dataclass
class EffectChart:
    metric: str
    value: float
    control_mean: float | None
    control_std: float | None
    controls: list[float]


@dataclass
class InterventionRecord:
    """A stored patch / steering / attribution result, as named fields for a table."""

    id: int
    layer: str
    kind: str
    created_at: str
    latents: list[int] | None     # the latents it acted on or scored (None: the whole layer)
    spec: list[Field]
    results: list[Field]
    answer: list[TokenEffect] | None
    chart: EffectChart | None


@dataclass
class Match:
    a: int
    b: int
    cosine: float


@dataclass
class CompareRecord:
    """Two dictionaries that decode into the same layer, matched by decoder cosine."""

    a: str
    b: str
    writes: str
    matches: list[Match]
    mean_max_cosine: float
    matched_above_0_9: float


@dataclass
class Meta:
    db: str
    generated: str
    version: str
    title: str


@dataclass
class Payload:
    meta: Meta
    layers: list[LayerRecord] = field(default_factory=list)
    latents: dict[str, list[LatentSummary]] = field(default_factory=dict)
    details: dict[str, dict[str, LatentDetail]] = field(default_factory=dict)
    prompts: dict[str, PromptRecord] = field(default_factory=dict)
    prompt_latents: dict[str, dict[str, PromptLatents]] = field(default_factory=dict)
    interventions: list[InterventionRecord] = field(default_factory=list)
    compare: list[CompareRecord] = field(default_factory=list)



def plain(obj: Any) -> Any:
    """One level of a record as JSON-ready: a dataclass as a dict of its fields (the JSON encoder
    recurses), a numpy scalar as a Python number. For ``json.dumps(default=plain)``."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return obj.__dict__  # a plain dataclass's fields, in their order (read, never changed)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not part of the dashboard's payload")


# ---------------------------------------------------------------------------- contexts
_WORD = re.compile(r"\w")


def _starts_word(tokens: list[str], i: int) -> bool:
    """True where a word boundary lies before token ``i``."""
    if i <= 0 or i >= len(tokens):
        return True
    here, before = tokens[i] or "", tokens[i - 1] or ""
    return not (_WORD.match(here[:1]) and _WORD.match(before[-1:]))


def context_window(tokens: list[str], row: int, radius: int = CONTEXT) -> tuple[int, int]:
    """``[lo, hi)`` around ``row``: up to ``radius`` tokens each side, shrunk so that neither edge
    falls inside a word (kept as is where no boundary lies within the window)."""
    n = len(tokens)
    lo, hi = max(0, row - radius), min(n, row + radius + 1)
    j = lo
    while j < row and not _starts_word(tokens, j):
        j += 1
    lo = j if _starts_word(tokens, j) else lo
    j = hi
    while j > row + 1 and not _starts_word(tokens, j):
        j -= 1
    hi = j if _starts_word(tokens, j) else hi
    return lo, hi


# ---------------------------------------------------------------------------- one layer
class LayerScan:
    """One pass over a layer's stored activations (the first ``max_tokens`` tokens), plus the
    prompts named in ``extra`` (for stored top examples outside the scan; they count in nothing).

    Dense layers keep the matrix; sparse ones the active entries sorted by channel."""

    def __init__(self, db: LatentDB, layer: str, max_tokens: int, extra: Iterable[int] = ()) -> None:
        info = db.layer_info(layer)
        self.width = info.width
        self.dense = info.storage != "sparse"
        self.offset: dict[int, int] = {}
        self.length: dict[int, int] = {}
        blocks: list[np.ndarray] = []
        n = 0
        for pidx, block in db.iter_sequence_blocks(layer):
            if n >= max_tokens:
                break
            block = block[: max_tokens - n]
            self.offset[pidx], self.length[pidx] = n, block.shape[0]
            blocks.append(block)
            n += block.shape[0]
        self.n = n
        missing = sorted(set(extra) - set(self.offset))
        if missing:
            for pidx, block in db.iter_sequence_blocks(layer, prompt_indices=missing):
                self.offset[pidx], self.length[pidx] = n, block.shape[0]
                blocks.append(block)
                n += block.shape[0]
        self.n_all = n
        self.row_prompt = np.zeros(n, np.int64)
        self.row_index = np.zeros(n, np.int64)
        for pidx, off in self.offset.items():
            self.row_prompt[off: off + self.length[pidx]] = pidx
            self.row_index[off: off + self.length[pidx]] = np.arange(self.length[pidx])
        if self.dense:
            self.matrix = np.concatenate(blocks) if blocks else np.zeros((0, self.width), np.float32)
        else:
            vals, chans, rows = [], [], []
            off = 0
            for block in blocks:
                r, c = np.nonzero(block > 0)
                vals.append(block[r, c])
                chans.append(c)
                rows.append(r + off)
                off += block.shape[0]
            values = np.concatenate(vals) if vals else np.zeros(0, np.float32)
            channels = np.concatenate(chans) if chans else np.zeros(0, np.int64)
            grows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
            self._by_row = (values, channels, grows)  # in row order, for the prompt view
            order = np.argsort(channels, kind="stable")
            self._values, self._rows = values[order], grows[order]
            self._bounds = np.searchsorted(channels[order], np.arange(self.width + 1))

    def channel(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, global rows) of channel ``c`` in the scan: every value (dense), or the active
        ones (sparse)."""
        if self.dense:
            return self.matrix[: self.n, c], np.arange(self.n)
        lo, hi = self._bounds[c], self._bounds[c + 1]
        v, r = self._values[lo:hi], self._rows[lo:hi]
        keep = r < self.n
        return v[keep], r[keep]

    def window(self, c: int, prompt: int, lo: int, hi: int) -> np.ndarray:
        """Channel ``c`` at rows ``lo..hi-1`` of ``prompt`` (zeros where not active)."""
        off = self.offset[prompt]
        if self.dense:
            return self.matrix[off + lo: off + hi, c]
        a, b = self._bounds[c], self._bounds[c + 1]
        rows = self._rows[a:b]
        i, j = np.searchsorted(rows, [off + lo, off + hi])
        out = np.zeros(hi - lo, np.float32)
        out[rows[i:j] - off - lo] = self._values[a:b][i:j]
        return out

    def top_per_token(self, prompt: int, per_token: int) -> tuple[list[list[int]], list[list[float]]]:
        off, n = self.offset[prompt], self.length[prompt]
        latents, values = [], []
        if self.dense:
            block = self.matrix[off: off + n]
        else:
            vals, chans, rows = self._by_row
            i, j = np.searchsorted(rows, [off, off + n])
            block = np.zeros((n, self.width), np.float32)
            block[rows[i:j] - off, chans[i:j]] = vals[i:j]
        k = min(per_token, self.width)
        if not n:
            return latents, values
        neg = -np.nan_to_num(block, nan=-np.inf)  # NaN never ranks
        idx = np.argpartition(neg, k - 1, axis=1)[:, :k]
        idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(neg, idx, 1), axis=1, kind="stable"), 1)
        top = np.take_along_axis(block, idx, 1)
        n_pos = (top > 0).sum(1).tolist()  # sorted descending: the active ones come first
        for ids, vals, m in zip(idx.tolist(), np.round(top.astype(np.float64), 3).tolist(), n_pos):
            latents.append(ids[:m])
            values.append(vals[:m])
        return latents, values


def layer_header(db: LatentDB, layer: str, scan: LayerScan, counts: np.ndarray,
                 inter: list[dict[str, Any]]) -> list[Stat]:
    """The layer summary: a dictionary's held-out FVU / explained variance / L0 / dead fraction
    (and the CE-loss score where evaluated) next to what this scan measured; channel statistics
    for a model layer."""
    info = db.layer_info(layer)
    out: list[Stat] = []
    artifact_id = info.artifact_id if info.artifact_id is not None else info.meta.get("artifact_id")
    if artifact_id is not None:
        try:
            art = db.get_artifact(int(artifact_id))
        except KeyError:
            art = None
        metrics = art["metrics"] if art else {}
        labels = {"fvu": "FVU", "explained_variance": "explained variance", "l0": "L0", "dead_fraction":
                  "dead fraction", "mse": "MSE", "eval_tokens": "evaluated on (tokens)",
                  "ce_loss_score": "CE-loss score", "loss_recovered_zero": "CE loss recovered (vs zero-ablation)",
                  "loss_recovered_mean": "CE loss recovered (vs mean-ablation)", "ce_clean": "CE clean",
                  "ce_spliced": "CE spliced"}
        held = ((art or {}).get("config", {}).get("metadata", {}).get("split", {}) or {}).get("held_out")
        note = "held-out prompts" if held else ("training prompts" if held is False else None)
        for key in HEADER_KEYS:
            if key in metrics and metrics[key] is not None:
                out.append(Stat(key, labels[key], _stat_value(metrics[key]), note))
        for rec in inter:
            if rec["layer"] == layer and rec["kind"] in ("splice_quality", "eval"):
                for key in ("ce_loss_score", "loss_recovered_zero", "loss_recovered_mean", "ce_clean", "ce_spliced"):
                    if key in rec["results"] and not any(s.key == key for s in out):
                        out.append(Stat(key, labels[key], _stat_value(rec["results"][key]),
                                        f"{rec['kind']} #{rec['id']}"))
        if not any(s.key == "ce_loss_score" or s.key.startswith("loss_recovered") for s in out):
            out.append(Stat("ce_loss_score", "CE-loss score", None, "not evaluated (interlatent eval / "
                            "splice_quality(..., db=db))"))
    if scan.n:
        if not scan.dense or info.kind in ("latent", "latent_sae"):
            active = counts.sum()
            out.append(Stat("scan_l0", "L0 in the scanned tokens", num(active / scan.n, 3), f"{scan.n} tokens"))
            out.append(Stat("scan_dead", "dead in the scanned tokens", num(float((counts == 0).mean()), 4),
                            f"{int((counts == 0).sum())} of {scan.width} latents never > 0"))
        if scan.dense:
            m = scan.matrix[: scan.n].astype(np.float64)
            finite = np.isfinite(m)
            mf = np.where(finite, m, 0.0)
            cnt = np.maximum(finite.sum(0), 1)
            mean = mf.sum(0) / cnt
            std = np.sqrt(np.maximum((mf * mf).sum(0) / cnt - mean ** 2, 0))
            norms = np.sqrt((mf * mf).sum(1))
            out += [Stat("mean_of_means", "channel mean (average)", num(mean.mean())),
                    Stat("mean_std", "channel std (average)", num(std.mean())),
                    Stat("fraction_positive", "values > 0", num(float((m > 0).mean()), 4)),
                    Stat("mean_norm", "token L2 norm (mean)", num(norms.mean())),
                    Stat("min", "min", num(m[finite].min()) if finite.any() else None),
                    Stat("max", "max", num(m[finite].max()) if finite.any() else None)]
            if not finite.all():
                out.append(Stat("nonfinite", "non-finite values", int((~finite).sum())))
    return out


def _stat_value(v: Any) -> Any:
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return num(v, 4) if isinstance(v, (float, np.floating)) else int(v)
    return str(v)


def histogram(v: np.ndarray, signed: bool) -> Histogram | None:
    values = v if signed else v[v > 0]
    finite = values[np.isfinite(values)]
    if not values.size:
        return None
    lo = float(finite.min()) if (signed and finite.size) else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    lo = min(lo, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(finite, bins=HIST_BINS, range=(lo, hi))
    return Histogram(num(edges[0]), num(edges[-1]), counts.tolist(), signed, int(values.size - finite.size),
                     int(values.size))


def logit_effects_by_channel(db: LatentDB, layer: str) -> dict[int, LogitEffects]:
    df = db.logit_effects(layer)
    out: dict[int, LogitEffects] = {}
    for c, direction, tid, token, value in zip(df["channel"].tolist(), df["direction"].tolist(),
                                               df["token_id"].tolist(), df["token"].tolist(),
                                               np.round(df["value"].to_numpy(np.float64), 4).tolist()):
        fx = out.get(c)
        if fx is None:
            fx = out[c] = LogitEffects([], [])
        (fx.promoted if direction == "promoted" else fx.suppressed).append(TokenEffect(token, tid, value))
    return out


def rounded(values: np.ndarray, digits: int = 3) -> list[float | int]:
    """``values`` rounded for display, exact zeros written as ``0`` (sparse contexts are mostly zero)."""
    return [0 if x == 0 else x for x in np.round(np.asarray(values, np.float64), digits).tolist()]
