"""Encoder models (bidirectional): a tiny Hugging Face BERT from a config and TransformerLens's
``HookedEncoder``. Collection stores every real position exactly as the model computes it, with no
causal assumption; patching is bit-identical without edits; effects apply no causal reachability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interlatent import LatentDB, LLMCollector
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig
from interlatent.backends import HFEncoderBackend, TLEncoderBackend, make_backend
from interlatent.errors import ConfigError, LayerNotFoundError
from interlatent.patch import LatentPatch, measure
from interlatent.patch.effects import reachable_logits

PROMPTS = ["the sky is blue and the sea is green", "a cat sat on the mat", "hello world",
           "Alice said that Bob would report it; Carol said nothing at all"]


@pytest.fixture(scope="module")
def bert(tiny_bert_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(tiny_bert_dir), local_files_only=True).eval()


@pytest.fixture(scope="module")
def bert_mlm(tiny_bert_dir):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(tiny_bert_dir), local_files_only=True).eval()


def _sae(d_in=32, seed=1):
    sae = SparseAutoencoder(SparseCoderConfig(d_in=d_in, d_sae=64, k=8), seed=seed)
    with torch.no_grad():
        sae.b_dec.normal_()
    return sae


def test_hf_encoder_gets_the_encoder_backend(bert, bert_mlm):
    assert isinstance(make_backend(bert), HFEncoderBackend) and not make_backend(bert).is_causal
    assert isinstance(make_backend(bert_mlm), HFEncoderBackend)


@pytest.mark.parametrize("side", ["right", "left"])
def test_hf_encoder_collection_stores_every_position_as_the_model_computes_it(bert, tokenizer, tmp_path, side):
    db = LatentDB(tmp_path / "e.db")
    LLMCollector(db, layer_indices=[0, 1], hooks=["resid_post", "resid_pre", "attn_out", "mlp_in", "mlp_out"],
                 batch_size=4, dtype="float32", padding_side=side).run(bert, tokenizer, prompts=PROMPTS)
    ids = make_backend(bert, tokenizer).prompt_ids(PROMPTS)
    layer = bert.encoder.layer
    for i, row in enumerate(ids):
        seen = {}
        hooks = [layer[1].register_forward_hook(lambda m, a, o: seen.__setitem__("post", o[0] if isinstance(o, tuple)
                                                                                  else o)),
                 layer[1].intermediate.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp_in", a[0])),
                 layer[0].output.dense.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp_out", o))]
        with torch.no_grad():
            bert(input_ids=torch.tensor([row]))
        for h in hooks:
            h.remove()
        for name, key in (("llm.layer.1", "post"), ("llm.layer.1.mlp_in", "mlp_in"), ("llm.layer.0.mlp_out", "mlp_out")):
            got = db.fetch_activations(name, prompt_index=i).values
            assert got.shape == (len(row), 32)  # every real position, also the first ones
            np.testing.assert_allclose(got, seen[key][0].numpy(), atol=2e-5, equal_nan=False)


def test_hf_encoder_refuses_next_token_metrics_generation_and_resid_mid(bert, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "r.db")
    with pytest.raises(ConfigError, match="bidirectional"):
        LLMCollector(db, layer_indices=[0], metrics=["next_token_loss"]).run(bert, tokenizer, prompts=PROMPTS)
    with pytest.raises(ConfigError, match="bidirectional"):
        LLMCollector(db, layer_indices=[0]).run(bert, tokenizer, prompts=PROMPTS, max_new_tokens=2)
    with pytest.raises(LayerNotFoundError, match="resid_mid"):
        make_backend(bert).resolve("llm.layer.0.resid_mid")
    with pytest.raises(ConfigError, match="no output head"):
        make_backend(bert).logits(torch.tensor([[1, 2, 3]]))


def test_hf_encoder_patching_no_edit_is_bit_identical_and_an_edit_reaches_earlier_positions(bert):
    tokens = torch.tensor([[5, 17, 40, 9, 33, 21, 8]])
    with torch.no_grad():
        clean = bert(input_ids=tokens).last_hidden_state
        for layer in ("llm.layer.0", "llm.layer.0.mlp_out", "llm.layer.1.resid_pre"):
            patch = LatentPatch(_sae(), layer)
            with patch.applied(bert):
                assert torch.equal(bert(input_ids=tokens).last_hidden_state, clean)
            with patch.applied(bert, steer={0: 8.0, 1: 8.0}, positions=[5]):
                steered = bert(input_ids=tokens).last_hidden_state
            assert not torch.allclose(steered[:, :5], clean[:, :5])  # bidirectional: earlier positions move too
        assert torch.equal(bert(input_ids=tokens).last_hidden_state, clean)  # hooks gone


def test_effects_on_an_encoder_apply_no_causal_rule(bert_mlm):
    tokens = torch.tensor([[5, 17, 40, 9, 33, 21, 8]])
    patch = LatentPatch(_sae(), "llm.layer.0")
    reach = reachable_logits(bert_mlm, tokens, None, [5], patch.check_model(bert_mlm)[1])
    assert reach.all()  # an edit at 5 can change every position
    eff = measure(bert_mlm, tokens, lambda: patch.applied(bert_mlm, steer={0: 8.0, 1: 8.0}, positions=[5]),
                  answer=(3, 4), answer_position=0, positions=[5], point=patch)
    assert eff.delta_logit_diff != 0.0  # answer read at 0, edit at 5: allowed and non-zero


def test_hooked_encoder_collection_and_patching(tiny_encoder, tokenizer, tmp_path):
    backend = make_backend(tiny_encoder, tokenizer)
    assert isinstance(backend, TLEncoderBackend) and not backend.is_causal
    assert backend.resolve("llm.layer.1.mlp_in").tl_name == "blocks.1.ln1.hook_normalized"  # the MLP's input
    db = LatentDB(tmp_path / "h.db")
    LLMCollector(db, layer_indices=[0, 1], hooks=["resid_post", "mlp_in", "mlp_out"], batch_size=4,
                 dtype="float32").run(tiny_encoder, tokenizer, prompts=PROMPTS)
    for i, row in enumerate(backend.prompt_ids(PROMPTS)):
        _, cache = tiny_encoder.run_with_cache(torch.tensor([row]))
        for name, hook in (("llm.layer.1", "blocks.1.hook_resid_post"), ("llm.layer.0.mlp_in", "blocks.0.ln1.hook_normalized"),
                           ("llm.layer.1.mlp_out", "blocks.1.hook_mlp_out")):
            np.testing.assert_allclose(db.fetch_activations(name, prompt_index=i).values, cache[hook][0].numpy(),
                                       atol=2e-5, equal_nan=False)
    with pytest.raises(ConfigError, match="left"):
        LLMCollector(LatentDB(tmp_path / "l.db"), layer_indices=[0], padding_side="left").run(
            tiny_encoder, tokenizer, prompts=PROMPTS)
    tokens = torch.tensor([[5, 17, 40, 9, 33, 21, 8]])
    with torch.no_grad():
        clean = tiny_encoder(tokens)
        patch = LatentPatch(_sae(), "llm.layer.0")
        assert torch.equal(patch.run(tiny_encoder, tokens), clean)
        steered = patch.run(tiny_encoder, tokens, steer={0: 8.0, 1: 8.0}, positions=[5])
        assert not torch.allclose(steered[:, :5], clean[:, :5])
        assert torch.equal(tiny_encoder(tokens), clean)
