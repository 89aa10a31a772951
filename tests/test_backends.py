"""The backend adapter: one protocol for TransformerLens 3 / 4, Hugging Face causal LMs and encoders."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent.backends import (Backend, HFBackend, HFEncoderBackend, TL3Backend, TL4Backend, backend_class,
                                  make_backend)
from interlatent.errors import ConfigError, LayerNotFoundError
from tests.conftest import TL3

TOKENS = torch.tensor([[3, 17, 40, 9, 33, 21, 8], [4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture
def gpt2(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()


@pytest.fixture
def bert_mlm(tiny_bert_dir):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(tiny_bert_dir), local_files_only=True).eval()


@pytest.fixture(params=["tl", "gpt2", "bert_mlm"])
def model(request):
    return request.getfixturevalue({"tl": "tiny_tl"}.get(request.param, request.param))


def test_make_backend_picks_one_backend_per_kind(tiny_tl, gpt2, bert_mlm):
    assert backend_class(tiny_tl) is (TL3Backend if TL3 else TL4Backend)
    assert backend_class(gpt2) is HFBackend and backend_class(bert_mlm) is HFEncoderBackend
    backend = make_backend(gpt2)
    assert make_backend(backend) is backend  # a backend passes through
    with pytest.raises(ConfigError, match="expected a TransformerLens"):
        make_backend(object())
    with pytest.raises(ConfigError, match="no tokenizer"):
        make_backend(gpt2, need_tokenizer=True)


def test_model_facts(tiny_tl, gpt2, bert_mlm):
    tl, hf, enc = make_backend(tiny_tl), make_backend(gpt2), make_backend(bert_mlm)
    assert (tl.n_blocks, tl.n_ctx, tl.is_causal) == (3, 48, True)
    assert (hf.n_blocks, hf.n_ctx, hf.is_causal) == (2, 64, True)
    assert (enc.n_blocks, enc.n_ctx, enc.is_causal) == (2, 64, False)
    assert all(b.device == torch.device("cpu") for b in (tl, hf, enc))


def test_forward_captures_the_requested_points_and_stops_after_the_deepest(model):
    backend = make_backend(model)
    points = [backend.resolve("llm.layer.0"), backend.resolve("llm.layer.0.mlp_out")]
    after = backend.resolve(f"llm.layer.{backend.n_blocks - 1}")
    seen = []
    with torch.no_grad(), backend.at_hook(after, lambda act: seen.append(1)):
        captured, logits = backend.forward(TOKENS, torch.ones_like(TOKENS), points, need_logits=False)
        assert seen == [] and logits is None  # the last block never ran
        captured_all, logits = backend.forward(TOKENS, torch.ones_like(TOKENS), points, need_logits=True)
    assert seen == [1] and logits.shape[:2] == TOKENS.shape
    assert set(captured) == {p.tl_name for p in points}
    for p in points:
        assert captured[p.tl_name].shape == (2, 7, 32)
        assert torch.equal(captured[p.tl_name], captured_all[p.tl_name])


def test_at_hook_rewrites_in_place_and_leaves_no_trace(model):
    backend = make_backend(model)
    point = backend.resolve("llm.layer.0")
    with torch.no_grad():
        clean = backend.logits(TOKENS)
        with backend.at_hook(point, lambda act: act * 0.0):
            zeroed = backend.logits(TOKENS)
        with backend.at_hook(point, lambda act: None):
            untouched = backend.logits(TOKENS)
        with pytest.raises(RuntimeError, match="inside"), backend.at_hook(point, lambda act: act + 1.0):
            raise RuntimeError("inside")
        assert torch.equal(backend.logits(TOKENS), clean)
    assert not torch.allclose(zeroed, clean) and torch.equal(untouched, clean)


def test_logits_respect_the_attention_mask(model):
    backend = make_backend(model)
    mask = torch.ones_like(TOKENS)
    mask[1, 5:] = 0
    with torch.no_grad():
        padded = backend.logits(TOKENS, mask)
        alone = backend.logits(TOKENS[1:, :5])
    assert (padded[1, :5] - alone[0]).abs().max() < 1e-4


def test_left_padding_gives_the_activations_of_right_padding_on_hf_models(gpt2, bert_mlm):
    for m in (gpt2, bert_mlm):
        backend = make_backend(m)
        point = backend.resolve("llm.layer.1")
        row = TOKENS[1, :5]
        right = torch.stack([TOKENS[0], torch.cat([row, torch.zeros(2, dtype=torch.long)])])
        left = torch.stack([TOKENS[0], torch.cat([torch.zeros(2, dtype=torch.long), row])])
        mask_r = (torch.arange(7) < 5).long()
        masks = (torch.stack([torch.ones(7, dtype=torch.long), mask_r]),
                 torch.stack([torch.ones(7, dtype=torch.long), mask_r.flip(0)]))
        with torch.no_grad():
            a = backend.forward(right, masks[0], [point], False)[0][point.tl_name][1, :5]
            b = backend.forward(left, masks[1], [point], False)[0][point.tl_name][1, 2:]
        assert (a - b).abs().max() < 1e-5, type(m).__name__


def test_tokenisation_ignores_state_left_in_the_tokenizer(tiny_tl, tokenizer):
    tok = copy.deepcopy(tokenizer)
    backend = make_backend(tiny_tl, tok)
    texts = ["the sky is blue and the sea is green", "a cat"]
    before = backend.prompt_ids(texts)
    tok.pad_token = tok.eos_token
    tok(texts, padding="max_length", truncation=True, max_length=3)
    assert backend.prompt_ids(texts) == before
    assert before[0][0] == tok.bos_token_id and len(before[0]) > 3  # BOS first, nothing truncated


def test_unknown_points_are_refused_with_suggestions(tiny_tl, gpt2):
    with pytest.raises(LayerNotFoundError, match="llm.layer"):
        make_backend(tiny_tl).resolve("llm.layer.0.mlp_ot")
    with pytest.raises(LayerNotFoundError, match="valid names"):
        make_backend(gpt2).resolve("blocks.0.attn.hook_z")


def test_backend_is_the_protocol():
    for cls in (TL3Backend, TL4Backend, HFBackend, HFEncoderBackend):
        assert issubclass(cls, Backend)
        for method in ("resolve", "width", "forward", "at_hook", "logits"):
            assert getattr(cls, method) is not getattr(Backend, method), (cls, method)


def test_tensor_shapes_are_checked_in_the_test_run():
    """conftest installs jaxtyping's import hook (with beartype) on the backend and patch modules:
    a call whose tensors disagree on a named dimension fails at the call."""
    from jaxtyping import TypeCheckError

    from interlatent.patch.effects import logit_diff

    logits, tokens = torch.zeros(2, 5, 11), torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(TypeCheckError, match="pos"):
        logit_diff(logits, tokens, (1, 2))
    assert logit_diff(logits, tokens[:, :5], (1, 2)).shape == (2,)


@pytest.mark.parametrize("side", ["right", "left", "mask"])
def test_a_pass_split_at_resid_post_gives_the_whole_pass(tiny_tl, side):
    """Where a backend splits a pass (TransformerLens 3 at resid_post), running to a point and on
    from its activation gives the whole pass's logits, and one column per row gives those logits;
    left padding (the model derives the mask from the tokens) and a given mask alike. Elsewhere
    the backend says it cannot, and the whole-pass callers are used."""
    from interlatent.backends import make_backend

    backend = make_backend(tiny_tl)
    if not TL3:  # the bridge runs whole passes
        assert not backend.resumes_at(backend.resolve("llm.layer.0"))
        return
    assert not backend.resumes_at(backend.resolve("llm.layer.0.mlp_out"))
    tok = tiny_tl.tokenizer
    before = tok.padding_side
    mask = None
    tokens = TOKENS.clone()
    if side == "mask":
        mask = torch.ones_like(tokens)
        mask[1, :2] = 0
    try:
        tok.padding_side = "left" if side == "left" else "right"
        if side == "left":
            tokens[1, :3] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            whole = backend.logits(tokens, mask)
            for layer in ("llm.layer.0", "llm.layer.2"):
                point = backend.resolve(layer)
                assert backend.resumes_at(point)
                x = backend.run_to(point, tokens, mask)
                torch.testing.assert_close(backend.run_from(point, x, tokens, mask), whole, atol=1e-5, rtol=1e-5)
                cols = torch.tensor([6, 3])
                at = backend.run_from(point, x, tokens, mask, columns=cols)
                torch.testing.assert_close(at, whole[torch.arange(2), cols], atol=1e-5, rtol=1e-5)
            if side == "left":  # the derived mask matters: without it the padded row's logits differ
                x = backend.run_to(backend.resolve("llm.layer.0"), tokens, mask)
                unmasked = tiny_tl(x, start_at_layer=1)
                assert not torch.allclose(unmasked[1], whole[1], atol=1e-3)
    finally:
        tok.padding_side = before


#: tiny TransformerLens 3 architectures the narrowed last block must keep exact (d_vocab 50)
_BLOCKS = {"gpt2-like, attention results": {}, "llama-like": dict(normalization_type="RMS", positional_embedding_type="rotary",
                                                                   act_fn="silu", gated_mlp=True, n_key_value_heads=2,
                                                                   rotary_dim=8),
           "alibi": dict(positional_embedding_type="alibi"), "soft caps": dict(attn_scores_soft_cap=5.0,
                                                                              output_logits_soft_cap=3.0),
           "sandwich norms": dict(normalization_type="RMS", use_normalization_before_and_after=True),
           "parallel": dict(parallel_attn_mlp=True), "attention only": dict(attn_only=True)}
_NOT_NARROWED = {"parallel", "attention only"}  # no hook_resid_mid: the last block runs at every position
_built: dict[str, object] = {}


def _block_model(name):
    if name not in _built:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        fields = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=50, act_fn="gelu",
                      normalization_type="LN", seed=0)
        model = HookedTransformer(HookedTransformerConfig(**{**fields, **_BLOCKS[name]})).eval()
        if not _BLOCKS[name]:
            model.set_use_attn_result(True)
        _built[name] = model
    return _built[name]


@pytest.mark.skipif(not TL3, reason="the split pass is TransformerLens 3's")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(_BLOCKS)), data=st.data())
def test_logits_at_columns_equal_the_whole_pass(name, data):
    """``run_from(columns=)`` narrows the last block to the asked columns (its keys and values still
    at every position): for any architecture, split point, columns and padding mask, the logits
    equal the whole pass's at those columns, and the narrowing is used where the block allows it."""
    from interlatent.backends import make_backend

    model = _block_model(name)
    backend = make_backend(model)
    batch, seq = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    tokens = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 49), min_size=seq, max_size=seq),
                                             min_size=batch, max_size=batch)))
    starts = data.draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch))
    mask = (torch.arange(seq)[None] >= torch.tensor(starts)[:, None]).long()  # left padding
    cols = torch.tensor([data.draw(st.integers(s, seq - 1)) for s in starts])
    point = backend.resolve(f"llm.layer.{data.draw(st.integers(0, 2))}")
    used = []
    narrow = backend._last_block_at

    @contextmanager
    def spy(*args):
        with narrow(*args) as flag:
            used.append(flag)
            yield flag

    backend._last_block_at = spy
    with torch.no_grad():
        whole = backend.logits(tokens, mask)
        at = backend.run_from(point, backend.run_to(point, tokens, mask), tokens, mask, columns=cols)
    torch.testing.assert_close(at, whole[torch.arange(batch), cols], atol=1e-5, rtol=1e-5)
    assert used == [name not in _NOT_NARROWED and point.block < 2]


@pytest.mark.skipif(not TL3, reason="the split pass is TransformerLens 3's")
@pytest.mark.parametrize("name", sorted(_BLOCKS))
def test_the_last_block_is_narrowed_only_where_it_stays_exact(name):
    """Narrowed for a standard block after the split point that carries no hooks; not for parallel
    or attention-only blocks, a split at the last block, or a block with a user's hook (which
    would see narrowed shapes: it sees the whole sequence, and the logits stay right)."""
    from interlatent.backends import make_backend

    model = _block_model(name)
    backend = make_backend(model)
    rows, cols = torch.arange(2), torch.tensor([3, 5])
    expect = name not in _NOT_NARROWED

    def narrowed(layer):
        with backend._last_block_at(rows, cols, backend.resolve(layer)) as flag:
            return flag

    assert narrowed("llm.layer.1") is expect and narrowed("llm.layer.0") is expect
    assert narrowed("llm.layer.2") is False  # nothing after the split point
    # a backward hook on the block, a forward hook on the model, a global module hook: never narrowed
    handle = model.blocks[2].ln1.register_full_backward_hook(lambda *args: None)
    assert narrowed("llm.layer.0") is False
    handle.remove()
    handle = model.register_forward_hook(lambda *args: None)
    assert narrowed("llm.layer.0") is False
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert narrowed("llm.layer.0") is False
    handle.remove()
    assert narrowed("llm.layer.0") is expect
    seen = []
    hook = "blocks.2.hook_mlp_out" if name != "attention only" else "blocks.2.hook_attn_out"
    model.blocks[2].get_submodule(hook.split(".", 2)[2]).add_hook(lambda act, hook: seen.append(act.shape[1]))
    try:
        assert narrowed("llm.layer.0") is False
        tokens = TOKENS % 50
        point = backend.resolve("llm.layer.0")
        with torch.no_grad():
            whole = backend.logits(tokens)
            at = backend.run_from(point, backend.run_to(point, tokens), tokens, None, columns=cols)
        torch.testing.assert_close(at, whole[rows, cols], atol=1e-5, rtol=1e-5)
        assert seen and set(seen) == {tokens.shape[1]}
    finally:
        model.reset_hooks(including_permanent=True)
