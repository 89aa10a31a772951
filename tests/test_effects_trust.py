"""Effects whose controls can fail, and effects that cannot be non-zero by construction.

The checks recompute what the library claims independently: latent activity from ``run_with_cache``
activations through the dictionary's own ``encode_dense``, and logit differences read by hand from the
logits at the stated position.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig
from interlatent.errors import ConfigError, NotEnoughDataError, ShapeError
from interlatent.patch import LatentPatch, ablation_effect, activation_patching, measure
from interlatent.patch.effects import logit_diff, matched_control_latents

TEXTS = [
    "the sky is blue and the sea is green",
    "a cat sat on the mat while the dog slept",
    "Alice said that Bob would report it",
    "hello world, this is a tiny corpus",
    "numbers like 1 2 3 and symbols",
    "Carol said nothing at all",
]
SEQ = 7  # every prompt cut to its first SEQ tokens: one batch, no padding


@pytest.fixture(scope="module")
def tokens(trained_tl):
    rows = [trained_tl.to_tokens(t)[0, :SEQ] for t in TEXTS]
    assert all(len(r) == SEQ for r in rows)
    return torch.stack(rows)


def sae_patch(layer: str = "llm.layer.1", seed: int = 0, k: int = 4) -> LatentPatch:
    """A TopK SAE straight from a config (random init): at one position of a few prompts most of
    its 64 latents never fire, the case where zero-frequency ties used to pick dead controls."""
    return LatentPatch(SparseAutoencoder(SparseCoderConfig(d_in=32, d_sae=64, k=k), seed=seed), layer)


def activity_by_cache(model, patch: LatentPatch, tokens, positions, mask=None) -> np.ndarray:
    """[d_sae] number of (prompt, ablated position) pairs where each latent is > 0, recomputed from
    run_with_cache activations through the SAE's own encoder (padding excluded)."""
    _, cache = model.run_with_cache(tokens)
    hook = patch.check_model(model)[0].tl_name
    acts = cache[hook]
    cols = list(range(tokens.shape[1])) if positions is None else [p % tokens.shape[1] for p in positions]
    x = acts[:, cols]
    real = torch.ones(x.shape[:2], dtype=torch.bool) if mask is None else mask[:, cols].bool()
    with torch.no_grad():
        f = patch.module.encode_dense(x[real])
    return (f > 0).sum(0).numpy()


# --------------------------------------------------------------------------- item 4: controls


def test_every_control_latent_is_active_at_the_ablated_positions(trained_tl, tokens):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [-1])
    live = [int(i) for i in np.flatnonzero(active > 0)]
    chosen = sorted(live, key=lambda i: active[i])[:3]  # the rarest: their frequency bin holds dead latents
    assert len(live) >= 2 * len(chosen)  # enough active latents for a control to exist
    res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[-1], n_control=8, seed=0)
    used = {c for s in res.control_latents for c in s}
    assert used and all(active[c] > 0 for c in used), {c: int(active[c]) for c in used}
    assert all(not set(s) & set(chosen) and len(set(s)) == len(s) == len(chosen) for s in res.control_latents)


def test_controls_are_active_without_positions_too(trained_tl, tokens):
    patch = sae_patch(k=2)
    active = activity_by_cache(trained_tl, patch, tokens, None)
    chosen = sorted(np.flatnonzero(active > 0).tolist(), key=lambda i: active[i])[:2]
    res = ablation_effect(patch, trained_tl, tokens, chosen, n_control=6, seed=3)
    assert all(active[c] > 0 for s in res.control_latents for c in s)


def test_too_few_active_controls_raise_not_enough_data_with_counts(trained_tl, tokens):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [-1])
    live = [int(i) for i in np.flatnonzero(active > 0)]
    chosen = live[:-2]  # leaves two active latents for a control of len(chosen)
    with pytest.raises(NotEnoughDataError) as err:
        ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[-1], n_control=3)
    msg = str(err.value)
    assert f"{len(chosen)}" in msg and "2 " in msg and "allow_fewer_controls=True" in msg


def test_allow_fewer_controls_uses_the_active_ones_warns_and_records(trained_tl, tokens, caplog, tmp_path):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [-1])
    live = [int(i) for i in np.flatnonzero(active > 0)]
    chosen = live[:-2]
    with LatentDB(tmp_path / "e.db") as db:
        with caplog.at_level(logging.WARNING, logger="interlatent.patch.effects"):
            res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[-1], n_control=3,
                                  allow_fewer_controls=True, db=db)
        assert "fewer" in caplog.text and str(len(chosen)) in caplog.text
        assert all(sorted(s) == sorted(live[-2:]) for s in res.control_latents)
        out = res.to_dict()
        assert out["controls_per_set"] == 2 and out["controls_wanted_per_set"] == len(chosen)
        rec = db.interventions().iloc[-1]["results"]
        assert rec["controls_per_set"] == 2 and rec["control_latents"] == res.control_latents


def test_control_activity_is_recorded_in_result_and_store(trained_tl, tokens, tmp_path):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [-1])
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:2]]
    n_rows = tokens.shape[0]
    with LatentDB(tmp_path / "e.db") as db:
        res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[-1], n_control=4, db=db)
        rec = db.interventions().iloc[-1]
    out = res.to_dict()
    for latents, activity in zip(out["control_latents"], out["control_activity"]):
        assert activity == pytest.approx([active[c] / n_rows for c in latents])
    assert out["latent_activity"] == pytest.approx([active[c] / n_rows for c in chosen])
    assert out["n_ablated_positions"] == n_rows
    assert rec["results"]["control_activity"] == out["control_activity"]
    assert rec["spec"]["answer_position"] == -1
    twice = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[-1, SEQ - 1], n_control=4)
    assert twice.n_ablated_positions == n_rows and twice.control_activity == res.control_activity  # one column


def test_chosen_latents_never_active_are_named_or_refused(trained_tl, tokens, caplog):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [-1])
    dead = [int(i) for i in np.flatnonzero(active == 0)]
    live = [int(i) for i in np.argsort(-active, kind="stable")[:2]]
    with caplog.at_level(logging.WARNING, logger="interlatent.patch.effects"):
        res = ablation_effect(patch, trained_tl, tokens, [*live, dead[0]], answer=(5, 9), positions=[-1], n_control=3)
    assert f"[{dead[0]}]" in caplog.text and "never active" in caplog.text
    assert res.inactive_latents == [dead[0]] and res.to_dict()["inactive_latents"] == [dead[0]]
    assert all(len(s) == len(live) for s in res.control_latents)  # matched to the latents that act
    with pytest.raises(ConfigError, match="never active"):
        ablation_effect(patch, trained_tl, tokens, dead[:3], answer=(5, 9), positions=[-1], n_control=3)


def test_matched_control_latents_skips_latents_never_active_in_the_frequencies():
    freq = np.zeros(40)
    freq[[3, 7, 11, 19, 23]] = [0.5, 0.5, 0.25, 0.25, 0.75]
    rng = np.random.default_rng(0)
    for _ in range(20):
        picked = matched_control_latents(freq, [3, 7], rng)
        assert set(picked) <= {11, 19, 23} and len(set(picked)) == 2
    with pytest.raises(NotEnoughDataError, match="only 1 active"):
        matched_control_latents(freq, [3, 7, 11, 19], rng)
    assert len(matched_control_latents(freq, [3, 7, 11, 19], rng, allow_fewer=True)) == 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_controls_are_active_disjoint_and_matched_in_number(trained_tl, tokens, data):
    seed = data.draw(st.integers(0, 3), label="sae_seed")
    patch = sae_patch(seed=seed)
    positions = sorted(data.draw(st.sets(st.integers(-SEQ, SEQ - 1), min_size=1, max_size=3), label="positions"))
    cols = {p % SEQ for p in positions}
    if len(cols) < len(positions):
        positions = sorted(cols)
    chosen = sorted(data.draw(st.sets(st.integers(0, 63), min_size=1, max_size=6), label="latents"))
    active = activity_by_cache(trained_tl, patch, tokens, positions)
    acting = [c for c in chosen if active[c] > 0]
    candidates = [i for i in range(64) if active[i] > 0 and i not in chosen]
    kwargs = dict(answer=(5, 9), positions=positions, n_control=3, seed=data.draw(st.integers(0, 99)))
    if not acting:
        with pytest.raises(ConfigError, match="never active"):
            ablation_effect(patch, trained_tl, tokens, chosen, **kwargs)
        return
    if len(candidates) < len(acting):
        with pytest.raises(NotEnoughDataError):
            ablation_effect(patch, trained_tl, tokens, chosen, **kwargs)
        return
    res = ablation_effect(patch, trained_tl, tokens, chosen, **kwargs)
    assert res.inactive_latents == [c for c in chosen if active[c] == 0]
    for s in res.control_latents:
        assert len(s) == len(set(s)) == len(acting)
        assert not set(s) & set(chosen)
        assert all(active[c] > 0 for c in s)


# --------------------------------------------------------------------------- item 5: answer position


def test_logit_diff_reads_the_answer_position(trained_tl, tokens):
    logits = trained_tl(tokens)
    a, b = 5, 9
    assert torch.equal(logit_diff(logits, tokens, (a, b)), logits[:, -1, a] - logits[:, -1, b])
    assert torch.equal(logit_diff(logits, tokens, (a, b), answer_position=3), logits[:, 3, a] - logits[:, 3, b])
    assert torch.equal(logit_diff(logits, tokens, (a, b), answer_position=-2), logits[:, -2, a] - logits[:, -2, b])
    per_row = torch.tensor([1, 2, 3, 4, 5, 6])
    want = logits[torch.arange(6), per_row, a] - logits[torch.arange(6), per_row, b]
    assert torch.equal(logit_diff(logits, tokens, (a, b), answer_position=per_row), want)


def test_negative_answer_position_counts_from_each_rows_real_end(trained_tl, tokens):
    logits = trained_tl(tokens)
    mask = torch.ones_like(tokens)
    mask[0, 5:] = 0  # row 0 is right-padded: its last real token is at 4
    got = logit_diff(logits, tokens, (5, 9), mask, answer_position=-1)
    assert got[0] == logits[0, 4, 5] - logits[0, 4, 9] and got[1] == logits[1, -1, 5] - logits[1, -1, 9]
    got2 = logit_diff(logits, tokens, (5, 9), mask, answer_position=-2)
    assert got2[0] == logits[0, 3, 5] - logits[0, 3, 9]
    with pytest.raises(ConfigError, match="padding"):
        logit_diff(logits, tokens, (5, 9), mask, answer_position=6)
    with pytest.raises(ConfigError, match="outside"):
        logit_diff(logits, tokens, (5, 9), mask, answer_position=SEQ)
    with pytest.raises(ShapeError, match="one integer column per prompt"):
        logit_diff(logits, tokens, (5, 9), mask, answer_position=torch.tensor([1, 2]))


def test_ablation_effect_measures_at_the_answer_position(trained_tl, tokens):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [2])
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:3]]
    res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[2], answer_position=4,
                          n_control=2)
    with torch.no_grad():
        clean = trained_tl(tokens)
    patched = patch.run(trained_tl, tokens, ablate=chosen, positions=[2])
    want = float(((patched[:, 4, 5] - patched[:, 4, 9]) - (clean[:, 4, 5] - clean[:, 4, 9])).mean())
    assert res.value == pytest.approx(want, abs=1e-6) and res.value != 0
    assert res.to_dict()["answer_position"] == 4


def test_last_block_resid_post_before_the_answer_is_refused_and_really_zero(trained_tl, tokens):
    patch = sae_patch("llm.layer.2")  # the final block's residual stream: only ln_final + unembed follow
    active = activity_by_cache(trained_tl, patch, tokens, [2])
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:3]]
    clean = trained_tl(tokens)
    patched = patch.run(trained_tl, tokens, ablate=chosen, positions=[2])
    assert torch.equal(patched[:, -1], clean[:, -1])  # why it is refused: zero by construction
    with pytest.raises(ConfigError, match="cannot change") as err:
        ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[2], n_control=2)
    assert "answer_position" in str(err.value) and "blocks.2.hook_resid_post" in str(err.value)
    for hook in ("llm.layer.2.mlp_out", "llm.layer.2.resid_mid", "llm.layer.2.attn_out"):
        with pytest.raises(ConfigError, match="cannot change"):
            ablation_effect(sae_patch(hook), trained_tl, tokens, chosen, answer=(5, 9), positions=[2], n_control=2)
    ok = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[2], answer_position=2,
                         n_control=2)
    assert ok.value != 0


def test_earlier_hooks_mix_positions_so_an_earlier_ablation_is_allowed(trained_tl, tokens):
    for layer in ("llm.layer.2.resid_pre", "llm.layer.1"):
        patch = sae_patch(layer)
        active = activity_by_cache(trained_tl, patch, tokens, [2])
        chosen = [int(i) for i in np.argsort(-active, kind="stable")[:3]]
        res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[2], n_control=2)
        assert res.value != 0, layer


def test_positions_after_the_answer_are_refused(trained_tl, tokens):
    patch = sae_patch()
    with pytest.raises(ConfigError, match="after the answer"):
        ablation_effect(patch, trained_tl, tokens, [0, 1], answer=(5, 9), positions=[5, 6], answer_position=3)


def test_loss_metric_with_only_the_last_position_ablated_is_refused(trained_tl, tokens):
    patch = sae_patch()
    active = activity_by_cache(trained_tl, patch, tokens, [-1])
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:2]]
    with pytest.raises(ConfigError, match="cannot change"):
        ablation_effect(patch, trained_tl, tokens, chosen, positions=[-1], n_control=2)  # metric: delta_loss
    res = ablation_effect(patch, trained_tl, tokens, chosen, positions=[-1], n_control=2, metric="kl")
    assert res.value > 0


def test_measure_refuses_an_unreachable_answer_and_restricts_loss_and_kl(trained_tl, tokens):
    patch = sae_patch("llm.layer.2")
    active = activity_by_cache(trained_tl, patch, tokens, [2])
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:3]]

    def run():
        return patch.applied(trained_tl, ablate=chosen, positions=[2])

    for point in ("llm.layer.2", patch):  # a hook name, or the patch whose output hook it writes
        with pytest.raises(ConfigError, match="cannot change"):
            measure(trained_tl, tokens, run, answer=(5, 9), positions=[2], point=point)
    eff = measure(trained_tl, tokens, run, positions=[2], point="llm.layer.2")
    with torch.no_grad():
        clean = trained_tl(tokens)
    patched = patch.run(trained_tl, tokens, ablate=chosen, positions=[2])
    p, q = torch.log_softmax(clean[:, 2], -1), torch.log_softmax(patched[:, 2], -1)
    assert eff.kl_affected == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)
    assert eff.kl == pytest.approx(eff.kl_affected / SEQ, rel=1e-4)  # the whole-sequence mean dilutes it

    def nll(logits):  # the next-token loss of the logits at column 2 (the only ones the edit reaches)
        return -torch.log_softmax(logits[:, 2], -1).gather(-1, tokens[:, 3:4]).squeeze(-1)

    assert eff.delta_loss_affected == pytest.approx(float((nll(patched) - nll(clean)).mean()), abs=1e-5)


def test_activation_patching_takes_an_answer_position_and_refuses_zero_by_construction(tiny_tl):
    clean = tiny_tl.to_tokens("the sky is blue")
    corrupt = tiny_tl.to_tokens("the sea is blue")
    answer = (5, 9)
    with pytest.raises(ConfigError, match="cannot change"):
        activation_patching(tiny_tl, clean, corrupt, ["llm.layer.2"], answer=answer, positions=[1])
    first_diff = int(torch.nonzero(clean[0] != corrupt[0])[0, 0])
    df = activation_patching(tiny_tl, clean, corrupt, ["llm.layer.2"], answer=answer, positions=[first_diff],
                             answer_position=first_diff)
    assert df["restored"].iloc[0] == pytest.approx(1.0, abs=1e-4)  # the last block at the answer: all of it
    assert df["answer_position"].iloc[0] == first_diff
    assert df["logit_diff_clean"].iloc[0] != df["logit_diff_corrupted"].iloc[0]


def test_right_padded_prompts_the_ablation_cannot_reach_are_named(trained_tl, tokens, caplog):
    patch = sae_patch("llm.layer.2")
    mask = torch.ones_like(tokens)
    mask[0, 5:] = 0  # prompt 0 ends at column 4: column -1 is padding there, its answer is at 4
    active = activity_by_cache(trained_tl, patch, tokens, [-1], mask)
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:2]]
    with caplog.at_level(logging.WARNING, logger="interlatent.patch.effects"):
        res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), positions=[-1], n_control=2,
                              attention_mask=mask)
    assert "cannot change on 1 of 6 prompts" in caplog.text and "[0]" in caplog.text
    assert res.n_ablated_positions == 5  # the padded column of prompt 0 is not an ablated site
    assert all(active[c] > 0 for s in res.control_latents for c in s)


def test_bidirectional_model_lets_later_positions_reach_the_answer(tokenizer):
    from transformer_lens import HookedTransformer

    from tests.conftest import tiny_tl_config

    torch.manual_seed(0)
    model = HookedTransformer(tiny_tl_config(len(tokenizer), attention_dir="bidirectional"), tokenizer=tokenizer).eval()
    toks = torch.randint(2, len(tokenizer), (4, SEQ))
    patch = sae_patch("llm.layer.0")
    active = activity_by_cache(model, patch, toks, [5])
    chosen = [int(i) for i in np.argsort(-active, kind="stable")[:2]]
    res = ablation_effect(patch, model, toks, chosen, answer=(5, 9), positions=[5], answer_position=2, n_control=2)
    assert res.value != 0  # attention looks both ways: position 5 reaches position 2
    with pytest.raises(ConfigError, match="nothing after it mixes positions"):
        ablation_effect(sae_patch("llm.layer.2"), model, toks, chosen, answer=(5, 9), positions=[5],
                        answer_position=2, n_control=2)


def test_hugging_face_model_same_rules_and_active_controls(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    toks = torch.randint(2, hf.config.vocab_size, (5, SEQ), generator=torch.Generator().manual_seed(0))
    last = sae_patch("llm.layer.1")  # GPT-2 here has two blocks: the output of block 1 is the final one
    with pytest.raises(ConfigError, match="cannot change"):
        ablation_effect(last, hf, toks, [0, 1], answer=(5, 9), positions=[2], n_control=2)
    patch = sae_patch("llm.layer.0")
    with torch.no_grad():
        hidden = hf(toks, output_hidden_states=True).hidden_states[1]  # the output of block 0
        active = (patch.module.encode_dense(hidden[:, 2]) > 0).sum(0).numpy()
    chosen = sorted(np.flatnonzero(active > 0).tolist(), key=lambda i: active[i])[:2]
    res = ablation_effect(patch, hf, toks, chosen, answer=(5, 9), positions=[2], n_control=4)
    assert res.value != 0 and all(active[c] > 0 for s in res.control_latents for c in s)


def test_clamp_steer_and_splice_effects_take_the_same_restriction(trained_tl, tokens):
    from interlatent.patch.effects import edit_effect

    patch = sae_patch("llm.layer.2")
    for edit in ({"clamp": {3: 8.0}}, {"steer": {3: 8.0}}, {"ablate": [3]}):
        with pytest.raises(ConfigError, match="cannot change"):
            edit_effect(patch, trained_tl, tokens, positions=[2], answer=(5, 9), **edit)
    eff = edit_effect(patch, trained_tl, tokens, steer={3: 8.0}, positions=[2], answer=(5, 9), answer_position=2)
    with torch.no_grad():
        clean = trained_tl(tokens)
    steered = patch.run(trained_tl, tokens, steer={3: 8.0}, positions=[2])
    want = float(((steered[:, 2, 5] - steered[:, 2, 9]) - (clean[:, 2, 5] - clean[:, 2, 9])).mean())
    assert eff.delta_logit_diff == pytest.approx(want, abs=1e-5) and want != 0
    assert torch.equal(steered[:, 3:], clean[:, 3:])  # the final block's point: nothing else moves
    spliced = edit_effect(patch, trained_tl, tokens, keep_error=False, positions=[2], answer=(5, 9))
    assert spliced.delta_logit_diff != 0  # a splice rewrites every position: the last one too
    with pytest.raises(ConfigError, match="no edit"):
        edit_effect(patch, trained_tl, tokens, answer=(5, 9))


def test_attention_pattern_points_index_heads_not_positions(tiny_tl):
    from interlatent.hooks import resolve
    from interlatent.patch.effects import reachable_logits

    toks = torch.randint(2, 50, (2, SEQ))
    names = tiny_tl.hook_dict.keys()
    pattern = resolve("blocks.2.attn.hook_pattern", 3, names)  # [batch, head, query, key]: no refusal
    assert reachable_logits(tiny_tl, toks, None, [3], pattern).all()
    z = resolve("blocks.2.attn.hook_z", 3, names)  # past the last attention: only where it is edited
    assert reachable_logits(tiny_tl, toks, None, [3], z).nonzero()[:, 1].unique().tolist() == [3]
    early = resolve("blocks.1.attn.hook_z", 3, names)  # a later block's attention mixes: 3 and after
    assert reachable_logits(tiny_tl, toks, None, [3], early).nonzero()[:, 1].unique().tolist() == [3, 4, 5, 6]


def test_controls_on_a_final_block_point_are_active_where_the_answer_is_read(trained_tl, tokens):
    """On the last block's residual stream only the answer position can move the answer's logits:
    without positions=, controls active only elsewhere would be zero by construction."""
    patch = sae_patch("llm.layer.2", k=4)
    at_answer = activity_by_cache(trained_tl, patch, tokens, [-1])
    anywhere = activity_by_cache(trained_tl, patch, tokens, None)
    chosen = [int(np.argmax(at_answer))]
    res = ablation_effect(patch, trained_tl, tokens, chosen, answer=(5, 9), n_control=8, seed=0,
                          allow_fewer_controls=True)
    used = {c for s in res.control_latents for c in s}
    assert used and all(at_answer[c] > 0 for c in used), {c: int(at_answer[c]) for c in used}
    assert all(e.delta_logit_diff != 0.0 for e in res.control)  # none is zero by construction
    assert res.n_ablated_positions == tokens.shape[0]  # the sites that matter: one per prompt
    elsewhere = [int(i) for i in np.flatnonzero((anywhere > 0) & (at_answer == 0))]
    assert elsewhere, "the planted case needs a latent active only away from the answer"
    with pytest.raises(ConfigError, match="never active"):
        ablation_effect(patch, trained_tl, tokens, elsewhere[:1], answer=(5, 9), n_control=2, seed=0)
