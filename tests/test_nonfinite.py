"""Non-finite values (+inf, -inf, NaN) in activations, token metrics and intervention records: the
statistics stay computed on the finite values, and every command and the dashboard still produce
strict JSON (no ``Infinity`` / ``NaN`` tokens) and never crash."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest

from interlatent import LatentDB
from interlatent.cli import main
from interlatent.db import SequenceRecord, SparseActs
from interlatent.db.stats import MomentAccumulator
from interlatent.vis.dashboard import build_dashboard

N_PROMPTS, N_POS, WIDTH = 6, 7, 5
INF_AT = (1, 2, 1)  # prompt, position, channel of the +inf activation
NEG_INF_AT = (2, 3, 2)  # and of the -inf one
METRIC_INF_AT = (0, 1)  # prompt, position of the +inf token metric


def _strict_loads(text: str):
    """json.loads that refuses the non-standard Infinity / -Infinity / NaN tokens."""
    def reject(token: str):
        raise ValueError(f"non-standard JSON constant {token!r}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def inf_store(tmp_path_factory):
    """A store whose dense float32 layer holds +inf and -inf, whose float16 layer overflowed (promoted
    to float32), whose latent layer has an +inf latent, and whose token metric has an +inf."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("nonfinite") / "inf.db"
    dense_all, metric_all = [], []
    recs = []
    for i in range(N_PROMPTS):
        dense = rng.standard_normal((N_POS, WIDTH)).astype(np.float32)
        if i == INF_AT[0]:
            dense[INF_AT[1], INF_AT[2]] = np.inf
        if i == NEG_INF_AT[0]:
            dense[NEG_INF_AT[1], NEG_INF_AT[2]] = -np.inf
        half = rng.standard_normal((N_POS, 3)).astype(np.float32)
        if i == 3:
            half[0, 0] = 1e6  # beyond float16: the row is promoted to float32
            half[1, 1] = np.inf
        idx = np.stack([rng.choice(8, 2, replace=False) for _ in range(N_POS)])
        vals = rng.random((N_POS, 2)).astype(np.float32) + 0.1
        if i == 4:
            idx[2] = [6, 7]
            vals[2] = [np.inf, 0.5]  # latent 6 is +inf once
        score = rng.standard_normal(N_POS)
        if i == METRIC_INF_AT[0]:
            score[METRIC_INF_AT[1]] = np.inf
        score[-1] = np.nan  # undefined for the last token of every prompt
        dense_all.append(dense)
        metric_all.append(score)
        recs.append(SequenceRecord(list(range(N_POS)), [f" t{j}" for j in range(N_POS)],
                                   {"llm.layer.0": dense, "llm.layer.1": half,
                                    "latent:llm.layer.0": SparseActs(idx, vals, 8)},
                                   text=f"{'A' if i % 2 else 'B'} prompt {i}", label="a" if i % 2 else "b",
                                   prompt_index=i, metrics={"score": score}))
    with LatentDB(path) as db:
        with db.run() as run:
            run.write(recs, dtypes={"llm.layer.0": "float32", "llm.layer.1": "float16",
                                    "latent:llm.layer.0": "float32"})
        db.compute_latent_examples("latent:llm.layer.0", top=4)
        db.compute_stats(min_count=1)
        db.add_intervention("latent:llm.layer.0", "ablation", {"ablate": [6], "scale": float("nan")},
                            {"metric": "delta_loss", "value": float("inf"), "control_mean": float("-inf"),
                             "control_std": float("nan")})
    return path, np.concatenate(dense_all), np.concatenate(metric_all).astype(np.float32)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------- correlations
def _pearson_on_finite(x: np.ndarray, m: np.ndarray) -> tuple[float, int]:
    keep = np.isfinite(x) & np.isfinite(m)
    return float(np.corrcoef(x[keep].astype(np.float64), m[keep].astype(np.float64))[0, 1]), int(keep.sum())


def test_inf_token_metric_keeps_its_correlations_on_the_finite_rows(inf_store):
    path, dense, score = inf_store
    with LatentDB(path, mode="r") as db:
        blocks = {b.channel: b for b in db.iter_statblocks("llm.layer.0")}
    for c in range(WIDTH):
        want, n = _pearson_on_finite(dense[:, c], score)
        got = dict(blocks[c].top_correlations)
        assert "score" in got, f"channel {c}: the correlation with the metric holding one inf was dropped"
        assert got["score"] == pytest.approx(want, abs=1e-9)
        assert blocks[c].correlation_counts["score"] == n  # the count actually used is reported
    # channels 1 and 2 hold an inf activation themselves: one fewer usable row than the clean ones
    assert blocks[1].correlation_counts["score"] == blocks[0].correlation_counts["score"] - 1
    assert blocks[0].correlation_counts["score"] == N_PROMPTS * (N_POS - 1) - 1
    # the label indicators have no non-finite values: every row with a finite activation counts
    assert blocks[0].correlation_counts["label==a"] == N_PROMPTS * N_POS
    assert blocks[1].correlation_counts["label==a"] == N_PROMPTS * N_POS - 1


def test_stats_of_an_infinite_channel_keep_the_infinite_extremes(inf_store):
    path, dense, _ = inf_store
    with LatentDB(path, mode="r") as db:
        blocks = {b.channel: b for b in db.iter_statblocks("llm.layer.0")}
        frame = db.stats_frame("llm.layer.0")
    assert blocks[1].max == np.inf and blocks[1].mean == np.inf
    assert blocks[2].min == -np.inf and blocks[2].mean == -np.inf
    assert blocks[0].mean == pytest.approx(float(dense[:, 0].astype(np.float64).mean()))
    assert "top_n" in frame.columns and frame["top_n"].notna().all()


def test_moment_accumulator_masks_pairs_in_any_chunking(rng):
    x = rng.standard_normal((40, 3))
    m = rng.standard_normal((40, 2))
    x[5, 0], x[17, 2], m[9, 1], m[30, 0] = np.inf, -np.inf, np.inf, np.nan
    whole = MomentAccumulator(3, 2)
    whole.update(x, m)
    parts = MomentAccumulator(3, 2)
    for lo, hi in ((0, 7), (7, 8), (8, 40)):
        parts.update(x[lo:hi], m[lo:hi])
    r1, n1 = whole.correlations()
    r2, n2 = parts.correlations()
    np.testing.assert_allclose(r1, r2, rtol=1e-12)
    np.testing.assert_array_equal(n1, n2)
    for c in range(3):
        for k in range(2):
            want, n = _pearson_on_finite(x[:, c], m[:, k])
            assert r1[c, k] == pytest.approx(want, abs=1e-12) and n1[c, k] == n


# ---------------------------------------------------------------------------- command output
def test_search_json_is_strict_and_says_which_values_were_infinite(inf_store, capsys):
    path, _, _ = inf_store
    rc, out, err = run_cli(capsys, "search", str(path), "--layer", "llm.layer.0", "--top", "3", "--format", "json")
    assert rc == 0, err
    rows = _strict_loads(out)
    top = rows[0]
    assert (top["prompt_index"], top["position"], top["channel"]) == INF_AT
    assert top["value"] is None and top["nonfinite"] == {"value": "inf"}
    assert all("nonfinite" not in r for r in rows[1:]) and isinstance(rows[1]["value"], float)


def test_search_csv_and_table_spell_infinity(inf_store, capsys):
    path, _, _ = inf_store
    rc, out, _ = run_cli(capsys, "search", str(path), "--layer", "llm.layer.0", "--top", "2", "--format", "csv")
    first = next(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and first["value"] == "inf" and float(first["value"]) == np.inf
    rc, out, _ = run_cli(capsys, "search", str(path), "--layer", "llm.layer.0", "--top", "2")
    assert rc == 0 and re.search(r"\binf\b", out.splitlines()[1])


def test_float16_overflow_promoted_layer_searches_as_strict_json(inf_store, capsys):
    path, _, _ = inf_store
    rc, out, err = run_cli(capsys, "search", str(path), "--layer", "llm.layer.1", "--top", "2", "--format", "json")
    rows = _strict_loads(out)
    assert rc == 0 and rows[0]["nonfinite"] == {"value": "inf"} and rows[1]["value"] == pytest.approx(1e6)


def test_summary_and_diff_json_are_strict_with_infinite_stats(inf_store, capsys):
    path, _, _ = inf_store
    rc, out, err = run_cli(capsys, "summary", str(path), "--stats", "llm.layer.0", "--format", "json")
    assert rc == 0, err
    stats = {r["channel"]: r for r in _strict_loads(out)}
    assert stats[1]["max"] is None and stats[1]["nonfinite"]["max"] == "inf"
    assert stats[2]["min"] is None and stats[2]["nonfinite"]["min"] == "-inf"
    assert isinstance(stats[0]["mean"], float) and "nonfinite" not in stats[0]
    rc, out, err = run_cli(capsys, "diff", str(path), "--layer", "llm.layer.0", "--label-a", "a", "--label-b", "b",
                           "--format", "json")
    assert rc == 0 and err == ""
    rows = {r["channel"]: r for r in _strict_loads(out)}
    assert rows[1]["nonfinite"]["mean_a"] == "inf" and rows[1]["mean_a"] is None
    assert rows[1]["std_diff"] is None  # undefined, not a zero effect
    assert isinstance(rows[0]["std_diff"], float)
    rc, out, err = run_cli(capsys, "summary", str(path), "--format", "json")
    assert rc == 0 and _strict_loads(out)["store"][0]["sequences"] == N_PROMPTS


def test_stored_top_examples_keep_an_infinite_activation(inf_store, capsys):
    path, _, _ = inf_store
    with LatentDB(path, mode="r") as db:
        examples = db.latent_examples("latent:llm.layer.0", channel=6)
    assert examples["value"].iloc[0] == np.inf and examples["prompt_index"].iloc[0] == 4
    # the unfiltered search answers from those stored examples
    rc, out, _ = run_cli(capsys, "search", str(path), "--layer", "latent:llm.layer.0", "--top", "1", "--format", "json")
    row = _strict_loads(out)[0]
    assert rc == 0 and (row["channel"], row["prompt_index"], row["position"]) == (6, 4, 2)
    assert row["nonfinite"] == {"value": "inf"}


# ---------------------------------------------------------------------------- dashboard payload
def _payload(html: str):
    text = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
    return _strict_loads(text)


def test_dashboard_builds_with_infinite_activations_and_nan_in_a_spec(inf_store, tmp_path):
    path, _, _ = inf_store
    with LatentDB(path, mode="r") as db:
        out = build_dashboard(db, tmp_path / "r.html", layers=["latent:llm.layer.0", "llm.layer.0"])
    data = _payload(out.read_text())
    index = {r["latent"]: r for r in data["latents"]["latent:llm.layer.0"]}
    assert index[6]["max"] == {"$nonfinite": "inf"}
    assert data["details"]["latent:llm.layer.0"]["6"]["top"][0]["value"] == {"$nonfinite": "inf"}
    hist = data["details"]["latent:llm.layer.0"]["6"]["histogram"]
    assert hist["nonfinite"] == 1 and sum(hist["counts"]) == index[6]["count"] - 1
    fields = {f["key"]: f["value"] for part in ("spec", "results") for f in data["interventions"][0][part]}
    assert fields["scale"] == {"$nonfinite": "nan"} and fields["value"] == {"$nonfinite": "inf"}


def test_dashboard_builds_with_only_a_nan_in_an_intervention_spec(tmp_path):
    path = tmp_path / "nan_spec.db"
    with LatentDB(path) as db:
        idx = np.array([[0, 1], [1, 2]])
        vals = np.array([[1.0, 0.5], [0.25, 2.0]], dtype=np.float32)
        with db.run() as run:
            run.write([SequenceRecord([0, 1], [" a", " b"], {"latent:llm.layer.0": SparseActs(idx, vals, 4)},
                                      text="a b", prompt_index=0)], dtypes={"latent:llm.layer.0": "float32"})
        db.add_intervention("latent:llm.layer.0", "steer", {"latents": [1], "alpha": float("nan")}, {"kl": 0.1})
        out = build_dashboard(db, tmp_path / "r.html")
    record = _payload(out.read_text())["interventions"][0]
    assert record["spec"] == [{"key": "latents", "value": "1"}, {"key": "alpha", "value": {"$nonfinite": "nan"}}]
    assert record["latents"] == [1]


def test_query_records_are_strict_json_like_the_commands(inf_store):
    from interlatent.vis import queries

    path, _, _ = inf_store
    with LatentDB(path, mode="r") as db:
        rows = queries.to_records(queries.search(db, layer="llm.layer.0", top=2))
    assert rows[0]["value"] is None and rows[0]["nonfinite"] == {"value": "inf"}
    assert _strict_loads(json.dumps(rows, allow_nan=False)) == rows


def test_plot_scales_to_the_finite_values_and_labels_the_infinite_ones(inf_store):
    from interlatent.vis import queries
    from interlatent.vis.plot import figure

    path, dense, _ = inf_store
    with LatentDB(path, mode="r") as db:
        heat = queries.trace(db, "llm.layer.0", INF_AT[0], [0, 1, 2])
        one = queries.trace(db, "llm.layer.0", INF_AT[0], [INF_AT[2]])
    fig = figure(heat, "llm.layer.0", INF_AT[0])
    ax = fig.axes[0]
    finite = heat[["ch0", "ch1", "ch2"]].to_numpy()
    finite = finite[np.isfinite(finite)]
    assert ax.images[0].get_clim() == pytest.approx((-np.abs(finite).max(), np.abs(finite).max()))
    assert [t.get_text() for t in ax.texts] == ["+∞"]
    fig = figure(one, "llm.layer.0", INF_AT[0])
    marks = [t for t in fig.axes[0].texts if t.get_text() == "+∞"]
    assert len(marks) == 1 and marks[0].get_position()[0] == INF_AT[1]
