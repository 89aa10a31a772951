"""Each demo end to end on the quick demo model, checking what it wrote."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from interlatent import LatentDB

ROOT = Path(__file__).resolve().parents[1]


def load_demo(rel: str):
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_workflow_demo_quick(tmp_path, capsys, caplog):
    demo = load_demo("demos/llm_workflow_demo.py")
    results = demo.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "speaker probe" in out and "dashboard:" in out
    saved = json.loads((tmp_path / "workflow_results.json").read_text())
    assert saved["probe"]["accuracy"] > saved["probe"]["baseline_accuracy"]
    assert 0 <= saved["sae"]["fvu"] < 1 and 0 <= saved["transcoder"]["fvu"] < 1
    assert saved["ablation"]["control_std"] >= 0 and len(saved["ablation"]["control"]) == 5
    # the ablated latents are ranked by attribution at the decision position: every one acts there
    assert saved["ablation"]["latents"] == saved["attribution"]["top_latents"] != []
    assert saved["ablation"]["inactive_latents"] == [] and "never active" not in caplog.text
    assert all(s < 0 for s in saved["attribution"]["scores"])
    assert saved["splice"]["ce_clean"] <= saved["splice"]["ce_zero_ablated"]
    assert Path(saved["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert "Content-Security-Policy" in Path(saved["report"]).read_text()
    with LatentDB(tmp_path / "workflow.db", mode="r") as db:
        assert {"llm.layer.1", "llm.layer.1.mlp_in", "llm.layer.1.mlp_out", "latent:llm.layer.1",
                "latent_sae:llm.layer.1"} <= set(db.layers())
        for name in ("latent:llm.layer.1", "latent_sae:llm.layer.1"):  # logit effects stored with the latents
            assert len(db.logit_effects(name)) == 2 * 10 * db.layer_info(name).width
        assert len(db.interventions()) >= 3 and len(db.artifacts()) >= 3
        assert "attribution" in set(db.interventions()["kind"])
    assert results["seconds"] > 0


def test_prompt_dataset_demo_quick(tmp_path):
    demo = load_demo("demos/prompt_dataset_demo.py")
    res = demo.main(["--quick", "--out", str(tmp_path)])
    assert res["voices"]["probe"]["accuracy"] >= res["voices"]["probe"]["baseline"]
    assert res["voices"]["top_teen"] and all(r["label"] == "teen" for r in res["voices"]["top_teen"])
    assert "r2" in res["severity"]["probe"] and 0 <= res["severity"]["sae_fvu"] < 1
    assert json.loads((tmp_path / "prompt_dataset_results.json").read_text())["voices"]
    assert (tmp_path / "severity.csv").read_text().startswith("text,label,dilemma")


def test_activation_patching_demo_quick(tmp_path):
    demo = load_demo("demos/activation_patching_demo.py")
    res = demo.main(["--quick", "--out", str(tmp_path)])
    rows = {r["point"]: r for r in res["rows"]}
    assert rows["llm.layer.1"]["restored"] == pytest.approx(1.0, abs=1e-3)  # the whole last block: all of it
    assert rows["llm.layer.0.resid_pre"]["restored_last_position_only"] == pytest.approx(0.0, abs=1e-3)
    assert (tmp_path / "activation_patching.csv").is_file()


def test_real_model_demo_skips_without_flag_and_runs_on_a_local_checkpoint(tmp_path, tiny_gpt2_dir, monkeypatch,
                                                                           capsys):
    demo = load_demo("demos/llm_real_model_demo.py")
    monkeypatch.delenv("RUN_LLM_REAL", raising=False)
    assert demo.main([]) == 0 and "RUN_LLM_REAL=1" in capsys.readouterr().out
    monkeypatch.setenv("RUN_LLM_REAL", "1")
    monkeypatch.setenv("LLM_MODEL", str(tiny_gpt2_dir))
    monkeypatch.setenv("DEMO_OUT", str(tmp_path))
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert "SAE held-out FVU" in out
    with LatentDB(tmp_path / "real.db", mode="r") as db:
        assert db.tokens()["generated"].any() and "latent_sae:llm.layer.1" in db.layers()


def test_character_ablations_quick(tmp_path):
    build = load_demo("demos/character_ablations/build_dataset.py")
    run = load_demo("demos/character_ablations/run_experiment.py")
    vis = load_demo("demos/character_ablations/visualize.py")
    csv_path = build.main(["--out", str(tmp_path / "d.csv"), "--n-dilemmas", "12"])
    head = csv_path.read_text().splitlines()[0]
    assert head == "text,label,character,age,dilemma_id,severity,decision"
    res = run.main(["--dataset", str(csv_path), "--out", str(tmp_path), "--quick", "--controls", "3",
                    "--top-latents", "4", "--sae-seeds", "2", "--doses", "1", "2", "4", "--swap-latents", "4",
                    "--agreement-prompts", "2"])
    assert res["probe"]["baseline_accuracy"] <= 0.5 and 0 <= res["probe"]["accuracy"] <= 1
    assert set(res["ablations"]) == {"teen", "romantic", "manager", "philosopher"}
    for r in res["ablations"].values():
        assert r["n_prompts"] >= 1 and r["control_accuracy_drop_std"] >= 0 and len(r["control_latents"]) == 3
    for ch, runs in res["seeds"].items():  # the main SAE (seed 0) first, then the extra training seed
        assert [r["seed"] for r in runs] == [0, 1]
        assert runs[0]["logit_diff_change"] == res["ablations"][ch]["logit_diff_change"]
    assert len(res["seeds"]["teen"]) == 2 and res["seeds"]["teen"][0] != res["seeds"]["teen"][1]
    # the decision study: one entry per SAE seed, a dose-response curve and a speaker swap per speaker
    assert [s["seed"] for s in res["decision_study"]] == [0, 1]
    for study in res["decision_study"]:
        for ch in ("teen", "romantic", "manager", "philosopher"):
            r = study[ch]
            assert [d["n_latents"] for d in r["dose"]] == [1, 2, 4][: len(r["dose"])] and r["dose"]
            for d in r["dose"]:
                assert 0 <= d["flip_rate"] <= 1 and 0 < d["p_value"] <= 1 and d["control_delta_std"] > 0
            signs = [s > 0 for s in r["scores"]]
            assert all(signs) or not any(signs)  # every ranked latent pushes toward the other decision
            assert set(r["swap"]) == {"teen", "romantic", "manager", "philosopher"} - {ch}
            assert all(0 <= v["rule_flip_rate"] <= 1 and v["n_pairs"] >= 1 for v in r["swap"].values())
    assert res["decision_summary"]["teen"]["n_seeds"] == 2
    with LatentDB(tmp_path / "characters.db", mode="r") as db:
        kinds = db.interventions()["kind"].tolist()
    assert kinds.count("attribution") == 4 and kinds.count("dose_response") == 4
    for method in ("atp", "ig"):
        ag = res["agreement"][method]
        assert len(ag["estimated"]) == len(ag["exact"]) > 0 and -1 <= ag["spearman"] <= 1
    files = vis.main(["--results", str(tmp_path / "results.json")])
    assert all(Path(f).stat().st_size > 0 for f in files) and Path(files[-1]).suffix == ".html"
    assert {"dose_response.png", "attribution_vs_exact.png"} <= {Path(f).name for f in files}
