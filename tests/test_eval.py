"""evaluate(): SAEBench's core metrics, checked against sae_lens.evals on identical tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interlatent.analysis.evaluate import (
    METRICS,
    EvalResult,
    evaluate,
    load_token_file,
    seed_summary,
    tokens_from_db,
)
from interlatent.analysis.interop import load_saelens
from interlatent.errors import ConfigError, NotEnoughDataError, ShapeError

HOOK = "blocks.1.hook_resid_post"
TEXTS = [
    "the sky is blue and the sea is green",
    "a cat sat on the mat while the dog slept",
    "Alice said that Bob would report it",
    "hello world, this is a tiny corpus",
    "numbers like 1 2 3 and symbols like < > & ;",
    "the dog slept and the cat sat",
]


def _saelens(arch: str, seed: int = 0, scale: float = 0.3):
    import sae_lens

    classes = {"topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6}),
               "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {})}
    cls, cfg_cls, extra = classes[arch]
    sae = cls(cfg_cls(d_in=32, d_sae=64, dtype="float32", device="cpu", **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(64, generator=gen) * 0.3)
    sae.cfg.metadata.hook_name = HOOK
    return sae.eval()


class _Tokens:
    """The one method of SAELens's ActivationsStore its sparsity/variance metrics call."""

    def __init__(self, tokens):
        self.tokens = tokens

    def get_batch_tokens(self, n):
        return self.tokens


def _saelens_metrics(sae, model, tokens, ignore):
    from sae_lens.evals import get_recons_loss, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    per_token = get_recons_loss(sae, model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True,
                                ignore_tokens=ignore)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for t in ignore or []:
        mask &= tokens != t
    out = {}
    for key, value in per_token.items():  # what get_downstream_reconstruction_metrics does with them
        m = mask if value.shape[1] == mask.shape[1] else mask[:, :-1]
        out[key] = float(value[m].mean())
    out["ce_loss_score"] = (out["ce_loss_with_ablation"] - out["ce_loss_with_sae"]) / (
        out["ce_loss_with_ablation"] - out["ce_loss_without_sae"])
    out["kl_div_score"] = (out["kl_div_with_ablation"] - out["kl_div_with_sae"]) / out["kl_div_with_ablation"]
    scalars, features = get_sparsity_and_variance_metrics(
        sae, model, _Tokens(tokens), ActivationScaler(), n_batches=1, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=tokens.shape[0], model_kwargs={}, ignore_tokens=ignore)
    return out, scalars, features


# ours -> sae_lens.evals name, where the definitions agree
SAME = {"ce_clean": "ce_loss_without_sae", "ce_spliced": "ce_loss_with_sae",
        "ce_zero_ablation": "ce_loss_with_ablation", "ce_loss_score": "ce_loss_score", "kl_spliced": "kl_div_with_sae", "kl_zero_ablation": "kl_div_with_ablation",
        "kl_div_score": "kl_div_score"}
SAME_ACTS = {"explained_variance": "explained_variance", "sse_per_token": "mse", "l0": "l0", "l1": "l1",
             "l2_norm_in": "l2_norm_in", "l2_norm_out": "l2_norm_out", "l2_ratio": "l2_ratio",
             "relative_reconstruction_bias": "relative_reconstruction_bias", "cossim": "cossim"}


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
@pytest.mark.parametrize("exclude", [False, True], ids=["all-tokens", "no-special-tokens"])
def test_evaluate_equals_sae_lens_evals_on_identical_tokens(arch, exclude, tiny_tl, tmp_path):
    sae = _saelens(arch)
    sae.save_model(tmp_path / "sl")
    tokens = tiny_tl.to_tokens(TEXTS[:4])[:, :8]  # BOS first; equal lengths, so no padding
    bos = tiny_tl.tokenizer.bos_token_id
    ours = evaluate(load_saelens(tmp_path / "sl"), tiny_tl, tokens, batch_size=3,
                    exclude_special_tokens=[bos] if exclude else False)
    recons, scalars, features = _saelens_metrics(sae, tiny_tl, tokens, [bos] if exclude else None)
    for mine, theirs in SAME.items():
        assert ours.metrics[mine] == pytest.approx(recons[theirs], abs=1e-4, rel=1e-4), mine
    for mine, theirs in SAME_ACTS.items():
        assert ours.metrics[mine] == pytest.approx(scalars[theirs], abs=1e-4, rel=1e-4), mine
    np.testing.assert_allclose(ours.feature_density, features["feature_density"], atol=1e-6)
    assert ours.n_tokens == tokens.numel() - (tokens.shape[0] if exclude else 0)
    assert ours.metrics["dead_fraction"] == pytest.approx(float((np.array(features["feature_density"]) == 0).mean()))
    assert ours.density_histogram.sum() == 64
    assert 0 < ours.metrics["l0"] < 64 and ours.metrics["ce_spliced"] != ours.metrics["ce_clean"]


def test_mean_ablation_baseline_and_scores(tiny_tl, tmp_path):
    """Mean ablation replaces the hook by the mean activation of the evaluated tokens; a perfect
    dictionary (spliced output == clean) scores 1 against both baselines."""
    from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig

    tokens = tiny_tl.to_tokens(TEXTS[:4])[:, :8]
    _, cache = tiny_tl.run_with_cache(tokens)
    x = cache[HOOK].reshape(-1, 32)
    ident = SparseAutoencoder(SparseCoderConfig(d_in=32, d_sae=64, activation="relu", k=None,
                                                metadata={"layer": "llm.layer.1"}))
    with torch.no_grad():  # latents 0..31 carry +x, 32..63 carry -x: an exact reconstruction
        eye = torch.eye(32)
        ident.W_enc.copy_(torch.cat([eye, -eye]))
        ident.W_dec.copy_(torch.cat([eye, -eye]))
        ident.b_enc.zero_()
        ident.b_dec.zero_()
    res = evaluate(ident, tiny_tl, tokens, exclude_special_tokens=False)
    assert res.metrics["ce_spliced"] == pytest.approx(res.metrics["ce_clean"], abs=1e-5)
    assert res.metrics["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert res.metrics["ce_loss_score_mean"] == pytest.approx(1.0, abs=1e-4)
    assert res.metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    mean = x.mean(0)
    with torch.no_grad(), tiny_tl.hooks(fwd_hooks=[(HOOK, lambda act, hook: mean.expand_as(act).clone())]):
        logits = tiny_tl(tokens)
    ce = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None]).mean()
    assert res.metrics["ce_mean_ablation"] == pytest.approx(float(ce), rel=1e-6)
    assert res.metrics["ce_mean_ablation"] != pytest.approx(res.metrics["ce_zero_ablation"], rel=1e-3)


def test_explained_variance_is_around_the_whole_sets_mean_not_zero(tiny_tl):
    """A dictionary that outputs the mean of every activation explains nothing (0), even though
    taken around zero (SAELens before #659) it would look good for activations with a large mean."""
    from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig

    tokens = tiny_tl.to_tokens(TEXTS[:4])[:, :8]
    _, cache = tiny_tl.run_with_cache(tokens)
    x = cache[HOOK].reshape(-1, 32)
    mean_only = SparseAutoencoder(SparseCoderConfig(d_in=32, d_sae=8, activation="relu", k=None,
                                                    metadata={"layer": "llm.layer.1"}))
    with torch.no_grad():
        mean_only.W_enc.zero_()
        mean_only.b_enc.fill_(-1.0)  # nothing fires
        mean_only.b_dec.copy_(x.mean(0))
    res = evaluate(mean_only, tiny_tl, tokens, exclude_special_tokens=False)
    around_zero = 1 - float((x - x.mean(0)).pow(2).sum() / x.pow(2).sum())
    assert res.metrics["explained_variance"] == pytest.approx(0.0, abs=1e-5)
    assert around_zero > 0.05  # what the old definition would have reported
    assert res.metrics["dead_fraction"] == 1.0 and res.metrics["l0"] == 0.0


def test_evaluate_a_transcoder_reads_mlp_in_and_scores_mlp_out(tiny_tl, tmp_path):
    from sparsify import SparseCoder
    from sparsify import SparseCoderConfig as SparsifyConfig

    from interlatent.analysis.interop import load_sparsify

    coder = SparseCoder(32, SparsifyConfig(num_latents=64, k=6, transcode=True), device="cpu")
    with torch.no_grad():
        for p in coder.parameters():
            p.normal_(0, 0.3)
    coder.save_to_disk(tmp_path / "layers.1.mlp")
    tokens = tiny_tl.to_tokens(TEXTS[:3])[:, :8]
    res = evaluate(load_sparsify(tmp_path / "layers.1.mlp"), tiny_tl, tokens, exclude_special_tokens=False)
    _, cache = tiny_tl.run_with_cache(tokens)
    x_in, y = cache["blocks.1.ln2.hook_normalized"].reshape(-1, 32), cache["blocks.1.hook_mlp_out"].reshape(-1, 32)
    with torch.no_grad():
        y_hat = coder(x_in).sae_out
    ev = 1 - float((y - y_hat).pow(2).sum(-1).mean() / ((y - y.mean(0)).pow(2).sum(-1).mean()))
    assert res.metrics["explained_variance"] == pytest.approx(ev, rel=1e-6, abs=1e-5)  # float32 sums
    assert res.metrics["l0"] == pytest.approx(6.0)


def test_stored_prompts_and_token_files_give_the_same_result(tiny_tl, tokenizer, tmp_path):
    from interlatent import LatentDB, LLMCollector

    db = LatentDB(tmp_path / "e.db")
    LLMCollector(db, layer_indices=[1]).run(tiny_tl, tokenizer, prompts=TEXTS)
    tokens, mask = tokens_from_db(db)
    assert tokens.shape[0] == len(TEXTS) and mask.sum(1).tolist() == db.sequences()["n_positions"].tolist()
    stored = db.tokens(prompt_index=0, metrics=False)["token_id"].tolist()
    assert tokens[0, :len(stored)].tolist() == stored
    sae = _saelens("topk")
    sae.save_model(tmp_path / "sl")
    module = load_saelens(tmp_path / "sl")
    from_db = evaluate(module, tiny_tl, tokens, attention_mask=mask, batch_size=4)
    lines = "\n".join(" ".join(str(int(t)) for t in row[:int(m.sum())]) for row, m in zip(tokens, mask))
    (tmp_path / "tokens.txt").write_text(lines + "\n")
    t2, m2 = load_token_file(tmp_path / "tokens.txt")
    from_file = evaluate(module, tiny_tl, t2, attention_mask=m2, batch_size=2)
    for k in METRICS:
        assert from_db.metrics[k] == pytest.approx(from_file.metrics[k], rel=1e-9, abs=1e-12), k
    # padding never counts: the same prompts one by one give the same token-weighted CE
    singles = [evaluate(module, tiny_tl, tokens[i:i + 1, :int(mask[i].sum())]) for i in range(len(TEXTS))]
    n = [s.extra["ce_positions"] for s in singles]
    assert from_db.metrics["ce_clean"] == pytest.approx(
        sum(s.metrics["ce_clean"] * k for s, k in zip(singles, n)) / sum(n), rel=1e-9)
    np.save(tmp_path / "t.npy", tokens[:2, :5].numpy())
    assert torch.equal(load_token_file(tmp_path / "t.npy")[0], tokens[:2, :5])
    (tmp_path / "bad.txt").write_text("1 2 x\n")
    with pytest.raises(ConfigError, match="integer ids"):
        load_token_file(tmp_path / "bad.txt")


def test_evaluate_refuses_bad_input(tiny_tl, tmp_path):
    sae = _saelens("topk")
    sae.save_model(tmp_path / "sl")
    module = load_saelens(tmp_path / "sl")
    with pytest.raises(ShapeError, match="exceed the model's context of 48"):
        evaluate(module, tiny_tl, torch.ones(1, 60, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\[batch, pos\]"):
        evaluate(module, tiny_tl, torch.ones(5, dtype=torch.long))
    bos = tiny_tl.tokenizer.bos_token_id
    with pytest.raises(NotEnoughDataError, match="special token"):
        evaluate(module, tiny_tl, torch.full((2, 3), bos, dtype=torch.long))


def _result(name, **metrics):
    full = dict.fromkeys(METRICS, 0.0)
    full.update(metrics)
    return EvalResult(name, full, np.zeros(4), np.zeros(20, dtype=int), 10, 1)


def test_seed_summary_gives_mean_sd_and_flags_differences_within_two_sd():
    groups = {"topk": [_result("a", l0=10.0, mse=1.0), _result("b", l0=12.0, mse=1.1)],
              "relu": [_result("c", l0=30.0, mse=1.05), _result("d", l0=32.0, mse=1.0)]}
    summary, comparisons = seed_summary(groups, metrics=["l0", "mse"])
    row = next(r for r in summary if r["group"] == "topk" and r["metric"] == "l0")
    assert (row["mean"], row["n"]) == (11.0, 2) and row["sd"] == pytest.approx(np.sqrt(2.0))
    flags = {r["metric"]: r["within_2sd"] for r in comparisons}
    assert flags == {"l0": False, "mse": True}  # l0: 20 apart, sd 1.4; mse: 0.025 apart, sd 0.07
    single = seed_summary({"a": [_result("a")], "b": [_result("b")]}, metrics=["l0"])[1]
    assert single[0]["within_2sd"] is None


# ---------------------------------------------------------------------------- interlatent eval
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The quick demo model's layer 0 in a store, with two SAELens TopK dictionaries (two seeds)
    and a JumpReLU one backfilled over it."""
    import sae_lens

    from interlatent import LatentDB, LLMCollector
    from interlatent.analysis.train import backfill
    from interlatent.llm import demo_model

    model = demo_model(quick=True)
    tmp = tmp_path_factory.mktemp("evalcli")
    db = LatentDB(tmp / "d.db")
    LLMCollector(db, layer_indices=[0]).run(model, None, prompts=TEXTS)
    names = []
    for seed, arch in ((0, "topk"), (1, "topk"), (2, "jumprelu")):
        cls, cfg_cls, extra = ((sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 8}) if arch == "topk" else
                               (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}))
        sae = cls(cfg_cls(d_in=64, d_sae=128, dtype="float32", device="cpu", **extra))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        sae.save_model(tmp / f"sl{seed}")
        names.append(backfill(db, load_saelens(tmp / f"sl{seed}"), name=f"latent_sae:seed{seed}",
                              out_dir=tmp / "arts"))
    db.close()
    return tmp / "d.db", names, model


def _cli(argv, capsys):
    from interlatent.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_cli_uses_the_recorded_demo_model_and_matches_evaluate(demo_store, capsys):
    from interlatent import LatentDB
    from interlatent.patch import LatentPatch

    path, names, model = demo_store
    rc, out, err = _cli(["eval", str(path), "--list", "--format", "json"], capsys)
    assert rc == 0, err
    listed = {r["layer"]: r for r in json.loads(out)}
    assert listed[names[0]]["rebuild"] == "demo model" and listed[names[2]]["architecture"] == "jumprelu_sae"
    rc, out, err = _cli(["eval", str(path), "--layer", names[0], "--format", "json"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    [row] = data["dictionaries"]
    with LatentDB(path, mode="r") as db:
        tokens, mask = tokens_from_db(db)
        expected = evaluate(LatentPatch.from_db(db, names[0]), model, tokens, attention_mask=mask)
    for k in METRICS:
        assert row[k] == pytest.approx(expected.metrics[k], rel=1e-9, abs=1e-12), k
    assert sum(row["density_histogram"]["counts"]) == 128 and data["summary"] == [] == data["comparisons"]


def test_eval_cli_groups_of_seeds_give_mean_sd_and_comparison_flags(demo_store, capsys):
    path, names, _ = demo_store
    groups = [f"{names[0]},{names[1]}", names[2]]
    rc, out, err = _cli(["eval", str(path), "--layer", groups[0], "--layer", groups[1], "--format", "json",
                         "--max-prompts", "3"], capsys)
    assert rc == 0, err
    data = json.loads(out)
    assert [r["dictionary"] for r in data["dictionaries"]] == names
    l0 = next(r for r in data["summary"] if r["group"] == groups[0] and r["metric"] == "l0")
    assert l0["n"] == 2 and l0["mean"] == pytest.approx(8.0) and l0["sd"] == pytest.approx(0.0, abs=1e-12)
    assert {r["within_2sd"] for r in data["comparisons"]} == {None}  # one JumpReLU dictionary: no sd to compare
    rc, out, err = _cli(["eval", str(path), "--layer", groups[0], "--format", "table"], capsys)
    assert rc == 0 and "== metrics ==" in out and "== summary ==" in out and "ce_loss_score" in out
    rc, out, err = _cli(["eval", str(path), "--layer", names[0], "--format", "csv", "--max-prompts", "2"], capsys)
    assert rc == 0 and out.startswith("# dictionaries\ngroup,dictionary,ce_clean")


def test_eval_cli_errors_are_one_line(demo_store, tiny_tl, tokenizer, tmp_path, capsys):
    from interlatent import LatentDB, LLMCollector

    path, names, _ = demo_store
    rc, _, err = _cli(["eval", str(path)], capsys)  # neither --layer nor --list: a usage error
    assert rc == 2 and "one of the arguments --layer --list is required" in err
    rc, _, err = _cli(["eval", str(path), "--layer", "latent_sae:nope"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "did you mean" in err
    other = LatentDB(tmp_path / "o.db")  # a model no one can rebuild offline
    LLMCollector(other, layer_indices=[1]).run(tiny_tl, tokenizer, prompts=TEXTS[:3])
    sae = _saelens("topk")
    sae.save_model(tmp_path / "sl")
    from interlatent.analysis.train import backfill

    backfill(other, load_saelens(tmp_path / "sl"), out_dir=tmp_path / "arts")
    other.close()
    rc, _, err = _cli(["eval", str(tmp_path / "o.db"), "--layer", "latent_sae:llm.layer.1"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "cannot be rebuilt offline; pass --model demo" in err
    rc, _, err = _cli(["eval", str(path), "--layer", names[0], "--tokens", str(tmp_path / "none.npy")], capsys)
    assert rc == 1 and "does not exist" in err


def test_evaluate_a_hugging_face_model_equals_its_transformerlens_conversion(tiny_gpt2_dir, tmp_path):
    """The same checkpoint as a plain HF model (module hooks) and converted to a HookedTransformer
    (hook points) gives the same metrics; --model PATH evaluates a store made from it."""
    from transformers import AutoModelForCausalLM

    from interlatent import LatentDB, LLMCollector
    from interlatent.analysis.train import backfill
    from interlatent.llm import load_model

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir), local_files_only=True).eval()
    tl = load_model(tiny_gpt2_dir)
    sae = _saelens("topk")
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.save_model(tmp_path / "sl")
    module = load_saelens(tmp_path / "sl")
    tokens = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4], [4, 4, 8, 1, 2, 6, 3, 3]])
    a = evaluate(module, hf, tokens, exclude_special_tokens=False)
    b = evaluate(module, tl, tokens, exclude_special_tokens=False)
    for k in METRICS:
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-4, abs=1e-5), k
    db = LatentDB(tmp_path / "h.db")
    LLMCollector(db, layer_indices=[0]).run(tl, None, prompts=TEXTS[:3])
    backfill(db, module, out_dir=tmp_path / "arts")
    db.close()
    from interlatent.cli import main

    assert main(["eval", str(tmp_path / "h.db"), "--layer", "latent_sae:llm.layer.0", "--model", str(tiny_gpt2_dir),
                 "--format", "json"]) == 0
    from interlatent.vis.eval import recorded_model

    with LatentDB(tmp_path / "h.db", mode="r") as db:  # the store recorded the checkpoint: no --model needed
        assert recorded_model(db, "latent_sae:llm.layer.0") == str(tiny_gpt2_dir)
    assert main(["eval", str(tmp_path / "h.db"), "--layer", "latent_sae:llm.layer.0", "--format", "csv"]) == 0
