"""The HTML dashboard, opened from file:// in a real headless Chromium driven by Playwright.

Every view is checked at 1,280 px: no horizontal overflow, no JS error, no network request, and
stored text shown as text. Set ``INTERLATENT_DASH_SHOTS=/some/dir`` to save screenshots.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent.db import SequenceRecord, SparseActs
from interlatent.vis.dashboard import ASSETS, asset, build_dashboard
from interlatent.vis.dashboard_data import context_window

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
LAYER = "latent_sae:llm.layer.0"
N_PROMPTS, PEAK = 60, 30
WORDS = [" the", " inter", "national", " sky", " is", " blue", " and", " counter", "revolution", "aries", " said",
         " so", ","]
HOSTILE = ["<b>x</b>", " <script>alert(1)</script>", " & more"]


def _tokens(i: int) -> list[str]:
    toks = [WORDS[(i + j) % len(WORDS)] for j in range(44)]
    toks[PEAK], toks[PEAK + 1], toks[PEAK + 2] = HOSTILE
    return toks


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("dash")
    db = LatentDB(folder / "d.db")
    recs = []
    for i in range(N_PROMPTS):
        toks = _tokens(i)
        idx = np.stack([rng.choice(np.arange(10, 31), 3, replace=False) for _ in toks])  # 31 stays dead
        vals = rng.random((len(toks), 3)).astype(np.float32) + 0.05
        idx[PEAK] = [7, 8, 9]
        vals[PEAK] = [2.0 + i, 0.2, 0.1]  # latent 7 fires on the <b>x</b> token ...
        for d, v in ((-3, 0.25), (-1, 0.5), (1, 0.75)):  # ... and a little on its neighbours
            idx[PEAK + d, 0], vals[PEAK + d, 0] = 7, v
        recs.append(SequenceRecord(list(range(len(toks))), toks, {LAYER: SparseActs(idx, vals, 32)},
                                   text=f"prompt {i}: " + "".join(toks), label="a" if i % 2 else "b", prompt_index=i))
    with db.run() as run:
        run.write(recs, dtypes={LAYER: "float32"})
    db.compute_latent_examples(LAYER, top=10)
    db.compute_stats(min_count=1)
    db.set_explanations(LAYER, {7: "<i>markup</i> tokens & <script>x</script>"})
    ids = db.tokens(prompt_index=0, metrics=False)["token_id"].tolist()
    sky, blue = ids[WORDS.index(" sky")], ids[WORDS.index(" blue")]
    db.add_intervention(LAYER, "ablation", {"ablate": [7], "mode": "zero", "answer": [sky, blue], "n_control": 3},
                        {"latents": [7], "metric": "delta_loss", "value": 0.5, "control_mean": 0.01, "control_std": 0.02,
                         "exceeds_control": True, "effect": {"loss_clean": 2.0, "loss_patched": 2.5, "delta_loss": 0.5},
                         "control": [{"delta_loss": 0.0}, {"delta_loss": 0.03}, {"delta_loss": 0.0}],
                         "control_latents": [[11], [12], [13]]})
    db.add_intervention(LAYER, "steering", {"steer": {"8": 4.0}, "positions": [-1], "answer": [77, sky]},
                        {"metric": "delta_logit_diff", "value": -1.25, "control_mean": 0.1, "control_std": 0.2})
    db.add_intervention(LAYER, "attribution", {"method": "ig", "steps": 8, "answer": [sky, blue]},
                        {"latents": [7, 9], "scores": [0.8, -0.1]})
    width = 32
    promoted = {"promoted": np.tile([sky, blue, 77], (width, 1)), "suppressed": np.tile([4, 5, 6], (width, 1))}
    values = {"promoted": np.tile([2.5, 1.5, 0.5], (width, 1)), "suppressed": np.tile([-2.0, -1.0, -0.5], (width, 1))}
    db.set_logit_effects(LAYER, promoted, values, tokens={sky: " sky", blue: " blue", 77: "<img src=x onerror=alert(1)>"})
    path = build_dashboard(db, folder / "report.html")
    dense = db.fetch_activations(LAYER).values
    db.close()
    return path, dense


def payload(path: Path) -> dict:
    text = re.search(r'<script type="application/json" id="data">(.*?)</script>', path.read_text(), re.S).group(1)
    return json.loads(text)


@contextmanager
def browser_page():
    """A 1,280 px page that records JS errors and every request that is not file: or data:."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: scripts/ensure_browser.sh installs chromium")
        pytest.skip("Debian's chromium is not installed (make test installs it where it can)")
    playwright = pytest.importorskip("playwright.sync_api")
    errors, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.errors, page.requests = errors, requests
        yield page
        browser.close()
    assert errors == [] and requests == []


def assert_fits(page, name: str) -> None:
    """No horizontal overflow at this width, no error so far; a screenshot when asked for."""
    page.wait_for_timeout(50)
    widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                           " document.body.scrollWidth]")
    assert widths[0] <= widths[1] and widths[2] <= widths[1], f"{name}: horizontal overflow {widths}"
    assert page.errors == [] and page.requests == [], name
    shots = os.environ.get("INTERLATENT_DASH_SHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)


# ---------------------------------------------------------------------------- static
def test_static_properties(report):
    path, _ = report
    html = path.read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r"(src|href)=[\"']https?://", html)  # nothing to fetch
    assert "<script>alert(1)</script>" not in html  # the token is data, escaped inside JSON
    assert "<script>x</script>" not in html  # so is a stored explanation
    assert "<img src=x" not in html  # and a stored logit-effect token


def test_assets_are_package_files_inlined_into_the_page(report):
    path, _ = report
    html = path.read_text()
    folder = Path(__file__).resolve().parents[1] / "interlatent" / "vis" / "assets"
    for name in ASSETS:
        assert (folder / name).is_file()
        assert asset(name) == (folder / name).read_text(encoding="utf-8")
    assert asset("dashboard.js") in html and asset("dashboard.css") in html
    data = tomllib.loads((folder.parents[2] / "pyproject.toml").read_text())
    assert "vis/assets/*" in data["tool"]["setuptools"]["package-data"]["interlatent"]  # shipped in the wheel


def test_payload_is_typed_records_with_named_fields(report):
    path, dense = report
    data = payload(path)
    row = data["latents"][LAYER][7]
    assert set(row) == {"latent", "count", "max", "min", "density", "label_corr", "explanation"}
    assert row["latent"] == 7 and row["count"] == int((dense[:, 7] > 0).sum())
    assert set(row["label_corr"]) == {"metric", "r", "n"}
    det = data["details"][LAYER]["7"]
    ex = det["top"][0]
    assert set(ex) == {"prompt", "position", "row", "value", "start", "acts", "quantile"}
    assert set(det["histogram"]) == {"lo", "hi", "counts", "signed", "nonfinite", "n"}
    assert set(det["logit_effects"]["promoted"][0]) == {"token", "token_id", "value"}
    fx = data["interventions"][0]
    assert {f["key"] for f in fx["results"]} >= {"metric", "value", "control_mean", "effect.delta_loss"}
    assert set(data["prompts"]["0"]) == {"prompt", "text", "label", "tokens", "positions"}
    assert set(data["prompt_latents"][LAYER]["0"]) == {"latents", "values"}


def test_size_is_at_most_10_kb_per_latent(report):
    path, _ = report
    html = path.read_text()
    page = len(html.encode()) - sum(len(asset(n).encode()) for n in ASSETS)
    assert page / 32 <= 10_000


def test_context_window_cuts_at_word_boundaries():
    toks = [" the", " inter", "national", " sky", " is", " counter", "revolution", "aries", " said"] * 8
    lo, hi = context_window(toks, 36)
    assert 36 - lo <= 24 and hi - 37 <= 24
    assert toks[lo].startswith(" ") and (hi == len(toks) or toks[hi].startswith(" "))
    assert context_window(toks, 0) == (0, 23) and context_window(toks[:5], 2) == (0, 5)
    assert context_window(["ab"] * 60, 30) == (6, 55)  # no boundary anywhere: the plain window


# ---------------------------------------------------------------------------- the latent page
def test_latent_page_in_headless_chromium(report):
    path, dense = report
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={LAYER}")
        page.wait_for_selector("#index tbody tr")
        assert_fits(page, "index")
        page.goto(path.as_uri() + f"#layer={LAYER}&latent=7")
        page.wait_for_selector("#top-examples .ex")
        head = page.inner_text("#latent-head")
        assert "latent 7" in head
        assert page.inner_text("#latent-explanation") == "<i>markup</i> tokens & <script>x</script>"
        row = page.locator("#index tbody tr[data-latent='7']")
        assert "<i>markup</i> tokens" in row.inner_text() and row.locator("i").count() == 0
        first = page.locator("#top-examples .ex").first
        assert first.locator(".hl").inner_text() == "<b>x</b>"  # rendered literally, not as bold
        assert first.locator("b").count() == 0
        shown = float(first.locator(".val").inner_text())
        assert shown == pytest.approx(dense[:, 7].max(), abs=5e-4)  # the store's value, to 3 decimals
        count = int(re.search(r"active on (\d+)", head).group(1))
        assert count == int((dense[:, 7] > 0).sum())
        assert_fits(page, "latent")
        page.click("#index tbody tr[data-latent='8']")  # switching latents updates detail and link
        page.wait_for_function("document.querySelector('#latent-head').innerText.includes('latent 8')")
        assert "latent=8" in page.url
        page.goto(path.as_uri() + f"#layer={LAYER}&latent=9")  # a deep link
        page.wait_for_function("document.querySelector('#latent-head').innerText.includes('latent 9')")
        page.fill("#filter", "sky")
        assert page.locator("#index tbody tr").count() >= 1


def test_examples_show_24_tokens_of_context_each_shaded_by_its_activation(report):
    path, dense = report
    best = int(np.argmax(dense[:, 7])) // 44  # the prompt of the top example
    toks = _tokens(best)
    lo, hi = context_window(toks, PEAK)
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={LAYER}&latent=7")
        page.wait_for_selector("#top-examples .ex")
        first = page.locator("#top-examples .ex").first
        assert first.get_attribute("data-prompt") == str(best)
        spans = first.locator(".tok")
        assert spans.count() == hi - lo and PEAK - lo >= 20 and hi == len(toks)
        texts = spans.all_text_contents()
        assert "".join(texts) == "".join(toks[lo:hi])  # whole words at both ends
        titles = [spans.nth(i).get_attribute("title") for i in range(spans.count())]
        values = [float(re.match(r"activation (\S+)", t).group(1)) for t in titles]
        np.testing.assert_allclose(values, dense[best * 44 + lo: best * 44 + hi, 7], atol=5e-4)
        shaded = [spans.nth(i).evaluate("e => e.style.background") for i in range(spans.count())]
        for v, bg in zip(values, shaded):
            assert bool(bg) == (v > 0)  # every active token is shaded, the others are not
        assert page.locator("#quantile-examples .ex").count() == 5


def test_logit_effects_histogram_and_label_association(report):
    path, dense = report
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={LAYER}&latent=7")
        page.wait_for_selector("#logit-effects table")
        fx = page.locator("#logit-effects table").first.locator("tbody tr")
        assert fx.count() == 3
        assert fx.nth(0).locator(".tk").inner_text() == " sky"  # the token's text, leading space kept
        assert fx.nth(2).locator(".tk").inner_text() == "<img src=x onerror=alert(1)>"
        assert page.locator("#logit-effects img").count() == 0
        assert "2.500" in fx.nth(0).inner_text()
        ticks = page.locator("#hist text").all_text_contents()
        active = dense[:, 7][dense[:, 7] > 0]
        data = payload(path)["details"][LAYER]["7"]["histogram"]
        assert sum(data["counts"]) == active.size and data["signed"] is False
        assert str(max(data["counts"])) in ticks and "tokens" in ticks and "0" in ticks  # axes with counts
        assert "activation (tokens where > 0)" in ticks
        labels = page.locator("#correlations tr[data-label]")
        assert labels.count() == 2
        rows = np.repeat(np.arange(N_PROMPTS) % 2, 44)
        want_a = dense[rows == 1, 7].sum() / (rows == 1).sum()
        got_a = float(page.locator("#correlations tr[data-label='a'] td").nth(1).inner_text())
        assert got_a == pytest.approx(want_a, abs=5e-4)


def test_patch_steering_and_attribution_results_are_tables_not_json(report):
    path, _ = report
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={LAYER}&latent=7")
        page.wait_for_selector("#patch-effects .fx")
        text = page.inner_text("#patch-effects")
        assert "{" not in text and '"' not in text  # never raw JSON
        kinds = page.locator("#patch-effects .fx").evaluate_all("els => els.map(e => e.dataset.kind)")
        assert kinds == ["ablation", "attribution"]  # steering acted on latent 8 only
        ablation = page.locator("#patch-effects .fx[data-kind='ablation']")
        assert ablation.locator("tr[data-key='effect.delta_loss'] td").nth(1).inner_text() == "0.5000"
        assert ablation.locator("tr[data-key='control_latents'] td").nth(1).inner_text().startswith("3 lists")
        assert " sky" in ablation.locator(".tk").all_text_contents()  # answer ids shown as token strings
        chart = ablation.locator("svg.chart")
        assert chart.locator("rect").count() == 2 and chart.locator("circle").count() == 3  # effect, control, dots
        assert_fits(page, "latent_effects")
        page.click("#index tbody tr[data-latent='8']")
        page.wait_for_selector("#patch-effects .fx[data-kind='steering']")
        steering = page.locator("#patch-effects .fx[data-kind='steering']")
        assert "4" in steering.locator("tr[data-key='steer.8'] td").nth(1).inner_text()
        answer = steering.locator(".tk").all_text_contents()  # an id seen only among the logit effects
        assert answer == ["<img src=x onerror=alert(1)>", " sky"] and steering.locator("img").count() == 0


def test_sorting_twice_keeps_dead_latents_last(report):
    path, _ = report
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={LAYER}")
        page.wait_for_selector("#index tbody tr")
        for ascending in (True, False):  # count is the default sort: the first click flips it
            page.click("#index th[data-k='count']")
            order = page.locator("#index tbody tr").evaluate_all("rs => rs.map(r => +r.dataset.latent)")
            assert order[-8:] == [0, 1, 2, 3, 4, 5, 6, 31]  # never fire: last either way
            counts = page.locator("#index tbody tr td:nth-child(2)").all_text_contents()
            live = [int(c) for c in counts if c != "0"]
            assert live == sorted(live, reverse=not ascending) and len(live) == 24  # 0..6 and 31 never fire


# ---------------------------------------------------------------------------- prompt view
def test_prompt_view_lists_every_prompt_paged_and_searchable(report):
    path, dense = report
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={LAYER}&view=prompts")
        page.wait_for_selector("#pv-list li")
        assert page.inner_text("#pv-count").startswith(f"{N_PROMPTS} of {N_PROMPTS} prompts")
        assert page.locator("#pv-list li").count() == 25
        assert page.locator("#pv-text .tok").count() == 44  # not blank before a latent is typed
        assert page.locator("#pv-text .tok").first.evaluate("e => e.style.background") != ""
        assert_fits(page, "prompts")
        seen = set()
        for page_no in range(3):
            seen |= set(page.locator("#pv-list li").evaluate_all("ls => ls.map(l => l.dataset.prompt)"))
            if page_no < 2:
                page.click("#pv-next")
        assert page.locator("#pv-next").is_disabled() and page.inner_text("#pv-page") == "page 3 of 3"
        assert seen == {str(i) for i in range(N_PROMPTS)}
        page.fill("#pv-search", "prompt 42:")
        assert page.locator("#pv-list li").evaluate_all("ls => ls.map(l => l.dataset.prompt)") == ["42"]
        assert "<script>" in page.inner_text("#pv-text") and page.locator("#pv-text script").count() == 0
        page.locator(f"#pv-text .tok[data-position='{PEAK}']").click()
        listed = page.locator("#pv-token .linkish").evaluate_all("ls => ls.map(l => +l.dataset.latent)")
        row = dense[42 * 44 + PEAK]
        assert listed == [int(i) for i in np.argsort(-row, kind="stable")[: (row > 0).sum()]]
        page.locator("#pv-token .linkish").first.click()  # a listed latent opens its page
        page.wait_for_selector("#top-examples .ex")
        assert "latent=7" in page.url
        page.goto(path.as_uri() + f"#layer={LAYER}&view=prompts&prompt=3")
        page.fill("#pv-latent", "7")
        shades = page.locator("#pv-text .tok").evaluate_all("ts => ts.map(t => t.style.background !== '')")
        assert shades == list(dense[3 * 44: 4 * 44, 7] > 0)


# ---------------------------------------------------------------------------- header and compare
@pytest.fixture(scope="module")
def trained_report(tmp_path_factory, tiny_tl):
    from interlatent.analysis.logit_effects import compute_logit_effects
    from interlatent.analysis.train import SAEPipeline, TranscoderPipeline

    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("dash_trained")
    db = LatentDB(folder / "t.db")
    recs = [SequenceRecord(list(range(10)), [f" w{j}" for j in range(10)],
                           {"llm.layer.0.mlp_in": rng.standard_normal((10, 32)).astype(np.float32),
                            "llm.layer.0.mlp_out": rng.standard_normal((10, 32)).astype(np.float32)},
                           text=f"p{i}", label="x" if i % 2 else "y", prompt_index=i) for i in range(16)]
    with db.run() as run:
        run.write(recs, dtypes={"llm.layer.0.mlp_in": "float32", "llm.layer.0.mlp_out": "float32"})
    sae = SAEPipeline(db, "llm.layer.0.mlp_out", k=4, d_sae=24, steps=10, batch_size=32, progress=False).run()
    tc = TranscoderPipeline(db, "llm.layer.0", k=4, d_sae=24, steps=10, batch_size=32, progress=False).run()
    for res in (sae, tc):
        compute_logit_effects(db, res.latent_layer, tiny_tl, top=5)
    db.add_intervention(tc.latent_layer, "splice_quality", {"keep_error": False, "n_prompts": 4},
                        {"ce_clean": 3.0, "ce_spliced": 3.2, "loss_recovered_zero": 0.875})
    layers = [sae.latent_layer, tc.latent_layer, "llm.layer.0.mlp_out"]
    path = build_dashboard(db, folder / "report.html", layers=layers)
    out = (path, sae, tc, db.fetch_activations("llm.layer.0.mlp_out").values)
    db.close()
    return out


def test_layer_header_shows_dictionary_quality_and_model_layer_statistics(trained_report):
    path, sae, tc, dense = trained_report
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={tc.latent_layer}&latent=0")
        page.wait_for_selector("#layer-head .stat")
        stat = lambda key: page.locator(f"#layer-head .stat[data-key='{key}'] b").inner_text()  # noqa: E731
        assert float(stat("fvu")) == pytest.approx(tc.metrics["fvu"], abs=1e-4)
        assert float(stat("explained_variance")) == pytest.approx(tc.metrics["explained_variance"], abs=1e-4)
        assert float(stat("l0")) == pytest.approx(tc.metrics["l0"], abs=1e-4)
        assert float(stat("dead_fraction")) == pytest.approx(tc.metrics["dead_fraction"], abs=1e-4)
        assert stat("loss_recovered_zero") == "0.8750"
        assert page.locator("#logit-effects table").count() == 2  # computed at backfill from the model
        assert_fits(page, "trained_latent")
        page.goto(path.as_uri() + f"#layer={sae.latent_layer}&latent=0")
        page.wait_for_function("document.querySelector('#layer-head').innerText.includes('latent_sae')")
        assert "not evaluated" in page.inner_text("#layer-head [data-key='ce_loss_score']")
        page.goto(path.as_uri() + "#layer=llm.layer.0.mlp_out&latent=0")
        page.wait_for_selector("#hist")
        assert float(stat("fraction_positive")) == pytest.approx((dense > 0).mean(), abs=1e-4)
        assert float(stat("mean_std")) == pytest.approx(dense.std(0).mean(), abs=1e-3)
        hist = payload(path)["details"]["llm.layer.0.mlp_out"]["0"]["histogram"]
        assert hist["signed"] and hist["lo"] < 0 and sum(hist["counts"]) == dense.shape[0]  # every value, signed
        assert "activation (every token)" in page.locator("#hist text").all_text_contents()
        assert_fits(page, "model_layer")


def test_compare_view_matches_decoders_by_cosine_and_diffs_labels(trained_report):
    from interlatent.analysis.models import load_module

    path, sae, tc, _ = trained_report
    wa, wb = (load_module(r.path).W_dec.detach().numpy() for r in (tc, sae))
    a, b = sorted([(tc.latent_layer, wa), (sae.latent_layer, wb)])
    na, nb = (w / np.linalg.norm(w, axis=1, keepdims=True) for w in (a[1], b[1]))
    cos = na @ nb.T
    data = payload(path)["compare"]
    assert len(data) == 1 and (data[0]["a"], data[0]["b"]) == (a[0], b[0])
    assert data[0]["writes"] == "llm.layer.0.mlp_out"
    for m in data[0]["matches"]:
        assert m["b"] == int(cos[m["a"]].argmax()) and m["cosine"] == pytest.approx(cos[m["a"]].max(), abs=1e-4)
    with browser_page() as page:
        page.goto(path.as_uri() + f"#layer={tc.latent_layer}&view=compare")
        page.wait_for_selector("#cmp-table tbody tr")
        first = page.locator("#cmp-table tbody tr").first.locator("td")
        assert float(first.nth(2).inner_text()) == pytest.approx(cos.max(1).max(), abs=1e-3)
        assert page.locator("#label-diff tbody tr").count() > 0
        top = page.locator("#label-diff tbody tr").first
        c = int(top.get_attribute("data-latent"))
        det = payload(path)["details"][tc.latent_layer][str(c)]["by_label"]
        mean = {b["label"]: b["mean"] for b in det}
        assert float(top.locator("td").nth(3).inner_text()) == pytest.approx(mean["x"] - mean["y"], abs=1e-3)
        assert_fits(page, "compare")


# ---------------------------------------------------------------------------- non-finite values
@pytest.fixture(scope="module")
def nonfinite_report(tmp_path_factory):
    """A latent that is +inf once, a dense layer with +-inf, and NaN / inf in a stored patch effect."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("dash_inf")
    db = LatentDB(folder / "inf.db")
    recs = []
    for i in range(6):
        toks = [" sky", " is", " blue", " today"]
        idx = np.stack([rng.choice(8, 2, replace=False) for _ in toks])
        vals = rng.random((len(toks), 2)).astype(np.float32) + 0.05
        idx[1], vals[1] = [3, 4], [np.inf if i == 2 else 1.0 + i, 0.5]  # latent 3 is +inf once
        dense = rng.standard_normal((len(toks), 4)).astype(np.float32)
        dense[0, 0], dense[1, 1] = np.inf, -np.inf
        recs.append(SequenceRecord(list(range(len(toks))), toks, {LAYER: SparseActs(idx, vals, 8),
                                                                  "llm.layer.0": dense},
                                   text=f"prompt {i}", label="a" if i % 2 else "b", prompt_index=i,
                                   metrics={"score": np.array([np.inf, 1.0, 2.0, 3.0 + i])}))
    with db.run() as run:
        run.write(recs, dtypes={LAYER: "float32", "llm.layer.0": "float32"})
    db.compute_latent_examples(LAYER, top=4)
    db.compute_stats(min_count=1)
    db.add_intervention(LAYER, "ablation", {"ablate": [3], "scale": float("nan")},
                        {"metric": "delta_loss", "value": float("inf"), "control_mean": float("nan"), "control_std": 0.1})
    path = build_dashboard(db, folder / "report.html", layers=[LAYER, "llm.layer.0"])
    db.close()
    return path


def test_nonfinite_values_render_in_headless_chromium(nonfinite_report):
    with browser_page() as page:
        page.goto(nonfinite_report.as_uri() + f"#layer={LAYER}&latent=3")
        page.wait_for_selector("#top-examples .ex")
        assert "max ∞" in page.inner_text("#latent-stats")
        assert page.locator("#top-examples .ex .val").first.inner_text() == "∞"
        assert "∞" in page.locator("#index tbody tr[data-latent='3'] td").nth(2).inner_text()
        assert "1 infinite, not drawn" in page.inner_text("#hist-note")
        fx = page.locator("#patch-effects .fx")
        assert fx.locator("tr[data-key='scale'] td").nth(1).inner_text() == "NaN"
        assert fx.locator("tr[data-key='value'] td").nth(1).inner_text() == "∞"
        assert "score r = " in page.inner_text("#detail") and "(n = 17)" in page.inner_text("#detail")
        assert_fits(page, "nonfinite_latent")
        page.click("#index th[data-k='max']")  # sorting with an Infinity in the column
        page.click("#tab-prompts")
        page.fill("#pv-latent", "3")
        page.locator("#pv-list li[data-prompt='2']").click()
        assert page.locator("#pv-text .tok").count() == 4
        assert_fits(page, "nonfinite_prompts")
        page.goto(nonfinite_report.as_uri() + "#layer=llm.layer.0&latent=0")
        page.wait_for_function("document.querySelector('#latent-head').innerText.includes('latent 0')")
        assert "max ∞" in page.inner_text("#latent-stats")
        page.click("#tab-compare")
        assert_fits(page, "nonfinite_compare")


def test_prompt_view_leaves_out_a_prompt_cut_by_max_tokens(tmp_path):
    rng = np.random.default_rng(2)
    with LatentDB(tmp_path / "cut.db") as db:
        recs = [SequenceRecord(list(range(10)), [f" t{j}" for j in range(10)],
                               {LAYER: SparseActs(rng.integers(0, 8, (10, 2)), rng.random((10, 2)).astype(np.float32), 8)},
                               text=f"p{i}", prompt_index=i) for i in range(3)]
        with db.run() as run:
            run.write(recs, dtypes={LAYER: "float32"})
        path = build_dashboard(db, tmp_path / "r.html", max_tokens=25)  # prompt 2 is read up to token 5
    data = payload(path)
    assert sorted(data["prompt_latents"][LAYER]) == ["0", "1"]
    assert data["layers"][0]["scanned_tokens"] == 25 and data["layers"][0]["prompt_view_total"] == 3
