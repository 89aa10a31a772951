"use strict";
// Every text reaches the page through textContent (el() below): a token "<script>" shows as text.
const NONFINITE = {"inf": Infinity, "-inf": -Infinity, "nan": NaN};
const D = JSON.parse(document.getElementById("data").textContent,
  (k, v) => v !== null && typeof v === "object" && typeof v["$nonfinite"] === "string" ? NONFINITE[v["$nonfinite"]] : v);
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const PAGE = 25;
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) { if (k === "class") e.className = v; else e.setAttribute(k, v); }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
function svgEl(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text != null) e.textContent = String(text);
  return e;
}
const fmt = (x, d = 3) => x == null ? "–" : typeof x === "boolean" ? String(x) : typeof x === "string" ? x
  : Number.isFinite(Number(x)) ? Number(x).toFixed(d) : Number(x) > 0 ? "∞" : Number(x) < 0 ? "−∞" : "NaN";
const fmtg = (x) => typeof x === "number" && Number.isFinite(x) && x !== 0 && (Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3)
  ? x.toExponential(3) : typeof x === "number" && Number.isInteger(x) ? String(x) : fmt(x, 4);
// a token as it reads: spaces kept (white-space: pre), a newline shown as ↵, an empty token as ∅
const tokText = (t) => t == null ? "∅" : t === "" ? "∅" : t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
const tk = (t) => el("span", {class: "tk"}, tokText(t));

let state = {view: "latents", layer: null, latent: null, sort: "count", desc: true, prompt: null, page: 0,
             cmp: 0, labelA: null, labelB: null};
const layerRec = () => D.layers.find(L => L.name === state.layer) || null;

$("title").textContent = D.meta.title;
$("meta").textContent = " " + D.meta.db + " · generated " + D.meta.generated + " · interlatent " + D.meta.version;
for (const L of D.layers) $("layer").append(el("option", {value: L.name}, L.name + " (" + L.width + ")" + (L.incomplete ? " ⚠ partial data" : "")));
for (const L of D.layers.filter(L => L.incomplete)) $("status").before(el("span", {class: "incomplete", style: "color:#b00"}, "⚠ " + L.name + ": partial data — " + L.incomplete));

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.get("layer") && D.latents[h.get("layer")]) state.layer = h.get("layer");
  state.latent = h.get("latent") !== null && h.get("latent") !== "" ? Number(h.get("latent")) : null;
  if (h.get("prompt") !== null && h.get("prompt") !== "") state.prompt = h.get("prompt");
  state.view = ["prompts", "compare"].includes(h.get("view")) ? h.get("view") : "latents";
}
function writeHash() {
  const h = new URLSearchParams({layer: state.layer || ""});
  if (state.latent !== null) h.set("latent", state.latent);
  if (state.view !== "latents") h.set("view", state.view);
  if (state.view === "prompts" && state.prompt !== null) h.set("prompt", state.prompt);
  history.replaceState(null, "", "#" + h.toString());
}
function goLatent(layer, c) { state.layer = layer; state.latent = c; state.view = "latents"; writeHash(); render(); }

// ------------------------------------------------------------------ layer header
function renderLayerHead() {
  const box = $("layer-head"), L = layerRec();
  box.replaceChildren();
  if (!L) { box.append(el("span", {class: "muted"}, "No layers in this store.")); return; }
  box.append(el("h3", {}, L.name + " · " + L.kind + " · " + L.width + " channels · " + L.tokens + " tokens stored" +
    (L.scanned_tokens < L.tokens ? " (" + L.scanned_tokens + " scanned)" : "") + (L.source ? " · from " + L.source : "")));
  const stats = el("div", {class: "stats"});
  for (const s of L.header) {
    const chip = el("span", {class: "stat", "data-key": s.key}, s.label + ": ", el("b", {}, fmtg(s.value)));
    if (s.note) chip.append(el("span", {class: "muted"}, " (" + s.note + ")"));
    stats.append(chip);
  }
  if (!L.header.length) stats.append(el("span", {class: "muted"}, "no summary stored for this layer"));
  box.append(stats);
}

// ------------------------------------------------------------------ index
function rows() {
  const q = $("filter").value.trim().toLowerCase();
  let r = D.latents[state.layer] || [];
  if (q) {
    const n = Number(q);
    r = r.filter(x => (!isNaN(n) && x.count >= n) || String(x.latent) === q ||
      (x.label_corr && x.label_corr.metric.toLowerCase().includes(q)) || (x.explanation || "").toLowerCase().includes(q) ||
      ((D.details[state.layer][x.latent] || {}).top_tokens || []).some(t => t.token.toLowerCase().includes(q)));
  }
  const k = state.sort, s = state.desc ? -1 : 1;
  const key = (x) => k === "corr" ? (x.label_corr && Number.isFinite(x.label_corr.r) ? Math.abs(x.label_corr.r) : null)
    : k === "explanation" ? x.explanation : (x[k] == null || Number.isNaN(x[k]) ? null : x[k]);
  // dead latents (never > 0) and missing values go last whichever way the column is sorted
  return r.slice().sort((a, b) => {
    if ((a.count === 0) !== (b.count === 0)) return a.count === 0 ? 1 : -1;
    const ka = key(a), kb = key(b);
    if ((ka === null) !== (kb === null)) return ka === null ? 1 : -1;
    return (ka < kb ? -1 : ka > kb ? 1 : 0) * s || a.latent - b.latent;
  });
}
function renderIndex() {
  const tb = document.querySelector("#index tbody");
  tb.replaceChildren();
  const list = rows();
  for (const x of list) {
    const tr = el("tr", {"data-latent": x.latent}, el("td", {}, x.latent), el("td", {class: "num"}, x.count),
      el("td", {class: "num"}, fmt(x.max)), el("td", {class: "num"}, fmt(x.density, 4)),
      el("td", {}, x.label_corr ? x.label_corr.metric + " r=" + fmt(x.label_corr.r) : "–"),
      el("td", {class: "muted"}, x.explanation || ""));
    if (x.latent === state.latent) tr.className = "sel";
    tr.addEventListener("click", () => goLatent(state.layer, x.latent));
    tb.append(tr);
  }
  document.querySelectorAll("#index th").forEach(th => th.classList.toggle("sorted", th.dataset.k === state.sort));
  $("status").textContent = list.length + " of " + (D.latents[state.layer] || []).length + " latents";
}

// ------------------------------------------------------------------ latent page
function shade(v, scale) {
  if (!v) return "";
  if (!Number.isFinite(v)) return v > 0 ? "rgba(232,131,58,1)" : Number.isNaN(v) ? "" : "rgba(58,120,194,1)";
  if (v > 0) return "rgba(232,131,58," + Math.min(1, v / scale.pos).toFixed(3) + ")";
  return "rgba(58,120,194," + Math.min(1, -v / scale.neg).toFixed(3) + ")";
}
function scaleOf(summary) {
  const pos = Number.isFinite(summary.max) && summary.max > 0 ? summary.max : 1;
  const neg = Number.isFinite(summary.min) && summary.min < 0 ? -summary.min : pos;
  return {pos, neg};
}
function exampleLine(e, scale) {
  const P = D.prompts[e.prompt] || {tokens: [], positions: []};
  const line = el("div", {class: "ex", "data-prompt": e.prompt, "data-position": e.position});
  line.append(el("span", {class: "val"}, fmt(e.value)));
  if (e.quantile != null) line.append(el("span", {class: "muted"}, "q" + Math.round(e.quantile * 100) + " "));
  if (e.start > 0) line.append(el("span", {class: "muted"}, "…"));
  e.acts.forEach((v, i) => {
    const row = e.start + i, s = el("span", {class: row === e.row ? "tok hl" : "tok"}, P.tokens[row]);
    s.style.background = shade(v, scale);
    s.title = "activation " + fmt(v) + " · position " + (P.positions[row] ?? row);
    line.append(s);
  });
  if (e.start + e.acts.length < P.tokens.length) line.append(el("span", {class: "muted"}, "…"));
  const where = el("span", {class: "where"}, "   prompt " + e.prompt + " · pos " + e.position);
  where.addEventListener("click", () => { state.view = "prompts"; state.prompt = String(e.prompt); writeHash(); render(); });
  line.append(where);
  return line;
}
function histogram(h) {
  const W = 380, H = 110, ml = 44, mb = 30, mt = 8, w = W - ml - 8, n = h.counts.length, m = Math.max(1, ...h.counts);
  const svg = svgEl("svg", {width: W, height: H + mb + mt, viewBox: "0 0 " + W + " " + (H + mb + mt), id: "hist"});
  const x = (v) => ml + (v - h.lo) / (h.hi - h.lo) * w;
  h.counts.forEach((c, i) => {
    const bh = c ? Math.max(1, H * c / m) : 0, lo = h.lo + (h.hi - h.lo) * i / n, hi = h.lo + (h.hi - h.lo) * (i + 1) / n;
    const r = svgEl("rect", {x: x(lo), y: mt + H - bh, width: Math.max(0.5, w / n - 1), height: bh, class: hi <= 0 ? "bar neg" : "bar"});
    r.append(svgEl("title", {}, c + " tokens in [" + fmt(lo) + ", " + fmt(hi) + ")"));
    svg.append(r);
  });
  svg.append(svgEl("line", {x1: ml, y1: mt + H, x2: ml + w, y2: mt + H, class: "axis"}),
    svgEl("line", {x1: ml, y1: mt, x2: ml, y2: mt + H, class: "axis"}));
  const ticks = [h.lo, h.hi];
  if (h.lo < 0 && h.hi > 0) ticks.splice(1, 0, 0);
  for (const t of ticks) {
    svg.append(svgEl("line", {x1: x(t), y1: mt + H, x2: x(t), y2: mt + H + 4, class: "axis"}),
      svgEl("text", {x: x(t), y: mt + H + 14, "text-anchor": t === h.hi ? "end" : t === h.lo ? "start" : "middle"}, fmt(t)));
  }
  for (const [c, y] of [[0, mt + H], [m, mt + 4]]) svg.append(svgEl("text", {x: ml - 4, y: y, "text-anchor": "end"}, c));
  svg.append(svgEl("text", {x: ml + w / 2, y: mt + H + 27, "text-anchor": "middle"}, h.signed ? "activation (every token)" : "activation (tokens where > 0)"),
    svgEl("text", {x: 10, y: mt + H / 2, transform: "rotate(-90 10 " + (mt + H / 2) + ")", "text-anchor": "middle"}, "tokens"));
  return svg;
}
function effectTable(title, list) {
  const t = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, title), el("th", {class: "num"}, "logit"), el("th", {class: "barcell"}, ""))));
  const m = Math.max(1e-12, ...list.map(x => Math.abs(x.value)).filter(Number.isFinite));
  const tb = el("tbody");
  for (const x of list) {
    const bar = el("span", {class: "hbar " + (x.value >= 0 ? "pos" : "neg")});
    bar.style.width = (100 * Math.min(1, Math.abs(x.value) / m)).toFixed(1) + "%";
    tb.append(el("tr", {}, el("td", {title: "token id " + x.token_id}, x.token == null ? "#" + x.token_id : tk(x.token)),
      el("td", {class: "num"}, fmt(x.value)), el("td", {class: "barcell"}, bar)));
  }
  t.append(tb);
  return t;
}
function fieldTable(fields) {
  const tb = el("tbody");
  for (const f of fields) tb.append(el("tr", {"data-key": f.key}, el("td", {}, f.key), el("td", {}, fmtg(f.value))));
  return el("table", {}, tb);
}
function effectChart(c) {
  const W = 320, rowH = 18, vals = [c.value, ...(c.control_mean == null ? [] : [c.control_mean]), ...c.controls]
    .concat(c.control_mean != null && c.control_std != null ? [c.control_mean - c.control_std, c.control_mean + c.control_std] : [])
    .filter(Number.isFinite);
  const lo = Math.min(0, ...vals), hi = Math.max(0, ...vals), span = hi - lo || 1, ml = 92, w = W - ml - 10;
  const x = (v) => ml + (v - lo) / span * w;
  const svg = svgEl("svg", {width: W, height: rowH * 2 + 26, viewBox: "0 0 " + W + " " + (rowH * 2 + 26), class: "chart"});
  const bar = (row, v, label, cls) => {
    const y = 4 + row * rowH;
    svg.append(svgEl("text", {x: ml - 6, y: y + 11, "text-anchor": "end"}, label));
    if (!Number.isFinite(v)) { svg.append(svgEl("text", {x: x(0) + 4, y: y + 11}, fmt(v))); return y; }
    svg.append(svgEl("rect", {x: Math.min(x(0), x(v)), y: y, width: Math.max(1, Math.abs(x(v) - x(0))), height: rowH - 5, fill: cls}));
    return y;
  };
  bar(0, c.value, "effect", "#e8833a");
  if (c.control_mean != null) {
    const y = bar(1, c.control_mean, "control mean", "#9aa7b5");
    if (c.control_std != null && Number.isFinite(c.control_std) && Number.isFinite(c.control_mean)) {
      svg.append(svgEl("line", {x1: x(c.control_mean - c.control_std), x2: x(c.control_mean + c.control_std), y1: y + 6, y2: y + 6, stroke: "#333"}));
    }
  }
  for (const v of c.controls) if (Number.isFinite(v)) svg.append(svgEl("circle", {cx: x(v), cy: 4 + rowH + 6, r: 2.2, fill: "#333"}));
  const yb = 4 + 2 * rowH;
  svg.append(svgEl("line", {x1: x(0), x2: x(0), y1: 2, y2: yb, class: "axis"}),
    svgEl("text", {x: x(lo), y: yb + 12, "text-anchor": "start"}, fmt(lo)), svgEl("text", {x: x(hi), y: yb + 12, "text-anchor": "end"}, fmt(hi)),
    svgEl("text", {x: ml + w / 2, y: yb + 12, "text-anchor": "middle"}, c.metric));
  return svg;
}
function interventionBlock(i) {
  const b = el("div", {class: "fx", "data-intervention": i.id, "data-kind": i.kind},
    el("h4", {}, i.kind + " #" + i.id + (i.latents ? " · latents " + i.latents.slice(0, 12).join(", ") + (i.latents.length > 12 ? " …" : "") : " · whole layer")
      + " · " + i.created_at));
  if (i.answer) b.append(el("div", {}, "answer tokens: ", ...i.answer.flatMap((a, j) => [j ? " vs " : "", a.token == null ? "#" + a.token_id : tk(a.token),
    el("span", {class: "muted"}, " (#" + a.token_id + ")")])));
  if (i.chart) b.append(effectChart(i.chart));
  b.append(el("div", {class: "cols"}, el("div", {}, el("div", {class: "muted"}, "what was done"), fieldTable(i.spec)),
    el("div", {}, el("div", {class: "muted"}, "measured"), fieldTable(i.results))));
  return b;
}
function renderDetail() {
  const box = $("detail");
  box.replaceChildren();
  box.className = "";
  const det = state.latent === null ? null : (D.details[state.layer] || {})[state.latent];
  if (!det) { box.className = "muted"; box.textContent = "Pick a latent."; return; }
  const idx = D.latents[state.layer][state.latent], scale = scaleOf(idx);
  box.append(el("div", {class: "card", id: "latent-head"}, el("h3", {}, state.layer + " · latent " + state.latent),
    el("span", {id: "latent-stats"}, "active on " + idx.count + " tokens · max " + fmt(idx.max) + (idx.min < 0 ? " · min " + fmt(idx.min) : "")
      + " · density " + fmt(idx.density, 4)),
    idx.explanation ? el("div", {id: "latent-explanation"}, idx.explanation) : el("span", {})));
  const top = el("div", {class: "card", id: "top-examples"}, el("h3", {}, "Top activations"));
  if (!det.top.length) top.append(el("span", {class: "muted"}, "never active in the scanned tokens"));
  det.top.forEach(e => top.append(exampleLine(e, scale)));
  const q = el("div", {class: "card", id: "quantile-examples"}, el("h3", {}, "Across activation quantiles (10/30/50/70/90%)"));
  det.quantiles.forEach(e => q.append(exampleLine(e, scale)));
  const fx = el("div", {class: "card", id: "logit-effects"}, el("h3", {}, "Logit effects"));
  if (det.logit_effects) {
    fx.append(el("div", {class: "muted"}, "the decoder direction through the final norm and unembedding, per unit of activation"),
      el("div", {class: "cols"}, effectTable("promoted", det.logit_effects.promoted), effectTable("suppressed", det.logit_effects.suppressed)));
  } else fx.append(el("span", {class: "muted"}, "not computed — compute_logit_effects(db, layer, model), for dictionaries of the residual stream, mlp_out or attn_out"));
  const hist = el("div", {class: "card", id: "histogram"}, el("h3", {}, "Activation histogram"));
  if (det.histogram) {
    hist.append(histogram(det.histogram), el("div", {class: "muted", id: "hist-note"}, det.histogram.n + (det.histogram.signed ? " values" : " active values") +
      (det.histogram.nonfinite ? "; " + det.histogram.nonfinite + " infinite, not drawn" : "")));
  } else hist.append(el("span", {class: "muted"}, "no activations"));
  const tt = el("div", {class: "card", id: "top-tokens"}, el("h3", {}, "Tokens with the highest mean activation"));
  det.top_tokens.forEach(t => tt.append(el("div", {}, el("span", {class: "val"}, fmt(t.mean)), tk(t.token), el("span", {class: "muted"}, "  × " + t.count))));
  const cc = el("div", {class: "card", id: "correlations"}, el("h3", {}, "Label association"));
  if (!det.correlations.length) cc.append(el("span", {class: "muted"}, "no correlations stored (run db.compute_stats())"));
  det.correlations.forEach(c => cc.append(el("div", {}, c.metric + "  r = " + fmt(c.r) + (c.n == null ? "" : "  (n = " + c.n + ")"))));
  if (det.by_label.length) {
    cc.append(el("h4", {}, "Mean activation per label (A/B diff)"));
    const m = Math.max(1e-12, ...det.by_label.map(b => Math.abs(b.mean)).filter(Number.isFinite));
    const tb = el("tbody");
    det.by_label.forEach(b => {
      const bar = el("span", {class: "hbar " + (b.mean >= 0 ? "pos" : "neg")});
      bar.style.width = (100 * Math.min(1, Math.abs(b.mean) / m)).toFixed(1) + "%";
      tb.append(el("tr", {"data-label": b.label}, el("td", {}, b.label), el("td", {class: "num"}, fmt(b.mean)),
        el("td", {class: "num muted"}, b.count + " tokens"), el("td", {class: "barcell"}, bar)));
    });
    cc.append(el("table", {}, tb));
  }
  const pf = el("div", {class: "card", id: "patch-effects"}, el("h3", {}, "Patch, steering and attribution results"));
  const mine = D.interventions.filter(i => i.layer === state.layer && (i.latents === null || i.latents.includes(state.latent)));
  if (!mine.length) pf.append(el("span", {class: "muted"}, "none stored"));
  mine.forEach(i => pf.append(interventionBlock(i)));
  box.append(top, q, fx, hist, tt, cc, pf);
}

// ------------------------------------------------------------------ prompt view
function viewPrompts() {
  const pl = D.prompt_latents[state.layer] || {}, q = $("pv-search").value.trim().toLowerCase();
  return Object.keys(pl).map(Number).sort((a, b) => a - b).map(String).filter(p => {
    if (!q) return true;
    const P = D.prompts[p] || {};
    return p === q || (P.text || "").toLowerCase().includes(q) || (P.label || "").toLowerCase() === q;
  });
}
function renderPrompts(paging = false) {
  const L = layerRec(), pl = D.prompt_latents[state.layer] || {}, list = viewPrompts();
  const pages = Math.max(1, Math.ceil(list.length / PAGE));
  state.page = Math.min(Math.max(0, state.page), pages - 1);
  if (paging) state.prompt = list[state.page * PAGE] ?? null;
  else if (state.prompt === null || !list.includes(state.prompt)) { state.prompt = list.length ? list[0] : null; state.page = 0; }
  else state.page = Math.floor(list.indexOf(state.prompt) / PAGE);
  $("pv-count").textContent = list.length + " of " + (L ? L.prompt_view_prompts : 0) + " prompts" +
    (L && L.prompt_view_prompts < L.prompt_view_total ? " (" + L.prompt_view_total + " stored; the view holds the first " + L.prompt_view_prompts + ")" : "");
  const ul = $("pv-list"); ul.replaceChildren();
  for (const p of list.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
    const P = D.prompts[p] || {};
    const li = el("li", {"data-prompt": p, class: p === state.prompt ? "sel" : "", title: P.text || ""}, p + ": " + (P.text || "") + (P.label != null ? "  [" + P.label + "]" : ""));
    li.addEventListener("click", () => { state.prompt = p; writeHash(); renderPrompts(); });
    ul.append(li);
  }
  $("pv-page").textContent = "page " + (state.page + 1) + " of " + pages;
  $("pv-prev").disabled = state.page === 0; $("pv-next").disabled = state.page >= pages - 1;
  const box = $("pv-text"); box.replaceChildren();
  $("pv-token").replaceChildren(el("span", {class: "muted"}, "Click a token to list its top latents."));
  if (state.prompt === null) { box.append(el("span", {class: "muted"}, "no prompts in the view")); $("pv-legend").textContent = ""; return; }
  const P = D.prompts[state.prompt] || {tokens: []}, stored = pl[state.prompt];
  // a prompt cut by the scan's token budget has no latents past the cut
  const acts = {latents: P.tokens.map((t, i) => stored.latents[i] || []), values: P.tokens.map((t, i) => stored.values[i] || [])};
  const typed = $("pv-latent").value;
  const target = typed === "" ? state.latent : Number(typed);
  const complete = L && L.prompt_view_complete;
  const valueAt = (i) => {
    if (target === null) return acts.values[i].length ? acts.values[i][0] : 0;
    const j = acts.latents[i].indexOf(target);
    return j >= 0 ? acts.values[i][j] : (complete || acts.latents[i].length < L.prompt_view_per_token ? 0 : null);
  };
  let m = 1e-9;
  P.tokens.forEach((t, i) => { const v = valueAt(i); if (v != null && Number.isFinite(v)) m = Math.max(m, v); });
  $("pv-legend").textContent = target === null ? " shading: each token's strongest latent (max " + fmt(m) + ")"
    : " shading: latent " + target + " (max in this prompt " + fmt(m) + ")" + (complete ? "" : "; dotted: not among the token's top " + L.prompt_view_per_token);
  P.tokens.forEach((t, i) => {
    const v = valueAt(i), s = el("span", {class: "tok" + (v === null ? " unk" : ""), "data-position": i}, t);
    s.style.background = v === null ? "" : shade(v, {pos: m, neg: m});
    s.title = v === null ? "latent " + target + " is not among this token's top " + L.prompt_view_per_token : (target === null
      ? (acts.latents[i].length ? "latent " + acts.latents[i][0] + ": " + fmt(v) : "no active latent") : "latent " + target + ": " + fmt(v));
    s.addEventListener("click", () => {
      box.querySelectorAll(".picked").forEach(x => x.classList.remove("picked")); s.classList.add("picked");
      const info = $("pv-token");
      info.replaceChildren(el("h3", {}, "token " + i + ": ", tk(t)));
      if (!acts.latents[i].length) info.append(el("span", {class: "muted"}, "no latent > 0 here"));
      acts.latents[i].forEach((c, j) => {
        const a = el("span", {class: "linkish", "data-latent": c}, "latent " + c);
        a.addEventListener("click", () => goLatent(state.layer, c));
        const ex = (D.latents[state.layer][c] || {}).explanation;
        info.append(el("div", {}, a, ": " + fmt(acts.values[i][j]), ex ? el("span", {class: "muted"}, "  " + ex) : ""));
      });
      if (!complete && acts.latents[i].length) info.append(el("div", {class: "muted"}, "the token's top " + L.prompt_view_per_token + " latents by value"));
    });
    box.append(s);
  });
}

// ------------------------------------------------------------------ compare
function renderCompare() {
  const cd = $("cmp-dicts"); cd.replaceChildren(el("h3", {}, "Two dictionaries of one layer (decoder-cosine matches)"));
  const recs = D.compare;
  if (!recs.length) cd.append(el("span", {class: "muted"}, "No two dictionaries in this report decode into the same layer (an SAE and a transcoder of llm.layer.N.mlp_out, say)."));
  else {
    const sel = el("select", {id: "cmp-pair"});
    recs.forEach((r, i) => sel.append(el("option", {value: i}, r.a + "  vs  " + r.b + "  (into " + r.writes + ")")));
    sel.value = String(state.cmp);
    sel.addEventListener("change", () => { state.cmp = Number(sel.value); renderCompare(); });
    const r = recs[state.cmp] || recs[0];
    cd.append(sel, el("div", {id: "cmp-summary"}, "mean best cosine " + fmt(r.mean_max_cosine) + " · " + fmt(100 * r.matched_above_0_9, 1) +
      "% of " + r.a + "'s latents have a match above 0.9 in " + r.b));
    const desc = (layer, c) => {
      const d = (D.details[layer] || {})[c], x = (D.latents[layer] || [])[c] || {};
      return x.explanation || (d ? d.top_tokens.slice(0, 4).map(t => tokText(t.token)).join(" ") : "");
    };
    const tb = el("tbody");
    r.matches.slice().sort((a, b) => b.cosine - a.cosine).slice(0, 200).forEach(m => {
      const la = el("span", {class: "linkish"}, m.a), lb = el("span", {class: "linkish"}, m.b);
      la.addEventListener("click", () => goLatent(r.a, m.a)); lb.addEventListener("click", () => goLatent(r.b, m.b));
      tb.append(el("tr", {}, el("td", {}, la), el("td", {class: "muted"}, desc(r.a, m.a)), el("td", {class: "num"}, fmt(m.cosine)),
        el("td", {}, lb), el("td", {class: "muted"}, desc(r.b, m.b))));
    });
    cd.append(el("table", {id: "cmp-table"}, el("thead", {}, el("tr", {}, el("th", {}, r.a), el("th", {}, "reads"), el("th", {class: "num"}, "cosine"),
      el("th", {}, r.b), el("th", {}, "reads"))), tb));
  }
  const cl = $("cmp-labels"); cl.replaceChildren(el("h3", {}, "A/B label diff · " + state.layer));
  const L = layerRec(), labels = L ? L.labels : [];
  if (labels.length < 2) { cl.append(el("span", {class: "muted"}, "this layer's prompts carry fewer than two labels")); return; }
  if (!labels.includes(state.labelA)) state.labelA = labels[0];
  if (!labels.includes(state.labelB) || state.labelB === state.labelA) state.labelB = labels.find(l => l !== state.labelA);
  const pick = (id, cur, set) => {
    const s = el("select", {id: id}); labels.forEach(l => s.append(el("option", {value: l}, l))); s.value = cur;
    s.addEventListener("change", () => { set(s.value); renderCompare(); }); return s;
  };
  cl.append(el("label", {}, "A ", pick("cmp-a", state.labelA, v => { state.labelA = v; })), " ",
    el("label", {}, "B ", pick("cmp-b", state.labelB, v => { state.labelB = v; })));
  const dets = D.details[state.layer] || {}, out = [];
  for (const [c, d] of Object.entries(dets)) {
    const a = d.by_label.find(b => b.label === state.labelA), b = d.by_label.find(b => b.label === state.labelB);
    if (a && b && Number.isFinite(a.mean - b.mean)) out.push({c: Number(c), a, b, diff: a.mean - b.mean});
  }
  out.sort((x, y) => Math.abs(y.diff) - Math.abs(x.diff));
  const tb = el("tbody");
  out.slice(0, 50).forEach(r => {
    const l = el("span", {class: "linkish"}, r.c); l.addEventListener("click", () => goLatent(state.layer, r.c));
    tb.append(el("tr", {"data-latent": r.c}, el("td", {}, l), el("td", {class: "num"}, fmt(r.a.mean)), el("td", {class: "num"}, fmt(r.b.mean)),
      el("td", {class: "num"}, fmt(r.diff)), el("td", {class: "muted"}, (D.latents[state.layer][r.c] || {}).explanation || "")));
  });
  cl.append(el("table", {id: "label-diff"}, el("thead", {}, el("tr", {}, el("th", {}, "latent"), el("th", {class: "num"}, "mean " + state.labelA),
    el("th", {class: "num"}, "mean " + state.labelB), el("th", {class: "num"}, "A − B"), el("th", {}, "explanation"))), tb),
    el("div", {class: "muted"}, "means over every scanned token of the label's prompts; the 50 largest |A − B|"));
}

// ------------------------------------------------------------------ views
function showView(v) {
  state.view = v;
  $("view-latents").style.display = v === "latents" ? "flex" : "none";
  $("view-prompts").style.display = v === "prompts" ? "flex" : "none";
  $("view-compare").style.display = v === "compare" ? "block" : "none";
  for (const t of ["latents", "prompts", "compare"]) $("tab-" + t).className = v === t ? "on" : "";
}
function render() {
  $("layer").value = state.layer;
  showView(state.view);
  renderLayerHead();
  if (state.view === "latents") { renderIndex(); renderDetail(); }
  else if (state.view === "prompts") renderPrompts();
  else renderCompare();
}
document.querySelectorAll("#index th").forEach(th => th.addEventListener("click", () => {
  const k = th.dataset.k; state.desc = state.sort === k ? !state.desc : true; state.sort = k; renderIndex(); }));
$("layer").addEventListener("change", () => { state.layer = $("layer").value; state.latent = null; state.prompt = null; state.page = 0; writeHash(); render(); });
$("filter").addEventListener("input", () => { if (state.view !== "latents") { state.view = "latents"; writeHash(); render(); } else renderIndex(); });
for (const t of ["latents", "prompts", "compare"]) $("tab-" + t).addEventListener("click", () => { state.view = t; writeHash(); render(); });
$("pv-search").addEventListener("input", () => { state.page = 0; renderPrompts(true); writeHash(); });
$("pv-prev").addEventListener("click", () => { state.page -= 1; renderPrompts(true); writeHash(); });
$("pv-next").addEventListener("click", () => { state.page += 1; renderPrompts(true); writeHash(); });
$("pv-latent").addEventListener("input", () => renderPrompts());
window.addEventListener("hashchange", () => { readHash(); render(); });
state.layer = D.layers.length ? D.layers[0].name : null;
readHash(); render();
