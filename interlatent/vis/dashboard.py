"""A self-contained offline HTML dashboard of a store.

    interlatent dashboard latents.db -o report.html
    python -m interlatent.vis.dashboard latents.db -o report.html

One HTML file built from the store alone — no model, no network, no CDN: its Content-Security-Policy
forbids every network load. It holds an index of layers and latents (active count, max, density,
strongest label correlation, explanation when stored), sortable and filterable; per latent the top
examples and examples across activation quantiles with highlighted tokens in context, a density
histogram, the tokens with the highest mean activation, label correlations, the mean per label (the
A/B diff), and stored patch effects; and a prompt view showing a layer's latents over one prompt's
tokens. Deep links: ``report.html#layer=NAME&latent=N``. Every text goes into the page through
``textContent``: a token ``<script>`` shows as text.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from interlatent import __version__
from interlatent.db import LatentDB
from interlatent.errors import OutputError
from interlatent.vis._cli import add_db, main_for, open_db, output_file, positive_int

N_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _json_for_script(data: Any) -> str:
    """Strict JSON safe inside a <script> element (no ``</script>``, no HTML-significant characters).
    A non-finite number is written as ``{"$nonfinite": "inf" | "-inf" | "nan"}``, which the page's
    reader turns back into ``Infinity`` / ``-Infinity`` / ``NaN``."""
    def dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=float)

    try:
        text = dumps(data)
    except ValueError:  # a non-finite number somewhere: tag them all (one more pass, only then)
        text = dumps(_tag_nonfinite(data))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _tag_nonfinite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tag_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tag_nonfinite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return {"$nonfinite": "nan" if np.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    return obj


def _num(x: float, digits: int = 4) -> float:
    """``x`` rounded for display; infinities and NaN pass through (tagged when written)."""
    return round(float(x), digits) if np.isfinite(x) else float(x)


class _Gather:
    """One pass over a layer: active values with their channel and global row, plus token ids."""

    def __init__(self, db: LatentDB, layer: str, max_tokens: int) -> None:
        vals, chans, rows = [], [], []
        self.row_prompt: list[int] = []
        self.row_pos: list[int] = []
        n = 0
        for pidx, block in db.iter_sequence_blocks(layer):
            if n >= max_tokens:
                break
            block = block[: max_tokens - n]
            r, c = np.nonzero(block > 0)
            vals.append(block[r, c])
            chans.append(c)
            rows.append(r + n)
            self.row_prompt += [pidx] * block.shape[0]
            self.row_pos += list(range(block.shape[0]))
            n += block.shape[0]
        self.n = n
        self.values = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        self.channels = np.concatenate(chans) if chans else np.zeros(0, np.int64)
        self.rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)


def _layer_payload(db: LatentDB, layer: str, prompts: dict[int, dict[str, Any]], max_tokens: int,
                   top_examples: int, max_latents: int | None) -> tuple[list[dict], dict[str, Any]]:
    info = db.layer_info(layer)
    g = _Gather(db, layer, max_tokens)
    width = info.width if max_latents is None else min(info.width, max_latents)
    tokens_df = db.tokens(prompt_index=sorted(set(g.row_prompt)), metrics=False)
    tok_by_prompt = {p: grp["token"].fillna("").tolist() for p, grp in tokens_df.groupby("prompt_index")}
    tid_by_prompt = {p: grp["token_id"].to_numpy() for p, grp in tokens_df.groupby("prompt_index")}
    label_by_prompt = {p: grp["label"].iloc[0] for p, grp in tokens_df.groupby("prompt_index")}
    row_prompt = np.asarray(g.row_prompt, dtype=np.int64)
    row_pos = np.asarray(g.row_pos, dtype=np.int64)
    row_token = np.array([tok_by_prompt[p][i] for p, i in zip(g.row_prompt, g.row_pos)], dtype=object) \
        if g.n else np.zeros(0, dtype=object)
    row_tid = np.array([int(tid_by_prompt[p][i]) for p, i in zip(g.row_prompt, g.row_pos)], dtype=np.int64) \
        if g.n else np.zeros(0, dtype=np.int64)
    row_label = [label_by_prompt[p] for p in g.row_prompt]
    labels = sorted({str(lb) for lb in row_label if lb is not None})
    label_idx = np.array([labels.index(str(lb)) if lb is not None else -1 for lb in row_label], dtype=np.int64)
    label_counts = np.bincount(label_idx[label_idx >= 0], minlength=len(labels)) if labels else np.zeros(0)
    tid_counts = np.bincount(row_tid) if g.n else np.zeros(0)
    token_text = {}
    for t, s in zip(row_tid, row_token):
        token_text.setdefault(int(t), s)

    corr: dict[int, list] = {}
    for b in db.iter_statblocks(layer, top=5):
        corr[b.channel] = [[m, round(r, 4), b.correlation_counts.get(m)] for m, r in b.top_correlations]
    exp = db.explanations(layer)
    explained = {int(c): str(t) for c, t in zip(exp["channel"], exp["text"])}
    stored = db.latent_examples(layer, top=top_examples)
    stored_by_ch = {c: grp for c, grp in stored.groupby("channel")} if len(stored) else {}
    order = np.argsort(g.channels, kind="stable")
    ch_sorted, vals_sorted, rows_sorted = g.channels[order], g.values[order], g.rows[order]
    bounds = np.searchsorted(ch_sorted, np.arange(width + 1))

    def example(prompt: int, pos: int, value: float) -> list:
        toks = tok_by_prompt.get(prompt) or db.tokens(prompt_index=prompt, metrics=False)["token"].fillna("").tolist()
        prompts.setdefault(prompt, {})
        return [int(prompt), int(pos), _num(value), toks[max(0, pos - 8): pos], toks[pos] if pos < len(toks)
                else "", toks[pos + 1: pos + 5]]

    index, details = [], {}
    for c in range(width):
        lo, hi = bounds[c], bounds[c + 1]
        v, r = vals_sorted[lo:hi], rows_sorted[lo:hi]
        count = int(hi - lo)
        vmax = float(v.max()) if count else 0.0
        top_corr = corr.get(c, [])
        label_corr = next((p for p in top_corr if p[0].startswith("label")), top_corr[0] if top_corr else None)
        index.append({"c": c, "count": count, "max": _num(vmax), "density": round(count / max(g.n, 1), 5),
                      "corr": label_corr, "explanation": explained.get(c)})
        if count == 0:
            details[str(c)] = {"top": [], "quant": [], "hist": [], "edges": [0, 0], "nonfinite": 0, "top_tokens": [],
                               "corr": top_corr, "by_label": []}
            continue
        if c in stored_by_ch:
            grp = stored_by_ch[c]
            top = [example(int(p), int(pos), val) for p, pos, val in zip(grp["prompt_index"], grp["position"], grp["value"])]
        else:
            best = np.argsort(-v, kind="stable")[:top_examples]
            top = [example(int(row_prompt[r[j]]), int(row_pos[r[j]]), v[j]) for j in best]
        srt = np.argsort(v, kind="stable")
        quant = []
        for q in N_QUANTILES:
            j = srt[min(int(q * count), count - 1)]
            quant.append(example(int(row_prompt[r[j]]), int(row_pos[r[j]]), v[j]))
        finite = v[np.isfinite(v)]
        fmax = float(finite.max()) if finite.size else 0.0
        hist, edges = np.histogram(finite, bins=20, range=(0.0, fmax if fmax > 0 else 1.0))
        sums = np.bincount(row_tid[r], weights=v, minlength=len(tid_counts))
        with np.errstate(divide="ignore", invalid="ignore"):
            means = np.where(tid_counts > 0, sums / np.maximum(tid_counts, 1), 0.0)
        top_tok = [[token_text.get(int(t), ""), _num(means[t]), int(tid_counts[t])]
                   for t in np.argsort(-means)[:8] if means[t] > 0]
        by_label = []
        if labels:
            lsum = np.bincount(label_idx[r][label_idx[r] >= 0], weights=v[label_idx[r] >= 0], minlength=len(labels))
            by_label = [[lb, _num(lsum[i] / max(label_counts[i], 1)), int(label_counts[i])]
                        for i, lb in enumerate(labels)]
        details[str(c)] = {"top": top, "quant": quant, "hist": hist.tolist(), "edges": [0.0, round(float(edges[-1]), 4)],
                           "nonfinite": int(count - finite.size), "top_tokens": top_tok, "corr": top_corr,
                           "by_label": by_label}
    return index, details


def _prompt_view(db: LatentDB, layer: str, n_prompts: int, per_token: int) -> dict[str, list]:
    out = {}
    for pidx, block in db.iter_sequence_blocks(layer, prompt_indices=db.prompt_indices(layer)[:n_prompts]):
        rows = []
        for pos in range(block.shape[0]):
            row = block[pos]
            k = min(per_token, row.shape[0])
            idx = np.argpartition(-row, k - 1)[:k]
            idx = idx[np.argsort(-row[idx])]
            rows.append([[int(i), _num(row[i], 3)] for i in idx if row[i] > 0])
        out[str(pidx)] = rows
    return out


def build_dashboard(db: LatentDB, out: str | Path, *, layers: list[str] | None = None, max_tokens: int = 200_000,
                    top_examples: int = 10, max_latents: int | None = None, prompt_view_prompts: int = 20,
                    title: str | None = None) -> Path:
    """Write the dashboard of ``db`` to ``out`` (an existing directory: ``report.html`` inside it)
    and return the path written.

    Args:
        layers: layers to include (default: every latent layer, or every layer when there is none).
        max_tokens: tokens per layer scanned for densities, quantiles and token means.
        top_examples: top activating examples per latent.
        max_latents: only the first N channels of each layer (default: all).
        prompt_view_prompts: prompts available in the prompt view.
    """
    names = layers or [n for n in db.layers() if db.layer_info(n).kind in ("latent", "latent_sae")] or db.layers()
    prompts: dict[int, dict[str, Any]] = {}
    data: dict[str, Any] = {"layers": [], "index": {}, "details": {}, "prompt_view": {}, "prompts": {},
                            "interventions": []}
    table = db.layer_table()
    for name in names:
        info = db.layer_info(name)
        report = db.check_complete(name, what="the dashboard")
        row = table[table["layer"] == name].iloc[0]
        index, details = _layer_payload(db, name, prompts, max_tokens, top_examples, max_latents)
        data["layers"].append({"name": name, "kind": info.kind, "width": info.width, "dtype": info.dtype,
                               "tokens": int(row["tokens"]), "source": info.source,
                               "incomplete": None if report.complete else report.describe()})
        data["index"][name] = index
        data["details"][name] = details
        data["prompt_view"][name] = _prompt_view(db, name, prompt_view_prompts, 8)
        for p in data["prompt_view"][name]:
            prompts.setdefault(int(p), {})
    seqs = db.sequences(prompt_index=sorted(prompts)) if prompts else None
    if seqs is not None:
        toks = db.tokens(prompt_index=sorted(prompts), metrics=False)
        by_prompt = {p: grp["token"].fillna("").tolist() for p, grp in toks.groupby("prompt_index")}
        for rec in seqs.itertuples():
            data["prompts"][str(rec.prompt_index)] = {"text": rec.text, "label": None if rec.label is None else
                                                      str(rec.label), "tokens": by_prompt.get(rec.prompt_index, [])}
    inter = db.interventions()
    for rec in inter.itertuples():
        data["interventions"].append({"layer": rec.layer, "kind": rec.kind, "spec": rec.spec, "results": rec.results})
    data["meta"] = {"db": str(db.path), "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "version": __version__, "title": title or f"Interlatent — {db.path.name}"}
    html = _TEMPLATE.replace("__TITLE__", _escape(data["meta"]["title"])).replace("__DATA__", _json_for_script(data))
    out = Path(out)
    if out.is_dir():
        out = out / "report.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write the dashboard to {str(out)!r}: {exc.strerror or exc}; choose another "
                          "output path (-o)") from exc
    return out


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'none'; form-action 'none'; base-uri 'none'">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:10px 16px;background:#243447;color:#fff}header h1{font-size:17px;margin:0}
header span{opacity:.75;font-size:12px}
nav{display:flex;gap:8px;padding:8px 16px;border-bottom:1px solid #ddd;background:#fff;align-items:center}
nav button{border:1px solid #bbb;background:#f4f4f4;padding:4px 10px;cursor:pointer}nav button.on{background:#243447;color:#fff}
main{display:flex;gap:12px;padding:12px 16px}#left{width:44%;min-width:380px}#right{flex:1;min-width:0}
table{border-collapse:collapse;width:100%;background:#fff}th,td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left}
th{cursor:pointer;background:#f0f2f5;position:sticky;top:0}tr.sel{background:#ffe9b3}tbody tr{cursor:pointer}
#tablewrap{max-height:75vh;overflow:auto;border:1px solid #ddd}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:3px 0;padding:3px 6px;background:#fff;border:1px solid #eee}
.hl{background:#ffb347;font-weight:bold;border-radius:2px}.tok{border-radius:2px;cursor:pointer}
.val{color:#555;display:inline-block;width:5.5em}.card{background:#fff;border:1px solid #ddd;padding:8px 10px;margin-bottom:10px}
.card h3{margin:0 0 6px;font-size:14px}.muted{color:#888}input,select{padding:3px 6px}
.bar{fill:#4a78b5}
</style></head><body>
<header><h1 id="title"></h1><span id="meta"></span></header>
<nav><button id="tab-latents" class="on">Latents</button><button id="tab-prompts">Prompt view</button>
<label>layer <select id="layer"></select></label><input id="filter" placeholder="filter: min count, token, label…" size="32">
<span id="status" class="muted"></span></nav>
<main id="view-latents"><div id="left"><div id="tablewrap"><table id="index"><thead><tr>
<th data-k="c">latent</th><th data-k="count">count</th><th data-k="max">max</th><th data-k="density">density</th>
<th data-k="corr">strongest label correlation</th><th data-k="explanation">explanation</th></tr></thead><tbody></tbody></table></div></div>
<div id="right"><div id="detail" class="muted">Pick a latent.</div></div></main>
<main id="view-prompts" style="display:none"><div style="flex:1"><label>prompt <select id="prompt"></select></label>
<label>colour by latent <input id="pv-latent" type="number" min="0" style="width:6em"></label>
<div id="pv-text" class="card ex"></div><div id="pv-token" class="card"></div></div></main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const NONFINITE = {"inf": Infinity, "-inf": -Infinity, "nan": NaN};
const D = JSON.parse(document.getElementById("data").textContent,
  (k, v) => v !== null && typeof v === "object" && typeof v["$nonfinite"] === "string" ? NONFINITE[v["$nonfinite"]] : v);
const $ = (id) => document.getElementById(id);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === "class") e.className = v; else e.setAttribute(k, v); }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
const fmt = (x, d = 3) => x == null ? "–" : Number.isFinite(Number(x)) ? Number(x).toFixed(d)
  : Number(x) > 0 ? "∞" : Number(x) < 0 ? "−∞" : "NaN";
const specText = (o) => JSON.stringify(o, (k, v) => typeof v === "number" && !Number.isFinite(v) ? fmt(v) : v);
let state = {layer: null, latent: null, sort: "count", desc: true};
$("title").textContent = D.meta.title;
$("meta").textContent = " " + D.meta.db + " · generated " + D.meta.generated + " · interlatent " + D.meta.version;
for (const L of D.layers) $("layer").append(el("option", {value: L.name}, L.name + " (" + L.width + ")" + (L.incomplete ? " ⚠ partial data" : "")));
for (const L of D.layers.filter(L => L.incomplete)) $("status").before(el("span", {class: "incomplete", style: "color:#b00"}, "⚠ " + L.name + ": partial data — " + L.incomplete));
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get("layer") && D.index[h.get("layer")]) state.layer = h.get("layer");
  if (h.get("latent") !== null && h.get("latent") !== "") state.latent = Number(h.get("latent"));
  if (h.get("view") === "prompts") showView("prompts"); else showView("latents");
}
function writeHash() {
  const h = new URLSearchParams({layer: state.layer || ""});
  if (state.latent !== null) h.set("latent", state.latent);
  history.replaceState(null, "", "#" + h.toString());
}
function rows() {
  const q = $("filter").value.trim().toLowerCase();
  let r = D.index[state.layer] || [];
  if (q) {
    const n = Number(q);
    r = r.filter(x => (!isNaN(n) && x.count >= n) || String(x.c) === q || (x.corr && x.corr[0].toLowerCase().includes(q))
      || ((D.details[state.layer][x.c] || {}).top_tokens || []).some(t => t[0].toLowerCase().includes(q)));
  }
  const k = state.sort, s = state.desc ? -1 : 1;
  const key = (x) => k === "corr" ? (x.corr ? Math.abs(x.corr[1]) : -1) : (x[k] == null ? -Infinity : x[k]);
  return r.slice().sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * s);
}
function renderIndex() {
  const tb = document.querySelector("#index tbody");
  tb.replaceChildren();
  const list = rows();
  for (const x of list) {
    const tr = el("tr", {"data-latent": x.c}, el("td", {}, x.c), el("td", {}, x.count), el("td", {}, fmt(x.max)),
      el("td", {}, fmt(x.density, 4)), el("td", {}, x.corr ? x.corr[0] + " r=" + fmt(x.corr[1]) : "–"),
      el("td", {class: "muted"}, x.explanation || ""));
    if (x.c === state.latent) tr.className = "sel";
    tr.addEventListener("click", () => { state.latent = x.c; writeHash(); render(); });
    tb.append(tr);
  }
  $("status").textContent = list.length + " of " + (D.index[state.layer] || []).length + " latents";
}
function exampleLine(e) {
  const [p, pos, v, left, tok, right] = e;
  const line = el("div", {class: "ex", "data-prompt": p, "data-position": pos});
  line.append(el("span", {class: "val"}, fmt(v)), left.join(""), el("span", {class: "hl"}, tok), right.join(""),
    el("span", {class: "muted"}, "   prompt " + p + " · pos " + pos));
  return line;
}
function histogram(h, edges, nonfinite) {
  const ns = "http://www.w3.org/2000/svg", W = 360, H = 90, m = Math.max(1, ...h);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
  h.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect"), bh = Math.round(H * Math.sqrt(c / m));
    r.setAttribute("x", i * W / h.length); r.setAttribute("y", H - bh); r.setAttribute("width", W / h.length - 1);
    r.setAttribute("height", bh); r.setAttribute("class", "bar");
    const t = document.createElementNS(ns, "title"); t.textContent = c + " tokens"; r.append(t); svg.append(r);
  });
  const lab = document.createElementNS(ns, "text");
  lab.setAttribute("x", 0); lab.setAttribute("y", H + 13); lab.setAttribute("font-size", "11");
  lab.textContent = "0 … " + fmt(edges[1]) + " (active values; bar height ∝ √count)" +
    (nonfinite ? "; " + nonfinite + " infinite, not drawn" : "");
  svg.append(lab);
  return svg;
}
function renderDetail() {
  const box = $("detail");
  box.replaceChildren();
  box.className = "";
  const det = state.latent === null ? null : (D.details[state.layer] || {})[state.latent];
  if (!det) { box.className = "muted"; box.textContent = "Pick a latent."; return; }
  const idx = D.index[state.layer][state.latent];
  box.append(el("div", {class: "card", id: "latent-head"}, el("h3", {}, state.layer + " · latent " + state.latent),
    el("span", {id: "latent-stats"}, "active on " + idx.count + " tokens · max " + fmt(idx.max) + " · density " + fmt(idx.density, 4)),
    idx.explanation ? el("div", {id: "latent-explanation"}, idx.explanation) : el("span", {})));
  const top = el("div", {class: "card", id: "top-examples"}, el("h3", {}, "Top activations"));
  det.top.forEach(e => top.append(exampleLine(e)));
  const q = el("div", {class: "card"}, el("h3", {}, "Across activation quantiles (10/30/50/70/90%)"));
  det.quant.forEach(e => q.append(exampleLine(e)));
  const hist = el("div", {class: "card"}, el("h3", {}, "Density"), histogram(det.hist, det.edges, det.nonfinite));
  const tt = el("div", {class: "card"}, el("h3", {}, "Tokens with the highest mean activation"));
  det.top_tokens.forEach(t => tt.append(el("div", {class: "ex"}, el("span", {class: "val"}, fmt(t[1])), el("span", {class: "hl"}, t[0]),
    el("span", {class: "muted"}, "  × " + t[2]))));
  const cc = el("div", {class: "card"}, el("h3", {}, "Correlations"));
  if (!det.corr.length) cc.append(el("span", {class: "muted"}, "none stored (run db.compute_stats())"));
  det.corr.forEach(c => cc.append(el("div", {}, c[0] + "  r = " + fmt(c[1]) + (c[2] == null ? "" : "  (n = " + c[2] + ")"))));
  const bl = el("div", {class: "card"}, el("h3", {}, "Mean activation per label (A/B diff)"));
  det.by_label.forEach(b => bl.append(el("div", {}, b[0] + ": " + fmt(b[1]) + "  (" + b[2] + " tokens)")));
  const fx = el("div", {class: "card"}, el("h3", {}, "Patch effects"));
  const mine = D.interventions.filter(i => i.layer === state.layer &&
    (!i.spec.ablate || i.spec.ablate.includes(state.latent) || i.kind !== "ablation"));
  if (!mine.length) fx.append(el("span", {class: "muted"}, "none stored"));
  mine.forEach(i => fx.append(el("div", {class: "ex"}, i.kind + " " + specText(i.spec) + " → " +
    specText(i.results.metric ? {metric: i.results.metric, value: i.results.value, control_mean: i.results.control_mean,
      control_std: i.results.control_std} : i.results))));
  box.append(top, q, hist, tt, cc, bl, fx);
}
function renderPrompts() {
  const sel = $("prompt"), pv = D.prompt_view[state.layer] || {};
  if (!sel.options.length || sel.dataset.layer !== state.layer) {
    sel.replaceChildren(); sel.dataset.layer = state.layer;
    for (const p of Object.keys(pv)) sel.append(el("option", {value: p}, p + ": " + (D.prompts[p] || {}).text));
  }
  const p = sel.value, tokens = (D.prompts[p] || {}).tokens || [], acts = pv[p] || [];
  const target = $("pv-latent").value === "" ? state.latent : Number($("pv-latent").value);
  let m = 1e-9; acts.forEach(a => a.forEach(([c, v]) => { if (c === target && Number.isFinite(v)) m = Math.max(m, v); }));
  const box = $("pv-text"); box.replaceChildren();
  tokens.forEach((t, i) => {
    const hit = (acts[i] || []).find(([c]) => c === target);
    const a = !hit ? 0 : Number.isFinite(hit[1]) ? Math.min(1, Math.max(0, hit[1] / m)) : hit[1] > 0 ? 1 : 0;
    const s = el("span", {class: "tok", "data-position": i}, t);
    s.style.background = "rgba(255,140,0," + a.toFixed(3) + ")";
    s.addEventListener("click", () => {
      const info = $("pv-token"); info.replaceChildren(el("h3", {}, "token " + i + ": " + t));
      (acts[i] || []).forEach(([c, v]) => info.append(el("div", {}, "latent " + c + ": " + fmt(v))));
    });
    box.append(s);
  });
}
function showView(v) {
  $("view-latents").style.display = v === "latents" ? "flex" : "none";
  $("view-prompts").style.display = v === "prompts" ? "flex" : "none";
  $("tab-latents").className = v === "latents" ? "on" : ""; $("tab-prompts").className = v === "prompts" ? "on" : "";
  if (v === "prompts") renderPrompts();
}
function render() { $("layer").value = state.layer; renderIndex(); renderDetail(); if ($("view-prompts").style.display !== "none") renderPrompts(); }
document.querySelectorAll("#index th").forEach(th => th.addEventListener("click", () => {
  const k = th.dataset.k; state.desc = state.sort === k ? !state.desc : true; state.sort = k; renderIndex(); }));
$("layer").addEventListener("change", () => { state.layer = $("layer").value; state.latent = null; writeHash(); render(); });
$("filter").addEventListener("input", renderIndex);
$("tab-latents").addEventListener("click", () => showView("latents"));
$("tab-prompts").addEventListener("click", () => showView("prompts"));
$("prompt").addEventListener("change", renderPrompts); $("pv-latent").addEventListener("input", renderPrompts);
window.addEventListener("hashchange", () => { readHash(); render(); });
state.layer = D.layers.length ? D.layers[0].name : null;
readHash(); render();
</script></body></html>
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db(parser)
    parser.add_argument("-o", "--out", type=output_file, default="report.html", help="HTML file to write (default "
                        "report.html; a directory: report.html inside it); its folder must exist")
    parser.add_argument("--layer", action="append", help="a layer to include (repeatable; default: latent layers)")
    parser.add_argument("--max-latents", type=positive_int, help="only the first N latents of each layer")
    parser.add_argument("--max-tokens", type=positive_int, default=200_000, help="tokens scanned per layer (default 200,000)")


def run(args: argparse.Namespace) -> int:
    with open_db(args.db) as db:
        layers = [db.resolve_layer(n) for n in args.layer] if args.layer else None
        path = build_dashboard(db, args.out, layers=layers, max_latents=args.max_latents, max_tokens=args.max_tokens)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__.splitlines()[0], add_arguments, run, argv, prog="python -m interlatent.vis.dashboard")


if __name__ == "__main__":
    sys.exit(main())
