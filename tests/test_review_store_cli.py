"""Store and command-line fixes: NaN-aware channel statistics, one-line usage errors, unknown diff
labels, latent layers behind their source layer, and output and pattern options that say what they do."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB
from interlatent.cli import main
from interlatent.db import SequenceRecord, SparseActs
from interlatent.db.stats import MomentAccumulator
from interlatent.errors import IncompleteDataWarning, IncompleteRunError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- 1. NaN-aware moments
def _nan_reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """What each channel's statistics mean: over that channel's non-NaN values (infinities kept)."""
    used = (~np.isnan(x)).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"count": used, "mean": np.nanmean(x, axis=0), "std": np.nanstd(x, axis=0),
                "min": np.nanmin(x, axis=0), "max": np.nanmax(x, axis=0),
                "active": (x > 0).sum(axis=0), "nonzero": ((x != 0) & ~np.isnan(x)).sum(axis=0)}


@st.composite
def nan_matrix_and_cuts(draw):
    rows = draw(st.integers(1, 30))
    cols = draw(st.integers(1, 4))
    values = draw(st.lists(st.one_of(st.floats(-100, 100, allow_nan=False), st.just(float("nan")), st.just(0.0)),
                           min_size=rows * cols, max_size=rows * cols))
    x = np.array(values, dtype=np.float64).reshape(rows, cols)
    cuts = sorted(set(draw(st.lists(st.integers(0, rows), max_size=5))))
    return x, cuts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nan_matrix_and_cuts())
def test_moments_skip_nan_per_channel_in_any_chunking(case):
    x, cuts = case
    acc = MomentAccumulator(x.shape[1], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN chunk or channel must not warn
        for lo, hi in zip([0, *cuts], [*cuts, x.shape[0]]):
            acc.update(x[lo:hi], np.zeros((hi - lo, 0)))
        mean, std = acc.moments()
        lo_, hi_ = acc.extremes()
    ref = _nan_reference(x)
    np.testing.assert_array_equal(acc.used, ref["count"])
    np.testing.assert_array_equal(acc.active, ref["active"])
    np.testing.assert_array_equal(acc.nonzero, ref["nonzero"])
    np.testing.assert_allclose(mean, ref["mean"], rtol=1e-9, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(std, ref["std"], rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(lo_, ref["min"])
    np.testing.assert_array_equal(hi_, ref["max"])


def test_moments_keep_infinities_beside_nan():
    x = np.array([[np.nan, 1.0], [np.inf, np.nan], [2.0, -np.inf], [3.0, 4.0]])
    acc = MomentAccumulator(2, 0)
    acc.update(x, np.zeros((4, 0)))
    mean, _ = acc.moments()
    lo, hi = acc.extremes()
    assert acc.used.tolist() == [3, 3]
    assert mean[0] == np.inf and mean[1] == -np.inf
    assert (lo[0], hi[0]) == (2.0, np.inf) and (lo[1], hi[1]) == (-np.inf, 4.0)


def _nan_store(path: Path, rng) -> np.ndarray:
    """Four prompts of 20 tokens; channel 0 has one NaN (in prompt 1), channel 1 is finite, channel 2
    is NaN in all of prompt 2."""
    blocks = []
    recs = []
    for i in range(4):
        block = (rng.standard_normal((20, 3)) + 0.5).astype(np.float32)
        if i == 1:
            block[7, 0] = np.nan
        if i == 2:
            block[:, 2] = np.nan
        blocks.append(block)
        recs.append(SequenceRecord(list(range(20)), [f" t{j}" for j in range(20)], {"llm.layer.0": block},
                                   text=f"prompt {i}", label="a" if i % 2 else "b", prompt_index=i,
                                   metrics={"score": rng.standard_normal(20)}))
    with LatentDB(path) as db:
        with db.run() as run:
            run.write(recs, dtypes={"llm.layer.0": "float32"})
    return np.concatenate(blocks).astype(np.float64)


@pytest.mark.parametrize("chunk_tokens", [1, 20, 30, 10_000])
def test_compute_stats_min_max_of_a_channel_with_nan_are_its_finite_extremes(tmp_path, rng, chunk_tokens):
    x = _nan_store(tmp_path / "nan.db", rng)
    with LatentDB(tmp_path / "nan.db") as db:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            db.compute_stats(min_count=1, chunk_tokens=chunk_tokens)
        blocks = {b.channel: b for b in db.iter_statblocks("llm.layer.0")}
    ref = _nan_reference(x)
    for c in range(3):
        b = blocks[c]
        assert b.min == pytest.approx(ref["min"][c]) and b.max == pytest.approx(ref["max"][c]), c
        assert b.count == ref["count"][c]
        assert b.mean == pytest.approx(ref["mean"][c]) and b.std == pytest.approx(ref["std"][c])
        assert b.active_count == ref["active"][c]
    assert blocks[0].count == 79 and blocks[2].count == 60 and blocks[1].count == 80


def test_summary_stats_json_of_a_nan_channel_has_numbers(tmp_path, rng, capsys):
    x = _nan_store(tmp_path / "nan.db", rng)
    with LatentDB(tmp_path / "nan.db") as db:
        db.compute_stats(min_count=1)
    rc, out, err = run_cli(capsys, "summary", str(tmp_path / "nan.db"), "--stats", "llm.layer.0", "--format", "json")
    import json

    rows = {r["channel"]: r for r in json.loads(out)}
    assert rc == 0, err
    assert rows[0]["min"] == pytest.approx(np.nanmin(x[:, 0])) and rows[0]["max"] == pytest.approx(np.nanmax(x[:, 0]))
    assert "nonfinite" not in rows[0] and rows[0]["count"] == 79


# ---------------------------------------------------------------------------- 2. one-line usage errors
@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.db"
    rng = np.random.default_rng(0)
    recs = [SequenceRecord(list(range(6)), [" the", " heart", " of", " it", " all", "."],
                           {"llm.layer.1": rng.standard_normal((6, 4)).astype(np.float32)},
                           text=f"the heart of it all {i}", label=["philosopher", "teen", "romantic"][i % 3],
                           prompt_index=i)
            for i in range(6)]
    with LatentDB(path) as db:
        with db.run() as run:
            run.write(recs, dtypes={"llm.layer.1": "float32"})
    return path


USAGE_CALLS = [
    (["summary", "{db}", "--top", "0"], "interlatent summary"),
    (["search", "{db}", "--layer", "llm.layer.1", "--top", "abc"], "interlatent search"),
    (["search", "{db}", "--layer", "llm.layer.1", "--window", "-5"], "interlatent search"),
    (["search", "{db}"], "interlatent search"),
    (["summary"], "interlatent summary"),
    (["diff", "{db}", "--label-a", "teen", "--label-b", "romantic"], "interlatent diff"),
    (["plot", "{db}", "--layer", "llm.layer.1"], "interlatent plot"),
    (["dashboard", "{db}", "--max-latents", "0"], "interlatent dashboard"),
    (["summary", "{db}", "--bogus-flag"], "interlatent summary"),
    (["bogus"], "interlatent"),
]


def _assert_one_usage_line(rc: int, out: str, err: str, prog: str) -> None:
    assert rc == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and lines[0].endswith(f"(see {prog} --help)"), lines[0]
    assert "usage:" not in err and out == ""


@pytest.mark.parametrize("call,prog", USAGE_CALLS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_usage_errors_are_one_line_naming_the_help(small_store, call, prog, capsys):
    rc, out, err = run_cli(capsys, *(a.format(db=small_store) for a in call))
    _assert_one_usage_line(rc, out, err, prog)


@pytest.mark.parametrize("module", ["summary", "search", "diff", "plot", "dashboard"])
def test_module_forms_give_one_line_usage_errors(small_store, module, capsys):
    import importlib

    mod = importlib.import_module(f"interlatent.vis.{module}")
    try:
        rc = mod.main([str(small_store), "--no-such-option"])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    _assert_one_usage_line(rc, out, err, f"python -m interlatent.vis.{module}")


def test_usage_error_of_the_console_script_in_a_process(small_store):
    proc = subprocess.run([sys.executable, "-m", "interlatent.cli", "summary", str(small_store), "--top", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    _assert_one_usage_line(proc.returncode, proc.stdout, proc.stderr, "interlatent summary")


# ---------------------------------------------------------------------------- 3. unknown diff labels
def test_diff_with_an_unknown_label_is_a_data_error_listing_the_labels(small_store, capsys):
    rc, out, err = run_cli(capsys, "diff", str(small_store), "--layer", "llm.layer.1", "--label-a", "philosopher",
                           "--label-b", "nobody")
    assert rc == 1 and out == ""
    line = err.strip()
    assert len(err.strip().splitlines()) == 1 and line.startswith("error: ")
    assert "'nobody'" in line and all(f"'{lab}'" in line for lab in ("philosopher", "teen", "romantic"))


def test_diff_unknown_label_lists_the_closest_first(small_store, capsys):
    rc, _, err = run_cli(capsys, "diff", str(small_store), "--layer", "llm.layer.1", "--label-a", "tean",
                         "--label-b", "philosopher")
    assert rc == 1
    assert err.index("'teen'") < err.index("'philosopher'") and err.index("'teen'") < err.index("'romantic'")


def test_diff_pattern_that_matches_nothing_is_still_no_matches(small_store, capsys):
    rc, out, err = run_cli(capsys, "diff", str(small_store), "--layer", "llm.layer.1", "--prompt-like-a", "zzz",
                           "--label-b", "teen")
    assert rc == 0 and "no matches" in err


# ---------------------------------------------------------------------------- 4. stale latent layers
def _records(indices, rng):
    out = []
    for i in indices:
        out.append(SequenceRecord(list(range(5)), [f" w{j}" for j in range(5)],
                                  {"llm.layer.0": rng.standard_normal((5, 4)).astype(np.float32)},
                                  text=f"prompt {i}", prompt_index=i))
    return out


def _latent(db: LatentDB, rng) -> None:
    pending = []
    for p in db.prompt_indices("llm.layer.0"):
        idx = np.stack([rng.choice(8, 2, replace=False) for _ in range(5)])
        pending.append((p, SparseActs(idx, rng.random((5, 2)).astype(np.float32) + 0.1, 8)))
    with db.run(kind="train") as run:
        db.write_activations(run.run_id, "latent_sae:llm.layer.0", pending, dtype="float32",
                             layer_meta={"kind": "latent_sae", "source": "llm.layer.0", "in_layer": "llm.layer.0"})


def test_latent_layer_behind_its_source_is_reported_incomplete(tmp_path, rng):
    with LatentDB(tmp_path / "s.db") as db:
        with db.run() as run:
            run.write(_records(range(4), rng), dtypes={"llm.layer.0": "float32"})
        _latent(db, rng)
        assert db.layer_completeness("latent_sae:llm.layer.0").complete
        with warnings.catch_warnings():
            warnings.simplefilter("error", IncompleteDataWarning)
            db.check_complete("latent_sae:llm.layer.0")
        with db.run() as run:
            run.write(_records([4, 5], rng), dtypes={"llm.layer.0": "float32"})
        report = db.layer_completeness("latent_sae:llm.layer.0")
        assert not report.complete
        assert report.behind == {"llm.layer.0": (4, 6)}
        with pytest.warns(IncompleteDataWarning) as caught:
            db.check_complete("latent_sae:llm.layer.0", what="the dashboard")
        text = str(caught[0].message)
        assert "4 of the 6" in text and "'llm.layer.0'" in text and "backfill" in text
        with pytest.raises(IncompleteRunError):
            db.check_complete("latent_sae:llm.layer.0", action="raise")
        assert db.layer_completeness("llm.layer.0").complete  # the source itself is whole


def test_latent_layer_backfilled_again_is_complete(tmp_path, rng):
    with LatentDB(tmp_path / "s.db") as db:
        with db.run() as run:
            run.write(_records(range(3), rng), dtypes={"llm.layer.0": "float32"})
        _latent(db, rng)
        with db.run() as run:
            run.write(_records([3], rng), dtypes={"llm.layer.0": "float32"})
        assert not db.layer_completeness("latent_sae:llm.layer.0").complete
        db.delete_layer("latent_sae:llm.layer.0")
        _latent(db, rng)
        assert db.layer_completeness("latent_sae:llm.layer.0").complete


def test_dashboard_flags_a_latent_layer_behind_its_source(tmp_path, rng):
    from interlatent.vis.dashboard import build_dashboard

    with LatentDB(tmp_path / "s.db") as db:
        with db.run() as run:
            run.write(_records(range(3), rng), dtypes={"llm.layer.0": "float32"})
        _latent(db, rng)
        with db.run() as run:
            run.write(_records([3, 4], rng), dtypes={"llm.layer.0": "float32"})
        with pytest.warns(IncompleteDataWarning, match="3 of the 5"):
            html = build_dashboard(db, tmp_path / "r.html", layers=["latent_sae:llm.layer.0"]).read_text()
    assert "3 of the 5" in html


# ---------------------------------------------------------------------------- 5. patterns and output folders
@pytest.mark.parametrize("command,option", [("search", "--prompt-like"), ("search", "--token-like"),
                                            ("diff", "--prompt-like-a"), ("diff", "--prompt-like-b")])
def test_like_options_say_they_are_plain_case_insensitive_substrings(command, option, capsys):
    rc, out, _ = run_cli(capsys, command, "--help")
    assert rc == 0
    flat = " ".join(out.split())
    entry = flat[flat.rindex(option + " "):]  # the option's entry, after the usage line
    assert "plain substring" in entry[:260] and "case-insensitive" in entry[:260] and "%" in entry[:260]


def test_dashboard_into_a_missing_folder_is_a_usage_error_naming_it(small_store, tmp_path, capsys):
    target = tmp_path / "not_there" / "r.html"
    rc, out, err = run_cli(capsys, "dashboard", str(small_store), "-o", str(target))
    _assert_one_usage_line(rc, out, err, "interlatent dashboard")
    assert str(tmp_path / "not_there") in err
    assert not (tmp_path / "not_there").exists()


def test_plot_into_a_missing_folder_is_a_usage_error_naming_it(small_store, tmp_path, capsys):
    target = tmp_path / "not_there" / "p.png"
    rc, out, err = run_cli(capsys, "plot", str(small_store), "--layer", "llm.layer.1", "--channel", "0",
                           "--prompt-index", "0", "--out", str(target))
    _assert_one_usage_line(rc, out, err, "interlatent plot")
    assert str(tmp_path / "not_there") in err
    assert not (tmp_path / "not_there").exists()
