"""Numbers a pipeline reports must be numbers a user can recompute: splits, classes, dead latents,
metrics from the saved weights, probe pooling defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interlatent import LatentDB
from interlatent.analysis.dataset import LinearProbeDataset
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig, load_module
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline, train_linear_probe
from interlatent.analysis.train.fit import FitResult
from interlatent.db import SequenceRecord

D = 16


def write_prompts(db, xs, *, texts=None, labels=None, layer="llm.layer.0", metrics=None, extra=None):
    """One prompt per array in ``xs`` (``[positions, D]``), with optional texts, labels, metrics."""
    recs = []
    for i, x in enumerate(xs):
        acts = {layer: x.astype(np.float32)}
        if extra is not None:
            acts.update({name: fn(i).astype(np.float32) for name, fn in extra.items()})
        recs.append(SequenceRecord(list(range(len(x))), [f"t{j}" for j in range(len(x))], acts,
                                   text=None if texts is None else texts[i],
                                   label=None if labels is None else labels[i],
                                   metrics={} if metrics is None else {k: v[i] for k, v in metrics.items()}))
    with db.run(model="synthetic") as run:
        run.write(recs, dtypes={name: "float32" for name in recs[0].activations})


# ---------------------------------------------------------------------------- item 13: probe classes
def test_probe_labels_b_1_true_and_string_1_stay_four_classes(tmp_path):
    rng = np.random.default_rng(0)
    given = ["b", 1, True, "1"]
    centres = rng.standard_normal((4, D)) * 4
    labels = [given[i % 4] for i in range(80)]
    xs = [centres[i % 4] + 0.3 * rng.standard_normal((6, D)) for i in range(80)]
    db = LatentDB(tmp_path / "cls.db")
    write_prompts(db, xs, texts=[f"p{i}" for i in range(80)], labels=labels)
    res = train_linear_probe(db, "llm.layer.0", "label", pool="mean", epochs=150, lr=0.05)
    classes = res.metrics["classes"]
    assert len(classes) == 4
    # shown as given: same values and the same JSON types
    assert sorted(((type(c).__name__, c) for c in classes), key=str) == sorted(
        ((type(c).__name__, c) for c in given), key=str)
    assert res.metrics["accuracy"] > 0.9
    saved = load_module(res.path).cfg.classes
    assert [(type(c), c) for c in saved] == [(type(c), c) for c in classes]


# ---------------------------------------------------------------------------- item 6b: split by text
def _dup_texts(n_prompts, n_texts, rng):
    return [f"text {rng.integers(n_texts)}" for _ in range(n_prompts)]


def test_pipeline_split_keeps_every_copy_of_a_text_on_one_side(tmp_path):
    rng = np.random.default_rng(1)
    texts = _dup_texts(60, 12, rng)
    db = LatentDB(tmp_path / "dup.db")
    write_prompts(db, [rng.standard_normal((5, D)) for _ in texts], texts=texts)
    res = SAEPipeline(db, "llm.layer.0", k=2, d_sae=32, steps=5, val_fraction=0.3, progress=False,
                      backfill=False).run()
    split = res.module.cfg.metadata["split"]
    seqs = db.sequences().set_index("prompt_index")["text"]
    held = {seqs[p] for p in split["eval_prompt_indices"]}
    train = {seqs[p] for p in seqs.index if p not in set(split["eval_prompt_indices"])}
    assert held and train and not held & train


def test_probe_split_keeps_every_copy_of_a_text_on_one_side(tmp_path):
    from interlatent.analysis.train.probe import _split

    rng = np.random.default_rng(2)
    texts = _dup_texts(80, 10, rng)
    labels = ["x" if t.endswith(("1", "3", "5", "7", "9")) else "y" for t in texts]
    db = LatentDB(tmp_path / "dup.db")
    write_prompts(db, [rng.standard_normal((4, D)) for _ in texts], texts=texts, labels=labels)
    for pool in (None, "mean"):
        data = LinearProbeDataset(db, "llm.layer.0", "label", pool=pool).load()
        for seed in range(5):
            train_mask, test_mask = _split(db, data, 0.25, seed, None)
            text_of = db.sequences().set_index("prompt_index")["text"]
            a = {text_of[p] for p in data.groups[train_mask]}
            b = {text_of[p] for p in data.groups[test_mask]}
            assert a and b and not a & b
    res = train_linear_probe(db, "llm.layer.0", "label", epochs=2)
    assert set(res.module.cfg.metadata["split"]["test_prompt_indices"]) <= set(db.prompt_indices())


# ---------------------------------------------------------------------------- item 3: dead latents
def test_dead_fraction_counts_latents_the_final_weights_never_fire(tmp_path):
    rng = np.random.default_rng(3)
    db = LatentDB(tmp_path / "dead.db")
    write_prompts(db, [rng.standard_normal((8, D)) for _ in range(20)], texts=[f"p{i}" for i in range(20)])
    pipe = SAEPipeline(db, "llm.layer.0", k=4, d_sae=32, progress=False)
    model = SparseAutoencoder(SparseCoderConfig(d_in=D, d_sae=32, k=4), seed=0)
    with torch.no_grad():
        model.b_enc[:8] = -1e4  # these 8 can never fire with these weights
    fitted = FitResult(steps=1, tokens=1, fire_counts=torch.ones(32, dtype=torch.long))  # all fired in training
    m = pipe.evaluate(model, ["llm.layer.0"], list(range(20)), fitted)
    x = torch.from_numpy(db.fetch_activations("llm.layer.0").values)
    with torch.no_grad():
        never = (model.encode_dense(x) > 0).sum(0) == 0
    assert never[:8].all()
    assert m["dead_fraction"] == pytest.approx(float(never.float().mean())) and m["dead_fraction"] >= 0.25
    assert m["dead_fraction_train_window"] == 0.0


# ---------------------------------------------------------------------------- metrics recomputed
def _numpy_forward(weights, cfg, x):
    """An independent float64 forward pass from the saved tensors (by their names)."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    x = x.astype(np.float64)
    b_in = w["b_in"] if "b_in" in w else w["b_dec"]
    pre = (x - b_in) @ w["W_enc"].T + w["b_enc"]
    if cfg["activation"] == "topk":
        top = np.argpartition(-pre, cfg["k"] - 1, axis=1)[:, :cfg["k"]]
        f = np.zeros_like(pre)
        np.put_along_axis(f, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    else:
        f = np.maximum(pre, 0)
    out = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"]
    return f, out


def _planted_pipeline(tmp_path, kind, activation, *, k=3, d_sae=64, val_fraction=0.25, seed=0, n_prompts=40):
    rng = np.random.default_rng(4 + seed)
    feats_in, feats_out = rng.standard_normal((24, D)), rng.standard_normal((24, 12))
    codes = [(rng.random((10, 24)) < 0.15) * rng.uniform(0.5, 1.5, (10, 24)) for _ in range(n_prompts)]
    db = LatentDB(tmp_path / f"m_{kind}_{activation}_{k}_{d_sae}_{val_fraction}_{seed}.db")
    texts = [f"p{i}" for i in range(n_prompts)]
    common = dict(k=k if activation == "topk" else None, activation=activation, d_sae=d_sae, steps=40, batch_size=64,
                  val_fraction=val_fraction, seed=seed, progress=False, backfill=False)
    if kind == "sae":
        write_prompts(db, [c @ feats_in for c in codes], texts=texts)
        return db, SAEPipeline(db, "llm.layer.0", **common)
    write_prompts(db, [c @ feats_in for c in codes], texts=texts, layer="llm.layer.0.mlp_in",
                  extra={"llm.layer.0.mlp_out": lambda i: codes[i] @ feats_out})
    return db, TranscoderPipeline(db, "llm.layer.0", skip=activation == "topk", **common)


def _assert_metrics_recompute(db, res, kind):
    """Load the saved artifact from disk and recompute every reported number on its held-out rows."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    art = db.get_artifact(res.artifact_id)
    folder = Path(art["path"])
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "weights.safetensors"))
    held = cfg["metadata"]["split"]["eval_prompt_indices"]
    assert len(held) == res.metrics["val_prompts"] or not cfg["metadata"]["split"]["held_out"]
    x = db.fetch_activations(cfg["metadata"]["in_layer"], prompt_index=held).values
    y = x if kind == "sae" else db.fetch_activations(cfg["metadata"]["out_layer"], prompt_index=held).values
    f, out = _numpy_forward(weights, cfg, x)
    err = ((y - out) ** 2).sum()
    fvu = err / ((y - y.mean(0)) ** 2).sum()
    want = {"fvu": fvu, "explained_variance": 1 - fvu, "mse": err / y.size, "l0": (f > 0).sum(1).mean(),
            "dead_fraction": ((f > 0).sum(0) == 0).mean(), "eval_tokens": len(x)}
    for reported in (res.metrics, art["metrics"]):
        for key, value in want.items():
            assert reported[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_reported_metrics_equal_a_recomputation_from_the_saved_artifact(tmp_path, kind, activation):
    db, pipe = _planted_pipeline(tmp_path, kind, activation)
    res = pipe.run()
    assert res.module.cfg.metadata["split"]["held_out"] and res.metrics["val_prompts"] == 10
    _assert_metrics_recompute(db, res, kind)


def test_reported_metrics_recompute_over_small_configs(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(["sae", "transcoder"]), activation=st.sampled_from(["topk", "relu"]),
           k=st.integers(1, 6), d_sae=st.sampled_from([8, 24, 48]), val_fraction=st.sampled_from([0.0, 0.2, 0.5]),
           seed=st.integers(0, 3))
    def check(kind, activation, k, d_sae, val_fraction, seed):
        db, pipe = _planted_pipeline(tmp_path_factory.mktemp("h"), kind, activation, k=k, d_sae=d_sae,
                                     val_fraction=val_fraction, seed=seed, n_prompts=12)
        _assert_metrics_recompute(db, pipe.run(), kind)

    check()


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_probe_held_out_score_equals_a_recomputation_from_the_saved_probe(tmp_path, task):
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    rng = np.random.default_rng(5)
    w_true = rng.standard_normal(D)
    xs = [rng.standard_normal((6, D)) + rng.standard_normal(D) for _ in range(60)]
    db = LatentDB(tmp_path / "p.db")
    if task == "classification":
        labels = ["hi" if float(x.mean(0) @ w_true) > 0 else "lo" for x in xs]
        write_prompts(db, xs, texts=[f"p{i}" for i in range(60)], labels=labels)
        res = train_linear_probe(db, "llm.layer.0", "label", pool="mean", epochs=40)
    else:
        write_prompts(db, xs, texts=[f"p{i}" for i in range(60)], metrics={"m": [x @ w_true for x in xs]})
        res = train_linear_probe(db, "llm.layer.0", "m", task="regression", pool=None, epochs=20)
    folder = Path(db.get_artifact(res.artifact_id)["path"])
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "weights.safetensors"))
    test = set(cfg["metadata"]["split"]["test_prompt_indices"])
    acts = db.fetch_activations("llm.layer.0")
    p_idx = acts.tokens["prompt_index"].to_numpy()
    if task == "classification":
        prompts = sorted(set(p_idx))
        feats = np.stack([acts.values[p_idx == p].mean(0) for p in prompts])
        label_of = dict(zip(db.sequences()["prompt_index"], db.sequences()["label"]))
        target = np.array([cfg["classes"].index(label_of[p]) for p in prompts])
        rows = np.array([p in test for p in prompts])
    else:
        feats, target = acts.values, acts.tokens["m"].to_numpy()
        rows = np.array([p in test for p in p_idx])
    logits = ((feats - w["mean"]) / w["std"]) @ w["linear.weight"].T + w["linear.bias"]
    if task == "classification":
        accuracy = (logits.argmax(1)[rows] == target[rows]).mean()
        assert res.metrics["accuracy"] == pytest.approx(accuracy) and res.metrics["n_test"] == rows.sum()
    else:
        pred = logits[:, 0]
        r2 = 1 - ((pred[rows] - target[rows]) ** 2).sum() / ((target[rows] - target[~rows].mean()) ** 2).sum()
        assert res.metrics["r2"] == pytest.approx(r2, rel=1e-4, abs=1e-6) and res.metrics["r2"] > 0.5


# ---------------------------------------------------------------------------- item 9: one layer, one name
def _collected_like(db, rng, n=12):
    """Layers written as the LLM collector writes them: canonical names with their hook names."""
    recs = [SequenceRecord(list(range(6)), [f"t{j}" for j in range(6)],
                           {name: rng.standard_normal((6, D)).astype(np.float32)
                            for name in ("llm.layer.1", "llm.layer.1.mlp_in", "llm.layer.1.mlp_out")}, text=f"p{i}")
            for i in range(n)]
    meta = {"llm.layer.1": {"hook_name": "blocks.1.hook_resid_post", "n_blocks": 2, "block": 1},
            "llm.layer.1.mlp_in": {"hook_name": "blocks.1.ln2.hook_normalized", "n_blocks": 2, "block": 1},
            "llm.layer.1.mlp_out": {"hook_name": "blocks.1.hook_mlp_out", "n_blocks": 2, "block": 1}}
    with db.run() as run:
        run.write(recs, dtypes={k: "float32" for k in meta}, layer_meta=meta)


@pytest.mark.parametrize("spelling", ["blocks.1.hook_resid_post", "llm.layer.-1", "llm.layer.1"])
def test_sae_spellings_of_one_layer_train_one_latent_layer(tmp_path, spelling):
    from interlatent.patch import LatentPatch

    rng = np.random.default_rng(6)
    db = LatentDB(tmp_path / "names.db")
    _collected_like(db, rng)
    kw = dict(k=2, d_sae=16, steps=5, batch_size=16, progress=False)
    first = SAEPipeline(db, "llm.layer.1", **kw).run()
    res = SAEPipeline(db, spelling, **kw).run()
    assert res.latent_layer == "latent_sae:llm.layer.1"
    assert db.layers(prefix="latent") == ["latent_sae:llm.layer.1"]  # re-trained in place, not beside
    assert db.layer_info("latent_sae:llm.layer.1").artifact_id == res.artifact_id != first.artifact_id
    assert db.get_artifact(res.artifact_id)["name"] == "sae:llm.layer.1"
    assert res.module.cfg.metadata["layer"] == "llm.layer.1"
    for name in ("latent_sae:blocks.1.hook_resid_post", "latent_sae:llm.layer.-1"):
        assert db.resolve_layer(name) == "latent_sae:llm.layer.1"
        assert LatentPatch.from_db(db, name).name == "latent_sae:llm.layer.1"
    if spelling.startswith("blocks."):  # a patch built by hand names its layer canonically too
        assert LatentPatch(res.module, spelling).name == "latent_sae:llm.layer.1"


@pytest.mark.parametrize("spelling", ["blocks.1.hook_resid_post", "llm.layer.-1"])
def test_transcoder_spellings_of_one_layer_train_one_latent_layer(tmp_path, spelling):
    rng = np.random.default_rng(7)
    db = LatentDB(tmp_path / "tnames.db")
    _collected_like(db, rng)
    kw = dict(k=2, d_sae=16, steps=5, batch_size=16, progress=False)
    TranscoderPipeline(db, "llm.layer.1", **kw).run()
    res = TranscoderPipeline(db, spelling, **kw).run()
    assert res.latent_layer == "latent:llm.layer.1" and db.layers(prefix="latent") == ["latent:llm.layer.1"]
    meta = res.module.cfg.metadata
    assert (meta["layer"], meta["in_layer"], meta["out_layer"]) == ("llm.layer.1", "llm.layer.1.mlp_in",
                                                                    "llm.layer.1.mlp_out")
    assert db.resolve_layer("latent:blocks.1.hook_resid_post") == "latent:llm.layer.1"
    from interlatent.analysis.models import Transcoder
    from interlatent.patch import LatentPatch

    bare = Transcoder(SparseCoderConfig(d_in=D, d_sae=16, k=2, d_out=D))  # records no layers of its own
    patch = LatentPatch(bare, "blocks.1.hook_resid_post")
    assert (patch.name, patch.in_layer, patch.out_layer) == ("latent:llm.layer.1", "llm.layer.1.mlp_in",
                                                             "llm.layer.1.mlp_out")


# ---------------------------------------------------------------------------- item 16a: probe pooling default
def test_probe_pools_prompt_level_targets_by_default(tmp_path):
    rng = np.random.default_rng(8)
    direction = rng.standard_normal(D)
    labels = ["pos" if i % 2 else "neg" for i in range(40)]
    xs = [rng.standard_normal((8, D)) + (1.5 if labels[i] == "pos" else 0.0) * direction for i in range(40)]
    metrics = {"prompt_const": [np.full(8, float(i % 2)) for i in range(40)],
               "per_token": [rng.standard_normal(8) for _ in range(40)]}
    db = LatentDB(tmp_path / "pool.db")
    write_prompts(db, xs, texts=[f"p{i}" for i in range(40)], labels=labels, metrics=metrics)
    res = train_linear_probe(db, "llm.layer.0", "label", epochs=5)
    m = res.metrics
    assert m["pool"] == "mean" and m["n_test"] == m["test_prompts"] == 10  # one row per held-out prompt
    assert res.module.cfg.metadata["pool"] == "mean"
    assert train_linear_probe(db, "llm.layer.0", "prompt_const", epochs=5).metrics["pool"] == "mean"
    per_token = train_linear_probe(db, "llm.layer.0", "per_token", task="regression", epochs=5).metrics
    assert per_token["pool"] is None and per_token["n_test"] == 80
    explicit = train_linear_probe(db, "llm.layer.0", "label", pool=None, epochs=5).metrics
    assert explicit["pool"] is None and explicit["n_test"] == 80


# ---------------------------------------------------------------------------- item 16b: SAELens export hook
def test_export_saelens_takes_the_hook_from_the_store_when_not_given(tmp_path):
    import json

    from interlatent.analysis.interop import export_saelens

    rng = np.random.default_rng(9)
    db = LatentDB(tmp_path / "hook.db")
    _collected_like(db, rng)
    res = SAEPipeline(db, "llm.layer.1", k=2, d_sae=16, steps=5, batch_size=16, progress=False,
                      backfill=False).run()
    cfg = json.loads((export_saelens(load_module(res.path), tmp_path / "sl") / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["hook_layer"] == 1
    # a dictionary that only records its layer name (saved before hook names were recorded)
    sae = SparseAutoencoder(SparseCoderConfig(d_in=D, d_sae=16, k=2, metadata={"layer": "llm.layer.2.mlp_out"}))
    cfg = json.loads((export_saelens(sae, tmp_path / "sl2") / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_mlp_out" and cfg["metadata"]["hook_layer"] == 2
    cfg = json.loads((export_saelens(sae, tmp_path / "sl3", hook_name="blocks.0.hook_resid_pre")
                      / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_pre" and cfg["metadata"]["hook_layer"] == 0


def test_naming_grammar_round_trips():
    from interlatent import naming
    from interlatent.errors import ConfigError

    assert naming.canonical_hook_name("blocks.3.hook_resid_post") == "llm.layer.3"
    assert naming.canonical_hook_name("blocks.3.ln2.hook_normalized") == "llm.layer.3.mlp_in"
    assert naming.canonical_hook_name("blocks.3.attn.hook_z") == "blocks.3.attn.hook_z"  # no canonical kind
    assert naming.tl_hook_name("llm.layer.3") == "blocks.3.hook_resid_post"
    assert naming.tl_hook_name("llm.layer.3.mlp_out") == "blocks.3.hook_mlp_out"
    assert naming.tl_hook_name("policy.0:post") is None
    for kind in ("resid_pre", "resid_mid", "attn_out", "mlp_in", "mlp_out"):
        assert naming.canonical_hook_name(naming.tl_hook_name(f"llm.layer.2.{kind}")) == f"llm.layer.2.{kind}"
    assert naming.transcoder_io("blocks.1.hook_resid_post") == ("llm.layer.1.mlp_in", "llm.layer.1.mlp_out")
    assert naming.transcoder_io("policy.0") == ("policy.0:pre", "policy.0:post")
    assert naming.split_latent("latent_sae:llm.layer.1") == ("latent_sae:", "llm.layer.1")
    assert naming.split_latent("latent:x") == ("latent:", "x") and naming.split_latent("x") == (None, "x")
    assert naming.is_building(naming.building_name("latent:x")) and not naming.is_building("latent:x")
    with pytest.raises(ConfigError):
        naming.latent_layer_name("probe:", "x")
