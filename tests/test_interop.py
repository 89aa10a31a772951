"""Interop with SAELens and EleutherAI sparsify: their own save functions write the folders, our
loaders read them, and the outputs must equal theirs (float32, 1e-6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from interlatent.analysis.interop import export_saelens, load_saelens, load_sparsify
from interlatent.analysis.models import (
    JumpReLUSAE,
    SparseAutoencoder,
    SparseCoderConfig,
    Transcoder,
    expand_latents,
    load_module,
    save_module,
)
from interlatent.errors import ArtifactError, ConfigError
from interlatent.patch import LatentPatch

D_IN, D_SAE = 32, 96  # the tiny_tl fixture's d_model
TOL = 1e-6


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal to 1e-6 of the values' scale (float32 rounding: a folded bias moves a few ulp)."""
    ours, theirs = ours.detach(), theirs.detach()
    return float((ours - theirs).abs().max()) <= TOL * max(1.0, float(theirs.abs().max()))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _saelens_sae(arch: str, **cfg_kwargs):
    import sae_lens

    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 8}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {})}
    cls, cfg_cls, extra = classes[arch]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu", **extra, **cfg_kwargs))
    _randomize(sae, 0)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(1)) * 0.6)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    sae.cfg.metadata.hook_layer = 1
    sae.cfg.metadata.model_name = "tiny"
    return sae.eval()


SAELENS_CASES = [("standard", {}), ("topk", {}), ("jumprelu", {}), ("standard", {"apply_b_dec_to_input": False}),
                 ("topk", {"rescale_acts_by_decoder_norm": True}), ("jumprelu", {"apply_b_dec_to_input": False})]


@pytest.mark.parametrize(("arch", "cfg_kwargs"), SAELENS_CASES,
                         ids=["standard", "topk", "jumprelu", "standard-no-b-dec-in", "topk-rescaled",
                              "jumprelu-no-b-dec-in"])
def test_load_saelens_reproduces_saelens_encode_and_decode(arch, cfg_kwargs, tmp_path):
    original = _saelens_sae(arch, **cfg_kwargs)
    original.save_model(tmp_path / "sae")
    ours = load_saelens(tmp_path / "sae")
    expected_cls = JumpReLUSAE if arch == "jumprelu" else SparseAutoencoder
    assert type(ours) is expected_cls
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        f_theirs = original.encode(x)
        f_ours = ours.encode_dense(x)
        enc = ours.encode(x)
        assert close(expand_latents(enc.latent_acts, enc.latent_indices, D_SAE), f_theirs)
        assert close(f_ours, f_theirs)
        assert (f_theirs > 0).float().sum(-1).mean() > 1  # latents fire: the comparison is not of zeros
        assert close(ours.decode(f_theirs), original.decode(f_theirs))
        assert close(ours.decode(enc.latent_acts, enc.latent_indices), original(x))
    meta = ours.cfg.metadata
    assert (meta["layer"], meta["hook_name"], meta["block"], meta["model"]) == (
        "llm.layer.1", "blocks.1.hook_resid_post", 1, "tiny")


def _sparsify_coder(transcode: bool, skip: bool):
    from sparsify import SparseCoder
    from sparsify import SparseCoderConfig as SparsifyConfig

    coder = SparseCoder(D_IN, SparsifyConfig(num_latents=D_SAE, k=8, transcode=transcode, skip_connection=skip),
                        device="cpu")
    _randomize(coder, 3)
    return coder.eval()


@pytest.mark.parametrize(("transcode", "skip"), [(False, False), (True, False), (True, True), (False, True)],
                         ids=["sae", "transcoder", "skip-transcoder", "sae-with-skip"])
def test_load_sparsify_reproduces_sparsify_encode_and_decode(transcode, skip, tmp_path):
    original = _sparsify_coder(transcode, skip)
    original.save_to_disk(tmp_path / "run" / "layers.1.mlp")
    ours = load_sparsify(tmp_path / "run", hookpoint="layers.1.mlp")
    assert isinstance(ours, Transcoder if (transcode or skip) else SparseAutoencoder)
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = original.encode(x)
        dense_theirs = expand_latents(theirs.top_acts, theirs.top_indices, D_SAE)
        assert close(ours.encode_dense(x), dense_theirs)
        enc = ours.encode(x)
        assert close(expand_latents(enc.latent_acts, enc.latent_indices, D_SAE), dense_theirs)
        y_theirs = original(x).sae_out
        assert close(ours.decode(enc.latent_acts, enc.latent_indices, x=x), y_theirs)
        assert close(ours.decode(dense_theirs, x=x), y_theirs)
    meta = ours.cfg.metadata
    if transcode:
        assert (meta["layer"], meta["in_layer"], meta["out_layer"]) == ("llm.layer.1", "llm.layer.1.mlp_in",
                                                                        "llm.layer.1.mlp_out")
    else:
        assert (meta["layer"], meta["in_layer"]) == ("llm.layer.1.mlp_out", "llm.layer.1.mlp_out")


@pytest.mark.parametrize(("hookpoint", "transcode", "expected"), [
    ("layers.2", False, ("llm.layer.2", "llm.layer.2", None)),
    ("h.0", False, ("llm.layer.0", "llm.layer.0", None)),
    ("model.layers.3.self_attn", False, ("llm.layer.3.attn_out", "llm.layer.3.attn_out", None)),
    ("layers.2.mlp", True, ("llm.layer.2", "llm.layer.2.mlp_in", "llm.layer.2.mlp_out")),
    ("layers.2", True, ("llm.layer.2", "llm.layer.2.resid_pre", "llm.layer.2")),
])
def test_sparsify_hookpoints_map_to_store_layer_names(hookpoint, transcode, expected):
    from interlatent.analysis.interop import hookpoint_layers

    assert hookpoint_layers(hookpoint, transcode) == expected


def test_sparsify_transcoder_patches_the_model_like_sparsify(tiny_tl, tmp_path):
    """A sparsify transcoder spliced without its error term writes sparsify's prediction from the MLP's
    input at hook_mlp_out."""
    original = _sparsify_coder(True, False)
    original.save_to_disk(tmp_path / "layers.1.mlp")
    patch = LatentPatch(module := load_sparsify(tmp_path / "layers.1.mlp"), module.cfg.metadata["layer"])
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2]])
    _, cache = tiny_tl.run_with_cache(tokens)
    with torch.no_grad():
        expected = original(cache["blocks.1.ln2.hook_normalized"][0]).sae_out
    seen = {}
    with patch.applied(tiny_tl, keep_error=False), torch.no_grad():
        tiny_tl.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out",
                                                   lambda act, hook: seen.__setitem__("y", act.clone()))])
    assert torch.allclose(seen["y"][0], expected, atol=1e-5)


def test_jumprelu_is_a_real_module_save_patch_export(tiny_tl, tmp_path):
    original = _saelens_sae("jumprelu")
    original.save_model(tmp_path / "sl")
    sae = load_saelens(tmp_path / "sl")
    save_module(sae, tmp_path / "ours")
    again = load_module(tmp_path / "ours")
    assert isinstance(again, JumpReLUSAE)
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), again.state_dict().values()))
    patch = LatentPatch(again, again.cfg.metadata["layer"])
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 2, 6]])
    with torch.no_grad():
        clean = tiny_tl(tokens)
        assert torch.equal(patch.run(tiny_tl, tokens), clean)  # splice with the error term: a no-op
        _, cache = tiny_tl.run_with_cache(tokens)
        f = again.encode_dense(cache["blocks.1.hook_resid_post"].reshape(-1, D_IN))
        live = int(torch.argmax((f > 0).sum(0)))
        assert not torch.allclose(patch.run(tiny_tl, tokens, ablate=[live]), clean)
        # without the error term, the residual stream is SAELens's reconstruction
        seen = {}
        with patch.applied(tiny_tl, keep_error=False):
            tiny_tl.run_with_hooks(tokens, fwd_hooks=[("blocks.2.hook_resid_pre",
                                                       lambda act, hook: seen.__setitem__("x", act.clone()))])
        assert torch.allclose(seen["x"], original(cache["blocks.1.hook_resid_post"]), atol=1e-5)
    folder = export_saelens(again, tmp_path / "back")
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    import sae_lens

    reloaded = sae_lens.SAE.load_from_disk(str(folder))
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        assert close(reloaded(x), original(x))


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_export_import_export_is_bit_exact(activation, tmp_path):
    cfg = SparseCoderConfig(d_in=D_IN, d_sae=D_SAE, k=8 if activation == "topk" else None, activation=activation,
                            metadata={"layer": "llm.layer.1", "hook_name": "blocks.1.hook_resid_post", "block": 1,
                                      "model": "tiny"})
    sae = (JumpReLUSAE if activation == "jumprelu" else SparseAutoencoder)(cfg, seed=0)
    _randomize(sae, 5)
    first = export_saelens(sae, tmp_path / "a", context_size=64)
    second = export_saelens(load_saelens(first), tmp_path / "b")
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_loaders_refuse_what_they_cannot_reproduce(tmp_path):
    original = _saelens_sae("standard")
    original.save_model(tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    for key, value, match in (("architecture", "gated", "not supported"),
                              ("normalize_activations", "layer_norm", "normalize_activations"),
                              ("d_sae", D_SAE + 1, "shape")):
        (tmp_path / "sl" / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ArtifactError, match=match):
            load_saelens(tmp_path / "sl")
    with pytest.raises(ArtifactError, match="sae_weights.safetensors"):
        load_saelens(tmp_path)
    _sparsify_coder(False, False).save_to_disk(tmp_path / "run" / "layers.0")
    assert load_sparsify(tmp_path / "run").cfg.metadata["layer"] == "llm.layer.0"  # the run's only hook point
    _sparsify_coder(False, False).save_to_disk(tmp_path / "run" / "layers.1.mlp")
    with pytest.raises(ArtifactError, match=r"hookpoint= one of \['layers.0', 'layers.1.mlp'\]"):
        load_sparsify(tmp_path / "run")
    assert isinstance(load_sparsify(tmp_path / "run", hookpoint="layers.0"), SparseAutoencoder)
    assert np.isfinite(load_sparsify(tmp_path / "run" / "layers.0").W_enc.detach().numpy()).all()


# ---------------------------------------------------------------------------- backfill without training
TEXTS = [
    "the sky is blue and the sea is green",
    "a cat sat on the mat while the dog slept",
    "Alice said that Bob would report it",
    "hello world, this is a tiny corpus",
] * 3


@pytest.fixture(scope="module")
def store(tiny_tl, tokenizer, tmp_path_factory):
    from interlatent import LatentDB, LLMCollector

    db = LatentDB(tmp_path_factory.mktemp("interop") / "i.db")
    LLMCollector(db, layer_indices=[1], hooks=["resid_post", "mlp_in", "mlp_out"], dtype="float32").run(
        tiny_tl, tokenizer, prompts=TEXTS)
    return db


def test_backfill_a_loaded_saelens_dictionary_then_patch_search_and_stats(store, tiny_tl, tmp_path):
    from interlatent.analysis.train import backfill
    from interlatent.vis.queries import search

    db = store
    original = _saelens_sae("jumprelu")
    original.save_model(tmp_path / "sl")
    name = backfill(db, load_saelens(tmp_path / "sl"), latent_dtype="float32", out_dir=tmp_path / "arts")
    assert name == "latent_sae:llm.layer.1"
    stored = db.fetch_activations(layer=name)
    inputs = db.fetch_activations(layer="llm.layer.1")
    with torch.no_grad():
        expected = original.encode(torch.from_numpy(inputs.values)).numpy()
    np.testing.assert_allclose(stored.values, expected, atol=1e-6)
    where = ["prompt_index", "position"]
    assert (stored.tokens[where].values == inputs.tokens[where].values).all()
    patch = LatentPatch.from_db(db, name)
    assert isinstance(patch.module, JumpReLUSAE)
    assert torch.equal(patch.module.threshold, load_saelens(tmp_path / "sl").threshold)
    np.testing.assert_allclose(patch.latent_means, expected.mean(0), rtol=1e-4, atol=1e-6)
    tokens = tiny_tl.to_tokens(TEXTS[0])
    with torch.no_grad():
        assert torch.equal(patch.run(tiny_tl, tokens), tiny_tl(tokens))
        live = int(np.argmax((expected > 0).sum(0)))
        assert not torch.equal(patch.run(tiny_tl, tokens, ablate=[live], mode="mean"), tiny_tl(tokens))
    top = search(db, layer=name, channel=live, top=3)
    assert top["value"].iloc[0] == pytest.approx(float(expected[:, live].max()), rel=1e-6)
    assert len(db.latent_examples(name, channel=live)) > 0
    blocks = {b.channel: b for b in db.iter_statblocks(name)}
    assert blocks[live].mean == pytest.approx(float(expected[:, live].mean()), rel=1e-4)
    # a second backfill replaces the layer in one step: same rows, nothing left under the building name
    n = db.n_tokens(name)
    assert backfill(db, load_saelens(tmp_path / "sl"), out_dir=tmp_path / "arts") == name
    assert db.n_tokens(name) == n and not any(layer.startswith("~") for layer in db.layers())


def test_backfill_a_sparsify_transcoder_reads_the_mlp_input(store, tiny_tl, tmp_path):
    from interlatent.analysis.train import backfill

    db = store
    original = _sparsify_coder(True, False)
    original.save_to_disk(tmp_path / "layers.1.mlp")
    name = backfill(db, load_sparsify(tmp_path / "layers.1.mlp"), out_dir=tmp_path / "arts")
    assert name == "latent:llm.layer.1"
    assert db.layer_info(name).meta["in_layer"] == "llm.layer.1.mlp_in"
    patch = LatentPatch.from_db(db, name)
    assert (patch.in_layer, patch.out_layer) == ("llm.layer.1.mlp_in", "llm.layer.1.mlp_out")
    tokens = tiny_tl.to_tokens(TEXTS[1])
    with torch.no_grad():
        assert torch.equal(patch.run(tiny_tl, tokens), tiny_tl(tokens))
    inputs = torch.from_numpy(db.fetch_activations(layer="llm.layer.1.mlp_in").values)
    with torch.no_grad():
        theirs = original.encode(inputs)
    dense = expand_latents(theirs.top_acts, theirs.top_indices, D_SAE).numpy()
    np.testing.assert_allclose(db.fetch_activations(layer=name).values, dense, rtol=1e-3, atol=1e-3)  # float16


def test_backfill_refuses_a_dictionary_of_another_width(store):
    from interlatent.analysis.train import backfill
    from interlatent.errors import ShapeError

    sae = SparseAutoencoder(SparseCoderConfig(d_in=D_IN + 1, d_sae=8, k=2, metadata={"layer": "llm.layer.1"}))
    with pytest.raises(ShapeError, match="width 33.*width 32"):
        backfill(store, sae)
    with pytest.raises(KeyError, match="did you mean"):
        backfill(store, sae, "llm.layer.7")


# ---------------------------------------------------------------------------- exports others read
# SAEDashboard's NeuronpediaDashboardFeature.to_dict / NeuronpediaDashboardActivation.to_dict keys
SAEDASHBOARD_FEATURE = {
    "feature_index": int, "neuron_alignment_indices": list, "neuron_alignment_values": list,
    "neuron_alignment_l1": list, "correlated_neurons_indices": list, "correlated_neurons_l1": list,
    "correlated_neurons_pearson": list, "correlated_features_indices": list, "correlated_features_l1": list,
    "correlated_features_pearson": list, "neg_str": list, "neg_values": list, "pos_str": list, "pos_values": list,
    "frac_nonzero": float, "freq_hist_data_bar_values": list, "freq_hist_data_bar_heights": list,
    "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list, "n_prompts_total": int,
    "n_tokens_in_prompt": int, "dataset": str, "decoder_weights_dist": list, "activations": list,
}
SAEDASHBOARD_ACTIVATION = {"bin_min": (int, float), "bin_max": (int, float), "bin_contains": (int, float),
                           "tokens": list, "values": list}


@pytest.fixture(scope="module")
def backfilled(store, tmp_path_factory):
    from interlatent.analysis.train import backfill

    tmp = tmp_path_factory.mktemp("exports")
    original = _saelens_sae("topk")
    with torch.no_grad():
        original.b_enc[:8] -= 50.0  # latents 0..7 never fire: they are dead
    original.save_model(tmp / "sl")
    name = backfill(store, load_saelens(tmp / "sl"), name="latent_sae:exported", latent_dtype="float32",
                    out_dir=tmp / "arts")
    return store, name, load_saelens(tmp / "sl")


def test_neuronpedia_export_follows_the_saedashboard_batch_schema(backfilled, tiny_tl, tmp_path):
    from interlatent.analysis.interop import export_neuronpedia

    db, name, sae = backfilled
    folder = export_neuronpedia(db, name, tmp_path / "np", model=tiny_tl, features_per_batch=40, n_examples=5)
    stored = db.fetch_activations(layer=name)
    freq = (stored.values != 0).mean(0)
    skipped = json.loads((folder / "skipped_indexes.json").read_text())
    assert set(skipped) == {"model_id", "layer", "sae_set", "log_sparsity", "skipped_indexes"}
    assert sorted(skipped["skipped_indexes"]) == [int(i) for i in np.flatnonzero(freq == 0)]
    assert set(range(8)) <= set(skipped["skipped_indexes"])
    batches = sorted(folder.glob("batch-*.json"))
    assert [b.name for b in batches] == [f"batch-{i}.json" for i in range(len(batches))]
    seen = []
    w_u = tiny_tl.W_U.detach()
    for path in batches:
        batch = json.loads(path.read_text())
        assert list(batch) == ["model_id", "layer", "sae_set", "features"] and batch["layer"] == 1
        assert batch["model_id"] == tiny_tl.cfg.model_name and len(batch["features"]) <= 40
        for feat in batch["features"]:
            assert set(feat) == set(SAEDASHBOARD_FEATURE)
            assert all(isinstance(feat[k], t) for k, t in SAEDASHBOARD_FEATURE.items()), feat["feature_index"]
            c = feat["feature_index"]
            seen.append(c)
            assert feat["frac_nonzero"] == pytest.approx(float(freq[c]))
            assert sum(feat["freq_hist_data_bar_heights"]) == int((stored.values[:, c] != 0).sum())
            tops = [a["bin_max"] for a in feat["activations"]]
            assert tops == sorted(tops, reverse=True) and tops[0] == pytest.approx(stored.values[:, c].max(), abs=1e-3)
            for act in feat["activations"]:
                assert set(act) == set(SAEDASHBOARD_ACTIVATION) and (act["bin_min"], act["bin_contains"]) == (-1, -1)
                assert len(act["tokens"]) == len(act["values"]) and all(isinstance(t, str) for t in act["tokens"])
                assert max(act["values"]) == pytest.approx(act["bin_max"], abs=1e-3)
            logits = (sae.W_dec[c] @ w_u).detach().numpy()
            assert feat["pos_values"][0] == pytest.approx(float(logits.max()), abs=1e-3)
            assert feat["pos_str"][0] == tiny_tl.to_single_str_token(int(logits.argmax()))
            assert feat["neuron_alignment_indices"][0] == int(np.abs(sae.W_dec[c].detach().numpy()).argmax())
    assert sorted(seen + skipped["skipped_indexes"]) == list(range(D_SAE))


def _read_delphi_split(path):
    """What delphi's TensorBuffer.load does with one split file."""
    from safetensors.numpy import load_file

    data = load_file(str(path))
    first = int(path.name.split("_")[0])
    locations = data["locations"].astype(np.int64)
    locations[:, 2] += first
    return locations, data["activations"], data["tokens"], data["locations"].dtype


def test_delphi_export_layout_gives_back_every_stored_latent(backfilled, tmp_path):
    from interlatent.analysis.interop import export_delphi

    db, name, _ = backfilled
    module_dir = export_delphi(db, name, tmp_path / "latents", n_splits=4, model_name="tiny")
    assert module_dir.name == "layers.1"
    files = sorted(module_dir.glob("*.safetensors"), key=lambda p: int(p.name.split("_")[0]))
    assert [p.name for p in files] == ["0_23.safetensors", "24_47.safetensors", "48_71.safetensors",
                                       "72_95.safetensors"]
    stored = db.fetch_activations(layer=name)
    prompts = sorted(stored.tokens["prompt_index"].unique())
    ctx = int(stored.tokens["position"].max()) + 1
    dense = np.zeros((len(prompts), ctx, D_SAE), dtype=np.float32)
    for path in files:
        locations, acts, tokens, dtype = _read_delphi_split(path)
        assert dtype == np.uint16 and acts.dtype == np.float16 and tokens.shape == (len(prompts), ctx)
        lo, hi = (int(v) for v in path.stem.split("_"))
        assert ((locations[:, 2] >= lo) & (locations[:, 2] <= hi)).all()
        dense[locations[:, 0], locations[:, 1], locations[:, 2]] = acts
    row = {p: i for i, p in enumerate(prompts)}
    r = stored.tokens["prompt_index"].map(row).to_numpy()
    pos = stored.tokens["position"].to_numpy()
    np.testing.assert_allclose(dense[r, pos], stored.values, rtol=1e-3, atol=1e-3)  # float16, as delphi stores them
    assert dense.sum() == pytest.approx(dense[r, pos].sum())  # nothing at a padded position
    assert (tokens[r, pos] == stored.tokens["token_id"].to_numpy()).all()
    config = json.loads((module_dir / "config.json").read_text())
    assert config["model_name"] == "tiny" and config["ctx_len"] == ctx == config["cache_ctx_len"]
    # windows of delphi's example_ctx_len never span two prompts when the width is a multiple of it
    wide = export_delphi(db, name, tmp_path / "wide", n_splits=1, ctx_multiple=8)
    _, _, tokens, _ = _read_delphi_split(wide / f"0_{D_SAE - 1}.safetensors")
    assert tokens.shape[1] % 8 == 0 and tokens.shape[1] - ctx < 8


def test_delphi_latent_dataset_reads_the_export(backfilled, tokenizer, tmp_path):
    """Where eai-delphi imports (it needs vllm and faiss, which do not install beside this torch)."""
    delphi_latents = pytest.importorskip("delphi.latents")
    from delphi.config import ConstructorConfig, SamplerConfig

    from interlatent.analysis.interop import export_delphi

    db, name, _ = backfilled
    export_delphi(db, name, tmp_path / "latents", n_splits=2)
    dataset = delphi_latents.LatentDataset(tmp_path / "latents", SamplerConfig(), ConstructorConfig(),
                                           tokenizer=tokenizer, modules=["layers.1"])
    assert len(dataset.buffers) == 2 and dataset.tokens.shape[0] == len(db.sequences())


# ---------------------------------------------------------------------------- latents in the cache
def test_run_with_cache_returns_latents_as_hooked_sae_transformer_does(tiny_tl, tokenizer, tmp_path):
    from sae_lens import HookedSAETransformer

    from interlatent.analysis.interop import run_with_cache

    original = _saelens_sae("topk")
    original.save_model(tmp_path / "sl")
    sae = load_saelens(tmp_path / "sl")
    coder = _sparsify_coder(True, False)
    coder.save_to_disk(tmp_path / "layers.0.mlp")
    tc = load_sparsify(tmp_path / "layers.0.mlp")
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2], [4, 4, 8, 1, 2, 6]])
    logits, cache = run_with_cache(tiny_tl, tokens, [sae, tc])
    with torch.no_grad():
        clean, clean_cache = tiny_tl.run_with_cache(tokens)
    assert torch.equal(logits, clean)  # attached, not spliced: the model runs unchanged
    x = clean_cache["blocks.1.hook_resid_post"]
    with torch.no_grad():
        assert close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"], original.encode(x))
        assert close(cache["blocks.1.hook_resid_post.hook_sae_recons"], original(x))
        assert torch.equal(cache["blocks.1.hook_resid_post.hook_sae_error"],
                           x - cache["blocks.1.hook_resid_post.hook_sae_recons"])
        x_mlp = clean_cache["blocks.0.ln2.hook_normalized"]
        theirs = coder.encode(x_mlp.reshape(-1, D_IN))
        dense = expand_latents(theirs.top_acts, theirs.top_indices, D_SAE).reshape(2, 6, D_SAE)
        assert close(cache["blocks.0.ln2.hook_normalized.hook_sae_acts_post"], dense)
        y_theirs = coder(x_mlp.reshape(-1, D_IN)).sae_out.reshape(2, 6, -1)
        assert close(cache["blocks.0.hook_mlp_out.hook_sae_recons"], y_theirs)
    assert torch.equal(cache["blocks.2.hook_resid_post"], clean_cache["blocks.2.hook_resid_post"])
    # spliced: SAELens's HookedSAETransformer with the same SAE gives the same cache entries and logits
    hooked = HookedSAETransformer(tiny_tl.cfg, tokenizer=tokenizer)
    hooked.load_state_dict(tiny_tl.state_dict())
    hooked.eval()
    with torch.no_grad():
        their_logits, their_cache = hooked.run_with_cache_with_saes(tokens, saes=[original])
    logits, cache = run_with_cache(tiny_tl, tokens, sae, splice=True)
    assert close(logits, their_logits)
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        key = f"blocks.1.hook_resid_post.{name}"
        assert close(cache[key], their_cache[key]), key
    assert close(cache["blocks.2.hook_resid_pre"], their_cache["blocks.2.hook_resid_pre"])
    with pytest.raises(ConfigError, match="same hook point"):
        run_with_cache(tiny_tl, tokens, [sae, sae])


def test_run_with_cache_on_a_hugging_face_model(tiny_gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from interlatent.analysis.interop import run_with_cache

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    original = _saelens_sae("jumprelu")
    original.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    original.save_model(tmp_path / "sl")
    tokens = torch.tensor([[1, 5, 9, 3]])
    logits, found = run_with_cache(hf, tokens, load_saelens(tmp_path / "sl"))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    assert torch.equal(logits, out.logits)
    assert close(found["blocks.0.hook_resid_post.hook_sae_acts_post"], original.encode(out.hidden_states[1]))


# ---------------------------------------------------------------------------- SAELens transcoders
TRANSCODER_ARCHS = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


def _saelens_transcoder(arch: str):
    import sae_lens

    classes = {"transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
               "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
               "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
               "jumprelu_skip_transcoder": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig)}
    cls, cfg_cls = classes[arch]
    tc = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, dtype="float32", device="cpu", apply_b_dec_to_input=False))
    _randomize(tc, 7)
    if "jumprelu" in arch:
        with torch.no_grad():
            tc.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(8)) * 0.6)
    tc.cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"
    tc.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    return tc.eval()


@pytest.mark.parametrize("arch", TRANSCODER_ARCHS)
def test_load_saelens_transcoders_reproduce_saelens_and_patch_the_mlp(arch, tiny_tl, tmp_path):
    from interlatent.analysis.models import JumpReLUTranscoder

    original = _saelens_transcoder(arch)
    original.save_model(tmp_path / "tc")
    ours = load_saelens(tmp_path / "tc")
    assert isinstance(ours, JumpReLUTranscoder if "jumprelu" in arch else Transcoder)
    assert ours.cfg.skip == ("skip" in arch)
    meta = ours.cfg.metadata
    assert (meta["layer"], meta["in_layer"], meta["out_layer"]) == ("llm.layer.1", "llm.layer.1.mlp_in",
                                                                    "llm.layer.1.mlp_out")
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        f = original.encode(x)
        assert close(ours.encode_dense(x), f) and (f > 0).float().sum(-1).mean() > 1
        assert close(ours.decode(ours.encode_dense(x), x=x), original(x))
    patch = LatentPatch(ours, meta["layer"])
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2]])
    _, cache = tiny_tl.run_with_cache(tokens)
    seen = {}
    with patch.applied(tiny_tl, keep_error=False), torch.no_grad():
        tiny_tl.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out",
                                                   lambda act, hook: seen.__setitem__("y", act.clone()))])
        assert close(seen["y"], original(cache["blocks.1.ln2.hook_normalized"]))
    first = export_saelens(ours, tmp_path / "a")
    second = export_saelens(load_saelens(first), tmp_path / "b")
    for name in ("cfg.json", "sae_weights.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_a_centred_transcoder_exports_to_saelens_with_its_input_bias_folded(tmp_path):
    import sae_lens

    cfg = SparseCoderConfig(d_in=D_IN, d_sae=D_SAE, k=None, activation="relu", d_out=D_IN, skip=True,
                            metadata={"layer": "llm.layer.1", "in_layer": "llm.layer.1.mlp_in",
                                      "out_layer": "llm.layer.1.mlp_out"})
    ours = Transcoder(cfg, seed=0)
    _randomize(ours, 11)  # b_in too: the input is centred, as the pipeline's transcoders are
    folder = export_saelens(ours, tmp_path / "tc")
    written = json.loads((folder / "cfg.json").read_text())
    assert (written["architecture"], written["d_out"], written["apply_b_dec_to_input"]) == ("skip_transcoder", D_IN,
                                                                                            False)
    assert written["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    loaded = sae_lens.SAE.load_from_disk(str(folder))
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        assert close(loaded(x), ours.decode(ours.encode_dense(x), x=x))
    topk = Transcoder(SparseCoderConfig(d_in=D_IN, d_sae=D_SAE, k=4, d_out=D_IN))
    with pytest.raises(ConfigError, match="no TopK transcoder"):
        export_saelens(topk, tmp_path / "topk")


def test_the_dashboard_shows_a_backfilled_imported_dictionary(backfilled, tmp_path):
    from interlatent.vis.dashboard import build_dashboard

    db, name, _ = backfilled
    out = build_dashboard(db, tmp_path / "report.html", layers=[name])
    html = Path(out).read_text()
    stored = db.fetch_activations(layer=name)
    top = int(np.argmax(stored.values.max(0)))
    assert name in html and f"{stored.values[:, top].max():.3f}"[:4] in html
