"""The HTML dashboard, opened from file:// in a real headless Chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent.db import SequenceRecord, SparseActs
from interlatent.vis.dashboard import build_dashboard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("dash")
    db = LatentDB(folder / "d.db")
    recs = []
    for i in range(12):
        toks = ["<b>x</b>", " <script>alert(1)</script>", " sky", " is", " blue", " & more"]
        idx = np.stack([rng.choice(32, 3, replace=False) for _ in toks])
        vals = rng.random((len(toks), 3)).astype(np.float32) + 0.05
        idx[0] = [7, 8, 9]
        vals[0] = [2.0 + i, 0.2, 0.1]  # latent 7 fires on the <b>x</b> token
        recs.append(SequenceRecord(list(range(len(toks))), toks, {"latent_sae:llm.layer.0": SparseActs(idx, vals, 32)},
                                   text=f"prompt {i}", label="a" if i % 2 else "b", prompt_index=i))
    with db.run() as run:
        run.write(recs, dtypes={"latent_sae:llm.layer.0": "float32"})
    db.compute_latent_examples("latent_sae:llm.layer.0", top=10)
    db.compute_stats(min_count=1)
    db.set_explanations("latent_sae:llm.layer.0", {7: "<i>markup</i> tokens & <script>x</script>"})
    db.add_intervention("latent_sae:llm.layer.0", "ablation", {"ablate": [7]}, {"metric": "delta_loss", "value": 0.5,
                                                                             "control_mean": 0.01, "control_std": 0.02})
    path = build_dashboard(db, folder / "report.html")
    dense = db.fetch_activations("latent_sae:llm.layer.0").values
    db.close()
    return path, dense


def test_static_properties(report):
    path, _ = report
    html = path.read_text()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    assert not re.search(r"(src|href)=[\"']https?://", html)  # nothing to fetch
    assert "<script>alert(1)</script>" not in html  # the token is data, escaped inside JSON
    assert "<script>x</script>" not in html  # so is a stored explanation
    assert len(html.encode()) < 32 * 10_000 + 40_000  # about 10 KB per latent or less


def test_in_headless_chromium(report):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: scripts/ensure_browser.sh installs chromium")
        pytest.skip("Debian's chromium is not installed (make test installs it where it can)")
    playwright = pytest.importorskip("playwright.sync_api")
    path, dense = report
    errors, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(path.as_uri() + "#layer=latent_sae:llm.layer.0&latent=7")
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
        page.click("#index tbody tr[data-latent='8']")  # switching latents updates detail and link
        page.wait_for_function("document.querySelector('#latent-head').innerText.includes('latent 8')")
        assert "latent=8" in page.url
        page.goto(path.as_uri() + "#layer=latent_sae:llm.layer.0&latent=9")  # a deep link
        page.wait_for_function("document.querySelector('#latent-head').innerText.includes('latent 9')")
        page.click("#tab-prompts")
        assert "<script>" in page.inner_text("#pv-text") and page.locator("#pv-text script").count() == 0
        page.fill("#filter", "sky")
        assert page.locator("#index tbody tr").count() >= 1
        browser.close()
    assert errors == [] and requests == []


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
        recs.append(SequenceRecord(list(range(len(toks))), toks, {"latent_sae:llm.layer.0": SparseActs(idx, vals, 8),
                                                                  "llm.layer.0": dense},
                                   text=f"prompt {i}", label="a" if i % 2 else "b", prompt_index=i,
                                   metrics={"score": np.array([np.inf, 1.0, 2.0, 3.0 + i])}))
    with db.run() as run:
        run.write(recs, dtypes={"latent_sae:llm.layer.0": "float32", "llm.layer.0": "float32"})
    db.compute_latent_examples("latent_sae:llm.layer.0", top=4)
    db.compute_stats(min_count=1)
    db.add_intervention("latent_sae:llm.layer.0", "ablation", {"ablate": [3], "scale": float("nan")},
                        {"metric": "delta_loss", "value": float("inf"), "control_mean": float("nan"), "control_std": 0.1})
    path = build_dashboard(db, folder / "report.html", layers=["latent_sae:llm.layer.0", "llm.layer.0"])
    db.close()
    return path


def test_nonfinite_values_render_in_headless_chromium(nonfinite_report):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser tests: scripts/ensure_browser.sh installs chromium")
        pytest.skip("Debian's chromium is not installed (make test installs it where it can)")
    playwright = pytest.importorskip("playwright.sync_api")
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(nonfinite_report.as_uri() + "#layer=latent_sae:llm.layer.0&latent=3")
        page.wait_for_selector("#top-examples .ex")
        assert "max ∞" in page.inner_text("#latent-stats")
        assert page.locator("#top-examples .ex .val").first.inner_text() == "∞"
        assert "∞" in page.locator("#index tbody tr[data-latent='3'] td").nth(2).inner_text()
        assert "1 infinite, not drawn" in page.locator("#detail svg text").text_content()
        effects = page.inner_text("#detail")
        assert '"scale":"NaN"' in effects and '"value":"∞"' in effects
        assert "score r = " in effects and "(n = 17)" in effects  # the inf metric still correlates
        page.click("#index th[data-k='max']")  # sorting with an Infinity in the column
        page.click("#tab-prompts")
        page.fill("#pv-latent", "3")
        page.select_option("#prompt", "2")
        assert page.locator("#pv-text .tok").count() == 4
        page.goto(nonfinite_report.as_uri() + "#layer=llm.layer.0&latent=0")
        page.wait_for_function("document.querySelector('#latent-head').innerText.includes('latent 0')")
        assert "max ∞" in page.inner_text("#latent-stats")
        browser.close()
    assert errors == []
