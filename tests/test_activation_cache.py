"""SAELens activation caches: a store's layers out as the directory SAELens's CacheActivationsRunner
writes, such a directory back in, bit for bit both ways; SAELens's own runner writes the caches
read here (checked against the model's run_with_cache), and SAELens trains on the caches written."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interlatent import LatentDB
from interlatent.analysis.interop import (
    SAELensCache,
    export_saelens_cache,
    import_saelens_cache,
    read_saelens_cache,
)
from interlatent.db import SequenceRecord
from interlatent.errors import (
    ArtifactError,
    ConfigError,
    DtypeRangeError,
    LayerNotFoundError,
    NotEnoughDataError,
    OutputError,
    ShapeError,
)

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="needs Hugging Face datasets (not installed here)")

# (store layer, TransformerLens hook): a resid_post, an mlp_out and a hook without a store name
LAYERS = (("llm.layer.0", "blocks.0.hook_resid_post"), ("llm.layer.1.mlp_out", "blocks.1.hook_mlp_out"),
          ("hook_embed", "hook_embed"))
BITS = {"float16": np.uint16, "float32": np.uint32}


def _bits(values: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(values.astype(dtype)).view(BITS[dtype])


def _random_block(rng: np.random.Generator, n: int, width: int, dtype: str) -> np.ndarray:
    """Any bit pattern of the dtype: normals, subnormals, infinities and NaNs with payloads."""
    raw = rng.integers(0, np.iinfo(BITS[dtype]).max, size=(n, width), dtype=BITS[dtype], endpoint=True)
    return raw.view(dtype)


def _store(path: Path, layers: list[tuple[str, str, int, str]], lengths: list[int], seed: int = 0):
    """A store of ``len(lengths)`` prompts holding each ``(layer, hook, width, dtype)``; prompt ``i``
    has token ids ``1000 i + position``, so a row tells which prompt it came from."""
    rng = np.random.default_rng(seed)
    data: dict[str, dict[int, np.ndarray]] = {name: {} for name, *_ in layers}
    records = []
    for i, n in enumerate(lengths):
        acts = {}
        for name, _, width, dtype in layers:
            data[name][i] = acts[name] = _random_block(rng, n, width, dtype)
        records.append(SequenceRecord(token_ids=list(1000 * i + np.arange(n)), tokens=[f"t{j}" for j in range(n)],
                                      text=f"prompt {i}", activations=acts))
    db = LatentDB(path)
    with db.run(kind="custom") as run:
        run.write(records, dtypes={name: dtype for name, _, _, dtype in layers},
                  layer_meta={name: {"hook_name": hook} for name, hook, _, _ in layers})
    return db, data


def _table(folder: Path) -> pa.Table:
    files = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    tables = []
    for name in files:
        with pa.memory_map(str(folder / name)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


def _values(column: pa.ChunkedArray) -> np.ndarray:
    """A column's innermost values as raw bits (Arrow's equals says NaN != NaN)."""
    arr = column.combine_chunks()
    while not pa.types.is_primitive(arr.type):
        arr = (arr.storage if isinstance(arr, pa.ExtensionArray) else arr).flatten()
    values = arr.to_numpy(zero_copy_only=False)
    return values.view({2: np.uint16, 4: np.uint32}[values.dtype.itemsize])


def assert_same_cache(a: Path, b: Path) -> None:
    """Same schema (types, extension metadata, features), same values bit for bit, same dataset_info.json."""
    first, second = _table(a), _table(b)
    assert first.schema.equals(second.schema, check_metadata=True)
    assert first.num_rows == second.num_rows
    for column in first.column_names:
        assert np.array_equal(_values(first.column(column)), _values(second.column(column))), column
    assert (a / "dataset_info.json").read_bytes() == (b / "dataset_info.json").read_bytes()


def _stored(db: LatentDB, layer: str) -> dict[int, np.ndarray]:
    return dict(db.iter_sequence_blocks(layer))


def _ids(db: LatentDB) -> dict[int, np.ndarray]:
    tokens = db.tokens(metrics=False)
    return {int(i): g["token_id"].to_numpy() for i, g in tokens.groupby("prompt_index")}


# ------------------------------------------------------------------------------------ round trips
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chosen=st.lists(st.tuples(st.sampled_from(range(len(LAYERS))), st.integers(1, 6),
                                 st.sampled_from(["float16", "float32"])), min_size=1, max_size=3,
                       unique_by=lambda t: t[0]),
       n_prompts=st.integers(1, 5), ctx=st.integers(1, 5), shuffle=st.booleans(), seed=st.integers(0, 2**16),
       one_row_files=st.booleans())
def test_store_cache_store_is_bit_exact(chosen, n_prompts, ctx, shuffle, seed, one_row_files):
    layers = [(*LAYERS[i], width, dtype) for i, width, dtype in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        db, data = _store(tmp / "a.db", layers, [ctx] * n_prompts, seed)
        cache = export_saelens_cache(db, tmp / "cache", shuffle=shuffle, seed=seed,
                                     max_shard_size=1 if one_row_files else 10**9)
        assert (cache.context_size, cache.n_sequences) == (ctx, n_prompts)
        assert len(cache.files) == (n_prompts if one_row_files else 1)
        assert sorted(cache.hook_names) == sorted(hook for _, hook, _, _ in layers)
        assert read_saelens_cache(tmp / "cache") == cache
        back = LatentDB(tmp / "b.db")
        result = import_saelens_cache(tmp / "cache", back)
        assert result.layers == {hook: name for name, hook, _, _ in layers}  # hook names map to store names
        ids = _ids(back)
        origin = {new: int(row[0]) // 1000 for new, row in ids.items()}  # token ids say where a row came from
        assert sorted(origin.values()) == list(range(n_prompts))
        if not shuffle:
            assert [origin[i] for i in result.prompt_indices] == list(range(n_prompts))
        for new, row in ids.items():
            np.testing.assert_array_equal(row, 1000 * origin[new] + np.arange(ctx))
        for name, hook, width, dtype in layers:
            info = back.layer_info(name)
            assert (info.width, info.dtype, info.hook_name) == (width, dtype, hook)
            for new, block in _stored(back, name).items():
                assert np.array_equal(_bits(block, dtype), _bits(data[name][origin[new]], dtype))
        again = export_saelens_cache(back, tmp / "again")  # cache -> store -> cache: the same columns
        assert again.columns == cache.columns
        assert_same_cache(tmp / "cache", tmp / "again")  # rows come back in the cache's order, shuffled or not
        db.close()
        back.close()


def test_bfloat16_layers_export_as_exact_float32_and_import_back(tmp_path):
    _, data = _store(tmp_path / "a.db", [("llm.layer.0", "blocks.0.hook_resid_post", 4, "float32")], [3, 3])
    bf = LatentDB(tmp_path / "bf.db")
    with bf.run() as run:
        run.write([SequenceRecord(token_ids=[1, 2, 3], tokens=["a", "b", "c"], activations={"llm.layer.0": block})
                   for block in data["llm.layer.0"].values()], dtypes={"llm.layer.0": "bfloat16"})
    cache = export_saelens_cache(bf, tmp_path / "cache")
    assert cache.columns[0].dtype == "float32"
    back = LatentDB(tmp_path / "b.db")
    import_saelens_cache(tmp_path / "cache", back, dtype="bfloat16")
    for (_, a), (_, b) in zip(bf.iter_sequence_blocks("llm.layer.0"), back.iter_sequence_blocks("llm.layer.0")):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_ragged_prompts_export_only_whole_rows_never_padded(tmp_path):
    layers = [("llm.layer.0", "blocks.0.hook_resid_post", 3, "float32")]
    db, data = _store(tmp_path / "a.db", layers, [3, 5, 5, 7, 2])
    with pytest.raises(ShapeError, match=r"1 of 2 positions, 1 of 3 positions, 2 of 5 positions.*context_size=5"):
        export_saelens_cache(db, tmp_path / "c0")
    assert not (tmp_path / "c0").exists()
    exact = export_saelens_cache(db, tmp_path / "c1", context_size=5)
    assert exact.n_sequences == 2
    cut = export_saelens_cache(db, tmp_path / "c2", context_size=5, truncate=True)
    assert cut.n_sequences == 3
    back = LatentDB(tmp_path / "b.db")
    import_saelens_cache(tmp_path / "c2", back)
    stored = list(back.iter_sequence_blocks("llm.layer.0"))
    for (_, got), want in zip(stored, [data["llm.layer.0"][i][:5] for i in (1, 2, 3)]):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # prompt 3: its first 5 positions
    with pytest.raises(NotEnoughDataError, match="exactly 4 positions"):
        export_saelens_cache(db, tmp_path / "c3", context_size=4)


def test_import_chooses_and_renames_hooks_and_keeps_token_texts_empty_without_a_tokenizer(tmp_path):
    layers = [(*LAYERS[0], 4, "float16"), (*LAYERS[1], 6, "float32")]
    db, data = _store(tmp_path / "a.db", layers, [2, 2, 2])
    export_saelens_cache(db, tmp_path / "cache", prompt_indices=[2, 0])
    back = LatentDB(tmp_path / "b.db")
    result = import_saelens_cache(tmp_path / "cache", back, layers={"blocks.1.hook_mlp_out": "mine"},
                                  model_name="tiny", batch_size=1)
    assert back.layers() == ["mine"] and result.prompt_indices == [0, 1] and result.n_tokens == 4
    assert back.layer_info("mine").meta["model"] == "tiny" and back.resolve_layer("blocks.1.hook_mlp_out") == "mine"
    got = _stored(back, "mine")
    assert np.array_equal(got[1].view(np.uint32), data["llm.layer.1.mlp_out"][2].view(np.uint32))
    tokens = back.tokens(metrics=False)
    assert tokens["token"].tolist() == [""] * 4 and back.sequences()["text"].isna().all()
    runs = back.runs()
    assert runs["kind"].tolist() == ["import"] and runs["status"].tolist() == ["complete"]
    more = import_saelens_cache(tmp_path / "cache", back, layers=["blocks.1.hook_mlp_out"])  # a list names hooks
    assert more.layers == {"blocks.1.hook_mlp_out": "llm.layer.1.mlp_out"} and more.prompt_indices == [2, 3]


# ------------------------------------------------------------------------------------ errors
def test_errors_say_what_was_expected(tmp_path):
    layers = [(*LAYERS[0], 4, "float32")]
    db, _ = _store(tmp_path / "a.db", layers, [2, 2])
    export_saelens_cache(db, tmp_path / "cache")
    target = LatentDB(tmp_path / "t.db")
    with pytest.raises(ArtifactError, match="does not exist"):
        import_saelens_cache(tmp_path / "nowhere", target)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match=r"not a SAELens activation cache.*notes.txt"):
        import_saelens_cache(tmp_path / "junk", target)
    with pytest.raises(LayerNotFoundError, match="did you mean 'blocks.0.hook_resid_post'"):
        import_saelens_cache(tmp_path / "cache", target, layers=["blocks.0.hook_resid_pre"])
    with pytest.raises(OutputError, match="not empty"):
        export_saelens_cache(db, tmp_path / "cache")
    replaced = export_saelens_cache(db, tmp_path / "cache", prompt_indices=[1], overwrite=True)
    assert read_saelens_cache(tmp_path / "cache").n_sequences == replaced.n_sequences == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it
    with pytest.raises(ConfigError, match="dtype"):
        export_saelens_cache(db, tmp_path / "c2", dtype="bfloat16")
    wide, _ = _store(tmp_path / "w.db", [("llm.layer.0", "blocks.0.hook_resid_post", 9, "float32")], [2])
    with pytest.raises(ShapeError, match=r"width 9.*d_in 4.*layers="):
        import_saelens_cache(tmp_path / "cache", wide)
    assert wide.prompt_indices() == [0]  # nothing written
    big = LatentDB(tmp_path / "big.db")
    with big.run() as run:
        run.write([SequenceRecord(token_ids=[0], tokens=["a"], activations={"llm.layer.0": np.full((1, 2), 1e6)})],
                  dtypes={"llm.layer.0": "float32"})
    with pytest.raises(DtypeRangeError, match="dtype='float32'"):
        export_saelens_cache(big, tmp_path / "c3", dtype="float16")
    assert not (tmp_path / "c3").exists()
    with big.run() as run:
        run.write([SequenceRecord(token_ids=[0], tokens=["a"], activations={"llm.layer.1": np.ones((1, 2))})])
    with pytest.raises(ConfigError, match=r"not stored for prompts \[1\]"):
        export_saelens_cache(big, tmp_path / "c4")


def test_a_damaged_cache_is_an_artifact_error(tmp_path):
    db, _ = _store(tmp_path / "a.db", [(*LAYERS[0], 64, "float32")], [8] * 4)
    cache = export_saelens_cache(db, tmp_path / "cache")
    data = tmp_path / "cache" / cache.files[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="damaged"):
        import_saelens_cache(tmp_path / "cache", LatentDB(tmp_path / "b.db"))
    (tmp_path / "cache" / "state.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON list"):
        read_saelens_cache(tmp_path / "cache")


# ------------------------------------------------------------------------------------ datasets / SAELens
@needs_datasets
def test_the_export_is_what_datasets_save_to_disk_writes(tmp_path):
    from datasets import Array2D, Dataset, Features, Sequence, Value, load_from_disk

    layers = [(*LAYERS[0], 4, "float16"), (*LAYERS[1], 3, "float32")]
    db, data = _store(tmp_path / "a.db", layers, [5, 5, 5])
    export_saelens_cache(db, tmp_path / "cache")
    features = Features({"blocks.0.hook_resid_post": Array2D((5, 4), "float16"),
                         "blocks.1.hook_mlp_out": Array2D((5, 3), "float32"),
                         "token_ids": Sequence(Value("int32"), length=5)})
    reference = Dataset.from_dict({"blocks.0.hook_resid_post": np.stack(list(data["llm.layer.0"].values())),
                                   "blocks.1.hook_mlp_out": np.stack(list(data["llm.layer.1.mlp_out"].values())),
                                   "token_ids": [list(1000 * i + np.arange(5)) for i in range(3)]}, features=features)
    reference.save_to_disk(str(tmp_path / "reference"), num_shards=1)
    assert_same_cache(tmp_path / "cache", tmp_path / "reference")
    loaded = load_from_disk(str(tmp_path / "cache"))
    assert loaded.features == features and len(loaded) == 3


@needs_datasets
def test_a_cache_without_token_ids_imports_with_unknown_ids(tmp_path, caplog):
    from datasets import Array2D, Dataset, Features

    values = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    Dataset.from_dict({"blocks.0.hook_resid_post": values},
                      features=Features({"blocks.0.hook_resid_post": Array2D((3, 4), "float32")})
                      ).save_to_disk(str(tmp_path / "old"))
    db = LatentDB(tmp_path / "b.db")
    import_saelens_cache(tmp_path / "old", db)
    assert "no token_ids" in caplog.text
    assert (db.tokens()["token_id"] == -1).all()
    np.testing.assert_array_equal(np.stack([b for _, b in db.iter_sequence_blocks("llm.layer.0")]), values)
    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(ArtifactError, match="not an Array2D"):
        import_saelens_cache(tmp_path / "text", db)


CTX, N_SEQ, BATCH = 8, 12, 2


@pytest.fixture(scope="module")
def tiny_hooked(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=48,
                                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=0)
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


def _runner_cache(model, out: Path, hook: str, dtype: str, tokens: torch.Tensor):
    """A cache written by SAELens's CacheActivationsRunner over the pretokenized ``tokens``, the
    model given in place of one it would download; three shards of four sequences."""
    import sae_lens.cache_activations_runner as runner_module
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    cfg = CacheActivationsRunnerConfig(
        dataset_path="pretokenized", model_name="tiny", model_batch_size=BATCH, hook_name=hook, d_in=16,
        training_tokens=N_SEQ * CTX, context_size=CTX, new_cached_activations_path=str(out), shuffle=False,
        dtype=dtype, device="cpu", prepend_bos=False,
        buffer_size_gb=2 * BATCH * CTX * 16 * np.dtype(dtype).itemsize / 1e9)  # two batches a shard
    load_model = runner_module.load_model
    runner_module.load_model = lambda *args, **kwargs: model
    try:
        runner = CacheActivationsRunner(cfg, override_dataset=Dataset.from_dict({"tokens": tokens.tolist()}))
        runner.run()
    finally:
        runner_module.load_model = load_model
    return runner


@needs_datasets
@pytest.mark.parametrize(("hook", "dtype"), [("blocks.1.hook_resid_post", "float32"),
                                             ("blocks.0.hook_mlp_out", "float16")])
def test_a_cache_saelens_writes_imports_as_run_with_cache_and_exports_back_the_same(tmp_path, tiny_hooked,
                                                                                      tokenizer, hook, dtype):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, len(tokenizer), (N_SEQ, CTX), generator=gen)
    runner = _runner_cache(tiny_hooked, tmp_path / "theirs", hook, dtype, tokens)
    assert len(read_saelens_cache(tmp_path / "theirs").files) == 3
    db = LatentDB(tmp_path / "s.db")
    result = import_saelens_cache(tmp_path / "theirs", db, tokenizer=tiny_hooked, model_name="tiny")
    layer = result.layers[hook]
    assert db.layer_info(layer).hook_name == hook and db.layer_info(layer).dtype == dtype
    with torch.no_grad():  # the oracle: the model's own cache, batch by batch as the runner ran it
        want = torch.cat([tiny_hooked.run_with_cache(tokens[i:i + BATCH], names_filter=[hook])[1][hook]
                          for i in range(0, N_SEQ, BATCH)]).numpy().astype(dtype)
    got = np.stack([b for _, b in db.iter_sequence_blocks(layer)])
    assert np.array_equal(_bits(got, dtype), _bits(want, dtype))
    ids = _ids(db)
    np.testing.assert_array_equal(np.stack([ids[i] for i in sorted(ids)]), tokens.numpy())
    texts = db.tokens(prompt_index=0, metrics=False)["token"].tolist()
    assert texts == [tokenizer.decode([int(i)]) for i in tokens[0]]
    assert db.sequences()["text"][0] == tokenizer.decode(tokens[0].tolist())
    export_saelens_cache(db, tmp_path / "ours")
    assert_same_cache(tmp_path / "theirs", tmp_path / "ours")
    assert _table(tmp_path / "theirs").equals(_table(tmp_path / "ours"))  # no NaNs here: Arrow's own equality too
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "ours")).features == runner.features


@needs_datasets
def test_saelens_trains_on_an_exported_cache(tmp_path, tiny_hooked, tokenizer, monkeypatch):
    from conftest import CORPUS
    from datasets import Dataset
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
    )
    from sae_lens.training import sae_trainer

    from interlatent import LLMCollector

    db = LatentDB(tmp_path / "s.db")
    LLMCollector(db, layer_indices=[1], batch_size=2).run(tiny_hooked, tokenizer, prompts=[f"{text} {k}" for k in range(3) for text in CORPUS])
    shortest = int(db.sequences()["n_positions"].min())
    cache: SAELensCache = export_saelens_cache(db, tmp_path / "cache", context_size=shortest, truncate=True)
    assert cache.n_sequences == 15 and cache.columns[0].dtype == "float16"
    exported = np.stack([b[:shortest] for _, b in db.iter_sequence_blocks("llm.layer.1")])

    losses: list[float] = []
    step = sae_trainer.SAETrainer.step

    def recording_step(self, batch):
        out = step(self, batch)
        losses.append(float(out.loss.detach()))
        return out

    monkeypatch.setattr(sae_trainer.SAETrainer, "step", recording_step)
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=16, d_sae=32, l1_coefficient=1e-3), model_name="tiny",
        hook_name="blocks.1.hook_resid_post", use_cached_activations=True,
        cached_activations_path=str(tmp_path / "cache"), context_size=shortest,
        training_tokens=32 * 60, train_batch_size_tokens=32, store_batch_size_prompts=3,
        n_batches_in_buffer=8, lr=1e-2, device="cpu", logger=LoggingConfig(log_to_wandb=False), output_path=None,
        checkpoint_path=None, n_eval_batches=0, verbose=False, dtype="float32")
    ids = [[int(i) for i in row] for row in _table(tmp_path / "cache").column("token_ids").to_pylist()]
    runner = LanguageModelSAETrainingRunner(cfg, override_model=tiny_hooked,
                                            override_dataset=Dataset.from_dict({"tokens": ids}))
    acts, token_ids = runner.activations_store.get_raw_llm_batch()  # what SAELens reads is what was exported
    assert np.array_equal(acts.numpy(), exported[:3].reshape(-1, 16).astype(np.float32))
    assert token_ids.tolist() == [i for row in ids[:3] for i in row]
    runner.activations_store.current_row_idx = 0
    w_enc = runner.sae.W_enc.detach().clone()
    sae = runner.run()
    assert len(losses) == 60 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    assert not torch.equal(sae.W_enc.detach(), w_enc)


def _cli(*argv: str) -> tuple[int, str, str]:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "interlatent.cli", *argv], capture_output=True, text=True,
                          check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_exports_and_imports_a_saelens_cache_bit_exact(tmp_path):
    src = _store(tmp_path / "src.db", [("llm.layer.0", "blocks.0.hook_resid_post", 6, "float16"),
                                      ("llm.layer.1", "blocks.1.hook_resid_post", 5, "float32")], [4, 4, 4], seed=3)[0]
    src.close()
    rc, out, err = _cli("export", str(tmp_path / "src.db"), str(tmp_path / "cache"), "--saelens-cache",
                        "--layers", "llm.layer.0", "llm.layer.1")
    assert rc == 0, err
    assert "3 sequences x 4 positions" in out and "blocks.1.hook_resid_post" in out
    rc, out, err = _cli("import", str(tmp_path / "cache"), str(tmp_path / "back.db"), "--activations", "parquet")
    assert rc == 0, err
    assert "added 3 sequences (12 tokens)" in out
    with LatentDB(tmp_path / "src.db", mode="r") as a, LatentDB(tmp_path / "back.db", mode="r") as b:
        assert b.activation_tier == "parquet"
        for layer, dtype in (("llm.layer.0", "float16"), ("llm.layer.1", "float32")):
            got, want = _stored(b, layer), _stored(a, layer)
            assert sorted(got) == sorted(want)
            for i in want:
                assert np.array_equal(_bits(got[i], dtype), _bits(want[i], dtype))
        assert {i: v.tolist() for i, v in _ids(a).items()} == {i: v.tolist() for i, v in _ids(b).items()}
    # a second import appends a run; an existing cache directory needs --force
    assert _cli("import", str(tmp_path / "cache"), str(tmp_path / "back.db"))[0] == 0
    with LatentDB(tmp_path / "back.db", mode="r") as b:
        assert len(b.prompt_indices()) == 6
    rc, _, err = _cli("export", str(tmp_path / "src.db"), str(tmp_path / "cache"), "--saelens-cache")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert _cli("export", str(tmp_path / "src.db"), str(tmp_path / "cache"), "--saelens-cache", "--force")[0] == 0


@pytest.mark.parametrize("argv", [
    ["export", "SRC", "DST", "--layers", "llm.layer.0"],            # cache options without --saelens-cache
    ["export", "SRC", "DST", "--saelens-cache", "--truncate"],      # --truncate without --context-size
    ["export", "SRC", "DST", "--saelens-cache", "--context-size", "0"],
    ["export", "SRC", "DST", "--saelens-cache", "--activations", "parquet"],
    ["import", "CACHE", "DST", "--context-size", "4"],
])
def test_cli_cache_usage_errors_are_one_line_exit_2(tmp_path, argv):
    (tmp_path / "CACHE").mkdir()
    argv = [str(tmp_path / a) if a in ("SRC", "DST", "CACHE") else a for a in argv]
    rc, _, err = _cli(*argv)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "DST").exists()


def test_cli_import_of_a_directory_that_is_not_a_cache_creates_nothing(tmp_path):
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "x.txt").write_text("hello")
    rc, _, err = _cli("import", str(tmp_path / "notacache"), str(tmp_path / "dst.db"))
    assert rc == 1 and "not a SAELens activation cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "dst.db").exists()
