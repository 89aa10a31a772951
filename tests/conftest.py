"""Shared fixtures: tiny random-init models built from configs, an offline tokenizer, temp stores.

The suite runs on TransformerLens 3 and 4. On 4, ``tiny_tl`` / ``trained_tl`` are native
``TransformerBridge`` models built from the same config, and a test whose own code builds a
``HookedTransformer`` / ``HookedEncoder`` or converts a checkpoint into one is skipped, saying so.
"""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap
import warnings

import numpy as np
import pytest
import torch
from jaxtyping import install_import_hook

#: modules whose jaxtyping shapes are checked at run time in every test (beartype), installed
#: before anything imports them. The collector is left out: it validates its user-facing arguments
#: itself, with the project's errors, and has no tensor signature of its own.
TYPE_CHECKED = ["interlatent.backends", "interlatent.patch.core", "interlatent.patch.activation",
                "interlatent.patch.reach", "interlatent.patch.measure", "interlatent.patch.controls",
                "interlatent.patch.effects", "interlatent.patch.attribution", "interlatent.patch.agreement",
                "interlatent.patch.components",
                "interlatent.patch.steering", "interlatent.llm.prompts", "interlatent.analysis"]
_TYPE_HOOK = install_import_hook(TYPE_CHECKED, "beartype.beartype")

warnings.filterwarnings("ignore", message=".*tokenizer.*")
torch.set_num_threads(1)  # tiny models: one thread is faster, and immune to oversubscription

CORPUS = [
    "the sky is blue and the sea is green",
    "a cat sat on the mat while the dog slept",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "Alice said that Bob would report it; Carol said nothing at all",
    "numbers like 1 2 3 and symbols like < > & ; % _ are text too",
]


def _has_hooked_transformer() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


TL3 = _has_hooked_transformer()
#: names a test's own code uses that only TransformerLens 3 has
_TL3_ONLY = ("HookedTransformer", "HookedTransformerConfig", "HookedEncoder", "hooked_from_hf", "load_model")


def _trees(fn, deep: bool, seen: set | None = None) -> list[tuple[ast.AST, dict]]:
    """The syntax trees of ``fn`` and, if ``deep``, of the module-level functions of its module that
    it names (recursively), each with the globals its names resolve in."""
    seen = set() if seen is None else seen
    if fn is None or id(fn) in seen:
        return []
    seen.add(id(fn))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return []
    env = getattr(fn, "__globals__", {})
    out = [(tree, env)]
    for name in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} if deep else ():
        other = env.get(name)
        if inspect.isfunction(other) and other.__module__ == getattr(fn, "__module__", None):
            out += _trees(other, deep, seen)
    return out


def _names_used(fns, wanted: tuple[str, ...], deep: bool = False) -> list[str]:
    """Which of ``wanted`` the functions' code (or a script it runs: a string, or a module-level
    string it names, that imports them) uses; with ``deep``, also through module-level helpers of
    their modules that they call."""
    used: set[str] = set()
    for tree, env in [t for fn in fns for t in _trees(fn, deep)]:
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        used |= names | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                used |= {a.name for a in node.names} | {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
        scripts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        scripts += [v for k, v in env.items() if k in names and isinstance(v, str)]
        for text in scripts:
            if "import" in text:
                used |= {name for name in wanted if name in text}
    return [name for name in wanted if name in used]


def _fixture_functions(item) -> list:
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {}) if info is not None else {}
    return [d[-1].func for name, d in defs.items() if d and name in item.fixturenames]


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "both_tl: runs on TransformerLens 3 and 4 although its code names a TL 3 "
                                       "loader (which returns a TransformerBridge on 4)")


def pytest_collection_modifyitems(config, items):
    """On TransformerLens 4: skip tests that build a TL 3 model themselves, and tests that need
    SAELens (which pins transformer-lens < 4, so the TL 4 environment cannot have it). On TL 3
    nothing is skipped here: SAELens is a test dependency there and its tests must run."""
    if TL3:
        return
    no_saelens = not _installed("sae_lens")
    for item in items:
        fns = [getattr(item, "function", None), *_fixture_functions(item)]
        if no_saelens and _names_used(fns, ("sae_lens",), deep=True):
            item.add_marker(pytest.mark.skip(reason="needs SAELens, which pins transformer-lens < 4: it is not "
                                                    "installed beside TransformerLens 4 (the TL 3 run covers this)"))
            continue
        if item.get_closest_marker("both_tl"):
            continue
        used = _names_used(fns, _TL3_ONLY)
        if used:
            item.add_marker(pytest.mark.skip(reason=f"TransformerLens 4 has no {used[0]}: this test builds or converts "
                                                    "a TransformerLens 3 model itself"))


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
    """The tiny model's config: ``HookedTransformerConfig`` on TransformerLens 3,
    ``TransformerBridgeConfig`` on 4."""
    fields = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=48, d_vocab=d_vocab,
                  act_fn="gelu", normalization_type="LN", seed=0)
    fields.update(overrides)
    if TL3:
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(**fields)
    from transformer_lens import TransformerBridgeConfig

    return TransformerBridgeConfig(**fields)


def tiny_model(cfg, tokenizer):
    """A random-init model from ``tiny_tl_config``: ``HookedTransformer`` (TL 3) or the native
    ``TransformerBridge`` (TL 4)."""
    if TL3:
        from transformer_lens import HookedTransformer

        return HookedTransformer(cfg, tokenizer=tokenizer)
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_native(cfg, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_tl(tokenizer):
    torch.manual_seed(0)
    model = tiny_model(tiny_tl_config(len(tokenizer)), tokenizer)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_bridge(tokenizer):
    """A TransformerLens 4 ``TransformerBridge`` booted natively from a config (skipped on TL 3)."""
    if TL3:
        pytest.skip("TransformerLens 3 has no TransformerBridge (the TL 4 run of `make test` covers it)")
    torch.manual_seed(0)
    return tiny_model(tiny_tl_config(len(tokenizer)), tokenizer).eval()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT-style encoder (``BertForMaskedLM`` from a ``BertConfig``) saved with
    save_pretrained; ``AutoModel`` loads its bare encoder, ``AutoModelForMaskedLM`` the head too."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return save_checkpoint(BertForMaskedLM(cfg), tokenizer, tmp_path_factory.mktemp("bert"))


def save_checkpoint(model, tokenizer, folder):
    """``model`` and ``tokenizer`` saved with save_pretrained in ``folder`` (absolute), returned."""
    path = folder.resolve()
    model.eval().save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tokenizer):
    """A TransformerLens ``HookedEncoder`` (BERT) from a config (TL 3 only: TL 4 has none)."""
    if not TL3:
        pytest.skip("TransformerLens 4 has no HookedEncoder")
    from transformer_lens import HookedEncoder

    torch.manual_seed(0)
    model = HookedEncoder(tiny_tl_config(len(tokenizer), n_layers=2, attention_dir="bidirectional"),
                          move_to_device=False)
    with torch.no_grad():  # HookedEncoder leaves its parameters uninitialised (it expects pretrained weights)
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                param.fill_(1.0)
            elif leaf.startswith("b"):
                param.zero_()
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny random GPT-2 saved with save_pretrained (the real local-checkpoint path)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_checkpoint(GPT2LMHeadModel(cfg), tokenizer, tmp_path_factory.mktemp("gpt2"))


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
    torch.manual_seed(0)
    model = tiny_model(tiny_tl_config(len(tokenizer), seed=1), tokenizer)
    tokens = model.to_tokens(CORPUS)  # right-padded with eos
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(tokens, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model
