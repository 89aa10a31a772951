"""LLMCollector on tiny random-init HookedTransformers and Hugging Face models."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from interlatent import LatentDB, LLMCollector
from interlatent.errors import ConfigError, LayerNotFoundError, ModelLoadError
from interlatent.hooks import resolve
from interlatent.llm import PromptDataset, PromptExample, hooked_from_hf, load_model

PROMPTS = [
    "the sky is blue",
    "a cat sat on the mat while the dog slept and the sky was green and the sea was blue",
    "hi",
    "Alice said that Bob would report it",
]


def reference(model, text, names, prepend_bos=True):
    """Per-prompt activations from an unpadded run_with_cache."""
    tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return tokens[0].tolist(), {n: cache[n][0].numpy() for n in names}


# ---------------------------------------------------------------------------- hook names
def test_hook_names_resolve():
    assert resolve("llm.layer.2", 4).tl_name == "blocks.2.hook_resid_post"
    p = resolve("llm.layer.-1.mlp_in", 4)
    assert (p.block, p.tl_name, p.name) == (3, "blocks.3.ln2.hook_normalized", "llm.layer.3.mlp_in")
    assert resolve("blocks.1.hook_mlp_out", 4).name == "llm.layer.1.mlp_out"
    assert resolve(-2, 4).name == "llm.layer.2"
    with pytest.raises(LayerNotFoundError, match="mlp_out"):
        resolve("llm.layer.1.mlp_ot", 4)
    with pytest.raises(LayerNotFoundError, match="out of range.*4 blocks"):
        resolve("llm.layer.4", 4)
    with pytest.raises(LayerNotFoundError, match="llm.layer"):
        resolve("llm.layr.1", 4)


# ---------------------------------------------------------------------------- TransformerLens
@pytest.mark.parametrize("side", ["right", "left"])
def test_collection_matches_unpadded_forward(tiny_tl, tokenizer, tmp_path, side):
    db = LatentDB(tmp_path / "c.db")
    hooks = ["resid_pre", "resid_mid", "attn_out", "mlp_in", "mlp_out", "resid_post"]
    LLMCollector(db, layer_indices=[0, -1], hooks=hooks, batch_size=3, dtype="float32",
                 padding_side=side).run(tiny_tl, tokenizer, prompts=PROMPTS)
    expected_layers = {f"llm.layer.{b}{'' if k == 'resid_post' else '.' + k}" for b in (0, 2) for k in hooks}
    assert set(db.layers()) == expected_layers
    for i, text in enumerate(PROMPTS):
        names = [f"blocks.{b}.{h}" for b in (0, 2) for h in ("hook_resid_pre", "hook_resid_mid", "hook_attn_out",
                                                               "ln2.hook_normalized", "hook_mlp_out",
                                                               "hook_resid_post")]
        ids, ref = reference(tiny_tl, text, names)
        got = db.fetch_activations("llm.layer.2", prompt_index=i)
        assert got.tokens["token_id"].tolist() == ids  # every real token, no pad
        assert got.tokens["position"].tolist() == list(range(len(ids)))
        assert got.tokens["token"].tolist() == tiny_tl.to_str_tokens(text)
        for layer, name in [("llm.layer.2", "blocks.2.hook_resid_post"), ("llm.layer.0.mlp_in",
                            "blocks.0.ln2.hook_normalized"), ("llm.layer.2.attn_out", "blocks.2.hook_attn_out"),
                            ("llm.layer.0.resid_mid", "blocks.0.hook_resid_mid"),
                            ("llm.layer.2.mlp_out", "blocks.2.hook_mlp_out"),
                            ("llm.layer.0.resid_pre", "blocks.0.hook_resid_pre")]:
            np.testing.assert_allclose(db.fetch_activations(layer, prompt_index=i).values, ref[name], atol=2e-5,
                                       err_msg=f"{layer} prompt {i} ({side} padding)")
    assert db.layer_info("llm.layer.2.mlp_in").hook_name == "blocks.2.ln2.hook_normalized"
    assert db.resolve_layer("llm.layer.-1") == "llm.layer.2"  # negative spelling still reads
    assert db.runs()["status"].tolist() == ["complete"]


def test_stop_at_layer_and_names_filter(tiny_tl, tokenizer, tmp_path, monkeypatch):
    seen = []
    original = type(tiny_tl).run_with_hooks

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_tl), "run_with_hooks", spy)
    db = LatentDB(tmp_path / "s.db")
    LLMCollector(db, layer_indices=[0], batch_size=2).run(tiny_tl, tokenizer, prompts=PROMPTS)
    assert len(seen) == 2  # one forward per batch
    assert all(k["stop_at_layer"] == 1 and k["return_type"] is None for k in seen)
    assert [name for name, _ in seen[0]["fwd_hooks"]] == ["blocks.0.hook_resid_post"]  # only the requested point


def test_max_channels_dtype_and_errors(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "m.db")
    LLMCollector(db, layer_indices=[1], max_channels=5).run(tiny_tl, tokenizer, prompts=PROMPTS[:2])
    acts = db.fetch_activations("llm.layer.1")
    assert acts.values.shape[1] == 5 and db.layer_info("llm.layer.1").dtype == "float16"
    with pytest.raises(ConfigError, match="max_channels=99 exceeds the width 32"):
        LLMCollector(LatentDB(tmp_path / "m2.db"), layer_indices=[1], max_channels=99).run(
            tiny_tl, tokenizer, prompts=PROMPTS[:2])
    with pytest.raises(LayerNotFoundError, match="out of range"):
        LLMCollector(db, layer_indices=[7]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    with pytest.raises(LayerNotFoundError, match="mlp_out"):
        LLMCollector(db, layer_indices=[0], hooks=["mlp_outt"])
    with pytest.raises(ConfigError, match="set_use_hook_mlp_in"):
        LLMCollector(db, hooks=["blocks.0.hook_mlp_in"]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    with pytest.raises(ConfigError, match="empty"):
        LLMCollector(db).run(tiny_tl, tokenizer, prompts=[])
    with pytest.raises(ConfigError, match="prompt 1 is an empty string"):
        LLMCollector(db).run(tiny_tl, tokenizer, prompts=["ok", ""])
    assert len(db.sequences()) == 2  # nothing of the refused runs was stored


def test_raw_hook_names_are_accepted(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "raw.db")
    LLMCollector(db, hooks=["blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"], dtype="float32").run(
        tiny_tl, tokenizer, prompts=PROMPTS[:1])
    assert set(db.layers()) == {"llm.layer.1.mlp_out", "blocks.0.attn.hook_z"}
    z = db.fetch_activations("blocks.0.attn.hook_z").values
    assert z.shape[1] == 4 * 8  # heads x d_head, flattened


def test_long_prompt_is_truncated_with_warning(tiny_tl, tokenizer, tmp_path, caplog):
    db = LatentDB(tmp_path / "long.db")
    long_text = " ".join(["the sky is blue"] * 40)
    with caplog.at_level(logging.WARNING):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=[long_text, "hi"])
    assert "truncated" in caplog.text
    assert db.sequences()["n_positions"].tolist() == [48, 2]


def test_tokenizer_without_pad_token(tiny_tl, tokenizer, tmp_path):
    assert tokenizer.pad_token_id is None
    db = LatentDB(tmp_path / "pad.db")
    LLMCollector(db, layer_indices=[0], batch_size=4).run(tiny_tl, tokenizer, prompts=PROMPTS)
    assert db.sequences()["n_positions"].tolist() == [len(tiny_tl.to_tokens(p)[0]) for p in PROMPTS]
    assert tokenizer.pad_token_id is None  # the user's tokenizer is left alone


def test_generation_logs_generated_tokens(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "gen.db")
    LLMCollector(db, layer_indices=[1], dtype="float32", batch_size=4).run(
        tiny_tl, tokenizer, prompts=PROMPTS, max_new_tokens=3)
    for i, text in enumerate(PROMPTS):
        toks = db.tokens(prompt_index=i)
        n = len(tiny_tl.to_tokens(text)[0])
        assert len(toks) == n + 3
        assert toks["generated"].tolist() == [False] * n + [True] * 3
        ids = tiny_tl.to_tokens(text)
        for _ in range(3):  # greedy, unpadded, by hand
            ids = torch.cat([ids, tiny_tl(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert toks["token_id"].tolist() == ids[0].tolist()
        _, cache = tiny_tl.run_with_cache(ids)
        np.testing.assert_allclose(db.fetch_activations("llm.layer.1", prompt_index=i).values,
                                   cache["blocks.1.hook_resid_post"][0].numpy(), atol=2e-5)


def test_builtin_metrics_match_tl_loss(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "met.db")
    LLMCollector(db, layer_indices=[0], metrics=["next_token_loss", "next_token_entropy"]).run(
        tiny_tl, tokenizer, prompts=PROMPTS)
    for i, text in enumerate(PROMPTS):
        toks = db.tokens(prompt_index=i)
        want = tiny_tl(tiny_tl.to_tokens(text), return_type="loss", loss_per_token=True)[0].detach().numpy()
        np.testing.assert_allclose(toks["next_token_loss"].to_numpy()[:-1], want, atol=1e-4)
        assert np.isnan(toks["next_token_loss"].iloc[-1])
        ent = toks["next_token_entropy"].to_numpy()
        assert np.all(ent > 0) and np.all(ent <= np.log(len(tokenizer)) + 1e-4)


def test_prompt_dataset_labels_context_and_metrics(tiny_tl, tokenizer, tmp_path):
    ds = PromptDataset.from_pairs(PROMPTS, ["sky", "animals", "greeting", "people"])
    assert ds.label_classes == {"animals": 0, "greeting": 1, "people": 2, "sky": 3}
    db = LatentDB(tmp_path / "ds.db")
    LLMCollector(db, layer_indices=[-1], prompt_context_fn=ds.prompt_context_fn(),
                 token_metrics_fn=ds.token_metrics_fn("label"), batch_size=3).run(tiny_tl, prompts=ds.texts)
    seqs = db.sequences()
    assert seqs["label"].tolist() == ds.labels
    assert seqs["label_id"].tolist() == [3, 0, 1, 2]
    assert seqs["context"][0] == {"label": "sky", "label_id": 3}
    assert db.label_classes() == ds.label_classes
    toks = db.tokens(prompt_index=1)
    assert set(toks["prompt_label"]) == {0.0}
    assert set(db.fetch_activations("llm.layer.2", label="people").tokens["prompt_index"]) == {3}


def test_prompt_dataset_csv_round_trip(tmp_path):
    ds = PromptDataset([PromptExample("a, \"quoted\" text", label="x", score=1.5, who="Al"),
                        PromptExample("plain", label="y", score=2, who="Bo")])
    path = ds.to_csv(tmp_path / "p.csv")
    back = PromptDataset.from_csv(path, text_col="text", label_col="label")
    assert back.texts == ds.texts and back.labels == ["x", "y"]
    assert back[0].meta == {"score": 1.5, "who": "Al"}
    ctx = back.prompt_context_fn()(back.texts[1], 1)
    assert ctx == {"label": "y", "score": 2, "who": "Bo", "label_id": 1}
    assert back.token_metrics_fn("score")(back.texts[0], 0, ["a"]) == {"prompt_score": 1.5}
    with pytest.raises(ConfigError, match="columns are"):
        PromptDataset.from_csv(path, text_col="prompt")
    with pytest.raises(ConfigError, match="2 texts but 1 labels"):
        PromptDataset.from_pairs(["a", "b"], ["x"])


def test_failing_metrics_fn_interrupts_run_and_keeps_batches(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "int.db")
    calls = {"n": 0}

    def flaky(text, idx, tokens):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ValueError("metric exploded")
        return {"len": len(tokens)}

    with pytest.raises(ValueError, match="metric exploded"):
        LLMCollector(db, layer_indices=[0], token_metrics_fn=flaky, batch_size=2).run(
            tiny_tl, tokenizer, prompts=PROMPTS)
    runs = db.runs()
    assert runs["status"].tolist() == ["interrupted"] and "metric exploded" in runs["error"][0]
    assert len(db.sequences()) == 2  # the first batch is intact
    assert db.fetch_activations("llm.layer.0").values.shape[0] == db.sequences()["n_positions"].sum()


def test_more_layers_over_the_same_prompts_and_new_prompts(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "two.db")
    LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    LLMCollector(db, layer_indices=[1]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    assert len(db.sequences()) == 4 and db.layers() == ["llm.layer.0", "llm.layer.1"]
    LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=["brand new prompt"])
    assert db.sequences()["prompt_index"].tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- Hugging Face
def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_hf_and_tl_paths_agree(tiny_gpt2_dir, tokenizer, tmp_path, side):
    hf = _hf(tiny_gpt2_dir)
    tl = hooked_from_hf(hf, tokenizer)
    kinds = ["resid_pre", "resid_mid", "attn_out", "mlp_in", "mlp_out", "resid_post"]
    dbs = {}
    for name, model in (("hf", hf), ("tl", tl)):
        dbs[name] = LatentDB(tmp_path / f"{name}.db")
        LLMCollector(dbs[name], layer_indices=[0, 1], hooks=kinds, dtype="float32", batch_size=4,
                     padding_side=side, prepend_bos=True).run(model, tokenizer, prompts=PROMPTS)
    assert dbs["hf"].layers() == dbs["tl"].layers() and len(dbs["hf"].layers()) == 12
    for layer in dbs["hf"].layers():
        a, b = dbs["hf"].fetch_activations(layer), dbs["tl"].fetch_activations(layer)
        assert a.tokens["token_id"].tolist() == b.tokens["token_id"].tolist()
        assert np.abs(a.values - b.values).max() < 1e-4, layer


def test_hf_llama_collects_and_matches_tl(tiny_llama_dir, tokenizer, tmp_path):
    hf = _hf(tiny_llama_dir)
    tl = load_model(tiny_llama_dir)
    dbs = {}
    for name, model in (("hf", hf), ("tl", tl)):
        dbs[name] = LatentDB(tmp_path / f"{name}.db")
        LLMCollector(dbs[name], layer_indices=[1], hooks=["mlp_in", "mlp_out", "resid_post"], dtype="float32",
                     padding_side="left", prepend_bos=True).run(model, tokenizer, prompts=PROMPTS)
    for layer in ("llm.layer.1", "llm.layer.1.mlp_in", "llm.layer.1.mlp_out"):
        diff = np.abs(dbs["hf"].fetch_activations(layer).values - dbs["tl"].fetch_activations(layer).values).max()
        assert diff < 1e-4, (layer, diff)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_load_model_from_local_checkpoint_matches_hf_logits(fixture, request, tokenizer):
    path = request.getfixturevalue(fixture)
    model = load_model(path)
    hf = _hf(path)
    tokens = model.to_tokens("the sky is blue and the sea is green")
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4
    ids = tokenizer("the sky is")["input_ids"]
    assert model.to_str_tokens("the sky is", prepend_bos=False) == [tokenizer.decode([i]) for i in ids]


def test_load_model_errors_say_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="tried .*local checkpoint directory.*TransformerLens model name"):
        load_model("definitely-not-a-model-name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")


# ---------------------------------------------------------------------------- tokenizer state (item 1)
def _stored_ids(db, i):
    return db.tokens(prompt_index=i)["token_id"].tolist()


def _unpadded_ids(tokenizer, text, bos=True):
    from tokenizers import Tokenizer

    clean = Tokenizer.from_str(tokenizer._tokenizer.to_str())
    clean.no_padding()
    clean.no_truncation()
    ids = clean.encode(text, add_special_tokens=False).ids
    return [tokenizer.bos_token_id, *ids] if bos else ids


def test_tl_tokenizer_state_left_by_to_str_tokens_is_not_stored(tiny_tl, tmp_path):
    prompts = ["my heart aches", "ngl I found a wallet lol and the sky is blue"]
    tiny_tl.to_str_tokens("my heart aches")  # leaves padding + truncation on in the backend
    tok = tiny_tl.tokenizer
    tok(["a b", "the sky is blue and the sea"], truncation=True, max_length=4)
    state = (tok._tokenizer.padding, tok._tokenizer.truncation)
    assert state[1] is not None and state[1]["max_length"] == 4
    db = LatentDB(tmp_path / "state.db")
    LLMCollector(db, layer_indices=[0], batch_size=2).run(tiny_tl, prompts=prompts)
    assert (tok._tokenizer.padding, tok._tokenizer.truncation) == state  # the user's tokenizer is untouched
    for i, text in enumerate(prompts):
        assert _stored_ids(db, i) == _unpadded_ids(tok, text) == tiny_tl.to_tokens(text, truncate=False)[0].tolist()
    assert tok.pad_token_id not in db.tokens()["token_id"].tolist()
    assert db.sequences()["n_positions"].tolist() == [len(_unpadded_ids(tok, p)) for p in prompts]


def test_hf_tokenizer_state_padding_truncation_side_pad_token_is_not_inherited(tiny_gpt2_dir, tokenizer, tmp_path):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    tok(["a", "the sky is blue and the sea is green"], padding="max_length", truncation=True, max_length=3)
    assert tok._tokenizer.padding is not None and tok._tokenizer.truncation is not None
    hf = _hf(tiny_gpt2_dir)
    db = LatentDB(tmp_path / "hfstate.db")
    LLMCollector(db, layer_indices=[1], batch_size=4, prepend_bos=True).run(hf, tok, prompts=PROMPTS)
    for i, text in enumerate(PROMPTS):
        assert _stored_ids(db, i) == _unpadded_ids(tokenizer, text)
    assert tok._tokenizer.truncation["max_length"] == 3  # left as the user set it


def test_clean_tokenizer_copy_is_cached_and_follows_vocabulary_changes(tokenizer):
    import copy

    from interlatent.llm.backends import encode_texts, stateless_backend

    tok = copy.deepcopy(tokenizer)
    assert stateless_backend(tok) is tok._tokenizer  # no state left: the backend itself, no copy
    tok("a b c", truncation=True, max_length=2)
    clean = stateless_backend(tok)
    assert clean is not tok._tokenizer and clean.truncation is None and clean.padding is None
    assert stateless_backend(tok) is clean  # cached
    tok.add_tokens(["zqzq"])
    tok("a b c", truncation=True, max_length=2)
    fresh = stateless_backend(tok)
    assert fresh is not clean
    ids = encode_texts(tok, ["x zqzq the sky is blue and the sea"])[0].ids
    assert tok.convert_tokens_to_ids("zqzq") in ids and len(ids) > 2


def test_padded_encoding_is_refused_before_anything_is_stored(tiny_tl, tokenizer, tmp_path, monkeypatch):
    from interlatent.errors import ShapeError
    from interlatent.backends import base as backends

    real = backends.encode_texts

    def padded(tok, texts, add_special_tokens=False):
        return [backends.Encoding([*e.ids, 0, 0], e.n_real) for e in real(tok, texts, add_special_tokens)]

    monkeypatch.setattr(backends, "encode_texts", padded)
    db = LatentDB(tmp_path / "pad.db")
    with pytest.raises(ShapeError, match="attention mask"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    assert db.sequences().empty


def test_write_time_check_positions_equal_mask_sum(tiny_tl, tokenizer, tmp_path, monkeypatch):
    from interlatent.errors import ShapeError
    from interlatent.llm.capture import Capture

    original = Capture._assemble

    def drop_last(self, *args, **kwargs):
        records = original(self, *args, **kwargs)
        rec = records[0]
        rec.token_ids, rec.tokens = rec.token_ids[:-1], rec.tokens[:-1]
        rec.activations = {k: v[:-1] for k, v in rec.activations.items()}
        return records

    monkeypatch.setattr(Capture, "_assemble", drop_last)
    db = LatentDB(tmp_path / "chk.db")
    with pytest.raises(ShapeError, match="attention mask has"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    assert db.sequences().empty


# ---------------------------------------------------------------------------- duplicates and resume (6, 7c)
def test_rerun_and_superset_attach_to_stored_prompts(tiny_tl, tokenizer, tmp_path, caplog):
    db = LatentDB(tmp_path / "dup.db")
    LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    with caplog.at_level(logging.INFO, logger="interlatent"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    assert "4 of 4 prompts already stored" in caplog.text
    superset = ["a fresh prompt", *PROMPTS[::-1], "another one", PROMPTS[0]]
    LLMCollector(db, layer_indices=[0, 1], batch_size=2).run(tiny_tl, tokenizer, prompts=superset)
    seqs = db.sequences()
    assert len(seqs) == len(set(superset)) == 6 and seqs["text"].is_unique
    assert seqs["text"].tolist()[:4] == PROMPTS  # stored prompts keep their indices
    assert db.fetch_activations("llm.layer.1").values.shape[0] == seqs["n_positions"].sum()  # new layer joined
    assert db.fetch_activations("llm.layer.0").values.shape[0] == seqs["n_positions"].sum()  # no copy of layer 0


def test_duplicates_new_stores_copies_and_warns(tiny_tl, tokenizer, tmp_path, caplog):
    db = LatentDB(tmp_path / "new.db")
    LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS)
    with caplog.at_level(logging.WARNING):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS[:2], duplicates="new")
    assert len(db.sequences()) == 6
    assert "stored 2 of 2 prompts as new sequences" in caplog.text
    with pytest.raises(ConfigError, match="duplicates must be"):
        LLMCollector(db).run(tiny_tl, tokenizer, prompts=PROMPTS, duplicates="skip")


def test_duplicate_texts_within_one_call_are_one_sequence(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "within.db")
    seen = []
    LLMCollector(db, layer_indices=[0], prompt_context_fn=lambda t, i: seen.append(i) or {"i": i}).run(
        tiny_tl, tokenizer, prompts=["x y", "hi", "x y", "hi", "z"])
    seqs = db.sequences()
    assert seqs["text"].tolist() == ["x y", "hi", "z"] and seqs["prompt_index"].tolist() == [0, 1, 4]
    assert [c["i"] for c in seqs["context"]] == [0, 1, 4]
    db2 = LatentDB(tmp_path / "within_new.db")
    LLMCollector(db2, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=["x y", "hi", "x y"], duplicates="new")
    assert db2.sequences()["text"].tolist() == ["x y", "hi", "x y"]


def test_same_text_other_tokenisation_is_a_new_sequence_and_warned(tiny_tl, tokenizer, tmp_path, caplog):
    db = LatentDB(tmp_path / "retok.db")
    LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS[:2])
    with caplog.at_level(logging.WARNING):
        LLMCollector(db, layer_indices=[0], prepend_bos=False).run(tiny_tl, tokenizer, prompts=PROMPTS[:2])
    assert "2 prompts have the text of a stored sequence but another tokenisation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # generation is another tokenisation too: not skipped as stored
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=PROMPTS[:1], max_new_tokens=2)
    assert "1 prompts have the text of a stored sequence" in caplog.text
    seqs = db.sequences()
    assert seqs["text"].tolist() == [*PROMPTS[:2], *PROMPTS[:2], PROMPTS[0]]
    n = [len(_unpadded_ids(tokenizer, p)) for p in PROMPTS[:2]]
    assert seqs["n_positions"].tolist() == [*n, n[0] - 1, n[1] - 1, n[0] + 2]
    assert db.tokens(prompt_index=4)["generated"].sum() == 2


def _store_snapshot(db):
    seqs = db.sequences()
    out = {}
    for _, row in seqs.iterrows():
        toks = db.tokens(prompt_index=int(row["prompt_index"]))
        acts = {layer: db.fetch_activations(layer, prompt_index=int(row["prompt_index"])).values
                for layer in db.layers()}
        out[row["text"]] = (int(row["prompt_index"]), row["label"], row["context"], toks["token_id"].tolist(),
                            toks["len"].tolist(), acts)
    return out


def test_interrupted_collection_resumes_without_duplicates(tiny_tl, tokenizer, tmp_path, monkeypatch, caplog):
    prompts = [f"{w} is a word number {i}" + " and more" * (i % 4) for i, w in
               enumerate(["sky", "cat", "dog", "sea", "Alice", "Bob", "mat", "hello", "world"])]
    labels = ["a", "b", "a", "b", "a", "b", "a", "b", "a"]

    def collector(db, fail_after=None):
        calls = {"n": 0}

        def metrics(text, idx, tokens):
            calls["n"] += 1
            if fail_after is not None and calls["n"] > fail_after:
                raise KeyboardInterrupt
            return {"len": len(tokens)}

        return LLMCollector(db, layer_indices=[0, 2], batch_size=2, token_metrics_fn=metrics)

    whole = LatentDB(tmp_path / "whole.db")
    collector(whole).run(tiny_tl, tokenizer, prompts=prompts, labels=labels)
    db = LatentDB(tmp_path / "resumed.db")
    with pytest.raises(KeyboardInterrupt):
        collector(db, fail_after=4).run(tiny_tl, tokenizer, prompts=prompts, labels=labels)  # 2 batches stored
    assert len(db.sequences()) == 4 and db.runs()["status"].tolist() == ["interrupted"]
    forwards = []
    original = type(tiny_tl).run_with_hooks

    def spy(self, tokens, *args, **kwargs):
        forwards.append(tokens.shape[0])
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(tiny_tl), "run_with_hooks", spy)
    with caplog.at_level(logging.INFO, logger="interlatent"):
        collector(db).run(tiny_tl, tokenizer, prompts=prompts, labels=labels)
    assert "4 of 9 prompts already stored with every requested layer" in caplog.text
    assert sum(forwards) == 5  # only the prompts not yet stored went forward
    got, want = _store_snapshot(db), _store_snapshot(whole)
    assert got.keys() == want.keys() and len(db.sequences()) == 9
    for text, (index, label, ctx, ids, lens, acts) in want.items():
        g = got[text]
        assert g[:5] == (index, label, ctx, ids, lens)
        for layer, values in acts.items():
            assert np.array_equal(g[5][layer], values), (text, layer)  # bit-exact
    # the resumed layers hold whole data again: the interrupted run is marked resumed, no warning
    statuses = db.runs().set_index("run_id")["status"].to_dict()
    assert sorted(statuses.values()) == ["complete", "resumed"]
    for layer in ("llm.layer.0", "llm.layer.2"):
        assert db.layer_completeness(layer).complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db.check_complete("llm.layer.0")


def test_a_partial_resume_leaves_the_interrupted_run_incomplete(tiny_tl, tokenizer, tmp_path):
    prompts = [f"{w} sat on the mat {i}" for i, w in enumerate(["sky", "cat", "dog", "sea", "Alice", "Bob"])]

    def failing(text, idx, tokens, calls={"n": 0}):  # noqa: B006 - a counter local to this test
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return {}

    db = LatentDB(tmp_path / "partial.db")
    with pytest.raises(KeyboardInterrupt):
        LLMCollector(db, layer_indices=[0], batch_size=2, token_metrics_fn=failing).run(tiny_tl, tokenizer,
                                                                                          prompts=prompts)
    LLMCollector(db, layer_indices=[0], batch_size=2).run(tiny_tl, tokenizer, prompts=prompts[:3])  # not all
    assert sorted(db.runs()["status"]) == ["complete", "interrupted"]
    assert not db.layer_completeness("llm.layer.0").complete


# ---------------------------------------------------------------------------- refusals (15c) and labels (16c)
@pytest.mark.parametrize("bad", [[0.5], [1.0], [True], [0, np.float32(1)], "0"])
def test_non_integer_layer_indices_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="layer_indices must be"):
        LLMCollector(LatentDB(tmp_path / "li.db"), layer_indices=bad)


def test_bad_prompts_and_contexts_refused_before_any_forward(tiny_tl, tokenizer, tmp_path, monkeypatch):
    forwards = []
    monkeypatch.setattr(type(tiny_tl), "run_with_hooks", lambda *a, **k: forwards.append(1))
    db = LatentDB(tmp_path / "refuse.db")
    with pytest.raises(ConfigError, match=r"prompt 1 is not valid Unicode.*surrogate.*character 1"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=["ok", "a\ud800b"])
    for bad in (5, ["label", "x"], None, "text"):
        with pytest.raises(ConfigError, match=f"must return a dict.*prompt 0.*{type(bad).__name__}"):
            LLMCollector(db, layer_indices=[0], prompt_context_fn=lambda t, i, bad=bad: bad).run(
                tiny_tl, tokenizer, prompts=["ok"])
    with pytest.raises(ConfigError, match="cannot be stored as JSON.*set is not JSON serialisable"):
        LLMCollector(db, layer_indices=[0], prompt_context_fn=lambda t, i: {"ok": 1, "bad": {1, 2}}).run(
            tiny_tl, tokenizer, prompts=["ok"])
    with pytest.raises(ConfigError, match=r"labels\[1\] is \[1\]"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=["ok", "no"], labels=["a", [1]])
    with pytest.raises(ConfigError, match="labels has 1 entries for 2 prompts"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=["ok", "no"], labels=["a"])
    with pytest.raises(ConfigError, match="labels gives 'b' but prompt_context_fn gives label 'a'"):
        LLMCollector(db, layer_indices=[0], prompt_context_fn=lambda t, i: {"label": "a"}).run(
            tiny_tl, tokenizer, prompts=["ok"], labels=["b"])
    assert forwards == [] and db.sequences().empty and db.runs().empty and db.label_classes() == {}


def test_labels_argument_is_the_prompt_label(tiny_tl, tokenizer, tmp_path):
    db = LatentDB(tmp_path / "labels.db")
    LLMCollector(db, layer_indices=[0], prompt_context_fn=lambda t, i: {"who": i}).run(
        tiny_tl, tokenizer, prompts=PROMPTS, labels=["sky", 2, None, np.float64(0.5)])
    toks = db.tokens()
    assert [toks.loc[toks["prompt_index"] == i, "label"].iloc[0] for i in range(4)] == ["sky", 2, None, 0.5]
    contexts = [json.loads(c) for (c,) in db._q("SELECT context FROM sequences ORDER BY prompt_index")]
    assert contexts[0] == {"who": 0, "label": "sky"} and contexts[2] == {"who": 2}
    assert db.label_classes() == {"sky": 0}
    assert set(db.fetch_activations("llm.layer.0", label="sky").tokens["prompt_index"]) == {0}
    db2 = LatentDB(tmp_path / "agree.db")
    LLMCollector(db2, layer_indices=[0], prompt_context_fn=lambda t, i: {"label": "x"}).run(
        tiny_tl, tokenizer, prompts=PROMPTS[:1], labels=["x"])
    assert db2.sequences()["label"].tolist() == ["x"]


# ---------------------------------------------------------------------------- concurrent writers (11b)
_CHILD = r"""
import os, sys, time, torch
torch.set_num_threads(1)
from transformer_lens import HookedTransformer, HookedTransformerConfig
from interlatent import LatentDB, LLMCollector
from interlatent.llm.loading import load_local_tokenizer
store, tok_dir, name, go = sys.argv[1:5]
prompts = sys.argv[5:]
tok = load_local_tokenizer(tok_dir)
cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=32, d_vocab=len(tok),
                              act_fn="gelu", normalization_type="LN", seed=0)
model = HookedTransformer(cfg, tokenizer=tok).eval()
db = LatentDB(store)
open(go + "." + name, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
first = []
def slow_first(text, idx, tokens):  # the other writer plans its indices meanwhile
    if not first:
        first.append(1)
        time.sleep(0.5)
    return {}
LLMCollector(db, layer_indices=[0], batch_size=1, token_metrics_fn=slow_first).run(model, prompts=prompts)
db.close()
"""


def test_concurrent_collectors_store_every_prompt_once(tokenizer_dir, tmp_path):
    import os
    import subprocess
    import sys
    import time

    store = tmp_path / "shared.db"
    LatentDB(store).close()  # the schema exists before the writers start
    go = str(tmp_path / "go")
    sets = {"a": [f"alpha prompt {i} " + "x " * i for i in range(6)],
            "b": [f"beta prompt {i} " + "y " * (5 - i) for i in range(6)]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(store), str(tokenizer_dir), name, go, *texts],
                              env=env, stderr=subprocess.PIPE, text=True) for name, texts in sets.items()]
    deadline = time.monotonic() + 120
    while not all(os.path.exists(f"{go}.{n}") for n in sets) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.05)
    open(go, "w").close()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    db = LatentDB(store, mode="r")
    seqs = db.sequences()
    assert sorted(seqs["text"]) == sorted(sets["a"] + sets["b"])  # every prompt stored once
    assert seqs["prompt_index"].is_unique
    assert db.runs()["status"].tolist() == ["complete", "complete"]
    assert db.fetch_activations("llm.layer.0").values.shape[0] == seqs["n_positions"].sum()


# ---------------------------------------------------------------------------- the demo model (16c)
def test_demo_model_training_shows_progress_and_logs_its_cache(tmp_path, monkeypatch, capsys, caplog):
    from interlatent.llm.demo_model import DemoModelConfig, demo_model

    monkeypatch.setenv("INTERLATENT_CACHE", str(tmp_path / "cache"))
    cfg = DemoModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=32, vocab_size=300, steps=3,
                          batch_size=4, n_dilemma_texts=40, n_general=10)
    with caplog.at_level(logging.INFO, logger="interlatent"):
        model = demo_model(config=cfg, progress=True)
    err = capsys.readouterr().err
    assert "training the demo model" in err and "3/3" in err  # the tqdm bar, forced on
    folder = tmp_path / "cache" / "demo_model" / cfg.key()
    assert "training the demo model (3 steps; first use only)" in caplog.text and str(folder.resolve()) in caplog.text
    assert (folder / "model.safetensors").is_file() and model.cfg.n_layers == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="interlatent"):
        demo_model(config=cfg, progress=True)  # cached: no training, no bar
    assert "training" not in caplog.text and "training" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- points not indexed by position
@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_points_whose_second_axis_is_not_position_are_refused(tiny_tl, tokenizer, tmp_path, hook):
    db = LatentDB(tmp_path / "pattern.db")
    prompts = ["the sky is blue", "a cat sat on the mat while the dog slept"]  # one longer than n_heads
    with pytest.raises(ConfigError, match="not indexed by token position"):
        LLMCollector(db, layer_indices=[], hooks=[hook]).run(tiny_tl, tokenizer, prompts=prompts)
    assert db.layers() == [] and db.sequences().empty  # refused before anything is stored


def test_an_activation_whose_second_axis_is_not_the_positions_is_refused_at_the_first_batch(tiny_tl, tokenizer,
                                                                                              tmp_path, monkeypatch):
    from interlatent.backends import make_backend

    backend_cls = type(make_backend(tiny_tl, tokenizer))
    real_forward = backend_cls.forward

    def transposed(self, tokens, mask, points, need_logits):  # a point that hands back [pos, batch, ...]
        captured, logits = real_forward(self, tokens, mask, points, need_logits)
        return {k: v.transpose(0, 1).contiguous() for k, v in captured.items()}, logits

    monkeypatch.setattr(backend_cls, "forward", transposed)
    db = LatentDB(tmp_path / "shape.db")
    with pytest.raises(ConfigError, match="not indexed by token position"):
        LLMCollector(db, layer_indices=[0]).run(tiny_tl, tokenizer, prompts=["the sky is blue and the sea", "a cat"])
    assert db.sequences().empty
