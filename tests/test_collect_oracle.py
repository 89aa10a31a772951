"""Oracle tests: what the collector stores equals TransformerLens's own ``run_with_cache`` on each
prompt alone (one unpadded forward), whatever the prompts, batch size, padding side and the state
earlier tokenizer calls left behind — for the TransformerLens and the Hugging Face paths.

Property-based (hypothesis): prompt lists of 1..6 texts, from one token to past the model's
context (truncated: compared with run_with_cache of the truncated tokens), unicode and whitespace,
repeated texts (stored once, at the first occurrence's index).
"""

from __future__ import annotations

import copy
import itertools
import logging
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB, LLMCollector

from conftest import tiny_tl_config

KINDS = ("resid_pre", "resid_mid", "attn_out", "mlp_in", "mlp_out", "resid_post")
TL_NAME = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
           "mlp_in": "ln2.hook_normalized", "mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post"}
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
N_TL, N_HF = 130, 90

WORDS = ["the", "sky", "is", "blue", "cat", "sat", "on", "mat", "hello", "world,", "Alice", "said", "Bob",
         "1", "2", "3", "<", ">", "&", ";", "%", "_", "numbers", "tiny", "corpus"]
WHITESPACE = [" ", "  ", "\n", "\t", " \n ", "\r\n"]
words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=60).map(" ".join)  # past n_ctx at the top
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
spaced = st.tuples(st.sampled_from(WHITESPACE), words, st.sampled_from(WHITESPACE)).map("".join)
single = st.sampled_from(list(string.ascii_letters + string.punctuation) + WHITESPACE + ["é", "日本", "🙂"])
prompt = st.one_of(words, unicode_text, spaced, single)
prompts = st.lists(prompt, min_size=1, max_size=6).flatmap(
    lambda ps: st.just(ps) | st.lists(st.sampled_from(ps), min_size=1, max_size=7))  # repeats, too
STATES = ("none", "to_tokens", "to_str_tokens", "padding_truncation", "left_padding_truncation")


def leave_state(state: str, tok, model, texts: list[str], max_length: int) -> None:
    """What a user's earlier calls leave in the tokenizer."""
    if state == "to_tokens" and model is not None:
        model.to_tokens(texts)
    elif state == "to_str_tokens" and model is not None:
        model.to_str_tokens(texts[0])
    elif state in ("padding_truncation", "left_padding_truncation"):
        tok.padding_side = "left" if state.startswith("left") else "right"
        tok(texts, padding=True, truncation=True, max_length=max_length)


def check_store(db: LatentDB, texts: list[str], ref_ids: dict[str, list[int]], ref_acts: dict[str, dict],
                layers: dict[str, str], pad_id: int | None, atol: float) -> None:
    first = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    seqs = db.sequences()
    assert seqs["prompt_index"].tolist() == sorted(first.values())  # one sequence per distinct text
    assert seqs["text"].tolist() == [texts[i] for i in sorted(first.values())]
    all_toks = db.tokens()
    for text, index in first.items():
        toks = all_toks[all_toks["prompt_index"] == index]
        ids = ref_ids[text]
        assert toks["token_id"].tolist() == ids, (text, index)  # the unpadded tokenisation, truncated
        assert toks["position"].tolist() == list(range(len(ids)))
        assert int(seqs.loc[seqs["prompt_index"] == index, "n_positions"].iloc[0]) == len(ids)
        if pad_id is not None and pad_id not in ids:
            assert pad_id not in toks["token_id"].tolist()
    text_of = {index: text for text, index in first.items()}
    for layer, hook in layers.items():
        blocks = dict(db.iter_sequence_blocks(layer))
        assert sorted(blocks) == sorted(text_of), layer
        for index, got in blocks.items():
            want = ref_acts[text_of[index]][hook]
            assert got.shape == want.shape, (layer, text_of[index])
            np.testing.assert_allclose(got, want, atol=atol, rtol=0, err_msg=f"{layer} {text_of[index]!r}")


_counter = itertools.count()


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("oracle")


# ---------------------------------------------------------------------------- TransformerLens
@pytest.fixture(scope="module")
def tl_model(tokenizer):
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    model = HookedTransformer(tiny_tl_config(len(tokenizer), seed=3), tokenizer=tokenizer).eval()
    assert model.tokenizer is not tokenizer  # its own copy: the states left here stay in this module
    return model


def tl_reference(model, text: str, names: list[str]) -> tuple[list[int], dict[str, np.ndarray]]:
    tokens = model.to_tokens(text, prepend_bos=True, truncate=False)[:, : model.cfg.n_ctx]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=torch.ones_like(tokens),
                                        names_filter=lambda n: n in names)
    return tokens[0].tolist(), {n: cache[n][0].float().numpy() for n in names}


@settings(max_examples=N_TL, **SETTINGS)
@given(texts=prompts, batch_size=st.integers(1, 4), side=st.sampled_from(["right", "left"]),
       state=st.sampled_from(STATES), max_length=st.integers(1, 6))
def test_tl_collection_equals_run_with_cache_per_prompt(tl_model, oracle_dir, texts, batch_size, side, state,
                                                        max_length):
    model, tok = tl_model, tl_model.tokenizer
    n = model.cfg.n_layers
    layers = {f"llm.layer.{b}" + ("" if k == "resid_post" else f".{k}"): f"blocks.{b}.{TL_NAME[k]}"
              for b in (0, n - 1) for k in KINDS}
    ref_ids, ref_acts = {}, {}
    for text in set(texts):
        ref_ids[text], ref_acts[text] = tl_reference(model, text, list(layers.values()))
    leave_state(state, tok, model, texts, max_length)
    db = LatentDB(oracle_dir / f"tl{next(_counter)}.db", durability="process")
    logging.getLogger("interlatent").setLevel(logging.ERROR)  # truncation warnings are expected here
    try:
        LLMCollector(db, layer_indices=[0, -1], hooks=list(KINDS), batch_size=batch_size, dtype="float32",
                     padding_side=side).run(model, prompts=texts)
        check_store(db, texts, ref_ids, ref_acts, layers, tok.pad_token_id, atol=2e-5)
    finally:
        logging.getLogger("interlatent").setLevel(logging.NOTSET)
        db.close()
        tok.padding_side = "right"


# ---------------------------------------------------------------------------- Hugging Face (GPT-2)
@pytest.fixture(scope="module")
def hf_pair(tiny_gpt2_dir, tokenizer):
    """The HF GPT-2, its TransformerLens twin (the oracle), and a tokenizer with a pad token to
    leave padding state in (a copy: the session's tokenizer is not touched)."""
    from transformers import AutoModelForCausalLM

    from interlatent.llm import hooked_from_hf

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    twin = hooked_from_hf(hf, tokenizer)
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    return hf, twin, tok


@settings(max_examples=N_HF, **SETTINGS)
@given(texts=prompts, batch_size=st.integers(1, 4), side=st.sampled_from(["right", "left"]),
       state=st.sampled_from(("none", "padding_truncation", "left_padding_truncation")),
       max_length=st.integers(1, 6))
def test_hf_collection_equals_run_with_cache_per_prompt(hf_pair, oracle_dir, texts, batch_size, side, state,
                                                        max_length):
    hf, twin, tok = hf_pair
    n = hf.config.n_layer
    layers = {f"llm.layer.{b}" + ("" if k == "resid_post" else f".{k}"): f"blocks.{b}.{TL_NAME[k]}"
              for b in (0, n - 1) for k in KINDS}
    ref_ids, ref_acts = {}, {}
    for text in set(texts):
        ref_ids[text], ref_acts[text] = tl_reference(twin, text, list(layers.values()))
    leave_state(state, tok, None, texts, max_length)
    db = LatentDB(oracle_dir / f"hf{next(_counter)}.db", durability="process")
    logging.getLogger("interlatent").setLevel(logging.ERROR)
    try:
        LLMCollector(db, layer_indices=[0, -1], hooks=list(KINDS), batch_size=batch_size, dtype="float32",
                     padding_side=side, prepend_bos=True).run(hf, tok, prompts=texts)
        check_store(db, texts, ref_ids, ref_acts, layers, tok.pad_token_id, atol=1e-4)
    finally:
        logging.getLogger("interlatent").setLevel(logging.NOTSET)
        db.close()
        tok.padding_side = "right"
