"""TransformerLens 4 (``TransformerBridge``): the demo model boots natively with the same logits,
collection matches the bridge's own ``run_with_cache``, and every patch works, a no-edit one
bit-identical. The bridge tests skip on TransformerLens 3 (``make test`` runs them in .venv-tl4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from einops import einsum
from safetensors.torch import load_file

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig, Transcoder
from interlatent.backends import TL4Backend, make_backend
from interlatent.patch import Edits, LatentPatch, activation_patching, measure

PROMPTS = ["the sky is blue and the sea is green", "a cat sat on the mat", "hello world",
           "Alice said that Bob would report it; Carol said nothing at all"]


def _ln(x, w, b, eps=1e-5):
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w + b


def reference_logits(state, ids, n_layers):
    """A pre-LN GPT-2-style forward written from the TransformerLens 3 weight file, for checking."""
    x = state["embed.W_E"][ids] + state["pos_embed.W_pos"][: ids.shape[1]]
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(n_layers):
        p = f"blocks.{i}."
        h = _ln(x, state[p + "ln1.w"], state[p + "ln1.b"])
        q, k, v = (einsum(h, state[p + f"attn.W_{c}"], "b t m, h m d -> b t h d") + state[p + f"attn.b_{c}"]
                   for c in "QKV")
        scores = einsum(q, k, "b q h d, b k h d -> b h q k") / math.sqrt(q.shape[-1])
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = einsum(pattern, v, "b h q k, b k h d -> b q h d")
        x = x + einsum(z, state[p + "attn.W_O"], "b q h d, h d m -> b q m") + state[p + "attn.b_O"]
        h2 = _ln(x, state[p + "ln2.w"], state[p + "ln2.b"])
        mlp = torch.nn.functional.gelu(h2 @ state[p + "mlp.W_in"] + state[p + "mlp.b_in"])
        x = x + mlp @ state[p + "mlp.W_out"] + state[p + "mlp.b_out"]
    return _ln(x, state["ln_final.w"], state["ln_final.b"]) @ state["unembed.W_U"] + state["unembed.b_U"]


def test_demo_model_logits_equal_a_reference_forward_from_its_weight_file():
    """Run on both versions: the TL 3 model and the TL 4 bridge each match one forward
    written from the cached weights, so they match each other."""
    from interlatent.llm import demo_model
    from interlatent.llm.demo_model import QUICK, cache_dir

    model = demo_model(quick=True)
    state = load_file(str(cache_dir() / "demo_model" / QUICK.key() / "model.safetensors"))
    tok = model.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *tok("the sky is blue and Alice said", add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        got, want = model(ids), reference_logits(state, ids, QUICK.n_layers)
    assert (got - want).abs().max() < 1e-5


def test_demo_model_boots_through_the_bridge_on_tl4(tiny_bridge):
    from interlatent.llm import demo_model

    model = demo_model(quick=True)
    assert type(model).__name__ == "TransformerBridge"
    assert isinstance(make_backend(model), TL4Backend)


def test_stored_activations_equal_the_bridges_run_with_cache(tiny_bridge, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "b.db")
    kinds = ["resid_post", "resid_pre", "resid_mid", "attn_out", "mlp_in", "mlp_out"]
    LLMCollector(db, layer_indices=[0, 2], hooks=kinds, batch_size=3).run(tiny_bridge, tokenizer, prompts=PROMPTS)
    backend = make_backend(tiny_bridge, tokenizer)
    ids = backend.prompt_ids(PROMPTS)
    names = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
             "attn_out": "hook_attn_out", "mlp_in": "ln2.hook_normalized", "mlp_out": "hook_mlp_out"}
    for i, row in enumerate(ids):
        _, cache = tiny_bridge.run_with_cache(torch.tensor([row]))
        for block in (0, 2):
            for kind in kinds:
                layer = f"llm.layer.{block}" if kind == "resid_post" else f"llm.layer.{block}.{kind}"
                got = db.fetch_activations(layer, prompt_index=i).values
                want = cache[f"blocks.{block}.{names[kind]}"][0].detach().numpy()
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)  # float16 storage


def test_collection_stops_after_the_deepest_block_on_the_bridge(tiny_bridge, tokenizer, tmp_path, monkeypatch):
    seen = []
    original = type(tiny_bridge).run_with_hooks

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_bridge), "run_with_hooks", spy)
    LLMCollector(LatentDB(tmp_path / "s.db"), layer_indices=[0]).run(tiny_bridge, tokenizer, prompts=PROMPTS)
    assert seen and all(k["stop_at_layer"] == 1 and k["return_type"] is None for k in seen)


def _sae(seed=1):
    sae = SparseAutoencoder(SparseCoderConfig(d_in=32, d_sae=64, k=8), seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def test_every_patch_works_on_the_bridge_and_a_no_edit_patch_is_bit_identical(tiny_bridge, tokenizer):
    tokens = tiny_bridge.to_tokens("the sky is blue and the sea is green")
    with torch.no_grad():
        clean = tiny_bridge(tokens)
        for layer in ("llm.layer.1", "llm.layer.2.mlp_out", "llm.layer.0.resid_pre"):
            patch = LatentPatch(_sae(), layer)
            assert torch.equal(patch.run(tiny_bridge, tokens), clean)
            assert torch.equal(tiny_bridge.run_with_hooks(tokens, fwd_hooks=patch.hooks(model=tiny_bridge)), clean)
            spliced = patch.run(tiny_bridge, tokens, keep_error=False)
            assert not torch.allclose(spliced, clean, atol=1e-4)
            f = patch.module.encode_dense(tiny_bridge.run_with_cache(tokens)[1][patch.check_model(tiny_bridge)[1]
                                                                                 .tl_name][0])
            active = [int(i) for i in torch.nonzero(f[4] > 0).flatten()]
            ablated = patch.run(tiny_bridge, tokens, edits=Edits(ablate=tuple(active), positions=(4,)))
            assert torch.equal(ablated[:, :4], clean[:, :4]) and not torch.allclose(ablated[:, 4], clean[:, 4])
            for edit in ({"clamp": {active[0]: 10.0}}, {"steer": {active[0]: 5.0}}):
                assert not torch.allclose(patch.run(tiny_bridge, tokens, **edit), clean)
        transcoder = Transcoder(SparseCoderConfig(d_in=32, d_sae=64, k=8, d_out=32), seed=2)
        tc = LatentPatch(transcoder, "llm.layer.1")
        assert [n for n, _ in tc.hooks(model=tiny_bridge)] == ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
        assert torch.equal(tc.run(tiny_bridge, tokens), clean)
        assert not torch.allclose(tc.run(tiny_bridge, tokens, keep_error=False), clean, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(tiny_bridge(tokens), clean)  # every hook removed on leaving


def test_activation_patching_and_measure_on_the_bridge(tiny_bridge):
    clean = tiny_bridge.to_tokens("the sky is blue")
    corrupt = tiny_bridge.to_tokens("the sea is blue")
    df = activation_patching(tiny_bridge, clean, corrupt, ["llm.layer.0.resid_pre", "llm.layer.2"], answer=(5, 9))
    assert df["restored"].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    patch = LatentPatch(_sae(), "llm.layer.1")
    eff = measure(tiny_bridge, clean, lambda: patch.applied(tiny_bridge, keep_error=False), answer=(5, 9))
    assert eff.kl > 0 and math.isfinite(eff.delta_loss)


@pytest.mark.both_tl
def test_load_model_wraps_a_local_checkpoint_in_the_bridge(tiny_bridge, tiny_gpt2_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from interlatent.llm import loading

    bridge = loading.load_model(tiny_gpt2_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    tokens = torch.tensor([[3, 17, 40, 9, 33]])
    with torch.no_grad():
        assert type(bridge).__name__ == "TransformerBridge"
        assert (bridge(tokens) - hf(tokens).logits).abs().max() < 1e-5
    db = LatentDB(tmp_path / "g.db")
    LLMCollector(db, layer_indices=[1], hooks=["resid_post", "mlp_in"], dtype="float32").run(
        bridge, tokenizer, prompts=PROMPTS[:2])
    assert db.fetch_activations("llm.layer.1.mlp_in").values.shape[1] == 32
