"""Each demo end to end on the quick demo model, checking what it wrote."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from interlatent import LatentDB

ROOT = Path(__file__).resolve().parents[1]


def load_demo(rel: str):
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_workflow_demo_quick(tmp_path, capsys):
    demo = load_demo("demos/llm_workflow_demo.py")
    results = demo.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "speaker probe" in out and "dashboard:" in out
    saved = json.loads((tmp_path / "workflow_results.json").read_text())
    assert saved["probe"]["accuracy"] > saved["probe"]["baseline_accuracy"]
    assert 0 <= saved["sae"]["fvu"] < 1 and 0 <= saved["transcoder"]["fvu"] < 1
    assert saved["ablation"]["control_std"] >= 0 and len(saved["ablation"]["control"]) == 5
    assert saved["splice"]["ce_clean"] <= saved["splice"]["ce_zero_ablated"]
    assert Path(saved["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert "Content-Security-Policy" in Path(saved["report"]).read_text()
    with LatentDB(tmp_path / "workflow.db", mode="r") as db:
        assert {"llm.layer.1", "llm.layer.1.mlp_in", "llm.layer.1.mlp_out", "latent:llm.layer.1",
                "latent_sae:llm.layer.1"} <= set(db.layers())
        assert len(db.interventions()) >= 2 and len(db.artifacts()) >= 3
    assert results["seconds"] > 0
