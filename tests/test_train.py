"""Dictionaries and probes on synthetic activations with planted ground truth, written through the store."""

from __future__ import annotations

import json

import math

import numpy as np
import pytest
import torch

from interlatent import LatentDB
from interlatent.analysis.dataset import ActivationPairDataset, ActivationVectorDataset, LinearProbeDataset
from interlatent.analysis.models import (
    LinearProbe,
    LinearProbeConfig,
    SparseAutoencoder,
    SparseCoderConfig,
    Transcoder,
    load_module,
    save_module,
)
from interlatent.analysis.models.sparse import dense_topk_reference
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline, train_linear_probe
from interlatent.db import SequenceRecord
from interlatent.errors import ArtifactError, ConfigError, LayerNotFoundError, NotEnoughDataError

D, F = 32, 48  # activation width, planted features


def unit(rng, n, d):
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def planted_codes(rng, n, f=F, p=3 / F):
    active = rng.random((n, f)) < p
    return active * rng.uniform(0.5, 1.5, (n, f))


def write_planted(db, rng, layers, n_prompts=200, length=50, labels=None):
    """Write prompts whose activations are given by ``layers``: name -> fn(codes) -> [n, width]."""
    codes_all = []
    with db.run(model="planted") as run:
        for b in range(0, n_prompts, 25):
            recs = []
            for i in range(b, min(b + 25, n_prompts)):
                codes = planted_codes(rng, length)
                codes_all.append(codes)
                acts = {name: fn(codes, i).astype(np.float32) for name, fn in layers.items()}
                recs.append(SequenceRecord(list(range(length)), [f"t{j}" for j in range(length)], acts,
                                           text=f"prompt {i}", label=None if labels is None else labels[i],
                                           prompt_index=i, metrics={"m": codes[:, 0]}))
            run.write(recs, dtypes={n: "float32" for n in layers})
    return codes_all


def best_cos(truth, rows):
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return (truth @ rows.T).max(axis=1)


def test_sae_recovers_planted_features_and_backfills(tmp_path):
    rng = np.random.default_rng(0)
    feats = unit(rng, F, D)
    db = LatentDB(tmp_path / "sae.db")
    write_planted(db, rng, {"llm.layer.0": lambda c, i: c @ feats + 0.01 * rng.standard_normal((len(c), D))})
    res = SAEPipeline(db, "llm.layer.0", k=4, d_sae=96, steps=600, batch_size=512, seed=1,
                      progress=False).run()
    cos = best_cos(feats, res.module.W_dec.detach().numpy())
    assert (cos > 0.9).mean() >= 0.9, np.sort(cos)[:10]
    m = res.metrics
    assert 0 <= m["fvu"] < 0.15 and m["explained_variance"] == pytest.approx(1 - m["fvu"])
    # 96 latents for 48 planted features: with the final weights about a third never fire on held-out
    # tokens, though nearly all fired at some step of training
    assert m["dead_fraction"] <= 0.5 and m["dead_fraction_train_window"] <= 0.1 and 0 < m["l0"] <= 4
    assert m["val_prompts"] == 20 and m["train_prompts"] == 180
    # backfilled latents: sparse, every token with its metadata
    info = db.layer_info("latent_sae:llm.layer.0")
    assert (info.storage, info.width, info.source, info.artifact_id) == ("sparse", 96, "llm.layer.0", res.artifact_id)
    lat = db.fetch_activations("latent_sae:llm.layer.0", prompt_index=7)
    src = db.fetch_activations("llm.layer.0", prompt_index=7)
    assert lat.tokens[["prompt_index", "position", "token"]].equals(src.tokens[["prompt_index", "position", "token"]])
    want = res.module.encode_dense(torch.from_numpy(src.values)).detach().numpy()
    np.testing.assert_allclose(lat.values, want, rtol=2e-3, atol=2e-3)  # float16 storage
    assert ((lat.values > 0).sum(1) <= 4).all()
    ex = db.latent_examples("latent_sae:llm.layer.0", top=3)
    assert len(ex) > 0 and ex.groupby("channel")["value"].apply(lambda v: v.is_monotonic_decreasing).all()
    # artifact recorded and loadable
    art = db.get_artifact(res.artifact_id)
    assert art["metrics"]["fvu"] == pytest.approx(m["fvu"]) and art["kind"] == "sae"
    loaded = load_module(art["path"])
    x = torch.from_numpy(src.values)
    assert torch.equal(loaded.decode(*loaded.encode(x)), res.module.decode(*res.module.encode(x)))


def test_auxk_gradient_reaches_dead_latents_encoder_and_decoder():
    torch.manual_seed(0)
    m = SparseAutoencoder(SparseCoderConfig(d_in=16, d_sae=64, k=2, k_aux=8), seed=0)
    x = torch.randn(256, 16)
    with torch.no_grad():  # latents 0..31 can never win the TopK: they are dead
        m.b_enc[:32] = -1.0
        m.b_enc[32:] = 50.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:32] = True
    for use_aux, expect in ((False, False), (True, True)):
        m.zero_grad()
        out = m(x, dead_mask=dead if use_aux else None)
        assert not torch.isin(out.latent_indices, torch.arange(32)).any()
        out.loss.backward()
        enc_grad = m.W_enc.grad[:32].abs().sum() > 0
        dec_grad = m.W_dec.grad[:32].abs().sum() > 0
        assert bool(enc_grad) is expect and bool(dec_grad) is expect
        assert bool(out.auxk_loss > 0) is expect


def test_transcoder_learns_planted_map(tmp_path):
    rng = np.random.default_rng(1)
    f_in, g_out = unit(rng, F, D), unit(rng, F, 24)
    db = LatentDB(tmp_path / "tc.db")
    codes = {}

    def x_of(c, i):
        codes[i] = c
        return c @ f_in

    write_planted(db, rng, {"llm.layer.1.mlp_in": x_of, "llm.layer.1.mlp_out": lambda c, i: codes[i] @ g_out})
    res = TranscoderPipeline(db, "llm.layer.1", k=4, d_sae=96, steps=600, batch_size=512, seed=0,
                             progress=False).run()
    assert res.module.cfg.d_in == D and res.module.cfg.out_dim == 24
    assert (best_cos(g_out, res.module.W_dec.detach().numpy()) > 0.9).mean() >= 0.85
    # the latent that writes g_i reads f_i: its encoder row points at f_i more than at any other feature
    w_dec = res.module.W_dec.detach().numpy()
    w_enc = res.module.W_enc.detach().numpy()
    match = (g_out @ (w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)).T).argmax(1)
    reads = (w_enc[match] / np.linalg.norm(w_enc[match], axis=1, keepdims=True)) @ f_in.T
    assert (reads.argmax(1) == np.arange(F)).mean() >= 0.8
    assert res.metrics["fvu"] < 0.2
    assert db.layer_info("latent:llm.layer.1").width == 96
    assert res.latent_layer == "latent:llm.layer.1"


def test_transcoder_missing_layer_says_how_to_collect(tmp_path, rng):
    db = LatentDB(tmp_path / "miss.db")
    write_planted(db, rng, {"llm.layer.2": lambda c, i: c @ unit(rng, F, D)}, n_prompts=4)
    with pytest.raises(LayerNotFoundError, match="hooks=\\['mlp_in', 'mlp_out'\\]"):
        TranscoderPipeline(db, "llm.layer.2", k=4).run()
    with pytest.raises(LayerNotFoundError, match="GymCollector"):
        TranscoderPipeline(db, "policy.0", k=4).run()


def test_probe_finds_planted_label_split_by_prompt(tmp_path):
    rng = np.random.default_rng(2)
    direction = unit(rng, 1, D)[0]
    labels = ["calm" if i % 2 else "angry" for i in range(120)]
    db = LatentDB(tmp_path / "probe.db")
    write_planted(db, rng, {"llm.layer.0": lambda c, i: rng.standard_normal((len(c), D))
                            + (3.0 if labels[i] == "angry" else 0.0) * direction}, n_prompts=120, length=10,
                  labels=labels)
    res = train_linear_probe(db, layer="llm.layer.0", target_key="prompt_label", task="classification", epochs=30)
    m = res.metrics
    assert m["accuracy"] > 0.85 and m["baseline_accuracy"] < 0.65 and m["accuracy"] > m["baseline_accuracy"] + 0.2
    assert sorted(m["classes"]) == ["angry", "calm"]
    pooled = train_linear_probe(db, layer="llm.layer.0", target_key="label", pool="mean", epochs=200, lr=0.05)
    assert pooled.metrics["accuracy"] >= 0.9 and pooled.metrics["n_test"] == 30
    # the split is by prompt: no prompt has tokens on both sides
    data = LinearProbeDataset(db, "llm.layer.0", "label").load()
    from interlatent.analysis.train.probe import _split

    train_mask, test_mask = _split(db, data, 0.25, 0, None)
    assert not set(data.groups[train_mask]) & set(data.groups[test_mask])
    assert load_module(res.path).cfg.classes == m["classes"]


def test_probe_regression_and_single_class_error(tmp_path):
    rng = np.random.default_rng(4)
    w = rng.standard_normal(D)
    db = LatentDB(tmp_path / "reg.db")

    def acts(c, i):
        x = rng.standard_normal((len(c), D))
        x[:, :] += 0.0
        return x

    write_planted(db, rng, {"l": acts}, n_prompts=60, length=20, labels=["same"] * 60)
    # plant a metric that is a linear function of the activations: rewrite via a second store
    db2 = LatentDB(tmp_path / "reg2.db")
    with db2.run() as run:
        recs = []
        for i in range(60):
            x = rng.standard_normal((20, D)).astype(np.float32)
            recs.append(SequenceRecord(list(range(20)), ["t"] * 20, {"l": x}, text=f"p{i}",
                                       metrics={"target": x @ w + 0.1 * rng.standard_normal(20)}))
        run.write(recs, dtypes={"l": "float32"})
    res = train_linear_probe(db2, layer="l", target_key="target", task="regression", epochs=60)
    assert res.metrics["r2"] > 0.95 and res.metrics["baseline_r2"] == 0.0
    with pytest.raises(NotEnoughDataError, match="single class"):
        train_linear_probe(db, layer="l", target_key="label")


@pytest.mark.parametrize("make", [
    lambda: SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=16, k=3), seed=0),
    lambda: SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=16, k=None, activation="relu"), seed=0),
    lambda: Transcoder(SparseCoderConfig(d_in=8, d_sae=16, k=3, d_out=5), seed=0),
    lambda: Transcoder(SparseCoderConfig(d_in=8, d_sae=16, k=3, d_out=5, skip=True), seed=0),
    lambda: Transcoder(SparseCoderConfig(d_in=8, d_sae=16, k=None, activation="relu", d_out=5), seed=0),
    lambda: LinearProbe(LinearProbeConfig(d_in=8, n_classes=3, classes=["a", "b", "c"])),
])
def test_save_load_round_trip_every_architecture(make, tmp_path):
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    path = save_module(module, tmp_path / "m")
    assert json.loads((path / "config.json").read_text())["architecture"] == module.architecture
    assert (path / "weights.safetensors").read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # not a pickle
    loaded = load_module(path)
    assert type(loaded) is type(module)
    x = torch.randn(4, 8)
    with torch.no_grad():
        if isinstance(module, LinearProbe):
            a, b = module(x), loaded(x)
        else:
            a, b = module.decode(*module.encode(x), x=x), loaded.decode(*loaded.encode(x), x=x)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="config.json"):
        load_module(tmp_path)
    path = save_module(LinearProbe(LinearProbeConfig(d_in=2)), tmp_path / "p")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architecture"] = "mystery"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="unknown architecture 'mystery'"):
        load_module(path)


@pytest.mark.parametrize("cls,extra", [(SparseAutoencoder, {}), (Transcoder, {"d_out": 12, "skip": True})])
@pytest.mark.parametrize("with_dead", [None, "some", "all"])
def test_sparse_fast_path_matches_dense_reference(cls, extra, with_dead):
    torch.manual_seed(0)
    m = cls(SparseCoderConfig(d_in=16, d_sae=64, k=4, k_aux=8, **extra), seed=0)
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_()
    x = torch.randn(32, 16, requires_grad=True)
    y = torch.randn(32, m.cfg.out_dim) if extra else None
    dead = {None: None, "some": torch.rand(64) < 0.5, "all": torch.ones(64, dtype=torch.bool)}[with_dead]
    out = m(x, y, dead_mask=dead)
    torch.testing.assert_close(out.output, dense_topk_reference(m, x), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    fast_x, x.grad = x.grad.clone(), None
    m.zero_grad()
    # the same loss through plain dense autograd
    pre = (x - m._input_bias()) @ m.W_enc.t() + m.b_enc
    v, i = pre.topk(4)
    dense = torch.zeros_like(pre).scatter(-1, i, v.clamp_min(0))
    pred = dense @ m.W_dec + m.b_dec + m._skip(x)
    t = x if y is None else y
    loss = ((t - pred) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
    if with_dead:
        ka = min(8, int(dead.sum()))
        av, ai = pre.masked_fill(~dead, -float("inf")).topk(ka)
        aux = torch.zeros_like(pre).scatter(-1, ai, av.clamp_min(0)) @ m.W_dec
        r = (t - pred).detach()
        loss = loss + m.cfg.auxk_coefficient * min(1, int(dead.sum()) / 8) * ((r - aux) ** 2).sum() / (
            (r - r.mean(0)) ** 2).sum()
    loss.backward()
    for n, p in m.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(fast_x, x.grad, rtol=1e-4, atol=1e-5)


def test_encode_gradient_and_sparse_kernels_without_csr_dtype():
    from interlatent.analysis.models.kernels import TransposedPlan as _Transposed
    from interlatent.analysis.models.kernels import sampled_dot as _sampled_dot

    torch.manual_seed(1)
    m = SparseAutoencoder(SparseCoderConfig(d_in=16, d_sae=64, k=4), seed=0)
    x = torch.randn(32, 16, requires_grad=True)  # attribution to the input needs its gradient too
    enc = m.encode(x)  # the differentiable encoder alone (custom losses on latents)
    (enc.latent_acts * torch.arange(4.0)).sum().backward()
    fast = m.W_enc.grad.clone(), m.b_enc.grad.clone(), m.b_dec.grad.clone(), x.grad.clone()
    m.zero_grad()
    x.grad = None
    pre = (x - m.b_dec) @ m.W_enc.t() + m.b_enc
    v = pre.gather(1, enc.latent_indices).clamp_min(0)
    (v * torch.arange(4.0)).sum().backward()
    for a, b in zip(fast, (m.W_enc.grad, m.b_enc.grad, m.b_dec.grad, x.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # half precision has no CSR kernels: the fallback must agree with the float32 product
    idx = torch.stack([torch.randperm(64)[:4] for _ in range(32)])
    aux = torch.stack([torch.randperm(64)[:6] for _ in range(32)])
    vals, dense = [torch.randn(32, 4), torch.randn(32, 6)], [torch.randn(32, 16), torch.randn(32, 16)]
    plan = _Transposed([idx, aux], 64)
    ref = plan.matmul(vals, dense)
    half = plan.matmul([v.bfloat16() for v in vals], [d.bfloat16() for d in dense])
    torch.testing.assert_close(half.float(), ref, rtol=0.05, atol=0.05)
    expect = torch.zeros(64, 16)
    for b in range(32):
        expect[idx[b]] += vals[0][b][:, None] * dense[0][b]
        expect[aux[b]] += vals[1][b][:, None] * dense[1][b]
    torch.testing.assert_close(ref, expect, rtol=1e-5, atol=1e-5)
    w = torch.randn(64, 16)
    torch.testing.assert_close(_sampled_dot(dense[0], idx, w), torch.einsum("bkd,bd->bk", w[idx], dense[0]))


def test_relu_sae_trains_and_decoder_stays_unit_norm(tmp_path):
    rng = np.random.default_rng(5)
    feats = unit(rng, F, D)
    db = LatentDB(tmp_path / "relu.db")
    write_planted(db, rng, {"l": lambda c, i: c @ feats}, n_prompts=60)
    res = SAEPipeline(db, "l", activation="relu", d_sae=96, steps=300, batch_size=512, lr=3e-3,
                      progress=False).run()
    assert res.metrics["fvu"] < 0.5
    norms = res.module.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert db.layer_info("latent_sae:l").storage == "dense"


def test_streaming_datasets(tmp_path, rng):
    db = LatentDB(tmp_path / "ds.db")
    write_planted(db, rng, {"a": lambda c, i: c[:, :8], "b": lambda c, i: c[:, 8:12]}, n_prompts=10, length=30)
    chunks = list(ActivationVectorDataset(db, "a", chunk_size=64, seed=0))
    assert sum(c.shape[0] for c in chunks) == 300 and chunks[0].shape[1] == 8
    pairs = list(ActivationPairDataset(db, "a", "b", chunk_size=64))
    x, y = pairs[0]
    assert x.shape[0] == y.shape[0] and y.shape[1] == 4


def test_saelens_export_layout_and_forward(tmp_path):
    import importlib.util

    from safetensors.torch import load_file

    from interlatent.analysis.interop import export_saelens

    sae = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=24, k=3), seed=0)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    folder = export_saelens(sae, tmp_path / "sl", hook_name="blocks.0.hook_resid_post", model_name="tiny")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 3, 8, 24)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["apply_b_dec_to_input"] is True
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (8, 24), "b_enc": (24,), "W_dec": (24, 8),
                                                         "b_dec": (8,)}
    x = torch.randn(5, 8)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # SAELens's TopK forward, by its field names
    vals, idx = pre.topk(3)
    feats = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    with torch.no_grad():
        torch.testing.assert_close(feats @ w["W_dec"] + w["b_dec"], sae.decode(*sae.encode(x)))
    if importlib.util.find_spec("sae_lens") is not None:  # the real loader, where installed
        from sae_lens import SAE

        loaded = SAE.load_from_disk(str(folder))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), sae.decode(*sae.encode(x)), rtol=1e-5, atol=1e-5)


def test_init_from_data_pairs_read_and_write_directions():
    torch.manual_seed(2)
    x, y = torch.randn(40, 8) + 3.0, torch.randn(40, 6) - 1.0
    tc = Transcoder(SparseCoderConfig(d_in=8, d_sae=64, k=2, d_out=6), seed=0)
    before = tc.W_enc.detach().clone()
    tc.init_from_data(x, y, seed=0)  # transcoders default to sample pairs
    pick = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:40]
    reads, writes = x[pick] - x.mean(0), y[pick] - tc.b_dec
    torch.testing.assert_close(tc.W_dec[:40], writes / writes.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(tc.W_enc[:40], reads / reads.norm(dim=-1, keepdim=True) * before[:40].norm(dim=-1, keepdim=True))
    assert torch.equal(tc.W_enc[40:], before[40:])  # fewer samples than latents: the rest stay random
    sae = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=16, k=2), seed=0)
    w0 = sae.W_dec.detach().clone()
    sae.init_from_data(x)  # SAEs default to random directions: only the bias moves
    assert torch.equal(sae.W_dec, w0) and not torch.allclose(sae.b_dec, torch.zeros(8))
    sae.init_from_data(x, weights="samples")
    cos = torch.nn.functional.cosine_similarity(sae.W_enc, sae.W_dec, dim=-1)
    torch.testing.assert_close(cos, torch.ones(16))  # still encoder = decoder transpose
    with pytest.raises(ConfigError, match="'samples' or 'random'"):
        sae.init_from_data(x, weights="pca")


def test_fit_skips_a_non_finite_batch_and_stops_a_diverging_run():
    from interlatent.analysis.train.fit import TrainConfig, fit
    from interlatent.errors import TrainingDivergedError

    torch.manual_seed(3)
    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=2), seed=0)
    good = [torch.randn(64, 8) for _ in range(20)]
    batches = good[:5] + [torch.full((64, 8), float("nan"))] + good[5:]
    res = fit(m, iter(batches), 20, TrainConfig(), progress=False)
    assert res.skipped_steps == 1 and all(torch.isfinite(p).all() for p in m.parameters())
    m2 = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=2), seed=0)
    with pytest.raises(TrainingDivergedError, match="lower lr"):
        fit(m2, iter([torch.full((64, 8), float("inf"))] * 40), 40, TrainConfig(), progress=False)


def test_pipeline_batches_are_full_even_when_chunks_leave_remainders(tmp_path):
    rng = np.random.default_rng(5)
    db = LatentDB(tmp_path / "b.db")
    recs = [SequenceRecord(list(range(n)), [f"t{i}" for i in range(n)],
                           {"llm.layer.0": rng.normal(size=(n, 8)).astype(np.float32)}, prompt_index=j)
            for j, n in enumerate(rng.integers(3, 11, size=40))]
    with db.run() as run:
        run.write(recs)
    res = SAEPipeline(db, "llm.layer.0", k=2, d_sae=64, steps=30, batch_size=37, val_fraction=0.2,
                      progress=False, backfill=False).run()
    assert res.fit.tokens == 30 * res.metrics["batch_size"]  # every step saw a whole batch
    saved = json.loads((res.path / "config.json").read_text())  # the multiple it trained with, recorded
    fires = 30 * res.metrics["batch_size"] * 2 / 64  # each latent's expected firings over the run
    assert saved["metadata"]["train"]["decoder_lr_multiple"] == pytest.approx(min(math.sqrt(7500 / fires), 10.0))
    assert saved["metadata"]["train"]["schedule"] == "wsd"  # a short run for its latents
    assert saved["metadata"]["train"]["lr"] == 1e-2  # the rate used (width 8), not the config's None


def test_half_precision_inputs_train_a_float32_dictionary():
    torch.manual_seed(4)
    m = SparseAutoencoder(SparseCoderConfig(d_in=16, d_sae=64, k=4), seed=0)
    x = torch.randn(32, 16)
    out16 = m(x.half(), dead_mask=torch.rand(64) < 0.5)  # stored activations are often float16
    out32 = m(x.half().float(), dead_mask=torch.rand(64) < 0.5)
    torch.testing.assert_close(out16.output, out32.output)
    out16.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def _one_adam_step_oracle(model, x, lr, dec_scale, eps=1e-8):
    """Weights after fit's first step, computed by hand: Adam's first update is lr * g / (|g| + eps)
    per element (its moments are bias-corrected), the decoder's gradient has its row-parallel part
    removed first and its rows are renormalised after."""
    import copy

    ref = copy.deepcopy(model)
    ref.train()
    ref(x).loss.backward()
    g = ref.W_dec.grad
    g = g - (g * ref.W_dec).sum(-1, keepdim=True) * ref.W_dec
    with torch.no_grad():
        want = {n: p - lr * p.grad / (p.grad.abs() + eps) for n, p in ref.named_parameters() if n != "W_dec"}
        w_dec = ref.W_dec - lr * dec_scale * g / (g.abs() + eps)
        want["W_dec"] = w_dec / w_dec.norm(dim=-1, keepdim=True)
    return want


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_decoder_lr_scale_moves_only_the_decoder_faster(scale):
    from interlatent.analysis.train.fit import TrainConfig, fit

    torch.manual_seed(11)
    x = torch.randn(64, 8)
    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=3), seed=0)
    want = _one_adam_step_oracle(m, x, 1e-2, scale)
    fit(m, [x], 1, TrainConfig(lr=1e-2, lr_schedule="constant", decoder_lr_scale=scale), progress=False)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_decoder_lr_scale_is_deterministic_and_validated():
    from interlatent.analysis.train.fit import TrainConfig, fit

    assert TrainConfig().decoder_lr_scale is None  # chosen from the shape (see decoder_lr_multiple)
    torch.manual_seed(12)
    data = [torch.randn(64, 8) for _ in range(6)]
    runs = []
    for _ in range(2):
        m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=3), seed=0)
        fit(m, data, 6, TrainConfig(decoder_lr_scale=5.0), progress=False)
        runs.append({n: p.detach().clone() for n, p in m.named_parameters()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=3), seed=0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="decoder_lr_scale must be a finite number > 0 .*got"):
            fit(m, data, 1, TrainConfig(decoder_lr_scale=bad), progress=False)


@pytest.mark.parametrize(("d_sae", "k", "activation", "inputs", "want", "schedule"), [
    (1024, 16, "topk", 200_000, math.sqrt(7500 / 3125), "wsd"),  # each latent fires on ~3,125 inputs: 1.55
    (8192, 16, "topk", 200_000, math.sqrt(7500 / 390.625), "wsd"),  # ~391: 4.4
    (1024, 16, "topk", 480_000, 1.0, "linear"),  # exactly 7,500 firings: a long run
    (1024, 16, "topk", 479_999, math.sqrt(7500 / (479_999 * 16 / 1024)), "wsd"),  # one input short of it
    (1024, 64, "topk", 200_000, 1.0, "linear"),  # 12,500 firings: never below 1
    (131_072, 16, "topk", 200_000, 10.0, "wsd"),  # ~24 firings would give 17.5: at most 10
    (1024, None, "relu", 200_000, 1.0, "wsd"),
    (1024, None, "relu", 10**9, 1.0, "wsd"),  # ReLU keeps wsd however long the run
])
def test_the_default_decoder_multiple_and_schedule_follow_the_expected_firings(d_sae, k, activation, inputs, want,
                                                                                schedule):
    from interlatent.analysis.train.fit import TrainConfig, decoder_lr_multiple, expected_fires, lr_schedule

    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=d_sae, k=k, activation=activation), seed=0)
    assert expected_fires(m, inputs) == (None if k is None else pytest.approx(inputs * k / d_sae))
    assert decoder_lr_multiple(m, TrainConfig(), inputs) == pytest.approx(want, rel=1e-12)
    assert decoder_lr_multiple(m, TrainConfig(decoder_lr_scale=2.5), inputs) == 2.5  # a given value wins
    assert lr_schedule(m, TrainConfig(), inputs) == schedule
    assert lr_schedule(m, TrainConfig(lr_schedule="constant"), inputs) == "constant"


@pytest.mark.parametrize("bad", [0, -5, -10**12])
def test_the_rules_refuse_a_run_length_that_is_not_a_positive_int(bad):
    from interlatent.analysis.train.fit import TrainConfig, decoder_lr_multiple, lr_schedule

    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=64, k=4), seed=0)
    for rule in (decoder_lr_multiple, lr_schedule):
        with pytest.raises(ConfigError, match="run_inputs must be an int >= 1"):
            rule(m, TrainConfig(), bad)


def test_a_long_run_decays_linearly_and_a_short_one_holds_its_rate(tmp_path):
    """The schedule the run chose is the one it trains on: with 4 rows of 8 latents at k 4 over
    40 steps, each latent fires on ~80 inputs (wsd: the rate holds for the first 30% of the steps);
    at d_sae 8, k 8 over 2,000 steps of 32 rows on 64,000 (linear from the first step)."""
    from interlatent.analysis.train.fit import TrainConfig, fit

    torch.manual_seed(15)
    short = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=8, k=4), seed=0)
    res = fit(short, [torch.randn(4, 8)] * 40, 40, TrainConfig(lr=1e-2), progress=False, log_every=1)
    assert res.settings["lr_schedule"] == "wsd"
    assert [h["lr"] for h in res.history[:11]] == [pytest.approx(1e-2)] * 11
    long = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=8, k=8), seed=0)
    res = fit(long, [torch.randn(32, 8)] * 3, 2000, TrainConfig(lr=1e-2), progress=False, log_every=1)
    assert res.settings == {"lr": 1e-2, "decoder_lr_multiple": 1.0, "lr_schedule": "linear"}
    assert [h["lr"] for h in res.history] == [pytest.approx(1e-2 * (1 - s / 2000)) for s in (1, 2, 3)]


@pytest.mark.parametrize("bad", [0.0, -3.0, float("nan"), float("inf"), True, "2", 10**400])
def test_decoder_multiple_refuses_what_fit_refuses(bad):
    """The public rule answers only with a multiple fit would train with: a value fit refuses is
    refused here too, not handed back as the decoder's learning-rate multiple (the values are set
    past the constructor, whose annotations the tests check at run time and callers' code does not)."""
    from interlatent.analysis.train.fit import TrainConfig, decoder_lr_multiple

    def given(value):
        cfg = TrainConfig()
        object.__setattr__(cfg, "decoder_lr_scale", value)
        return cfg

    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=100, k=1), seed=0)
    with pytest.raises(ConfigError, match="decoder_lr_scale must be a finite number > 0"):
        decoder_lr_multiple(m, given(bad), 1000)
    assert decoder_lr_multiple(m, given(np.float32(2.0)), 1000) == 2.0 and decoder_lr_multiple(m, given(3), 1) == 3.0

@pytest.mark.parametrize(("d_in", "d_out", "activation", "want"), [
    (8, None, "topk", 1e-2),  # narrow: 1e-2, as before the rate followed the width
    (256, None, "topk", 1e-2),
    (1024, None, "topk", 5e-3),  # 1e-2 * sqrt(256 / 1024)
    (768, None, "topk", 1e-2 * math.sqrt(256 / 768)),
    (1024, 1024, "topk", 1e-2),  # a transcoder (its rows start from samples): 1e-2
    (1024, None, "relu", 1e-2),
])
def test_the_default_learning_rate_follows_the_width(d_in, d_out, activation, want):
    from interlatent.analysis.train.fit import TrainConfig, learning_rate

    k = 4 if activation == "topk" else None
    cfg = SparseCoderConfig(d_in=d_in, d_sae=32, k=k, activation=activation, d_out=d_out)
    m = (Transcoder if d_out else SparseAutoencoder)(cfg, seed=0)
    assert learning_rate(m, TrainConfig()) == pytest.approx(want, rel=1e-12)
    assert learning_rate(m, TrainConfig(lr=3e-4)) == 3e-4  # a given value wins


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), True, "1e-2", 10**400])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused(bad):
    from interlatent.analysis.train.fit import TrainConfig, fit, learning_rate

    cfg = TrainConfig()
    object.__setattr__(cfg, "lr", bad)  # past the constructor, as a caller's untyped code would
    m = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=3), seed=0)
    with pytest.raises(ConfigError, match="lr must be a finite number > 0 .*got"):
        learning_rate(m, cfg)
    with pytest.raises(ConfigError, match="lr must be a finite number > 0"):
        fit(m, [torch.randn(16, 8)], 1, cfg, progress=False)


def test_a_wide_dictionary_trains_at_the_width_rate_and_its_checkpoint_names_it(tmp_path):
    """At width 1,024 one default step equals the hand-computed Adam step at lr 5e-3; the
    checkpoint records that rate, so a run given 1e-2 (the rate before it followed the width) is
    refused with the setting to resume with, and at width <= 256 the default and an explicit 1e-2
    are the same run (a checkpoint from before the rule resumes)."""
    from interlatent.analysis.train import checkpoint
    from interlatent.analysis.train.fit import TrainConfig, fit
    from interlatent.errors import CheckpointError

    torch.manual_seed(14)
    x = torch.randn(64, 1024)
    cfg = SparseCoderConfig(d_in=1024, d_sae=64, k=3)
    m = SparseAutoencoder(cfg, seed=0)
    want = _one_adam_step_oracle(m, x, 5e-3, 1.0)
    fit(m, [x], 1, TrainConfig(lr_schedule="constant", decoder_lr_scale=1.0), progress=False,
        checkpoint_dir=tmp_path / "wide")
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checkpoint.latest(tmp_path / "wide").meta["fingerprint"]["train"]["lr"] == pytest.approx(5e-3)
    with pytest.raises(CheckpointError, match=r"lr .*TrainConfig\(lr=0.005"):
        fit(SparseAutoencoder(cfg, seed=0), [x], 1, TrainConfig(lr=1e-2, lr_schedule="constant", decoder_lr_scale=1.0),
            progress=False, checkpoint_dir=tmp_path / "wide", resume=True)
    narrow = torch.randn(64, 8)
    first = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=3), seed=0)
    fit(first, [narrow, narrow], 2, TrainConfig(lr=1e-2), progress=False, checkpoint_dir=tmp_path / "narrow")
    again = SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=32, k=3), seed=0)
    fit(again, [narrow, narrow], 2, TrainConfig(), progress=False, checkpoint_dir=tmp_path / "narrow", resume=True)
    for name, p in again.named_parameters():
        assert torch.equal(p.detach(), dict(first.named_parameters())[name].detach()), name


def test_the_default_trains_with_the_chosen_multiple(tmp_path):
    """One step at the defaults equals the hand-computed Adam step at the run's multiple (5 here:
    2 steps of 600 rows at k 25 of 100 latents, 300 expected firings each), and the checkpoint's
    fingerprint names that multiple: a run given it explicitly resumes from it, one given another
    multiple is refused."""
    from interlatent.analysis.train import checkpoint
    from interlatent.analysis.train.fit import TrainConfig, decoder_lr_multiple, fit
    from interlatent.errors import CheckpointError

    torch.manual_seed(13)
    x = torch.randn(600, 8)
    cfg = SparseCoderConfig(d_in=8, d_sae=100, k=25)
    m = SparseAutoencoder(cfg, seed=0)
    assert decoder_lr_multiple(m, TrainConfig(), 2 * 600) == pytest.approx(5.0)
    want = _one_adam_step_oracle(m, x, 1e-2, 5.0)
    fit(m, [x, x], 2, TrainConfig(lr=1e-2, lr_schedule="constant"), progress=False, checkpoint_dir=tmp_path,
        checkpoint_every=1)
    first = checkpoint.latest(tmp_path)
    assert first.meta["fingerprint"]["train"]["decoder_lr_scale"] == pytest.approx(5.0)
    m1 = SparseAutoencoder(cfg, seed=0)
    fit(m1, [x], 2, TrainConfig(lr=1e-2, lr_schedule="constant"), progress=False)  # a 2-step run's first step
    for name, p in m1.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=1e-5, atol=1e-6, msg=name)
    again = SparseAutoencoder(cfg, seed=0)
    fit(again, [x, x], 2, TrainConfig(lr=1e-2, lr_schedule="constant", decoder_lr_scale=5.0), progress=False,
        checkpoint_dir=tmp_path, resume=True)  # the same multiple, given: the finished run is taken as is
    for name, p in again.named_parameters():
        assert torch.equal(p.detach(), dict(m.named_parameters())[name].detach()), name
    with pytest.raises(CheckpointError, match="decoder_lr_scale"):
        fit(SparseAutoencoder(cfg, seed=0), [x, x], 2,
            TrainConfig(lr=1e-2, lr_schedule="constant", decoder_lr_scale=3.0), progress=False,
            checkpoint_dir=tmp_path, resume=True)


def test_a_checkpoint_without_its_batch_rows_resumes_and_one_on_another_schedule_names_it(tmp_path):
    """A checkpoint from before the rules followed the run's length records no batch rows: its
    inputs per update say them, so it resumes to the run that never stopped. A long run written
    on "wsd" (the schedule before it followed the length) is refused with the setting to resume with."""
    from interlatent.analysis.train import checkpoint
    from interlatent.analysis.train.fit import TrainConfig, fit
    from interlatent.errors import CheckpointError

    torch.manual_seed(16)
    data = [torch.randn(32, 8) for _ in range(6)]
    cfg = SparseCoderConfig(d_in=8, d_sae=16, k=8)  # 96 firings each over the run: multiple 8.8, from the rows
    whole = SparseAutoencoder(cfg, seed=0)
    fit(whole, data, 6, TrainConfig(), progress=False)
    part = SparseAutoencoder(cfg, seed=0)
    fit(part, data[:3], 6, TrainConfig(), progress=False, checkpoint_dir=tmp_path / "a", checkpoint_every=1)
    found = checkpoint.latest(tmp_path / "a")
    state_file = found.path / checkpoint.STATE_JSON
    state = json.loads(state_file.read_text())
    assert state["fit"].pop("rows") == 32
    state_file.write_text(json.dumps(state))
    resumed = SparseAutoencoder(cfg, seed=0)
    fit(resumed, data, 6, TrainConfig(), progress=False, checkpoint_dir=tmp_path / "a", resume=True)
    for name, p in resumed.named_parameters():
        assert torch.equal(p.detach(), dict(whole.named_parameters())[name].detach()), name

    long = SparseCoderConfig(d_in=8, d_sae=8, k=8)  # 2,000 steps of 32 rows: 64,000 firings each, "linear"
    fit(SparseAutoencoder(long, seed=0), data[:2], 2000, TrainConfig(lr_schedule="wsd"), progress=False,
        checkpoint_dir=tmp_path / "b", checkpoint_every=1)
    with pytest.raises(CheckpointError, match=r"'wsd' schedule: TrainConfig\(lr_schedule='wsd'\), --lr-schedule wsd"):
        fit(SparseAutoencoder(long, seed=0), data, 2000, TrainConfig(), progress=False, checkpoint_dir=tmp_path / "b",
            resume=True)


def test_total_steps_is_at_least_one_and_a_changed_length_is_named_as_such(tmp_path):
    from interlatent.analysis.train.fit import TrainConfig, fit
    from interlatent.errors import CheckpointError

    torch.manual_seed(17)
    data = [torch.randn(32, 8) for _ in range(4)]
    cfg = SparseCoderConfig(d_in=8, d_sae=16, k=8)
    for bad in (0, -3):  # (a float or bool is refused alike; the run-time type checks of the tests stop it earlier)
        with pytest.raises(ConfigError, match="total_steps must be a whole number >= 1"):
            fit(SparseAutoencoder(cfg, seed=0), iter(data), bad, TrainConfig(), progress=False)
    fit(SparseAutoencoder(cfg, seed=0), data[:2], 4, TrainConfig(), progress=False, checkpoint_dir=tmp_path,
        checkpoint_every=1)
    with pytest.raises(CheckpointError, match="total_steps: checkpoint 4, this run 6") as refused:
        fit(SparseAutoencoder(cfg, seed=0), data, 6, TrainConfig(), progress=False, checkpoint_dir=tmp_path,
            resume=True)
    assert "decoder_lr_scale=" not in str(refused.value)  # the multiple moved with the length: not a way out
