"""``SAEPipeline`` and ``TranscoderPipeline``: store -> train -> evaluate -> save -> backfill.

``.run()`` holds out prompts (never tokens of a prompt, nor copies of one text, on both sides),
streams shuffled training chunks from the store, fits the dictionary, evaluates its final weights on
the held-out prompts (FVU / explained variance, MSE, L0, dead fraction), saves it (safetensors +
JSON config, with the held-out prompts recorded under ``metadata["split"]``) and records it in the
store, then writes its latents for every stored token as a layer named from the canonical source
layer (``latent_sae:{layer}`` / ``latent:{layer}``, sparse for TopK) with the top activating
examples of every latent. A re-train builds the new layer aside and swaps it in with one commit.

``checkpoint_every=N`` writes a training checkpoint every N steps, by default under
``{artifacts}/checkpoints/{kind}_{layer}/``; ``resume=True`` continues from the latest one there
(ending exactly as an uninterrupted run). Once the artifact is saved and recorded the checkpoints
are deleted. Under torch.distributed every rank trains on its rows of each step's batch (see
:mod:`.distributed`); rank 0 alone reads the sample that initialises the dictionary (its weights
are broadcast), saves, records and backfills, and every rank returns its result.

``data_partitions=P`` deals the training prompts into ``P`` disjoint partitions, each read by a
stream of its own (:class:`.stream.PartitionedStream`) with ``1/P`` of one stream's shuffle buffer;
the global batch is their batches in partition order. Under ``W`` ranks (``P`` a multiple of ``W``;
by default ``P = W``) each rank reads only its ``P / W`` partitions, so the ranks read disjoint
prompts; one process with the same ``P`` reads them all and trains on the same batches.
``data_partitions=1`` under ``W`` ranks has every rank read the whole stream and keep its rows;
without the option one process reads one stream, as ever.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interlatent import naming
from interlatent.analysis.models import (
    SparseAutoencoder,
    SparseCoder,
    SparseCoderConfig,
    Transcoder,
    save_module,
)
from interlatent.analysis.train import checkpoint, distributed
from interlatent.analysis.train.backfill import backfill
from interlatent.analysis.train.fit import FitResult, TrainConfig, fit
from interlatent.analysis.train.splits import (  # re-exported: callers import them from here
    _safe,
    artifact_parent,
    new_artifact_folder,
    require_artifact_writable,
    split_groups,
    split_prompts,
    weights_sha256,
)
from interlatent.analysis.train.stream import (
    BatchStream,
    PartitionedStream,
    check_partitions,
    deal_prompts,
    partition_rows,
)
from interlatent.db import LatentDB
from interlatent.errors import (
    ConfigError,
    LayerNotFoundError,
    NotEnoughDataError,
    TrainingDivergedError,
)

log = logging.getLogger(__name__)
#: rows of the training stream's shuffle buffer (each of P data partitions holds 1/P of it)
SHUFFLE_BUFFER = 262_144
#: partitions whose token counts differ more than this (lightest / heaviest) are warned of
IMBALANCE = 0.8


@dataclass
class TrainResult:
    """What a pipeline produced."""

    module: SparseCoder
    metrics: dict[str, float]
    artifact_id: int
    path: Path
    latent_layer: str | None
    fit: FitResult


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
        lr: float | None = None,
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
        model: Any = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        data_partitions: int | None = None,
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
        self.model = model
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        if data_partitions is not None and data_partitions < 1:
            raise ConfigError(f"data_partitions must be >= 1 (or None), got {data_partitions}")
        self.data_partitions = data_partitions

    # subclasses: which stored layers feed the model, and how to build it
    def _canonical_layer(self) -> str:
        return self.db.resolve_layer(self.layer)

    def _io_layers(self) -> tuple[str, str | None]:
        raise NotImplementedError

    def _build(self, d_in: int, d_out: int) -> SparseCoder:
        raise NotImplementedError

    def _chunks(self, layers: list[str], prompts: list[int], chunk: int, shuffle: bool, seed: int, skip: int = 0,
                buffer: int = SHUFFLE_BUFFER) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for values, _ in self.db.iter_activation_chunks(layers if len(layers) > 1 else layers[0], chunk_size=chunk,
                                                        shuffle=shuffle, seed=seed, prompt_indices=prompts,
                                                        skip_chunks=skip, buffer_tokens=buffer):
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
        require_artifact_writable(self.db, artifact_parent(self.db, self.out_dir), f"{type(self).__name__}.run()",
                                  "or copy the store somewhere writable")
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
        rank, world = distributed.world()
        stream, parts = self._stream(layers, train, batch, rank, world)  # lazy: it reads nothing yet
        finite = True
        if rank == 0:  # under torch.distributed fit() gives every rank rank 0's initial weights
            x0, y0 = next(self._chunks(layers, train, min(n_train, 8192), True, self.seed))
            finite = bool(torch.isfinite(x0).all()) and (y0 is None or bool(torch.isfinite(y0).all()))
            if finite:
                model.init_from_data(x0, y0, weights=self.init, seed=self.seed)
        if world > 1:
            finite = int(distributed.all_sum(torch.tensor(int(not finite)))) == 0
        if not finite:
            self._raise_nonfinite(layers, train)
        ckpt_dir = self._checkpoint_folder()
        tag = {"kind": self.kind, "layer": self.layer, "in_layer": in_layer, "out_layer": out_layer, "seed": self.seed,
               "batch": batch, "train_tokens": n_train, "init": self.init, "val_fraction": self.val_fraction,
               "train_prompts_sha256": hashlib.sha256(json.dumps([int(p) for p in train]).encode()).hexdigest(),
               **({"data_partitions": parts} if parts > 1 else {})}
        try:
            fitted = fit(model, stream, steps, self.train_config, progress=self.progress, checkpoint_dir=ckpt_dir,
                         checkpoint_every=self.checkpoint_every, resume=self.resume, checkpoint_tag=tag)
        except TrainingDivergedError:
            self._raise_nonfinite(layers, train)
            raise
        if fitted.skipped_steps:  # a NaN or inf past the first chunk skips steps instead of failing them
            self._raise_nonfinite(layers, train)
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never save or backfill a diverged dictionary
            self._raise_nonfinite(layers, train)
            raise TrainingDivergedError(f"training {self.kind} on {self.layer!r} diverged: {bad} hold NaN or inf; "
                                        f"lower lr (now {fitted.settings['lr']}) or set TrainConfig(grad_clip=1.0)")
        eval_prompts = val if val else train
        model.cfg.metadata["split"] = {"val_fraction": self.val_fraction, "seed": self.seed, "held_out": bool(val),
                                       "eval_prompt_indices": [int(p) for p in eval_prompts]}
        metrics = self.evaluate(model, layers, eval_prompts, fitted)
        if not math.isfinite(metrics["fvu"]):  # never report a NaN score: name the held-out input that caused it
            self._raise_nonfinite(layers, eval_prompts)
        metrics.update({"steps": fitted.steps, "train_tokens": n_train, "batch_size": batch,
                        "val_prompts": len(val), "train_prompts": len(train)})
        shared: list[Any] = [None, None, None]
        if rank == 0:
            path, artifact_id = self._save(model, metrics, in_layer, out_layer, fitted)
            latent_layer = None
            if self.backfill:
                latent_layer = self._backfill(model, in_layer, artifact_id)
                if self.model is not None:
                    from interlatent.analysis.logit_effects import (
                        RESIDUAL_WRITE,
                        compute_logit_effects,
                    )

                    if RESIDUAL_WRITE.match(out_layer or in_layer):
                        compute_logit_effects(self.db, latent_layer, self.model)
            if ckpt_dir is not None:  # the artifact is recorded: its checkpoints have done their work
                checkpoint.remove(ckpt_dir)
            shared = [str(path), artifact_id, latent_layer]
        if world > 1:  # every rank returns rank 0's artifact
            torch.distributed.broadcast_object_list(shared, src=0)
        path, artifact_id, latent_layer = Path(shared[0]), int(shared[1]), shared[2]
        log.info("%s on %s: %s", self.kind, self.layer, {k: round(v, 4) for k, v in metrics.items()
                                                         if isinstance(v, float)})
        return TrainResult(model, metrics, artifact_id, path, latent_layer, fitted)

    def _stream(self, layers: list[str], train: list[int], batch: int, rank: int,
                world: int) -> tuple[BatchStream | PartitionedStream, int]:
        """The training stream and its number of data partitions: ``data_partitions`` (None: the
        world size) partitions of the training prompts, or with 1 the whole stream on every rank."""
        parts = self.data_partitions if self.data_partitions is not None else world
        if parts == 1:
            return BatchStream(lambda seed, skip: self._chunks(layers, train, batch, True, seed, skip), batch,
                               self.seed, rank=rank, world_size=world), 1
        check_partitions(parts, world)
        seqs = self.db.sequences()
        length = dict(zip(seqs["prompt_index"].astype(int), seqs["n_positions"].astype(int)))
        if batch < parts:  # the batch may be capped below batch_size: say which bound it is
            why = (f"batch_size={batch}" if batch == self.batch_size else
                   f"batch_size={self.batch_size} capped at a quarter of the {sum(length[int(p)] for p in train)} "
                   "training tokens, at least 64")
            raise ConfigError(f"data_partitions={parts} needs a row of every step's batch per partition, but the "
                              f"global batch is {batch} rows ({why}); pass at most {batch} partitions"
                              + (f" or batch_size >= {parts}" if batch == self.batch_size else ""))
        dealt = deal_prompts(train, [length[int(p)] for p in train], parts, self.seed)
        rows = partition_rows(batch, parts)
        loads = [sum(length[q] for q in d) for d in dealt]
        if rank == 0 and min(loads) < IMBALANCE * max(loads):
            log.warning("data partitions hold %d to %d tokens: each gives %s rows per step, so the lightest one's "
                        "tokens are drawn %.1fx as often as the heaviest one's; for a uniform sample pass fewer "
                        "partitions (data_partitions=1: every rank reads the whole stream)", max(loads), min(loads),
                        "/".join(map(str, sorted(set(rows)))), max(loads) / max(min(loads), 1))
        mine = [dealt[p] for p in range(rank * parts // world, (rank + 1) * parts // world)]
        log.info("rank %d of %d reads data partitions of %s prompts (%s rows per step of %d)", rank, world,
                 [len(m) for m in mine], rows[rank * parts // world:(rank + 1) * parts // world], batch)
        # the partitions share one stream's shuffle buffer: P of them in one process hold what one stream would
        return PartitionedStream(lambda p, seed, skip: self._chunks(layers, dealt[p], rows[p], True, seed, skip,
                                                                    max(SHUFFLE_BUFFER // parts, rows[p])),
                                 parts, batch, self.seed, rank=rank, world_size=world), parts

    def _checkpoint_folder(self) -> Path | None:
        """Where checkpoints go: ``checkpoint_dir``, else ``{artifacts}/checkpoints/{kind}_{layer}``
        when checkpointing or resuming was asked for (None: no checkpoints)."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if self.checkpoint_every is None and not self.resume:
            return None
        return artifact_parent(self.db, self.out_dir) / "checkpoints" / f"{self.kind}_{_safe(self.layer)}"

    def _raise_nonfinite(self, layers: list[str], prompts: list[int]) -> None:
        """Raise :class:`TrainingDivergedError` naming the prompts whose stored input holds NaN or inf
        (one pass over the training prompts); return quietly when every value is finite."""
        found: dict[str, tuple[int, list[int]]] = {}
        for name in layers:
            count, where = 0, []
            for index, block in self.db.iter_sequence_blocks(name, prompt_indices=prompts):
                bad = int(block.size - np.isfinite(block).sum())
                if bad:
                    count += bad
                    where.append(int(index))
            if count:
                found[name] = (count, where)
        if not found:
            return
        parts = [f"{name!r} holds {count} non-finite values (NaN or inf) in prompts {where[:20]}"
                 f"{' …' if len(where) > 20 else ''}" for name, (count, where) in found.items()]
        raise TrainingDivergedError(f"cannot train {self.kind} on {self.layer!r}: the input {'; '.join(parts)}; a "
                                    "dictionary trained on them is NaN. Collect the layer again into a new store without "
                                    "those prompts, or write finite activations")

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

    def _save(self, model: SparseCoder, metrics: dict[str, Any], in_layer: str, out_layer: str | None,
              fitted: FitResult) -> tuple[Path, int]:
        source = self.db.layer_info(in_layer)
        hook_name = source.hook_name or naming.tl_hook_name(in_layer)
        model.cfg.metadata.update({"layer": self.layer, "in_layer": in_layer, "out_layer": out_layer,
                                   "hook_name": hook_name, "block": source.meta.get("block", naming.block_of(
                                       hook_name or in_layer)), "model": source.meta.get("model"),
                                   "train": {"lr": fitted.settings["lr"],
                                             "schedule": fitted.settings["lr_schedule"],
                                             "decoder_lr_multiple": fitted.settings["decoder_lr_multiple"],
                                             "seed": self.seed}})
        path = new_artifact_folder(artifact_parent(self.db, self.out_dir), f"{self.kind}_{_safe(self.layer)}",
                                   len(self.db.artifacts()))
        try:
            save_module(model, path)
            artifact_id = self.db.add_artifact(
                f"{self.kind}:{self.layer}", self.kind, architecture=model.architecture, layer=self.layer,
                path=path.resolve(), config={**model.config_dict(), "weights_sha256": weights_sha256(path)},
                metrics=metrics)
        except BaseException:  # the folder is this run's own: nothing recorded points at it
            shutil.rmtree(path, ignore_errors=True)
            raise
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
        lr: peak Adam learning rate (None: chosen from the width, :func:`.fit.learning_rate`).
            auxk: AuxK loss on dead latents (TopK).
        val_fraction: prompts held out for evaluation. seed: split, init and shuffling seed.
        out_dir: where the artifact folder goes (default: ``{db}_artifacts/`` next to the store).
        backfill: write the latents of every stored token back into the store.
        init: latent directions at the start: ``"random"`` (SAE default: encoder = decoder
            transpose of random unit rows) or ``"samples"`` (centred training samples); None takes
            the architecture's default.
        train_config: every optimisation setting at once (overrides ``lr`` and ``auxk``).
        model: the model the activations came from; given, the backfill also stores every latent's
            logit effects (:func:`interlatent.analysis.logit_effects.compute_logit_effects`) where
            the dictionary writes the residual stream (``resid_*``, ``mlp_out``, ``attn_out``).
        checkpoint_every: write a training checkpoint every this many steps (and at the last).
        checkpoint_dir: where (default ``{artifacts}/checkpoints/{kind}_{layer}/``); deleted once
            the artifact is recorded. resume: continue from the latest checkpoint there (start
            afresh when there is none); one from another configuration raises CheckpointError.
        data_partitions: deal the training prompts into this many partitions read apart (by
            default the world size under torch.distributed, else one stream; see the module docstring).
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
        stored input layer (``llm.layer.-1`` -> ``llm.layer.2`` when ``llm.layer.2.mlp_in`` is stored).
        Either end of block N's MLP (``llm.layer.N.mlp_in`` / ``.mlp_out``) names that MLP's
        transcoder, ``llm.layer.N``."""
        with contextlib.suppress(LayerNotFoundError):
            stored = self.db.resolve_layer(self.layer)
            return naming.mlp_block_layer(stored) or stored
        name = naming.mlp_block_layer(self.layer) or naming.canonical_hook_name(self.layer)
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
