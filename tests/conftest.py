"""Shared fixtures: tiny random-init models built from configs, an offline tokenizer, temp stores."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore", message=".*tokenizer.*")
torch.set_num_threads(1)  # tiny models: one thread is faster, and immune to oversubscription

CORPUS = [
    "the sky is blue and the sea is green",
    "a cat sat on the mat while the dog slept",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "Alice said that Bob would report it; Carol said nothing at all",
    "numbers like 1 2 3 and symbols like < > & ; % _ are text too",
]


@pytest.fixture(scope="session", autouse=True)
def _demo_model_cache(tmp_path_factory):
    """The demo model trains once per test session into a temporary cache (subprocesses inherit it)."""
    import os

    if "INTERLATENT_TEST_CACHE" in os.environ:  # reuse a warm cache across local runs
        os.environ["INTERLATENT_CACHE"] = os.environ["INTERLATENT_TEST_CACHE"]
    else:
        os.environ["INTERLATENT_CACHE"] = str(tmp_path_factory.mktemp("interlatent_cache"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (no downloads), saved to an absolute path. No pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>")
    path = tmp_path_factory.mktemp("tokenizer").resolve()
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from interlatent.llm.loading import load_local_tokenizer

    tok = load_local_tokenizer(tokenizer_dir)
    assert tok.pad_token_id is None
    return tok


def tiny_tl_config(d_vocab: int, **overrides):
    from transformer_lens import HookedTransformerConfig

    fields = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=48, d_vocab=d_vocab,
                  act_fn="gelu", normalization_type="LN", seed=0)
    fields.update(overrides)
    return HookedTransformerConfig(**fields)


@pytest.fixture(scope="session")
def tiny_tl(tokenizer):
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    model = HookedTransformer(tiny_tl_config(len(tokenizer)), tokenizer=tokenizer)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny random GPT-2 saved with save_pretrained (the real local-checkpoint path)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gpt2").resolve()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama").resolve()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


@pytest.fixture(scope="session")
def trained_tl(tokenizer):
    """The tiny model trained for a few hundred steps on the corpus, so it has structure to break."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    model = HookedTransformer(tiny_tl_config(len(tokenizer), seed=1), tokenizer=tokenizer)
    tokens = model.to_tokens(CORPUS)  # right-padded with eos
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(tokens, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model
