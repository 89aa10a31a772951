"""The shape sweep's pieces at a tiny shape: the figures it reports and how recovery and FVU are scored."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sae_bench as bench
import sae_sweep as sweep


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return w / w.norm(dim=-1, keepdim=True)


def test_a_decoder_holding_the_planted_features_recovers_all_and_a_random_one_none():
    f = _unit(48, 64, 1)
    extra = _unit(16, 64, 2)
    decoder = torch.cat([extra, 3.0 * f.flip(0)])  # any order, any row norm
    assert bench.recovered(f, decoder, 0.9) == 48
    assert bench.recovered(f, _unit(64, 64, 3), 0.9) == 0
    # 16 features, each bent to cosine 0.8 with its truth (a direction orthogonal to every feature
    # added): found at 0.7, not at 0.9
    q, _ = torch.linalg.qr(torch.cat([f.t(), _unit(16, 64, 4).t()], 1))
    bent = 0.8 * f[:16] + 0.6 * q[:, 48:].t()
    assert bench.recovered(f, bent, 0.9) == 0
    assert bench.recovered(f, bent, 0.7) == 16


def test_quality_scores_fvu_dead_and_recovery_against_a_hand_built_case():
    f, g = _unit(8, 16, 5), _unit(8, 16, 6)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(7))
    w_dec = torch.cat([f, _unit(8, 16, 8)])
    idx = torch.zeros(300, 1, dtype=torch.long)  # only latent 0 ever fires

    def exact(xb):
        return xb.clone(), idx[: xb.shape[0]], torch.ones(xb.shape[0], 1)

    def mean(xb):
        return x.mean(0).expand_as(xb), idx[: xb.shape[0]], torch.ones(xb.shape[0], 1)

    fired = torch.zeros(16, dtype=torch.long)
    fired[3] = 5  # fired in training, not in evaluation
    q = bench.quality(exact, w_dec, w_dec, f, g, x, None, fired, False)
    assert q["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert q["rec90"] == 8 and q["l0"] == 1.0
    assert q["dead"] == pytest.approx(14 / 16)
    assert bench.quality(mean, w_dec, w_dec, f, g, x, None, fired, False)["fvu"] == pytest.approx(1.0, rel=1e-9)
    assert bench.quality(exact, w_dec, w_dec, f, g, x, None, fired, True)["rec90"] == 0  # scored against g


def test_planted_data_follows_the_shape_and_refuses_the_model_seed():
    shape = sweep.sweep_shape(16, 4, 4, 64, n_train=640, n_eval=128)
    assert (shape.d_sae, shape.n_feat, shape.active, shape.epoch) == (64, 32, 2.0, 10)
    f, g, x, y, xe, ye = bench.planted(True, shape)
    assert f.shape == g.shape == (32, 16) and x.shape == y.shape == (640, 16) and xe.shape == ye.shape == (128, 16)
    # ~2 active features of magnitude ~1: squared norm ~ 2 * E[a^2] = 2 * 13/12
    assert 1.5 < float(x.pow(2).sum(-1).mean()) < 2.9
    with pytest.raises(ValueError, match="model seed"):
        bench.planted(False, shape, seed=bench.MODEL_SEED)


def test_one_tiny_shape_gives_every_figure_and_a_table():
    torch.set_num_threads(1)
    shape = sweep.sweep_shape(16, 4, 4, 64, n_train=320, n_eval=128)
    res = sweep.run_shape(shape, False, "cpu", repeats=1, steps_per=1, threads=1, with_quality=True,
                          with_memory=False)
    rows = [r for r in sweep.PEERS if r in res["throughput"]["no_auxk"]]
    assert rows[:2] == ["ours", "minimal"]
    for key in ("no_auxk", "auxk"):
        assert res["throughput"][key]["minimal"]["ratio_vs_minimal"] == pytest.approx(1.0)
        for r in rows:
            t = res["throughput"][key][r]
            assert t["steps_per_s"] > 0 and t["min"] <= t["steps_per_s"] <= t["max"]
    for r in rows:
        q = res["quality"][r]
        assert 0.0 <= q["fvu"] < 1.5 and 0.0 <= q["dead"] <= 1.0 and 0 <= q["rec90"] <= shape.n_feat
    text = sweep.table(res)
    assert "d 16, 64 latents (4d), k 4, batch 64" in text
    for r in rows:
        assert sweep.LABELS[r] in text
    json.dumps(res)


def test_the_step_memory_of_the_minimal_loop_holds_its_dense_pre_activations():
    shape = sweep.sweep_shape(32, 32, 8, 512)  # pre-activations [512, 1024]: 2 MiB
    # in a fresh process with every allocation from fresh pages, as the sweep measures (in this process the
    # allocator may serve the step from pages already resident, and the high-water mark would not move)
    peak = sweep.step_peak("minimal", shape, False, True, "cpu", threads=1)
    dense_mb = shape.batch * shape.d_sae * 4 / 2**20
    assert peak["step_peak_mb"] >= dense_mb  # AuxK: pre, its masked copy and its gradient are all dense
    assert peak["steady_mb"] > 0


def test_ours_and_the_minimal_loop_score_through_the_same_quality_path():
    shape = sweep.sweep_shape(16, 4, 4, 64, n_train=320, n_eval=128)
    data = bench.planted(False, shape)
    f, g, _, _, xe, _ = data
    mini = bench.MinimalTopK(16, 16, bench.MODEL_SEED, shape.d_sae, shape.k)
    with torch.no_grad():
        mini.W_dec[: shape.n_feat] = f  # a decoder that holds the truth recovers it whatever was trained
    q = bench.quality(mini.encode_decode, mini.W_dec, mini.W_enc, f, g, xe, None,
                      torch.zeros(shape.d_sae, dtype=torch.long), False)
    assert q["rec90"] == shape.n_feat


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_row_runs_and_scores_on_cuda():
    shape = sweep.sweep_shape(16, 4, 4, 64, n_train=320, n_eval=128)
    res = sweep.run_shape(shape, False, "cuda", repeats=1, steps_per=1, threads=1, with_quality=True)
    assert set(res["quality"]) >= {"ours", "minimal"}
    assert res["memory"]["minimal"]["auxk"]["step_peak_mb"] > 0


def test_a_variant_of_ours_is_trained_beside_the_defaults_and_shown():
    """``--ours-variant``: an extra quality row of ours with other settings, its own numbers (the
    settings reach the model and the optimiser), in the table with what it changed."""
    torch.set_num_threads(1)
    variant = sweep.parse_variant("init_scale=0.1, decoder_lr_scale=10,lr_schedule=linear,warmup_steps=2")
    assert variant == {"init_scale": 0.1, "decoder_lr_scale": 10.0, "lr_schedule": "linear", "warmup_steps": 2}
    assert isinstance(variant["warmup_steps"], int) and sweep.parse_variant("") is None
    shape = sweep.sweep_shape(16, 4, 4, 64, n_train=320, n_eval=128)
    res = sweep.run_shape(shape, False, "cpu", repeats=1, steps_per=1, threads=1, with_quality=True,
                          with_memory=False, variant=variant)
    q, base = res["quality"]["variant"], res["quality"]["ours"]
    assert 0.0 <= q["fvu"] < 1.5 and q["fvu"] != base["fvu"]
    text = sweep.table(res)
    assert "ours (variant)" in text and "init_scale=0.1" in text and "lr_schedule=linear" in text
    for bad, says in (("lr", "key=value"), ("learning_rate=1", "unknown setting 'learning_rate'"),
                      ("init_scale=-1", "init_scale must be")):
        with pytest.raises(ValueError, match=says):
            sweep.parse_variant(bad)
