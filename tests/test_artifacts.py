"""Saved modules and their records: malformed files give ArtifactError, a store moves with its
artifacts, artifacts are found by name."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from interlatent import LatentDB
from interlatent.analysis.models import (
    LinearProbe,
    LinearProbeConfig,
    SparseAutoencoder,
    SparseCoderConfig,
    Transcoder,
    load_module,
    save_module,
)
from interlatent.analysis.train import SAEPipeline
from interlatent.db import SequenceRecord
from interlatent.errors import ArtifactError, ArtifactNotFoundError


@pytest.fixture
def saved(tmp_path):
    return save_module(SparseAutoencoder(SparseCoderConfig(d_in=8, d_sae=16, k=2), seed=0), tmp_path / "sae")


def _rewrite_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_truncated_weights_raise_artifact_error(saved):
    w = saved / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated|weights.safetensors"):
        load_module(saved)


@pytest.mark.parametrize("payload", [b"", b"\x00" * 3, b"garbage bytes, not a safetensors file at all",
                                     (10**12).to_bytes(8, "little") + b"{}", (2).to_bytes(8, "little") + b"[]"])
def test_garbage_weights_raise_artifact_error(saved, payload):
    (saved / "weights.safetensors").write_bytes(payload)
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        load_module(saved)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"sparse_autoencoder"'])
def test_bad_config_json_raises_artifact_error(saved, text):
    (saved / "config.json").write_text(text)
    with pytest.raises(ArtifactError, match="config.json"):
        load_module(saved)


@pytest.mark.parametrize("changes,match", [({"d_sae": "sixteen"}, "config"), ({"colour": "red"}, "colour"),
                                           ({"k": 99}, "config"), ({"d_in": None}, "config")])
def test_config_fields_that_do_not_build_raise_artifact_error(saved, changes, match):
    _rewrite_config(saved, **changes)
    with pytest.raises(ArtifactError, match=match):
        load_module(saved)


def test_wrong_tensor_names_raise_artifact_error(saved):
    w = load_file(str(saved / "weights.safetensors"))
    w["W_encoder"] = w.pop("W_enc")
    save_file(w, str(saved / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="W_enc") as err:
        load_module(saved)
    assert "W_encoder" in str(err.value)


def test_wrong_dtype_raises_artifact_error(saved):
    w = load_file(str(saved / "weights.safetensors"))
    w["W_dec"] = w["W_dec"].to(torch.int64)
    save_file(w, str(saved / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="W_dec.*I64|I64.*W_dec"):
        load_module(saved)


def test_shape_mismatch_raises_artifact_error(saved):
    _rewrite_config(saved, d_sae=17)
    with pytest.raises(ArtifactError, match=r"W_(enc|dec).* shape \(16, 8\).* needs \(17, 8\)"):
        load_module(saved)


def _peak_rss_reset() -> bool:
    try:  # Linux: writing 5 resets the peak resident set size reported as VmHWM
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def test_huge_d_sae_fails_fast_before_allocating(saved):
    _rewrite_config(saved, d_sae=2**24)  # a module of that width holds 2 x 2**24 x 8 floats: 1 GB
    assert (saved / "config.json").stat().st_size < 400
    measured = _peak_rss_reset()
    base = _peak_rss_mb() if measured else 0.0
    start = time.perf_counter()
    with pytest.raises(ArtifactError, match="shape"):
        load_module(saved)
    assert time.perf_counter() - start < 1.0
    if measured:
        assert _peak_rss_mb() - base < 100


@pytest.mark.parametrize("make", [
    lambda: Transcoder(SparseCoderConfig(d_in=8, d_sae=16, k=3, d_out=5, skip=True), seed=0),
    lambda: LinearProbe(LinearProbeConfig(d_in=8, n_classes=3, classes=["a", 1, True])),
])
def test_checked_load_still_round_trips(tmp_path, make):
    module = make()
    loaded = load_module(save_module(module, tmp_path / "m"))
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------- records in the store
def _trained_store(folder):
    rng = np.random.default_rng(0)
    db = LatentDB(folder / "moved.db")
    recs = [SequenceRecord(list(range(10)), [f"t{j}" for j in range(10)],
                           {"llm.layer.0": rng.standard_normal((10, 8)).astype(np.float32)}, text=f"p{i}")
            for i in range(12)]
    with db.run() as run:
        run.write(recs, dtypes={"llm.layer.0": "float32"})
    res = SAEPipeline(db, "llm.layer.0", k=2, d_sae=16, steps=5, batch_size=32, progress=False).run()
    return db, res


def test_a_store_moved_with_its_artifacts_folder_still_loads_them(tmp_path):
    from interlatent.patch import LatentPatch

    (tmp_path / "a").mkdir()
    db, res = _trained_store(tmp_path / "a")
    x = torch.from_numpy(db.fetch_activations("llm.layer.0").values)
    db.close()
    raw = sqlite3.connect(tmp_path / "a" / "moved.db").execute("SELECT path FROM artifacts").fetchone()[0]
    assert not raw.startswith("/") and raw.startswith("moved_artifacts/")
    shutil.move(tmp_path / "a", tmp_path / "b")
    with LatentDB(tmp_path / "b" / "moved.db") as db:
        art = db.get_artifact(res.artifact_id)
        assert str(tmp_path / "b") in art["path"]
        assert db.artifacts()["path"].iloc[0] == art["path"]
        loaded = load_module(art["path"])
        with torch.no_grad():
            assert torch.equal(loaded.encode(x).latent_acts, res.module.encode(x).latent_acts)
        patch = LatentPatch.from_db(db, "latent_sae:llm.layer.0")
        assert patch.d_sae == 16


def test_old_absolute_artifact_rows_still_load(tmp_path, saved):
    db = LatentDB(tmp_path / "store" / "s.db")
    aid = db.add_artifact("sae:x", "sae", path=saved.resolve())
    assert db.get_artifact(aid)["path"] == str(saved.resolve())
    assert type(load_module(db.get_artifact(aid)["path"])) is SparseAutoencoder


def test_get_artifact_by_name_is_the_newest_and_unknown_names_suggest(tmp_path):
    db = LatentDB(tmp_path / "n.db")
    first = db.add_artifact("sae:llm.layer.0", "sae", path="/x1")
    db.add_artifact("probe:llm.layer.0:label", "probe", path="/y")
    newest = db.add_artifact("sae:llm.layer.0", "sae", path="/x2")
    assert db.get_artifact("sae:llm.layer.0")["artifact_id"] == newest != first
    assert db.get_artifact(first)["path"] == "/x1"
    with pytest.raises(ArtifactNotFoundError, match="sae:llm.layer.0") as err:
        db.get_artifact("sae:llm.layer.O")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ArtifactError)
    with pytest.raises(KeyError, match="no artifact with id 99"):
        db.get_artifact(99)
