"""Patching on tiny random-init models, TransformerLens and Hugging Face forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig
from interlatent.analysis.train import SAEPipeline, TranscoderPipeline
from interlatent.errors import ConfigError, LayerNotFoundError, ShapeError
from interlatent.llm import hooked_from_hf
from interlatent.patch import LatentPatch, ablation_effect, activation_patching, measure, splice_quality
from interlatent.patch.core import logits_of

TEXTS = [
    "the sky is blue and the sea is green",
    "a cat sat on the mat while the dog slept",
    "Alice said that Bob would report it",
    "hello world, this is a tiny corpus",
] * 6


@pytest.fixture(scope="module")
def trained(trained_tl, tokenizer, tmp_path_factory):
    """A store with layer-1 points of the tiny model, an SAE and a transcoder trained on them."""
    path = tmp_path_factory.mktemp("patch") / "p.db"
    db = LatentDB(path)
    LLMCollector(db, layer_indices=[1], hooks=["resid_post", "mlp_in", "mlp_out"], dtype="float32").run(
        trained_tl, tokenizer, prompts=TEXTS)
    sae = SAEPipeline(db, "llm.layer.1", k=4, d_sae=64, steps=150, batch_size=64, progress=False).run()
    tc = TranscoderPipeline(db, "llm.layer.1", k=4, d_sae=64, steps=150, batch_size=64, progress=False).run()
    db.compute_stats(min_count=1)
    return db, sae, tc


def toks(model, text="the sky is blue and the sea is green"):
    return model.to_tokens(text)


def hook_count(model):
    return sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in model.modules())


def no_hooks_left(model):
    for mod in model.modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return False
    return True


def test_noop_splice_is_bit_identical_and_reconstruction_is_not(trained_tl, trained):
    db, sae, tc = trained
    tokens = toks(trained_tl)
    clean = trained_tl(tokens)
    for patch in (LatentPatch.from_db(db, "latent_sae:llm.layer.1"), LatentPatch.from_db(db, "latent:llm.layer.1")):
        assert torch.equal(trained_tl.run_with_hooks(tokens, fwd_hooks=patch.hooks(model=trained_tl)), clean)
        with patch.applied(trained_tl):
            assert torch.equal(trained_tl(tokens), clean)
        with patch.applied(trained_tl, keep_error=False):
            recon = trained_tl(tokens)
        assert not torch.allclose(recon, clean, atol=1e-4)
    tc_patch = LatentPatch.from_db(db, "latent:llm.layer.1")
    names = [name for name, _ in tc_patch.hooks(model=trained_tl)]
    assert names == ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]  # reads input, writes output


def test_ablation_changes_logits_only_at_and_after_position(trained_tl, trained):
    db, sae, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    tokens = toks(trained_tl)
    clean = trained_tl(tokens)
    acts = patch.module.encode_dense(
        trained_tl.run_with_cache(tokens)[1]["blocks.1.hook_resid_post"][0]).detach()
    active = [int(i) for i in torch.nonzero(acts[4] > 0).flatten()]
    out = patch.run(trained_tl, tokens, ablate=active, positions=[4])
    assert torch.equal(out[:, :4], clean[:, :4])
    assert not torch.allclose(out[:, 4], clean[:, 4])
    clamp = patch.run(trained_tl, tokens, clamp={active[0]: 10.0})
    steer = patch.run(trained_tl, tokens, steer={active[0]: 5.0})
    assert not torch.allclose(clamp, clean) and not torch.allclose(steer, clean)
    mean = patch.run(trained_tl, tokens, ablate=active, mode="mean")
    zero = patch.run(trained_tl, tokens, ablate=active, mode="zero")
    assert not torch.allclose(mean, zero)


def test_context_manager_removes_hooks_after_exception(tiny_tl, tiny_gpt2_dir, tokenizer, trained):
    db, sae, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    before = hook_count(tiny_tl)  # a TransformerBridge keeps hooks of its own
    with pytest.raises(RuntimeError, match="inside"):
        with patch.applied(tiny_tl, ablate=[0]):
            raise RuntimeError("inside")
    assert hook_count(tiny_tl) == before
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    hf_patch = LatentPatch(SparseAutoencoder(SparseCoderConfig(d_in=32, d_sae=64, k=4), seed=0), "llm.layer.1")
    with pytest.raises(RuntimeError, match="inside"):
        with hf_patch.applied(hf, ablate=[1]):
            raise RuntimeError("inside")
    assert no_hooks_left(hf)


def test_hf_and_tl_paths_agree(tiny_gpt2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    tl = hooked_from_hf(hf, tokenizer)
    tokens = tl.to_tokens("the sky is blue and the sea is green")
    torch.manual_seed(0)
    for layer in ("llm.layer.0", "llm.layer.1.mlp_out", "llm.layer.0.resid_pre"):
        patch = LatentPatch(SparseAutoencoder(SparseCoderConfig(d_in=32, d_sae=64, k=4), seed=1), layer)
        with torch.no_grad():
            patch.module.b_dec.normal_()
        for kwargs in ({}, {"keep_error": False}, {"ablate": list(range(0, 64, 2))}):
            with torch.no_grad():
                a = patch.run(hf, tokens, **kwargs)
                b = patch.run(tl, tokens, **kwargs)
            assert (a - b).abs().max() < 1e-4, (layer, kwargs)
        with torch.no_grad():
            assert torch.equal(patch.run(hf, tokens), hf(tokens).logits)  # HF no-op is bit-identical too
    assert no_hooks_left(hf)


def test_bad_input_is_refused_before_any_forward(trained_tl, trained, monkeypatch):
    db, sae, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    calls = []
    original = type(trained_tl).forward
    monkeypatch.setattr(type(trained_tl), "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    tokens = toks(trained_tl)
    with pytest.raises(ConfigError, match="unknown latent indices \\[64\\]"):
        patch.run(trained_tl, tokens, ablate=[64])
    with pytest.raises(ConfigError, match="outside the sequence"):
        patch.run(trained_tl, tokens, ablate=[1], positions=[99])
    with pytest.raises(LayerNotFoundError, match="does not fit this model"):
        LatentPatch(sae.module, "llm.layer.7").run(trained_tl, tokens)
    wide = LatentPatch(SparseAutoencoder(SparseCoderConfig(d_in=16, d_sae=32, k=2)), "llm.layer.1")
    with pytest.raises(ShapeError, match="width 16"):
        wide.run(trained_tl, tokens)
    with pytest.raises(ConfigError, match="mode"):
        patch.hooks(ablate=[1], mode="median")
    with pytest.raises(ConfigError, match="latent means"):
        LatentPatch(sae.module, "llm.layer.1").hooks(ablate=[1], mode="mean")
    assert calls == []


def test_splice_quality_lies_between_bounds(trained_tl, trained):
    db, sae, tc = trained
    tokens = trained_tl.to_tokens(TEXTS[0])
    for name in ("latent_sae:llm.layer.1", "latent:llm.layer.1"):
        q = splice_quality(LatentPatch.from_db(db, name), trained_tl, tokens, db=db)
        # a dictionary's error may lower the loss on one text by chance, a little: not by 0.5%
        assert q["ce_clean"] * (1 - 5e-3) <= q["ce_spliced"] <= q["ce_zero_ablated"] + 1e-6
        assert q["loss_recovered_zero"] <= 1.0 + 1e-3
        assert q["kl_spliced"] >= 0
        assert q["loss_recovered_zero"] == pytest.approx(
            (q["ce_zero_ablated"] - q["ce_spliced"]) / (q["ce_zero_ablated"] - q["ce_clean"]))
    assert set(db.interventions()["kind"]) == {"splice_quality"}


def test_ablation_effect_with_reproducible_random_control(trained_tl, tokenizer, trained):
    from interlatent.patch.effects import latent_frequencies

    db, sae, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    tokens = trained_tl.to_tokens(TEXTS[0])
    # the first token where the two answers differ (a trained BPE may give both a shared leading space)
    answer = next((a, b) for a, b in zip(tokenizer.encode(" blue"), tokenizer.encode(" green")) if a != b)
    # the latents most often active on the prompt: whatever the trained dictionary learned, they act there
    chosen = [int(i) for i in np.argsort(-latent_frequencies(patch, trained_tl, tokens), kind="stable")[:3]]
    runs = [ablation_effect(patch, trained_tl, tokens, chosen, answer=answer, n_control=3, seed=7, db=db)
            for _ in range(2)]
    assert runs[0].control_latents == runs[1].control_latents
    assert runs[0].control_mean == runs[1].control_mean and runs[0].value == runs[1].value
    assert all(not set(c) & set(chosen) for c in runs[0].control_latents)
    other = ablation_effect(patch, trained_tl, tokens, chosen, answer=answer, n_control=3, seed=8)
    assert other.control_latents != runs[0].control_latents
    rec = db.interventions().iloc[-1]
    assert rec["kind"] == "ablation" and rec["results"]["control_latents"] == runs[1].control_latents
    eff = measure(trained_tl, tokens, lambda: patch.applied(trained_tl, ablate=list(range(64))), answer=answer)
    assert eff.kl > 0 and eff.delta_logit_diff is not None


def test_position_ablation_controls_are_matched_where_the_ablation_acts(trained_tl, trained):
    from interlatent.patch.effects import latent_frequencies

    db, _, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    texts = TEXTS[:4] * 3
    tokens = trained_tl.to_tokens(texts, padding_side="left")
    mask = (tokens != trained_tl.tokenizer.pad_token_id).long() if trained_tl.tokenizer.pad_token_id is not None else None
    at_last = latent_frequencies(patch, trained_tl, tokens, mask, positions=[-1])
    overall = latent_frequencies(patch, trained_tl, tokens, mask)
    assert not np.allclose(at_last, overall)  # the last position has its own latents
    chosen = [int(i) for i in np.argsort(-at_last)[:2]]
    # the next-token loss never reads the last position's logits: measure the KL there instead
    res = ablation_effect(patch, trained_tl, tokens, chosen, positions=[-1], n_control=6, seed=0,
                          attention_mask=mask, db=db, metric="kl")
    # controls come from the same frequency bin *at the last position*, among latents active there
    candidates = np.sort(np.delete(at_last, chosen))[::-1]  # the closest matches there are: the most active others
    assert all(np.array_equal(np.sort(at_last[c])[::-1], candidates[:len(chosen)]) for c in res.control_latents)
    assert db.interventions().iloc[-1]["spec"]["control_frequencies"] == "tokens at positions"


def test_activation_patching_restores_clean_run(tiny_tl):
    clean = tiny_tl.to_tokens("the sky is blue")
    corrupt = tiny_tl.to_tokens("the sea is blue")
    assert clean.shape == corrupt.shape
    answer = (5, 9)
    df = activation_patching(tiny_tl, clean, corrupt, ["llm.layer.0.resid_pre", "llm.layer.2"], answer=answer)
    assert df["restored"].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)  # every position: the clean run
    last = activation_patching(tiny_tl, clean, corrupt, ["llm.layer.2"], answer=answer, positions=[-1])
    assert last["restored"].iloc[0] == pytest.approx(1.0, abs=1e-4)  # the last position is all logits read
    first = activation_patching(tiny_tl, clean, corrupt, ["llm.layer.0"], answer=answer, positions=[0])
    assert first["restored"].iloc[0] == pytest.approx(0.0, abs=1e-4)  # BOS never differs: nothing restored
    with pytest.raises(ConfigError, match="cannot change"):  # the last block at BOS: zero by construction
        activation_patching(tiny_tl, clean, corrupt, ["llm.layer.2"], answer=answer, positions=[0])
    half = activation_patching(tiny_tl, clean, corrupt, ["llm.layer.2"], answer=answer, positions=[-1],
                               mode="add_delta", alpha=0.5)
    assert 0.0 < abs(half["restored"].iloc[0]) < 1.5
    with pytest.raises(ShapeError):
        activation_patching(tiny_tl, clean, tiny_tl.to_tokens("a much longer corrupted prompt"), [0], answer=answer)


def test_logits_of_hf_matches(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    t = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(logits_of(hf, t), hf(t).logits)
    assert np.isfinite(logits_of(hf, t).detach().numpy()).all()


def test_loss_recovered_matches_saelens_ce_loss_score(trained_tl, trained, tmp_path):
    """Our zero-ablation loss recovered equals SAELens's ce_loss_score on the same model and dictionary
    (exported in its format and loaded by it). SAELens is a test extra: this runs, never skips."""
    import sae_lens
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    from interlatent.analysis.interop import export_saelens

    db, sae, _ = trained
    folder = export_saelens(sae.module, tmp_path / "sl", hook_name="blocks.1.hook_resid_post")
    loaded = sae_lens.SAE.load_from_disk(str(folder))
    tokens = trained_tl.to_tokens(TEXTS[0])
    ours = splice_quality(LatentPatch.from_db(db, "latent_sae:llm.layer.1"), trained_tl, tokens)
    theirs = get_recons_loss(loaded, trained_tl, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True)
    m = {k: float(v.mean()) for k, v in theirs.items()}
    score = (m["ce_loss_with_ablation"] - m["ce_loss_with_sae"]) / (m["ce_loss_with_ablation"] - m["ce_loss_without_sae"])
    assert ours["ce_clean"] == pytest.approx(m["ce_loss_without_sae"], rel=1e-4)
    assert ours["ce_spliced"] == pytest.approx(m["ce_loss_with_sae"], rel=1e-4)
    assert ours["loss_recovered_zero"] == pytest.approx(score, abs=1e-4)


def test_pipeline_dictionaries_draw_controls_active_by_run_with_cache(trained_tl, trained):
    """SAE and transcoder trained by the pipelines: every control latent is active (> 0) at the ablated
    position, recomputed from run_with_cache activations at the dictionary's input hook."""
    db, _, _ = trained
    tokens = torch.stack([trained_tl.to_tokens(t)[0, :8] for t in TEXTS[:4]])
    _, cache = trained_tl.run_with_cache(tokens)
    for name, hook in (("latent_sae:llm.layer.1", "blocks.1.hook_resid_post"),
                       ("latent:llm.layer.1", "blocks.1.ln2.hook_normalized")):
        patch = LatentPatch.from_db(db, name)
        with torch.no_grad():
            active = (patch.module.encode_dense(cache[hook][:, 3]) > 0).sum(0).numpy()
        chosen = sorted(np.flatnonzero(active > 0).tolist(), key=lambda i: active[i])[:2]
        res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[3], n_control=6, seed=1)
        assert all(active[c] > 0 for s in res.control_latents for c in s), name
        assert res.control_activity == [[active[c] / 4 for c in s] for s in res.control_latents]


def test_edits_is_one_frozen_value_checked_when_built():
    import dataclasses

    from interlatent.patch import Edits

    e = Edits(ablate=[3, 1], clamp={2: 1}, positions=-1)
    assert e.ablate == (3, 1) and e.clamp == {2: 1.0} and e.positions == (-1,) and e.latents() == [1, 2, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.mode = "mean"
    with pytest.raises(TypeError):
        e.clamp[2] = 5.0  # the mappings are read-only too
    with pytest.raises(ConfigError, match="mode must be one of"):
        Edits(mode="median")
    with pytest.raises(ConfigError, match="finite"):
        Edits(steer={0: float("nan")})
    with pytest.raises(ConfigError, match="either edits= or the edit keywords"):
        Edits.of(e, mode="mean")
    assert Edits.of(None, ablate=[1]) == Edits(ablate=(1,))
    assert e.describe() == {"ablate": [3, 1], "mode": "zero", "clamp": {"2": 1.0}, "steer": {}, "positions": [-1],
                            "keep_error": True}


def test_hooks_applied_and_effects_take_an_edits_value(trained_tl, trained):
    from interlatent.patch import Edits
    from interlatent.patch.effects import edit_effect

    db, _, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    tokens = toks(trained_tl)
    acts = patch.module.encode_dense(trained_tl.run_with_cache(tokens)[1]["blocks.1.hook_resid_post"][0]).detach()
    active = [int(i) for i in torch.nonzero(acts[4] > 0).flatten()]
    edits = Edits(ablate=tuple(active), positions=(4,))
    with torch.no_grad():
        with patch.applied(trained_tl, edits=edits):
            by_value = trained_tl(tokens)
        with patch.applied(trained_tl, ablate=active, positions=[4]):
            by_keywords = trained_tl(tokens)
        by_hooks = trained_tl.run_with_hooks(tokens, fwd_hooks=patch.hooks(edits, model=trained_tl))
    assert torch.equal(by_value, by_keywords) and torch.equal(by_hooks, by_keywords)
    assert not torch.equal(by_value, trained_tl(tokens))
    assert torch.equal(patch.run(trained_tl, tokens, edits=edits), by_value)
    eff = edit_effect(patch, trained_tl, tokens, edits=edits)
    assert eff.kl > 0
    with pytest.raises(ConfigError, match="unknown latent indices"):
        patch.applied(trained_tl, edits=Edits(ablate=(64,))).__enter__()


def test_edit_masks_are_built_on_the_activations_device(trained):
    """The edit tensors follow the activation's device (here the meta device, which mixes with no
    CPU tensor), so a patch on a GPU model builds nothing on the CPU."""
    from interlatent.patch import Edits

    db, _, _ = trained
    patch = LatentPatch.from_db(db, "latent_sae:llm.layer.1")
    f = torch.zeros(2, 5, 64, device="meta")
    for edits in (Edits(ablate=(1, 2), positions=(3,)), Edits(ablate=(1,), mode="mean"), Edits(clamp={4: 2.0}),
                  Edits(steer={5: 1.0}, positions=(0, -1))):
        out = patch._edit_latents(f, edits)
        assert out.device.type == "meta" and out.shape == f.shape
