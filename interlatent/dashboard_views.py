"""The dashboard's views beyond one layer's scan: stored interventions as tables of named fields
with an effect-vs-control chart, the decoder-cosine comparison of dictionaries of one layer, and
the assembly of a whole layer's records into the payload (:func:`build_layer`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from interlatent.db import LatentDB
from interlatent.vis.dashboard_data import (
    CompareRecord,
    Correlation,
    EffectChart,
    Example,
    Field,
    InterventionRecord,
    LabelMean,
    LatentDetail,
    LatentSummary,
    LayerRecord,
    LayerScan,
    Match,
    Payload,
    PromptLatents,
    PromptRecord,
    QUANTILES,
    TOP_TOKENS,
    TokenEffect,
    TokenMean,
    context_window,
    histogram,
    layer_header,
    logit_effects_by_channel,
    num,
    rounded,
)


# ---------------------------------------------------------------------------- interventions
_LATENT_KEYS = ("ablate", "latents", "clamp", "steer", "latent", "channels")


def _latents_of(spec: dict[str, Any], results: dict[str, Any]) -> list[int] | None:
    found: list[int] = []
    for d in (spec, results):
        for key in _LATENT_KEYS:
            v = d.get(key)
            if isinstance(v, dict):
                v = list(v.keys())
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                v = [v]
            if isinstance(v, list):
                for x in v:
                    try:
                        found.append(int(x))
                    except (TypeError, ValueError):
                        continue
    return sorted(set(found)) if found else None


def _fields(d: dict[str, Any], prefix: str = "", depth: int = 0) -> list[Field]:
    """Named rows: scalars as they are, nested objects flattened (``effect.delta_loss``), lists of
    numbers as a short text, lists of objects summarised."""
    out: list[Field] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth < 2 and value:
                out += _fields(value, name + ".", depth + 1)
            else:
                out.append(Field(name, "–" if not value else f"{len(value)} entries"))
        elif isinstance(value, list):
            out.append(Field(name, _list_text(value)))
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            out.append(Field(name, value))
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out.append(Field(name, num(value, 5) if isinstance(value, (float, np.floating)) else int(value)))
        else:
            out.append(Field(name, str(value)))
    return out


def _short(x: Any) -> str:
    if isinstance(x, float):
        return _fmt(x)
    return str(x)


def _fmt(x: float) -> str:
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}"


def _list_text(value: list[Any], limit: int = 12) -> str:
    if not value:
        return "–"
    if all(isinstance(x, dict) for x in value):
        return f"{len(value)} records"
    if all(isinstance(x, list) for x in value):
        inner = "; ".join(", ".join(_short(y) for y in x[:6]) + (" …" if len(x) > 6 else "") for x in value[:4])
        return f"{len(value)} lists: {inner}" + (" …" if len(value) > 4 else "")
    text = ", ".join(_short(x) for x in value[:limit])
    return text + (f" … ({len(value)} in all)" if len(value) > limit else "")


def _chart(results: dict[str, Any]) -> EffectChart | None:
    metric = results.get("metric")
    value = results.get("value")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    controls: list[float] = []
    for eff in results.get("control") or []:
        if isinstance(eff, dict) and isinstance(eff.get(metric), (int, float)):
            controls.append(num(eff[metric], 5))
    cm, cs = results.get("control_mean"), results.get("control_std")
    if cm is None and not controls:
        return None
    return EffectChart(str(metric or "value"), num(value, 5), None if cm is None else num(cm, 5),
                       None if cs is None else num(cs, 5), controls)


def intervention_records(db: LatentDB, token_text: dict[int, str]) -> list[InterventionRecord]:
    out = []
    for rec in db.interventions().itertuples():
        spec = rec.spec if isinstance(rec.spec, dict) else {"spec": rec.spec}
        results = rec.results if isinstance(rec.results, dict) else {"results": rec.results}
        answer = spec.get("answer") or results.get("answer")
        tokens = None
        if isinstance(answer, (list, tuple)) and all(isinstance(a, int) for a in answer):
            tokens = [TokenEffect(token_text.get(int(a)), int(a), 0) for a in answer]
        out.append(InterventionRecord(int(rec.intervention_id), str(rec.layer), str(rec.kind), str(rec.created_at),
                                      _latents_of(spec, results), _fields(spec), _fields(results), tokens,
                                      _chart(results)))
    return out


# ---------------------------------------------------------------------------- compare
def _decoder(db: LatentDB, layer: str) -> tuple[str, np.ndarray] | None:
    """(the layer it decodes into, ``W_dec`` [d_sae, d_out]) read with safetensors' numpy loader."""
    import json
    from pathlib import Path

    info = db.layer_info(layer)
    artifact_id = info.artifact_id if info.artifact_id is not None else info.meta.get("artifact_id")
    if artifact_id is None:
        return None
    try:
        art = db.get_artifact(int(artifact_id))
        folder = Path(art["path"])
        config = json.loads((folder / "config.json").read_text())
        from safetensors.numpy import load_file

        w_dec = load_file(str(folder / "weights.safetensors"))["W_dec"]
    except (KeyError, OSError, ValueError, TypeError):
        return None
    meta = config.get("metadata") or {}
    return str(meta.get("out_layer") or meta.get("in_layer") or info.source), np.asarray(w_dec, np.float32)


def compare_records(db: LatentDB, layers: list[str]) -> list[CompareRecord]:
    decs = {n: d for n in layers if db.layer_info(n).kind in ("latent", "latent_sae") and (d := _decoder(db, n))}
    names = sorted(decs)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (wa_layer, wa), (wb_layer, wb) = decs[a], decs[b]
            if wa_layer != wb_layer or wa.shape[1] != wb.shape[1]:
                continue
            na = wa / np.maximum(np.linalg.norm(wa, axis=1, keepdims=True), 1e-12)
            nb = wb / np.maximum(np.linalg.norm(wb, axis=1, keepdims=True), 1e-12)
            cos = na @ nb.T
            best = cos.argmax(1)
            best_cos = cos[np.arange(cos.shape[0]), best]
            out.append(CompareRecord(a, b, wa_layer, [Match(int(j), int(best[j]), num(best_cos[j], 4))
                                                     for j in range(cos.shape[0])],
                                     num(best_cos.mean(), 4), num(float((best_cos > 0.9).mean()), 4)))
    return out


# ---------------------------------------------------------------------------- the whole layer
def build_layer(db: LatentDB, layer: str, payload: Payload, *, max_tokens: int, top_examples: int,
                max_latents: int | None, per_token: int, view_tokens: int, view_prompts: int | None,
                interventions: list[dict[str, Any]]) -> dict[int, str]:
    """Add ``layer``'s record, index rows, latent pages and prompt-view rows to ``payload``;
    returns the text of every token id seen."""
    info = db.layer_info(layer)
    report = db.check_complete(layer, what="the dashboard")
    stored = db.latent_example_rows(layer, top=top_examples)
    indexed = False
    if not stored:  # a layer without stored examples: each channel's best from the search index
        stored = db.index_examples(layer, top_examples) or []
        indexed = bool(stored)
    scan = LayerScan(db, layer, max_tokens, extra={p for _, _, p, _, _ in stored})
    prompts = list(scan.offset)
    lists = db.token_lists(prompts)
    tok_df = db.tokens(prompt_index=prompts, metrics=False) if prompts else None
    row_tid = np.zeros(scan.n_all, np.int64)
    if tok_df is not None:
        for p, grp in tok_df.groupby("prompt_index"):
            off = scan.offset.get(int(p))
            if off is not None:
                ids = grp["token_id"].to_numpy()[: scan.length[int(p)]]
                row_tid[off: off + len(ids)] = ids
    token_text: dict[int, str] = {}
    for p in prompts:
        off, texts = scan.offset[p], lists.get(p, (None, [], None))[1]
        for i in range(min(scan.length[p], len(texts))):
            token_text.setdefault(int(row_tid[off + i]), texts[i] or "")
    labels_of = {p: (None if lists.get(p, (None, None, None))[2] is None else str(lists[p][2])) for p in prompts}
    labels = sorted({lb for p, lb in labels_of.items() if lb is not None and scan.offset[p] < scan.n})
    row_label = np.full(scan.n, -1, np.int64)
    for p in prompts:
        off = scan.offset[p]
        if off < scan.n and labels_of[p] is not None:
            row_label[off: off + scan.length[p]] = labels.index(labels_of[p])
    label_counts = np.bincount(row_label[row_label >= 0], minlength=len(labels))
    scan_tid = row_tid[: scan.n]
    tid_counts = np.bincount(scan_tid) if scan.n else np.zeros(0, np.int64)

    corr: dict[int, list[Correlation]] = {}
    for b in db.iter_statblocks(layer, top=5):
        corr[b.channel] = [Correlation(m, num(r), b.correlation_counts.get(m)) for m, r in b.top_correlations]
    exp = db.explanations(layer)
    explained = {int(c): str(t) for c, t in zip(exp["channel"], exp["text"])}
    effects = logit_effects_by_channel(db, layer)
    for fx in effects.values():  # answer tokens of stored interventions are often among them
        for t in fx.promoted + fx.suppressed:
            if t.token is not None:
                token_text.setdefault(t.token_id, t.token)
    width = info.width if max_latents is None else min(info.width, max_latents)
    signed_layer = info.kind not in ("latent", "latent_sae") and scan.dense and scan.n > 0 and \
        bool((scan.matrix[: scan.n] < 0).any())
    by_channel: dict[int, list[tuple[int, int, float]]] = {}
    for c, _rank, p, pos, v in stored:
        if indexed and not signed_layer and not v > 0:  # the examples of a layer >= 0 are its active values
            continue
        by_channel.setdefault(int(c), []).append((int(p), int(pos), float(v)))
    used: set[int] = set()

    def row_of(p: int, pos: int) -> int | None:
        positions = lists.get(p, (None, None, None))[0]
        if positions is None or p not in scan.offset:
            return None
        i = int(np.searchsorted(positions, pos))
        return i if i < min(len(positions), scan.length[p]) and positions[i] == pos else None

    def example(c: int, p: int, row: int, value: float, q: float | None = None) -> Example:
        texts = lists[p][1]
        lo, hi = context_window(texts[: scan.length[p]], row)
        used.add(p)
        acts = rounded(scan.window(c, p, lo, hi))
        return Example(p, int(lists[p][0][row]), row, num(value), lo, acts, q)

    summaries, details = [], {}
    counts = np.zeros(width, np.int64)
    for c in range(width):
        v, rows = scan.channel(c)
        active = v > 0
        count = int(active.sum())
        counts[c] = count
        ok = ~np.isnan(v)
        vmax = float(v[ok].max()) if ok.any() else 0.0
        vmin = float(v[ok].min()) if ok.any() else 0.0
        top_corr = corr.get(c, [])
        label_corr = next((x for x in top_corr if x.metric.startswith("label")), top_corr[0] if top_corr else None)
        summaries.append(LatentSummary(c, count, num(vmax), num(vmin), round(count / max(scan.n, 1), 5), label_corr,
                                       explained.get(c)))
        pool_signed = signed_layer and scan.dense
        pool = ok & (np.ones_like(active) if pool_signed else active)
        pv, pr = v[pool], rows[pool]
        top: list[Example] = []
        if c in by_channel:
            for p, pos, val in by_channel[c]:
                r = row_of(p, pos)
                if r is not None:
                    top.append(example(c, p, r, val))
        elif pv.size:
            k = min(top_examples, pv.size)
            cand = np.flatnonzero(pv >= np.partition(pv, pv.size - k)[pv.size - k])  # with every tie
            best = cand[np.lexsort((pr[cand], -pv[cand]))[:k]]  # ties by prompt, then position
            top = [example(c, int(scan.row_prompt[pr[j]]), int(scan.row_index[pr[j]]), float(pv[j])) for j in best]
        quant: list[Example] = []
        if pv.size:
            kth = sorted({min(int(q * pv.size), pv.size - 1) for q in QUANTILES})
            part = np.argpartition(pv, kth)
            for q in QUANTILES:
                j = part[min(int(q * pv.size), pv.size - 1)]
                quant.append(example(c, int(scan.row_prompt[pr[j]]), int(scan.row_index[pr[j]]), float(pv[j]), q))
        if not pv.size and not top:
            details[str(c)] = LatentDetail([], [], None, [], top_corr, [], effects.get(c))
            continue
        sums = np.bincount(scan_tid[rows[active & ok]], weights=v[active & ok], minlength=len(tid_counts)) \
            if not pool_signed else np.bincount(scan_tid[rows[ok]], weights=v[ok], minlength=len(tid_counts))
        with np.errstate(divide="ignore", invalid="ignore"):
            means = np.where(tid_counts > 0, sums / np.maximum(tid_counts, 1), 0.0)
        order = np.argpartition(-means, min(TOP_TOKENS, means.size) - 1)[:TOP_TOKENS] if means.size else \
            np.zeros(0, np.int64)
        order = order[np.argsort(-means[order], kind="stable")]
        top_tok = [TokenMean(token_text.get(int(t), ""), num(means[t]), int(tid_counts[t])) for t in order
                   if means[t] > 0]
        by_label = []
        if labels:
            sel = (active & ok) if not pool_signed else ok
            lab = row_label[rows[sel]]
            lsum = np.bincount(lab[lab >= 0], weights=v[sel][lab >= 0], minlength=len(labels))
            by_label = [LabelMean(lb, num(lsum[i] / max(label_counts[i], 1)), int(label_counts[i]))
                        for i, lb in enumerate(labels)]
        details[str(c)] = LatentDetail(top, quant, histogram(v, pool_signed), top_tok, top_corr, by_label,
                                       effects.get(c))

    view, budget = [], view_tokens
    for p in prompts:
        if scan.offset[p] >= scan.n or scan.length[p] > budget or (view_prompts is not None and
                                                                   len(view) >= view_prompts):
            break
        if p not in lists or len(lists[p][0]) != scan.length[p]:  # cut by max_tokens: not shown half-read
            continue
        view.append(p)
        budget -= scan.length[p]
    prompt_latents = {}
    for p in view:
        lat, vals = scan.top_per_token(p, per_token)
        prompt_latents[str(p)] = PromptLatents(lat, vals)
        used.add(p)
    new = [p for p in sorted(used) if str(p) not in payload.prompts and p in lists]
    seqs = db.sequences(prompt_index=new) if new else None
    text_of = dict(zip(seqs["prompt_index"].astype(int), seqs["text"])) if seqs is not None else {}
    for p in new:
        positions, texts, label = lists[p]
        payload.prompts[str(p)] = PromptRecord(p, text_of.get(p), None if label is None else str(label),
                                               [t or "" for t in texts], [int(x) for x in positions])
    k = info.meta.get("k")
    payload.layers.append(LayerRecord(
        layer, info.kind, info.width, info.dtype, int(db.n_tokens(layer)), scan.n, info.source, signed_layer,
        None if report.complete else report.describe(), layer_header(db, layer, scan, counts, interventions), labels,
        len(view), len(db.prompt_indices(layer)), per_token,
        bool(info.storage == "sparse" and isinstance(k, int) and k <= per_token)))
    payload.latents[layer] = summaries
    payload.details[layer] = details
    payload.prompt_latents[layer] = prompt_latents
    return token_text
