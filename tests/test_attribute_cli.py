"""``interlatent attribute``: recorded attribution scores as a table, strict JSON or CSV."""

from __future__ import annotations

import csv
import io
import json

import pytest

from interlatent import LatentDB
from interlatent import cli
from interlatent.patch import attribute
from test_attribution import ANSWER, linear_tl, sae, tokens_for


@pytest.fixture(scope="module")
def store(tokenizer, tmp_path_factory):
    model = linear_tl(tokenizer)
    path = tmp_path_factory.mktemp("attr") / "a.db"
    patch = sae()
    toks = tokens_for(model)
    with LatentDB(path) as db:
        atp = attribute(patch, model, toks, answer=ANSWER, db=db)
        attribute(patch, model, toks, answer=ANSWER, method="ig", steps=2, path="joint", db=db)
        ig = attribute(patch, model, toks, answer=ANSWER, method="ig", steps=2, db=db)
        other = sae(layer="llm.layer.0", seed=3)
        attribute(other, model, toks, answer=ANSWER, db=db)
        db.add_intervention(patch.name, "ablation", {"ablate": [1]}, {"value": 0.0})
    return path, patch.name, atp, ig


def call(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_lists_the_latest_record_per_layer_ranked_by_magnitude(store, capsys):
    path, layer, atp, ig = store
    rc, out, err = call(["attribute", str(path), "--layer", layer, "--top", "5", "--format", "json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["latent"] for r in rows] == ig.top(5)  # the latest record of the layer: the IG one
    assert all(r["method"] == "ig" and r["baseline"] == "zero" for r in rows)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["score"] == pytest.approx(float(ig.scores[rows[0]["latent"]]))
    rc, out, _ = call(["attribute", str(path), "--format", "json"], capsys)
    assert {r["layer"] for r in json.loads(out)} == {layer, "latent_sae:llm.layer.0"}


def test_a_chosen_record_in_csv_and_the_table(store, capsys):
    path, layer, atp, _ = store
    rc, out, _ = call(["attribute", str(path), "--list", "--format", "json"], capsys)
    listed = json.loads(out)
    assert rc == 0 and len(listed) == 4 and [r["method"] for r in listed] == ["atp", "ig:joint", "ig", "atp"]
    first = listed[0]["intervention_id"]
    rc, out, _ = call(["attribute", str(path), "--id", str(first), "--all", "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rc == 0 and len(rows) == int(atp.active.sum())
    assert [int(r["latent"]) for r in rows[:3]] == atp.top(3)
    rc, out, _ = call(["attribute", str(path), "--layer", layer], capsys)
    assert rc == 0 and out.splitlines()[0].split() == ["intervention_id", "layer", "method", "baseline", "rank",
                                                       "latent", "score", "abs_score"]


def test_a_record_made_before_ig_had_a_path_reads_as_the_joint_one(tmp_path, capsys):
    with LatentDB(tmp_path / "old.db") as db:
        db.add_intervention("latent_sae:llm.layer.1", "attribution", {"method": "ig", "baseline": "zero", "steps": 8},
                            {"scores": [0.5, -2.0], "active_latents": [0, 1]})
    rc, out, err = call(["attribute", str(tmp_path / "old.db"), "--format", "json"], capsys)
    rows = json.loads(out)
    assert rc == 0, err
    assert [(r["latent"], r["method"]) for r in rows] == [(1, "ig:joint"), (0, "ig:joint")]


def test_errors_are_one_line_and_the_exit_codes_say_which(store, tmp_path, capsys):
    path, layer, _, _ = store
    rc, out, err = call(["attribute", str(path), "--layer", layer + "x"], capsys)
    assert rc == 1 and out == "" and err.startswith("error: no layer") and "did you mean" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = call(["attribute", str(path), "--id", "999"], capsys)
    assert rc == 1 and "--list" in err
    rc, _, err = call(["attribute", str(path), "--top", "0"], capsys)
    assert rc == 2
    with LatentDB(tmp_path / "empty.db"):
        pass
    rc, out, err = call(["attribute", str(tmp_path / "empty.db"), "--format", "json"], capsys)
    assert rc == 0 and json.loads(out) == [] and "no attribution records" in err
