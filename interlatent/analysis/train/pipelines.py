"""``SAEPipeline`` and ``TranscoderPipeline``: store -> train -> evaluate -> save -> backfill.

``.run()`` holds out prompts (never tokens of a prompt, nor copies of one text, on both sides),
streams shuffled training chunks from the store, fits the dictionary, evaluates its final weights on
the held-out prompts (FVU / explained variance, MSE, L0, dead fraction), saves it (safetensors +
JSON config, with the held-out prompts recorded under ``metadata["split"]``) and records it in the
store, then writes its latents for every stored token as a layer named from the canonical source
layer (``latent_sae:{layer}`` / ``latent:{layer}``, sparse for TopK) with the top activating
examples of every latent. A re-train builds the new layer aside and swaps it in with one commit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interlatent import naming
from interlatent.analysis.models import SparseAutoencoder, SparseCoder, SparseCoderConfig, Transcoder, save_module
from interlatent.analysis.train.fit import FitResult, TrainConfig, fit
from interlatent.db import LatentDB, SparseActs
from interlatent.errors import (
    ConfigError,
    LayerNotFoundError,
    NotEnoughDataError,
    ShapeError,
    TrainingDivergedError,
)

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a pipeline produced."""

    module: SparseCoder
    metrics: dict[str, float]
    artifact_id: int
    path: Path
    latent_layer: str | None
    fit: FitResult


def split_prompts(indices: list[int], val_fraction: float, seed: int,
                  groups: list[Any] | None = None) -> tuple[list[int], list[int]]:
    """A seeded split of prompt indices into train and held-out (at least one each when possible).

    ``groups`` (one sortable label per index, e.g. from :func:`split_groups`) keeps prompts with
    one label on one side; the fraction then counts groups. Without it every prompt is its own group.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    units: dict[Any, list[int]] = {}
    for label, index in sorted(zip(indices if groups is None else groups, indices)):
        units.setdefault(label, []).append(index)
    members = list(units.values())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(members))
    n_val = int(round(len(members) * val_fraction))
    if val_fraction > 0 and len(members) >= 2:
        n_val = min(max(n_val, 1), len(members) - 1)
    val = sorted(i for u in order[:n_val] for i in members[u])
    train = sorted(i for u in order[n_val:] for i in members[u])
    return train, val


def split_groups(db: LatentDB, indices: list[int], split_key: str | None = None) -> list[Any]:
    """One label per prompt of ``indices`` such that prompts with the same text (a store may hold
    a text several times) share a label, and with ``split_key`` so do prompts with the same value
    of that context key. A group's label is the smallest of its members' own labels (the prompt
    index, or ``str`` of the ``split_key`` value), so without duplicates nothing is merged."""
    seqs = db.sequences()
    text_of = dict(zip(seqs["prompt_index"], seqs["text"]))
    own: dict[int, Any] = ({p: p for p in indices} if split_key is None else
                           {p: str(c.get(split_key)) for p, c in zip(seqs["prompt_index"], seqs["context"])})
    parent = {p: p for p in indices}

    def find(p: int) -> int:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    first: dict[Any, int] = {}
    for p in indices:
        for key in (("text", text_of.get(p)), ("group", own.get(p, p)) if split_key is not None else None):
            if key is None or key[1] is None or key[1] != key[1]:  # no text (a Gym episode): its own group
                continue
            if key in first:
                parent[find(p)] = find(first[key])
            else:
                first[key] = p
    label: dict[int, Any] = {}
    for p in indices:
        root = find(p)
        mine = own.get(p, p)
        label[root] = mine if root not in label else min(label[root], mine)
    return [label[find(p)] for p in indices]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class _Pipeline:
    """Shared steps of the two pipelines."""

    kind = "sparse_coder"
    latent_prefix = "latent:"
    backfill_tokens = 16_384
    """Tokens of latents written per transaction while backfilling."""

    def __init__(
        self,
        db: LatentDB,
        layer: str,
        *,
        k: int | None = 32,
        d_sae: int | None = None,
        expansion: int = 8,
        activation: str = "topk",
        steps: int | None = None,
        batch_size: int = 4096,
        lr: float = 1e-2,
        l1_coefficient: float = 1e-3,
        auxk: bool = True,
        val_fraction: float = 0.1,
        seed: int = 0,
        out_dir: str | Path | None = None,
        backfill: bool = True,
        latent_dtype: str = "float16",
        examples_top: int = 32,
        progress: bool | None = None,
        train_config: TrainConfig | None = None,
        init: str | None = None,
    ) -> None:
        if init not in (None, "samples", "random"):
            raise ConfigError(f"init must be 'samples', 'random' or None (the architecture's default), got {init!r}")
        if activation == "relu":
            k = None
        self.db = db
        self.layer = layer
        self.k = k
        self.d_sae = d_sae
        self.expansion = expansion
        self.activation = activation
        self.steps = steps
        self.batch_size = batch_size
        self.l1_coefficient = l1_coefficient
        self.val_fraction = val_fraction
        self.seed = seed
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.backfill = backfill
        self.latent_dtype = latent_dtype
        self.examples_top = examples_top
        self.progress = progress
        self.train_config = train_config or TrainConfig(lr=lr, auxk=auxk)
        self.init = init

    # subclasses: which stored layers feed the model, and how to build it
    def _canonical_layer(self) -> str:
        return self.db.resolve_layer(self.layer)

    def _io_layers(self) -> tuple[str, str | None]:
        raise NotImplementedError

    def _build(self, d_in: int, d_out: int) -> SparseCoder:
        raise NotImplementedError

    def _chunks(self, layers: list[str], prompts: list[int], chunk: int, shuffle: bool,
                seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for values, _ in self.db.iter_activation_chunks(layers if len(layers) > 1 else layers[0], chunk_size=chunk,
                                                        shuffle=shuffle, seed=seed, prompt_indices=prompts):
            if len(layers) > 1:
                yield torch.from_numpy(values[0]), torch.from_numpy(values[1])
            else:
                yield torch.from_numpy(values), None

    def run(self) -> TrainResult:
        """Train, evaluate, save, record and backfill. Returns the module and its held-out metrics."""
        self.layer = self._canonical_layer()  # one layer, one name: artifacts and latents use the stored one
        in_layer, out_layer = self._io_layers()
        layers = [in_layer] if out_layer is None else [in_layer, out_layer]
        for name in layers:
            self.db.check_complete(name, what=f"{self.kind} training")
        d_in = self.db.layer_info(in_layer).width
        d_out = self.db.layer_info(out_layer).width if out_layer else d_in
        prompts = self.db.prompt_indices(in_layer)
        if out_layer is not None:
            have = set(self.db.prompt_indices(out_layer))
            prompts = [p for p in prompts if p in have]
        if len(prompts) < 2 and self.val_fraction > 0:
            raise NotEnoughDataError(f"{in_layer!r} has {len(prompts)} prompt(s); a held-out split needs at least 2 "
                                     "(or pass val_fraction=0)")
        train, val = split_prompts(prompts, self.val_fraction, self.seed, split_groups(self.db, prompts))
        n_train = self._count(in_layer, train)
        if n_train == 0:
            raise NotEnoughDataError(f"no training tokens in {in_layer!r}")
        batch = int(min(self.batch_size, max(64, n_train // 4)))
        steps = self.steps or int(np.clip(math.ceil(5 * n_train / batch), 200, 5000))
        torch.manual_seed(self.seed)
        model = self._build(d_in, d_out)
        x0, y0 = next(self._chunks(layers, train, min(n_train, 8192), True, self.seed))
        model.init_from_data(x0, y0, weights=self.init, seed=self.seed)

        def batches() -> Iterator[Any]:
            # exactly `batch` rows each: an epoch's remainder joins the next epoch's first rows, so no
            # step sees a handful of rows (whose variance, FVU's denominator, can be near zero)
            epoch, carry_x, carry_y = 0, None, None
            while True:
                for x, y in self._chunks(layers, train, batch, True, self.seed + 1 + epoch):
                    if carry_x is not None:
                        x = torch.cat([carry_x, x])
                        y = None if y is None else torch.cat([carry_y, y])
                    while x.shape[0] >= batch:
                        yield x[:batch] if y is None else (x[:batch], y[:batch])
                        x, y = x[batch:], (None if y is None else y[batch:])
                    carry_x, carry_y = (x, y) if x.shape[0] else (None, None)
                epoch += 1

        fitted = fit(model, batches(), steps, self.train_config, progress=self.progress)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never save or backfill a diverged dictionary
            raise TrainingDivergedError(f"training {self.kind} on {self.layer!r} diverged: {bad} hold NaN or inf; "
                                        f"lower lr (now {self.train_config.lr}) or set TrainConfig(grad_clip=1.0)")
        eval_prompts = val if val else train
        model.cfg.metadata["split"] = {"val_fraction": self.val_fraction, "seed": self.seed, "held_out": bool(val),
                                       "eval_prompt_indices": [int(p) for p in eval_prompts]}
        metrics = self.evaluate(model, layers, eval_prompts, fitted)
        metrics.update({"steps": fitted.steps, "train_tokens": n_train, "batch_size": batch,
                        "val_prompts": len(val), "train_prompts": len(train)})
        path, artifact_id = self._save(model, metrics, in_layer, out_layer)
        latent_layer = None
        if self.backfill:
            latent_layer = self._backfill(model, in_layer, artifact_id)
        log.info("%s on %s: %s", self.kind, self.layer, {k: round(v, 4) for k, v in metrics.items()
                                                         if isinstance(v, float)})
        return TrainResult(model, metrics, artifact_id, path, latent_layer, fitted)

    def _count(self, layer: str, prompts: list[int]) -> int:
        seqs = self.db.sequences()
        return int(seqs.loc[seqs["prompt_index"].isin(prompts), "n_positions"].sum())

    @torch.no_grad()
    def evaluate(self, model: SparseCoder, layers: list[str], prompts: list[int], fitted: FitResult) -> dict[str, float]:
        """Held-out FVU, explained variance, MSE, L0 and dead fraction, all from the final weights.

        ``dead_fraction`` counts latents that never fire on the held-out tokens; the count over the
        training window (a latent that fired at any step is alive there, even if the final weights
        never fire it) is ``dead_fraction_train_window``."""
        err = tot_sq = 0.0
        s = None
        n = 0
        l0 = 0.0
        fired = torch.zeros(model.d_sae, dtype=torch.long)
        for x, y in self._chunks(layers, prompts, 8192, False, 0):
            target = x if y is None else y
            enc = model.encode(x)
            out = model.decode(enc.latent_acts, enc.latent_indices, x=x)
            t64 = target.double()
            err += float((t64 - out.double()).pow(2).sum())
            tot_sq += float(t64.pow(2).sum())
            s = t64.sum(0) if s is None else s + t64.sum(0)
            n += target.shape[0]
            active = enc.latent_acts > 0
            l0 += float(active.sum())
            if enc.latent_indices is not None:
                fired += torch.bincount(enc.latent_indices[active], minlength=model.d_sae)
            else:
                fired += active.sum(0)
        if n == 0:
            raise NotEnoughDataError("no held-out tokens to evaluate on")
        d = model.cfg.out_dim
        total_var = tot_sq - float((s * s).sum()) / n
        fvu = err / max(total_var, 1e-30)
        return {"fvu": fvu, "explained_variance": 1.0 - fvu, "mse": err / (n * d), "l0": l0 / n,
                "dead_fraction": float((fired == 0).float().mean()),
                "dead_fraction_train_window": fitted.dead_fraction, "eval_tokens": n}

    def _save(self, model: SparseCoder, metrics: dict[str, Any], in_layer: str, out_layer: str | None) -> tuple[Path, int]:
        folder = self.out_dir or self.db.path.parent / f"{self.db.path.stem}_artifacts"
        existing = len(self.db.artifacts())
        path = folder / f"{existing:03d}_{self.kind}_{_safe(self.layer)}"
        source = self.db.layer_info(in_layer)
        hook_name = source.hook_name or naming.tl_hook_name(in_layer)
        model.cfg.metadata.update({"layer": self.layer, "in_layer": in_layer, "out_layer": out_layer,
                                   "hook_name": hook_name, "block": source.meta.get("block", naming.block_of(
                                       hook_name or in_layer)), "model": source.meta.get("model"),
                                   "train": {"lr": self.train_config.lr, "schedule": self.train_config.lr_schedule,
                                             "seed": self.seed}})
        save_module(model, path)
        artifact_id = self.db.add_artifact(
            f"{self.kind}:{self.layer}", self.kind, architecture=model.architecture, layer=self.layer,
            path=path.resolve(), config=model.config_dict(), metrics=metrics)
        return path, artifact_id

    def _backfill(self, model: SparseCoder, in_layer: str, artifact_id: int) -> str:
        """Write the latents of every stored token as ``{latent_prefix}{layer}`` (see :func:`backfill`)."""
        return backfill(self.db, model, in_layer, name=f"{self.latent_prefix}{self.layer}", source=self.layer,
                        artifact_id=artifact_id, latent_dtype=self.latent_dtype, examples_top=self.examples_top,
                        chunk_tokens=self.backfill_tokens, stats=False)


class SAEPipeline(_Pipeline):
    """Train a sparse autoencoder on a stored layer; backfill ``latent_sae:{layer}``.

    Args:
        db: the store. layer: the stored layer to reconstruct, in any spelling the store resolves
            (``llm.layer.1``, ``blocks.1.hook_resid_post``, ``llm.layer.-1``): the artifact and the
            latent layer are named from the stored name.
        k: active latents per token (TopK). d_sae: dictionary width (default ``expansion * width``).
        activation: ``"topk"`` (default) or ``"relu"`` (ReLU + L1 with ``l1_coefficient``).
        steps: training steps (default: ~5 epochs, between 200 and 5,000). batch_size: tokens per step.
        lr: peak Adam learning rate. auxk: AuxK loss on dead latents (TopK).
        val_fraction: prompts held out for evaluation. seed: split, init and shuffling seed.
        out_dir: where the artifact folder goes (default: ``{db}_artifacts/`` next to the store).
        backfill: write the latents of every stored token back into the store.
        init: latent directions at the start: ``"random"`` (SAE default: encoder = decoder
            transpose of random unit rows) or ``"samples"`` (centred training samples); None takes
            the architecture's default.
        train_config: every optimisation setting at once (overrides ``lr`` and ``auxk``).
    """

    kind = "sae"
    latent_prefix = "latent_sae:"

    def _io_layers(self) -> tuple[str, str | None]:
        return self.db.resolve_layer(self.layer), None

    def _build(self, d_in: int, d_out: int) -> SparseCoder:
        cfg = SparseCoderConfig(d_in=d_in, d_sae=self.d_sae or self.expansion * d_in, k=self.k,
                                activation=self.activation, l1_coefficient=self.l1_coefficient)
        return SparseAutoencoder(cfg, seed=self.seed)


class TranscoderPipeline(_Pipeline):
    """Train a transcoder from a component's input to its output; backfill ``latent:{layer}``.

    For ``llm.layer.N`` the default is the MLP of block N: ``llm.layer.N.mlp_in`` (the MLP's input
    after its layer norm) to ``llm.layer.N.mlp_out``; for a Gym layer ``L``, ``L:pre`` to ``L:post``.
    ``in_layer`` / ``out_layer`` override them. ``skip=True`` adds a linear skip connection. By
    default each latent starts as a matched pair read from one training sample: its centred input
    (encoder) and its centred output (decoder) — ``init="random"`` for two unrelated random
    directions. Other arguments as :class:`SAEPipeline`.
    """

    kind = "transcoder"
    latent_prefix = "latent:"

    def __init__(self, db: LatentDB, layer: str, *, in_layer: str | None = None, out_layer: str | None = None,
                 skip: bool = False, **kwargs: Any) -> None:
        super().__init__(db, layer, **kwargs)
        self.in_layer = in_layer
        self.out_layer = out_layer
        self.skip = skip

    def default_io(self) -> tuple[str, str]:
        if self.in_layer and self.out_layer:
            return self.in_layer, self.out_layer
        pair = naming.transcoder_io(self.layer)
        return self.in_layer or pair[0], self.out_layer or pair[1]

    def _canonical_layer(self) -> str:
        """The stored name of ``layer`` when it is stored; else its canonical spelling
        (``blocks.N.hook_resid_post`` -> ``llm.layer.N``), a negative block resolved through the
        stored input layer (``llm.layer.-1`` -> ``llm.layer.2`` when ``llm.layer.2.mlp_in`` is stored)."""
        with contextlib.suppress(LayerNotFoundError):
            return self.db.resolve_layer(self.layer)
        name = naming.canonical_hook_name(self.layer)
        block = naming.block_of(name)
        if block is not None and block < 0 and name == f"llm.layer.{block}":
            with contextlib.suppress(LayerNotFoundError):
                real = naming.block_of(self.db.resolve_layer(naming.transcoder_io(name)[0]))
                if real is not None:
                    return f"llm.layer.{real}"
        return name

    def _io_layers(self) -> tuple[str, str | None]:
        in_name, out_name = self.default_io()
        resolved = []
        for role, name in (("input", in_name), ("output", out_name)):
            try:
                resolved.append(self.db.resolve_layer(name))
            except LayerNotFoundError as exc:
                how = ("collect it with LLMCollector(db, layer_indices=[N], hooks=['mlp_in', 'mlp_out'])"
                       if name.startswith("llm.layer.") else
                       "collect it with GymCollector(db, hook_layers=[...]), which records :pre and :post")
                raise LayerNotFoundError(f"the transcoder's {role} layer {name!r} is not in the store; {how}, or pass "
                                         f"in_layer=/out_layer=. ({exc})") from None
        return resolved[0], resolved[1]

    def _build(self, d_in: int, d_out: int) -> SparseCoder:
        cfg = SparseCoderConfig(d_in=d_in, d_sae=self.d_sae or self.expansion * max(d_in, d_out), k=self.k,
                                activation=self.activation, d_out=d_out, skip=self.skip,
                                l1_coefficient=self.l1_coefficient)
        return Transcoder(cfg, seed=self.seed)


def _latent_prefix(module: SparseCoder) -> str:
    return naming.TRANSCODER_PREFIX if isinstance(module, Transcoder) else naming.SAE_PREFIX


@torch.no_grad()
def backfill(db: LatentDB, module: SparseCoder, layer: str | None = None, *, name: str | None = None,
             source: str | None = None, artifact_id: int | None = None, out_dir: str | Path | None = None,
             latent_dtype: str = "float16", examples_top: int = 32, chunk_tokens: int = 16_384,
             stats: bool = True) -> str:
    """Run a dictionary that was not trained here (loaded with ``load_saelens`` / ``load_sparsify``,
    or any saved module) over a stored layer: its latents for every stored token, the top activating
    examples of every latent and (``stats=True``) per-latent statistics, as one latent layer.

    Args:
        db: the store (writable). module: an SAE, JumpReLU SAE or transcoder.
        layer: the stored layer it reads (a transcoder: its input layer), in any spelling the store
            resolves; default: the module's ``metadata["in_layer"]`` (set by the loaders).
        name: the latent layer (default ``latent_sae:{source}`` / ``latent:{source}``).
        source: the layer the latents describe (default: ``metadata["layer"]``, else ``layer``).
        artifact_id: the module's artifact in the store; without it the module is saved
            (safetensors + JSON) under ``out_dir`` (default ``{db}_artifacts/``) and recorded, so
            ``LatentPatch.from_db(db, name)`` loads it back.
        latent_dtype, examples_top, chunk_tokens: storage dtype, examples kept per latent, tokens
            written per transaction.

    The layer is written under a building name and swapped in for a stored ``name`` in one
    transaction: a crash before the swap keeps the previous layer, its examples and explanations;
    the next backfill of the name clears the leftover. Returns the latent layer's name.
    """
    if not isinstance(module, SparseCoder):
        raise ConfigError(f"backfill needs a SparseAutoencoder, JumpReLUSAE or Transcoder, got {type(module).__name__}")
    meta = module.cfg.metadata or {}
    wanted = layer or meta.get("in_layer") or meta.get("layer")
    if wanted is None:
        raise ConfigError("the module records no layer it reads; pass layer= (a stored layer, see db.layers())")
    in_layer = db.resolve_layer(wanted)
    info = db.layer_info(in_layer)
    if info.width != module.cfg.d_in:
        raise ShapeError(f"the dictionary reads width {module.cfg.d_in}, but stored layer {in_layer!r} has width "
                         f"{info.width}; backfill it over the layer it was trained on")
    if artifact_id is None:  # a pipeline checked its layers before training
        db.check_complete(in_layer, what="backfill")
    if source is None:
        recorded = meta.get("layer")
        source = in_layer if recorded is None else recorded
        with contextlib.suppress(LayerNotFoundError):
            source = db.resolve_layer(source)
    name = name or naming.latent_layer_name(_latent_prefix(module), source)
    module = module.eval()
    kind = "transcoder" if isinstance(module, Transcoder) else "sae"
    if artifact_id is None:
        hook_name = meta.get("hook_name") or info.hook_name or naming.tl_hook_name(in_layer)
        module.cfg.metadata.update({"layer": source, "in_layer": in_layer, "hook_name": hook_name,
                                    "model": meta.get("model") or info.meta.get("model")})
        folder = Path(out_dir) if out_dir is not None else db.path.parent / f"{db.path.stem}_artifacts"
        path = folder / f"{len(db.artifacts()):03d}_{kind}_{_safe(source)}"
        save_module(module, path)
        artifact_id = db.add_artifact(f"{kind}:{source}", kind, architecture=module.architecture, layer=source,
                                      path=path.resolve(), config=module.config_dict(),
                                      metrics={"imported": meta.get("imported")} if meta.get("imported") else {})
    built = naming.building_name(name)
    with contextlib.suppress(LayerNotFoundError):  # the leftover of a backfill that was killed
        db.delete_layer(built)
    layer_meta = {"kind": _latent_prefix(module).rstrip(":"), "source": source, "artifact_id": artifact_id,
                  "in_layer": in_layer, "activation": module.cfg.activation, "k": module.cfg.k}
    with db.run(kind="train", model=f"{kind}:{source}",
                config={"artifact_id": artifact_id, "layer": name}) as run:
        pending: list[tuple[int, Any]] = []
        size = 0
        for index, block in db.iter_sequence_blocks(in_layer):
            enc = module.encode(torch.from_numpy(block).to(module.W_enc.dtype))
            if enc.latent_indices is not None:
                acts: Any = SparseActs(enc.latent_indices.numpy(), enc.latent_acts.numpy(), module.d_sae)
            else:
                acts = enc.latent_acts.numpy()
            pending.append((index, acts))
            size += block.shape[0]
            if size >= chunk_tokens:
                db.write_activations(run.run_id, built, pending, dtype=latent_dtype, layer_meta=layer_meta)
                pending, size = [], 0
        if pending:
            db.write_activations(run.run_id, built, pending, dtype=latent_dtype, layer_meta=layer_meta)
        db.compute_latent_examples(built, top=examples_top)
        if stats:
            db.compute_stats(layers=[built])
        db.replace_layer(built, name)
    return name
