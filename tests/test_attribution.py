"""Latent attribution (AtP, IG) against exact patching, and component-level AtP.

Where the metric is linear in what is patched, first-order attribution is exact: a HookedTransformer
without layer norms whose dictionary sits after its last block's attention (nothing but linear maps
from there to the logits) is such a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tl_config
from interlatent import LatentDB
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig, Transcoder
from interlatent.errors import ConfigError, ShapeError
from interlatent.patch import LatentPatch, attribute, attribution_agreement, logits_of
from interlatent.patch.agreement import exact_latent_effects, top_k_recall
from interlatent.patch.attribution import spliced
from interlatent.patch.components import component_attribution
from interlatent.patch.core import at_hook
from interlatent.hooks import resolve

ANSWER = (3, 5)


def linear_tl(tokenizer, **overrides):
    """2 blocks, no layer norm: from the last block's resid_mid / mlp_out / resid_post on, the logits
    are an affine function of the activation."""
    torch.manual_seed(0)
    cfg = tiny_tl_config(len(tokenizer), n_layers=2, normalization_type=None, **overrides)
    return tiny_model(cfg, tokenizer).eval()  # a HookedTransformer on TL 3, the native bridge on TL 4


@pytest.fixture(scope="module")
def lin(tokenizer):
    return linear_tl(tokenizer)


def sae(layer="llm.layer.1", d_in=32, d_sae=64, k=6, seed=0, means=None) -> LatentPatch:
    module = SparseAutoencoder(SparseCoderConfig(d_in=d_in, d_sae=d_sae, k=k), seed=seed)
    return LatentPatch(module, layer, latent_means=means)


def tokens_for(model, batch=4, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (batch, seq), generator=g)


@pytest.mark.parametrize("baseline", ["zero", "mean", "corrupt"])
def test_atp_equals_exact_single_latent_patching_on_a_linear_model(lin, baseline):
    means = torch.rand(64) * 0.5
    patch = sae(means=means)
    toks = tokens_for(lin)
    base = tokens_for(lin, seed=1) if baseline == "corrupt" else baseline
    res = attribute(patch, lin, toks, answer=ANSWER, baseline=base, method="atp")
    latents = torch.nonzero(res.active).flatten().tolist()
    exact = exact_latent_effects(patch, lin, toks, latents, answer=ANSWER, baseline=base)
    assert np.abs(exact).max() > 1e-2  # the check has something to compare
    np.testing.assert_allclose(res.scores[latents].numpy(), exact, atol=1e-5, rtol=0)
    assert res.forward_max_diff == 0.0


@pytest.mark.parametrize("path", ["latent", "joint"])
def test_ig_equals_exact_on_a_linear_model_and_atp_on_it(lin, path):
    patch = sae()
    toks = tokens_for(lin)
    atp = attribute(patch, lin, toks, answer=ANSWER, method="atp")
    ig = attribute(patch, lin, toks, answer=ANSWER, method="ig", steps=4, path=path)
    torch.testing.assert_close(ig.scores, atp.scores, atol=1e-5, rtol=0)
    assert ig.spec["integration"] == {"joint": "midpoint", "latent": "grouped midpoint"}[path]
    assert ig.steps == 4 and ig.spec["path"] == path


def squared_diff(logits):
    """A metric quadratic in the latents on the linear model: the answer logit difference (x 10), squared."""
    return (10 * (logits[:, -1, ANSWER[0]] - logits[:, -1, ANSWER[1]])) ** 2


def test_latent_path_ig_is_exact_for_a_quadratic_metric_when_one_latent_moves_per_prompt(lin):
    """With one active latent per prompt at the scored position, nothing else moves in its probe, so
    the midpoint gradient is the exact effect of a quadratic metric; AtP misses half the curvature."""
    patch = sae(k=1)
    toks = tokens_for(lin)
    ig = attribute(patch, lin, toks, metric=squared_diff, method="ig", steps=1, path="latent", positions=[-1])
    atp = attribute(patch, lin, toks, metric=squared_diff, method="atp", positions=[-1])
    latents = torch.nonzero(ig.active).flatten().tolist()
    exact = exact_latent_effects(patch, lin, toks, latents, metric=squared_diff, positions=[-1])
    assert np.abs(exact).max() > 1e-2
    np.testing.assert_allclose(ig.scores[latents].numpy(), exact, rtol=1e-4, atol=1e-5)
    assert np.abs(atp.scores[latents].numpy() - exact).max() > 1e-2


def test_latent_path_ig_converges_to_the_exact_effect_as_the_groups_shrink(lin):
    """Many latents at every position: with few probes a latent shares its probe with others and
    their terms are the error; with as many probes as latents moving on a prompt every latent is alone
    in its probe and a quadratic metric is attributed exactly."""
    patch = sae(k=6)
    toks = tokens_for(lin, batch=2)
    res = attribute(patch, lin, toks, metric=squared_diff)
    latents = torch.nonzero(res.active).flatten().tolist()
    moving = int(res.active.sum())  # at least as many as move on any one prompt
    exact = exact_latent_effects(patch, lin, toks, latents, metric=squared_diff)
    errors = []
    for steps in (2, moving):
        ig = attribute(patch, lin, toks, metric=squared_diff, method="ig", steps=steps, seed=1)
        errors.append(float(np.abs(ig.scores[latents].numpy() - exact).mean()))
    scale = float(np.abs(exact).mean())
    assert errors[0] > 1e-2 * scale  # sharing a probe costs something here
    assert errors[1] < 1e-3 * scale  # float32 rounding


def test_probe_groups_keep_latents_of_a_position_apart():
    """Planted moves: 4 latents at each of 3 positions (disjoint sets) and one latent at all of them.
    With 5 groups every latent lands in exactly one, the shared latent alone, and no two latents of a
    position together; latents that never move are in none. Latents that overlap nothing fill the
    groups evenly."""
    from interlatent.patch.attribution import _probe_groups

    move = torch.zeros(2, 3, 20)
    for p in range(3):
        move[:, p, 4 * p:4 * p + 4] = torch.rand(2, 4) + 0.1
    move[:, :, 12] = 5.0
    member = _probe_groups(move, 5, seed=0)
    assert member.shape == (5, 2, 20)
    assert torch.equal(member.sum(0), (move.abs().sum(1) > 0).float())
    for b in range(2):
        shared = int(member[:, b, 12].argmax())
        assert member[shared, b].sum() == 1
        for p in range(3):
            assert member[:, b, 4 * p:4 * p + 4].sum(1).max() == 1
    assert torch.equal(member, _probe_groups(move, 5, seed=0))
    apart = torch.zeros(1, 10, 10)
    apart[0, torch.arange(10), torch.arange(10)] = torch.rand(10) + 0.1  # no two latents share a position
    assert _probe_groups(apart, 5, seed=0).sum((1, 2)).tolist() == [2.0] * 5  # so the groups are even


def test_latent_path_ig_is_seeded_and_takes_any_number_of_steps(tiny_tl):
    patch = sae("llm.layer.0", k=4)
    toks = tokens_for(tiny_tl)
    one = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=4, seed=3)
    again = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=4, seed=3)
    other = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=4, seed=4)
    assert torch.equal(one.per_position, again.per_position) and one.spec["seed"] == 3
    assert not torch.equal(one.per_position, other.per_position)
    odd = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=3)
    assert odd.steps == 3 and odd.scores.abs().sum() > 0
    with pytest.raises(ConfigError, match="path must be one of"):
        attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", path="straight")


def test_positions_restrict_scoring_and_exact_patching_alike(lin):
    patch = sae()
    toks = tokens_for(lin)
    res = attribute(patch, lin, toks, answer=ANSWER, positions=[-1, 4])
    assert torch.count_nonzero(res.per_position[:, [0, 1, 2, 3, 5, 6, 7, 8]]) == 0
    latents = torch.nonzero(res.active).flatten().tolist()
    exact = exact_latent_effects(patch, lin, toks, latents, answer=ANSWER, positions=[-1, 4])
    np.testing.assert_allclose(res.scores[latents].numpy(), exact, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.per_position.sum(1).mean(0), res.scores)
    assert res.position_scores.shape == (10, 64)


def test_a_transcoder_is_attributed_exactly_on_the_linear_path(lin):
    module = Transcoder(SparseCoderConfig(d_in=32, d_sae=48, k=5, d_out=32), seed=0)
    patch = LatentPatch(module, "llm.layer.1", in_layer="llm.layer.1.resid_mid")  # no layer norm: no mlp_in hook
    assert patch.in_layer != patch.out_layer
    toks = tokens_for(lin)
    res = attribute(patch, lin, toks, answer=ANSWER)
    latents = torch.nonzero(res.active).flatten().tolist()
    exact = exact_latent_effects(patch, lin, toks, latents, answer=ANSWER)
    np.testing.assert_allclose(res.scores[latents].numpy(), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coder", ["sae", "transcoder"])
def test_latent_path_takes_the_clean_gradient_in_its_probe_pass_as_atp_does_alone(tiny_tl, coder):
    """The latent path reads the clean latents from the unspliced run and its clean gradient from
    the first row block of its probes' pass: the error node (scored by AtP) and the active latents
    come out as AtP's own pass gives them, on a model with layer norms, for an SAE and a transcoder."""
    if coder == "sae":
        patch = sae("llm.layer.0", k=4)
    else:
        module = Transcoder(SparseCoderConfig(d_in=32, d_sae=48, k=5, d_out=32), seed=0)
        patch = LatentPatch(module, "llm.layer.0", in_layer="llm.layer.0.mlp_in")
    toks = tokens_for(tiny_tl, batch=3)
    atp = attribute(patch, tiny_tl, toks, answer=ANSWER, method="atp")
    ig = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=4)
    assert atp.error_scores.abs().sum() > 0
    torch.testing.assert_close(ig.error_scores, atp.error_scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(ig.active, atp.active) and ig.forward_max_diff == atp.forward_max_diff == 0.0
    assert not torch.allclose(ig.scores, atp.scores)  # the midpoints do move the gradient


def test_the_error_node_score_equals_zeroing_the_error_on_a_linear_model(lin):
    patch = sae()
    toks = tokens_for(lin)
    res = attribute(patch, lin, toks, answer=ANSWER)
    m = lambda lg: (lg[:, -1, ANSWER[0]] - lg[:, -1, ANSWER[1]]).mean()  # noqa: E731
    with torch.no_grad():
        clean = float(m(logits_of(lin, toks)))
        with spliced(patch, lin, lambda f, e: (f, torch.zeros_like(e))):
            no_error = float(m(logits_of(lin, toks)))
    assert abs(no_error - clean) > 1e-3
    assert res.error_score == pytest.approx(no_error - clean, abs=1e-5)
    assert res.error_scores.shape == (4, 10)


def test_the_splice_leaves_the_forward_pass_bit_identical(tiny_tl, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    toks = tokens_for(tiny_tl, batch=3, seq=8)
    patch = sae("llm.layer.1", k=4)
    clean = logits_of(tiny_tl, toks)
    with torch.no_grad(), spliced(patch, tiny_tl, lambda f, e: (f, e)):
        assert torch.equal(logits_of(tiny_tl, toks), clean)
    assert attribute(patch, tiny_tl, toks, answer=ANSWER).forward_max_diff == 0.0
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()
    res = attribute(patch, hf, toks, answer=ANSWER, method="ig", steps=2)
    assert res.forward_max_diff == 0.0 and res.scores.shape == (64,) and torch.isfinite(res.scores).all()
    assert res.scores.abs().sum() > 0


def test_ig_completeness_on_a_nonlinear_model(tiny_tl):
    """The IG scores of all latents add up to the change from patching all of them at once (the
    midpoint rule converges as 1/steps^2); AtP's do not."""
    patch = sae("llm.layer.0", k=4)
    toks = tokens_for(tiny_tl)
    m = lambda lg: (lg[:, -1, ANSWER[0]] - lg[:, -1, ANSWER[1]]).mean()  # noqa: E731
    with torch.no_grad():
        clean = float(m(logits_of(tiny_tl, toks)))
        with spliced(patch, tiny_tl, lambda f, e: (torch.zeros_like(f), e)):
            total = float(m(logits_of(tiny_tl, toks))) - clean
    ig = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=24, path="joint")
    atp = attribute(patch, tiny_tl, toks, answer=ANSWER, method="atp")
    assert float(ig.scores.sum()) == pytest.approx(total, rel=0.02, abs=1e-3)
    assert abs(float(atp.scores.sum()) - total) > abs(float(ig.scores.sum()) - total)


def test_agreement_reports_perfect_agreement_on_the_linear_model(lin):
    patch = sae()
    toks = tokens_for(lin)
    ag = attribution_agreement(patch, lin, toks, answer=ANSWER, method="atp", k=5)
    assert ag.spearman == pytest.approx(1.0) and ag.pearson == pytest.approx(1.0) and ag.top_k_recall == 1.0
    assert len(ag.latents) == len(ag.exact) > 5 and ag.seconds_exact > 0


def test_agreement_on_a_nonlinear_model_is_measured_not_assumed(tiny_tl, tmp_path):
    patch = sae("llm.layer.0", k=4)
    toks = tokens_for(tiny_tl)
    with LatentDB(tmp_path / "a.db") as db:
        ag = attribution_agreement(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=4, db=db)
        rows = db.interventions()
    assert -1 <= ag.spearman <= 1 and 0 <= ag.top_k_recall <= 1
    exact = exact_latent_effects(patch, tiny_tl, toks, ag.latents, answer=ANSWER)
    np.testing.assert_allclose(ag.exact, exact, atol=1e-6)
    assert set(rows["kind"]) == {"attribution", "attribution_agreement"}
    assert rows["results"].iloc[1]["spearman"] == pytest.approx(ag.spearman)


def test_top_k_recall_counts_the_true_top_found():
    assert top_k_recall([5, 4, 0, 0], [3, 2, 1, 0], 2) == 1.0
    assert top_k_recall([0, 0, 5, 4], [3, 2, 1, 0], 2) == 0.0
    assert top_k_recall([5, 0, 4, 0], [-3, 2, 1, 0], 2) == 0.5


def test_scores_recorded_in_the_store_and_as_a_frame(lin, tmp_path):
    patch = sae()
    toks = tokens_for(lin)
    with LatentDB(tmp_path / "s.db") as db:
        res = attribute(patch, lin, toks, answer=ANSWER, db=db)
        row = db.interventions().iloc[0]
    assert row["kind"] == "attribution" and row["layer"] == patch.name
    assert row["spec"]["method"] == "atp" and row["spec"]["answer"] == list(ANSWER)
    assert row["results"]["scores"] == pytest.approx(res.scores.tolist())
    assert row["results"]["top_latents"] == res.top(50)
    df = res.to_pandas()
    assert list(df.columns) == ["latent", "score", "abs_score", "rank", "active"]
    assert df["abs_score"].is_monotonic_decreasing and df["active"].all() and len(df) == int(res.active.sum())
    assert res.top(3, sign="negative") == df.sort_values("score")["latent"].head(3).tolist()
    assert not res.position_frame().empty


def test_a_custom_metric_is_attributed(lin):
    patch = sae()
    toks = tokens_for(lin)
    res_a = attribute(patch, lin, toks, answer=ANSWER)
    res_m = attribute(patch, lin, toks, metric=lambda lg: lg[:, -1, 3] - lg[:, -1, 5])
    torch.testing.assert_close(res_a.scores, res_m.scores)


def test_bad_arguments_are_refused_with_the_fix(lin):
    patch = sae()
    toks = tokens_for(lin)
    with pytest.raises(ConfigError, match="exactly one of answer"):
        attribute(patch, lin, toks, answer=ANSWER, metric=lambda lg: lg.sum())
    with pytest.raises(ConfigError, match="exactly one of answer"):
        attribute(patch, lin, toks)
    with pytest.raises(ConfigError, match="method must be one of"):
        attribute(patch, lin, toks, answer=ANSWER, method="grad")
    with pytest.raises(ConfigError, match="steps must be"):
        attribute(patch, lin, toks, answer=ANSWER, method="ig", steps=0)
    with pytest.raises(ConfigError, match="latent means"):
        attribute(patch, lin, toks, answer=ANSWER, baseline="mean")
    with pytest.raises(ShapeError, match="shape"):
        attribute(patch, lin, toks, answer=ANSWER, baseline=toks[:, :5])
    with pytest.raises(ConfigError, match="baseline must be"):
        attribute(patch, lin, toks, answer=ANSWER, baseline="corrupt")
    with pytest.raises(ConfigError, match="outside the sequence"):
        attribute(patch, lin, toks, answer=ANSWER, positions=[12])
    with pytest.raises(ConfigError, match="must return a tensor"):
        attribute(patch, lin, toks, metric=lambda lg: 1.0)


def _zero_ablate(model, point, toks, m, head=None):
    def fn(act):
        out = act.clone()
        if head is None:
            out[:] = 0
        else:
            out[:, :, head] = 0
        return out

    with torch.no_grad(), at_hook(model, point, fn):
        return float(m(logits_of(model, toks)))


def test_component_atp_equals_exact_patching_on_the_linear_path(tokenizer):
    attn_only = linear_tl(tokenizer, attn_only=True)
    toks = tokens_for(attn_only)
    m = lambda lg: (lg[:, -1, ANSWER[0]] - lg[:, -1, ANSWER[1]]).mean()  # noqa: E731
    with torch.no_grad():
        clean = float(m(logits_of(attn_only, toks)))
    df = component_attribution(attn_only, toks, answer=ANSWER, components=("heads", "attn_out")).set_index("component")
    point = resolve("blocks.1.attn.hook_z", 2, attn_only.hook_dict.keys())
    for h in range(4):
        exact = _zero_ablate(attn_only, point, toks, m, head=h) - clean
        assert df.loc[f"blocks.1.attn.hook_z[{h}]", "score"] == pytest.approx(exact, abs=1e-5)
    exact_attn = _zero_ablate(attn_only, resolve("llm.layer.1.attn_out", 2), toks, m) - clean
    assert abs(exact_attn) > 1e-3
    assert df.loc["llm.layer.1.attn_out", "score"] == pytest.approx(exact_attn, abs=1e-5)
    assert {"head", "attn_out"} == set(df["kind"])


def test_component_atp_for_mlp_outputs_and_on_hugging_face(lin, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    toks = tokens_for(lin)
    m = lambda lg: (lg[:, -1, ANSWER[0]] - lg[:, -1, ANSWER[1]]).mean()  # noqa: E731
    with torch.no_grad():
        clean = float(m(logits_of(lin, toks)))
    df = component_attribution(lin, toks, answer=ANSWER, components=("mlp_out",)).set_index("component")
    exact = _zero_ablate(lin, resolve("llm.layer.1.mlp_out", 2), toks, m) - clean
    assert df.loc["llm.layer.1.mlp_out", "score"] == pytest.approx(exact, abs=1e-5)
    assert len(df) == 2
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()
    hdf = component_attribution(hf, toks, answer=ANSWER, components=("attn_out", "mlp_out"))
    assert len(hdf) == 4 and np.isfinite(hdf["score"]).all() and hdf["abs_score"].sum() > 0
    with pytest.raises(ConfigError, match="hook_z"):
        component_attribution(hf, toks, answer=ANSWER)
    with pytest.raises(ConfigError, match="unknown components"):
        component_attribution(lin, toks, answer=ANSWER, components=("mlp",))


@pytest.mark.parametrize("path", ["latent", "joint"])
@pytest.mark.parametrize("corrupt", [False, True])
def test_ig_with_path_points_stacked_equals_one_point_per_pass(tiny_tl, monkeypatch, corrupt, path):
    from interlatent.patch import attribution

    patch = sae("llm.layer.0", k=4)
    toks = tokens_for(tiny_tl, batch=3)
    base = tokens_for(tiny_tl, batch=3, seed=5) if corrupt else "zero"
    stacked = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=6, baseline=base, path=path)
    monkeypatch.setattr(attribution, "IG_ROWS", 1)  # the plain loop: one path point per forward pass
    plain = attribute(patch, tiny_tl, toks, answer=ANSWER, method="ig", steps=6, baseline=base, path=path)
    torch.testing.assert_close(stacked.per_position, plain.per_position, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stacked.error_scores, plain.error_scores, atol=1e-5, rtol=1e-4)
    assert stacked.scores.abs().sum() > 0


@pytest.mark.parametrize("path", ["latent", "joint"])
def test_ig_with_a_bfloat16_or_float64_dictionary_scores_as_the_float32_one(lin, path):
    """The scored-position mask must not promote the path points out of the dictionary's dtype."""
    ref = attribute(sae(), lin, tokens_for(lin), answer=ANSWER, method="ig", steps=4, path=path)
    for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.05)):
        patch = sae()
        patch.module.to(dtype)
        res = attribute(patch, lin, tokens_for(lin), answer=ANSWER, method="ig", steps=4, path=path)
        assert res.scores.dtype == torch.float32
        err = float((res.scores - ref.scores).abs().max())
        assert err <= tol * float(ref.scores.abs().max()), (dtype, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["latent", "joint"])
def test_attribution_on_a_cuda_model_equals_the_cpu_one(tokenizer, path):
    """Every tensor the attribution builds follows the model's device; the results come back on the CPU."""
    model = tiny_model(tiny_tl_config(len(tokenizer), n_layers=2), tokenizer).eval()
    toks = tokens_for(model)
    mask = torch.ones_like(toks)
    mask[0, :3] = 0
    patch = sae(means=torch.rand(64))
    kw = {"answer": ANSWER, "method": "ig", "steps": 4, "path": path, "baseline": "mean", "attention_mask": mask,
          "positions": [-1, 5]}
    ref = attribute(patch, model, toks, **kw)
    patch.module.cuda()
    res = attribute(patch, model.cuda(), toks.cuda(), **{**kw, "attention_mask": mask.cuda()})
    assert res.scores.device.type == "cpu"
    torch.testing.assert_close(res.scores, ref.scores, atol=1e-4, rtol=1e-3)
    agreement = attribution_agreement(patch, model, toks.cuda(), result=res, **{**kw, "attention_mask": mask.cuda()})
    assert agreement.spearman > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_latent_path_ig_is_exact_for_a_quadratic_metric_that_couples_the_prompts(lin, seed):
    """A metric giving one value for the batch (the square of the summed logit differences) couples
    the prompts: a latent's own path moves it on every prompt at once, and a latent moving on
    another prompt in the same probe adds a cross term. With one latent active per prompt and as
    many steps as latents moving in the batch, every latent is alone in its probe on every prompt,
    so the midpoint is exact (groups drawn per prompt put latents of different prompts together)."""
    patch = sae(k=1)
    toks = tokens_for(lin)

    def coupled(logits):
        return (10 * (logits[:, -1, ANSWER[0]] - logits[:, -1, ANSWER[1]]).sum()) ** 2

    kw = {"metric": coupled, "positions": [-1]}
    atp = attribute(patch, lin, toks, method="atp", **kw)
    latents = torch.nonzero(atp.active).flatten().tolist()
    ig = attribute(patch, lin, toks, method="ig", steps=len(latents), seed=seed, **kw)
    exact = exact_latent_effects(patch, lin, toks, latents, **kw)
    assert len(latents) > 1 and np.abs(exact).max() > 1e-2
    np.testing.assert_allclose(ig.scores[latents].numpy(), exact, rtol=1e-4, atol=1e-4)
    assert np.abs(atp.scores[latents].numpy() - exact).max() > 1e-2


def test_the_agreement_module_annotations_resolve():
    """Every name in the public signatures is importable from the module (documentation tools and
    typing.get_type_hints resolve them), and the old import path gives the same objects."""
    import typing

    from interlatent.patch import agreement, attribution

    for name in agreement.__all__:
        obj = getattr(agreement, name)
        assert typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
        assert getattr(attribution, name) is obj


@pytest.mark.parametrize("split", ["hooked", "resumed"])
def test_latent_path_runs_no_probe_in_which_nothing_moves(lin, monkeypatch, split):
    """More steps than moving latents: each prompt's groups are numbered from 0, so the prompts share
    their probes, and the empty probes are skipped (one row block per pass here, so the passes count
    the probes); the scores stay exact on the linear model, and with no latent moving only the clean
    point runs. Hooked: every pass runs the whole model; resumed (TransformerLens 3): one pass up to
    the hook point, the probes from there."""
    from interlatent.patch import attribution

    if split == "resumed":
        _needs_resume(lin, "llm.layer.1")
        calls = _count_resumed(monkeypatch)
        passes = lambda: (calls["run_to"], calls["run_from"])  # noqa: E731
        one_latent, nothing_moves = (1, 2), (1 + 1, 1)  # (+ the corrupted run) the clean point [, one probe]
    else:
        _hooked_only(monkeypatch)
        calls = {"logits_of": 0}

        def counted(*a):
            calls["logits_of"] += 1
            return logits_of(*a)

        monkeypatch.setattr(attribution, "logits_of", counted)
        passes = lambda: calls["logits_of"]  # noqa: E731
        one_latent, nothing_moves = 1 + 1 + 1, 1 + 1 + 1  # the clean run, the clean point, one probe / the corrupted run
    monkeypatch.setattr(attribution, "IG_ROWS", 1)
    patch = sae(k=1)
    toks = tokens_for(lin)
    res = attribute(patch, lin, toks, answer=ANSWER, method="ig", steps=100, positions=[-1])
    assert passes() == one_latent  # one latent moves per prompt: one probe
    latents = torch.nonzero(res.active).flatten().tolist()
    exact = exact_latent_effects(patch, lin, toks, latents, answer=ANSWER, positions=[-1])
    np.testing.assert_allclose(res.scores[latents].numpy(), exact, atol=1e-5, rtol=0)
    for key in calls:
        calls[key] = 0
    same = toks.clone()
    none = attribute(patch, lin, toks, answer=ANSWER, method="ig", steps=5, baseline=same)
    assert passes() == nothing_moves and none.scores.abs().sum() == 0  # no probe


# --------------------------------------------------------------------------- the latent path resumed at the hook
def _hooked_only(monkeypatch):
    """Make every backend run the whole pass with a hook (the path Hugging Face models and the TL 4
    bridge take)."""
    from interlatent.backends.base import Backend
    from interlatent.backends.tl3 import TL3Backend

    monkeypatch.setattr(TL3Backend, "resumes_at", Backend.resumes_at)


def _count_resumed(monkeypatch):
    from interlatent.backends.tl3 import TL3Backend

    calls = {"run_to": 0, "run_from": 0}
    for name in calls:
        real = getattr(TL3Backend, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(TL3Backend, name, counted)
    return calls


def _needs_resume(model, layer):
    from interlatent.backends import make_backend

    backend = make_backend(model)
    if not backend.resumes_at(backend.resolve(layer)):
        pytest.skip("this backend runs the whole pass with a hook (the path compared against)")


@pytest.mark.parametrize("method", ["ig", "joint", "atp"])
@pytest.mark.parametrize("case", ["zero", "mean", "corrupt", "left_mask", "metric", "coupled", "positions",
                                  "answer_position", "one_row_block", "last_block", "decode_called"])
def test_attribution_resumed_at_the_hook_point_equals_the_hooked_pass(tiny_tl, monkeypatch, case, method):
    """On TransformerLens 3 attribution runs the model up to a resid_post dictionary once and its
    gradient passes from there (unembedding only the answer column); every score equals the whole
    hooked pass's, for both IG paths and AtP."""
    layer = "llm.layer.2" if case == "last_block" else "llm.layer.1"
    _needs_resume(tiny_tl, layer)
    patch = sae(layer, k=4, means=torch.rand(64) * 0.3)
    toks = tokens_for(tiny_tl, batch=3, seq=9)
    kw = {"answer": ANSWER, "method": "atp" if method == "atp" else "ig", "steps": 5,
          "path": "joint" if method == "joint" else "latent"}
    if case in ("mean", "corrupt"):
        kw["baseline"] = "mean" if case == "mean" else tokens_for(tiny_tl, batch=3, seq=9, seed=7)
    if case == "left_mask":
        mask = torch.ones_like(toks)
        mask[0, :4] = 0
        mask[2, :1] = 0
        kw["attention_mask"] = mask
    if case == "metric":
        kw = {**kw, "answer": None, "metric": lambda lg: (lg[:, -2, 7] - lg[:, 3, 2]) ** 2}
    if case == "coupled":
        kw = {**kw, "answer": None, "metric": lambda lg: lg[:, -1, ANSWER[0]].sum() * lg[:, 2, 1].sum()}
    if case == "positions":
        kw["positions"] = [0, 4, -1]
    if case == "answer_position":
        kw["answer_position"] = torch.tensor([5, -3, 8])
    if case == "one_row_block":
        from interlatent.patch import attribution

        monkeypatch.setattr(attribution, "IG_ROWS", 1)
    if case == "decode_called":  # a dictionary not known to decode affinely: its decode() is called
        from interlatent.patch import attribution

        monkeypatch.setattr(attribution, "_decodes_affinely", lambda module: False)
        monkeypatch.setattr(attribution, "IG_ROWS", 1)  # passes after the first hold no clean point
    with monkeypatch.context() as m:
        calls = _count_resumed(m)
        resumed = attribute(patch, tiny_tl, toks, **kw)
    assert calls["run_to"] == 1 + (case == "corrupt") and calls["run_from"] >= 1
    _hooked_only(monkeypatch)
    hooked = attribute(patch, tiny_tl, toks, **kw)
    assert resumed.scores.abs().sum() > 0 and resumed.error_scores.abs().sum() > 0
    torch.testing.assert_close(resumed.per_position, hooked.per_position, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(resumed.error_scores, hooked.error_scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(resumed.active, hooked.active)
    assert resumed.metric_clean == pytest.approx(hooked.metric_clean, abs=1e-5)
    assert resumed.forward_max_diff == hooked.forward_max_diff == 0.0
    assert resumed.spec == hooked.spec


@pytest.mark.parametrize("split", ["hooked", "resumed"])
def test_a_dictionary_decoding_to_inf_is_refused_not_reported(tiny_tl, monkeypatch, split):
    """A decoder giving inf makes ``decode(f) - decode(f)`` NaN: the splice no longer leaves the
    forward pass unchanged, and the attribution is refused rather than reported as NaN scores."""
    from interlatent.patch.attribution import SpliceMismatchError

    if split == "resumed":
        _needs_resume(tiny_tl, "llm.layer.1")
    else:
        _hooked_only(monkeypatch)
    patch = sae("llm.layer.1", k=4)
    toks = tokens_for(tiny_tl, batch=2, seq=6)
    with torch.no_grad():
        patch.module.W_dec[:] = float("inf")
    for method in ("ig", "atp"):
        with pytest.raises(SpliceMismatchError, match="inf / NaN"):
            attribute(patch, tiny_tl, toks, answer=ANSWER, method=method, steps=2)
