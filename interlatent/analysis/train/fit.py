"""The fitting loop of sparse dictionaries: it only sees an iterator of tensors.

``fit(model, batches, total_steps, cfg)`` takes batches ``x`` (SAE) or ``(x, y)`` (transcoder),
runs Adam on ``TrainConfig.lr_schedule`` (default: for a TopK run too short for its latents,
constant, then a linear decay to zero over the last 70% of the steps, and a linear decay from the
start once each latent is expected to fire on 7,500 inputs, :func:`lr_schedule`; the peak learning
rate and the decoder weights' multiple of it set by the dictionary's shape and the run's length,
:func:`learning_rate` and :func:`decoder_lr_multiple`), keeps decoder rows
unit-norm, tracks which latents have not fired lately and gives them the AuxK loss. Evaluation,
saving and the store live in the pipelines.

With ``checkpoint_dir`` / ``checkpoint_every`` it writes a checkpoint (:mod:`.checkpoint`) every N
steps and at the last one; ``resume=True`` continues from the latest, ending with exactly the
weights and history of a run that never stopped. The data position is the number of batches
consumed: a ``batches`` object with ``checkpoint_state()`` / ``restore_state(meta, tensors)``
(such as the pipelines' stream) saves and restores its own position: under torch.distributed
``checkpoint_state()`` is called on every rank, so a stream may gather its ranks' positions, and
rank 0's answer is written. Any other iterable is re-iterated from its start and the consumed
batches are skipped, which is exact when it yields the same batches each time. Under
``torch.distributed`` each rank passes its part of every global batch and the ranks train as one
(:mod:`.distributed`).
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from interlatent.analysis.models.sparse import SparseAutoencoder, SparseCoder
from interlatent.analysis.train import checkpoint, distributed
from interlatent.errors import (
    CheckpointError,
    ConfigError,
    NotEnoughDataError,
    TrainingDivergedError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a dictionary."""

    lr: float | None = None
    """Peak Adam learning rate (``lr_schedule`` takes it to 0 by the last step, unless ``"constant"``);
    None (default): chosen from the dictionary's width by :func:`learning_rate` (TopK SAEs:
    ``1e-2 * min(1, sqrt(256 / width))``; transcoders, ReLU and JumpReLU: 1e-2)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    lr_schedule: str | None = None
    """``"wsd"`` (constant, then a linear decay to 0 over the last ``decay_fraction`` of the
    steps), ``"linear"`` (decay to 0 from the start) or ``"constant"``; None (default): chosen from
    the run's length by :func:`lr_schedule` (TopK: ``"wsd"`` for a run too short for its latents,
    ``"linear"`` once every latent is expected to fire on 7,500 inputs; ReLU and JumpReLU: ``"wsd"``)."""
    decay_fraction: float = 0.7
    """``"wsd"`` only: the fraction of steps spent decaying."""
    auxk: bool = True
    """TopK only: apply the AuxK loss to dead latents."""
    dead_tokens: int | None = None
    """A latent is dead after this many inputs without firing (None: a tenth of the run, at most 10M)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (None: no clipping)."""
    decoder_lr_scale: float | None = None
    """The decoder weights learn at ``lr`` times this (same schedule); their rows are kept unit-norm,
    so this sets how fast the latents' write directions turn. None (default): chosen from the
    dictionary's shape and the run's length by :func:`decoder_lr_multiple` (TopK:
    ``sqrt(7,500 / fires)`` within [1, 10], ``fires`` the inputs a latent is expected to fire on over
    the run; ReLU and JumpReLU: 1)."""


@dataclass
class FitResult:
    """What training did: steps, inputs seen, per-latent fire counts and a loss history."""

    steps: int
    tokens: int
    fire_counts: torch.Tensor
    history: list[dict[str, float | int]] = field(default_factory=list)
    skipped_steps: int = 0
    """Steps whose loss or gradient was not finite: no update was made for them."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What the run trained with, given or chosen by the rules: ``lr``, ``decoder_lr_multiple`` and
    ``lr_schedule``."""

    @property
    def dead_fraction(self) -> float:
        """Fraction of latents that never fired during training."""
        return float((self.fire_counts == 0).float().mean())


def _lr_factor(step: int, total: int, cfg: TrainConfig, schedule: str) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(int(round(total * cfg.decay_fraction)), 1)
        start = total - decay
        return 1.0 if step < start else max(0.0, (total - step) / decay)
    span = max(total - cfg.warmup_steps, 1)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


#: inputs a TopK latent is expected to fire on over a run at which the automatic decoder multiple
#: reaches 1 and the automatic schedule decays from the start; see decoder_lr_multiple, lr_schedule
_FIRES_AT_ONE = 7_500
_SCHEDULES = ("wsd", "linear", "constant")
_MOST_DECODER_MULTIPLE = 10.0


def _finite_positive(value: Any) -> bool:
    """A real number (not a bool), finite and > 0, as a float (an int too large for one is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return bool(math.isfinite(value) and value > 0)
    except OverflowError:
        return False


#: the automatic peak learning rate, and the width past which a TopK SAE's is lower; see learning_rate
_BASE_LR, _WIDTH_AT_BASE = 1e-2, 256


def learning_rate(model: SparseCoder, cfg: TrainConfig) -> float:
    """The peak learning rate: ``cfg.lr`` when given; else, for a TopK SAE,
    ``1e-2 * min(1, sqrt(256 / width))`` with ``width`` its input width, and 1e-2 for transcoders,
    ReLU and JumpReLU. A given value that is not a finite number > 0 raises ConfigError.

    Adam moves every coordinate by about the learning rate, so a unit-norm row of width ``d``
    turns by about ``lr * sqrt(d)`` per update: past width 256 the rule keeps that angle at its
    width-256 size for rows that start random. On the planted-feature protocol after one epoch
    (``benchmarks/sae_sweep.py``, k 16, 8 latents per input dimension): d 512 recovered 1,949 of
    2,048 features (1,698 at 1e-2; SAELens at 1e-2 1,826), d 768 2,796 of 3,072 (1,889; SAELens
    2,432, and 2,826 at this rate) and d 1,024 3,720 of 4,096 (2,020; SAELens 2,957); at d 128 a
    rate 1.4x higher changed 502 to 507, so below 256 it stays. A transcoder starts each latent from a sample's matched pair, not
    a random row, and at d 768 lost from the rule (2,064 of 3,072 against 2,405 at 1e-2;
    sparsify 1,898), so it keeps 1e-2."""
    given = cfg.lr
    if given is not None:
        if not _finite_positive(given):
            raise ConfigError(f"lr must be a finite number > 0 (or None: chosen from the width), got {given!r}")
        return float(given)
    if model.cfg.activation != "topk" or not isinstance(model, SparseAutoencoder):
        return _BASE_LR
    return _BASE_LR * min(1.0, math.sqrt(_WIDTH_AT_BASE / model.cfg.d_in))


def expected_fires(model: SparseCoder, run_inputs: int) -> float | None:
    """The inputs each latent of a TopK dictionary is expected to fire on over a run of
    ``run_inputs`` inputs (``steps * batch rows``): ``run_inputs * k / d_sae``; None for ReLU and JumpReLU."""
    if not isinstance(run_inputs, numbers.Integral) or isinstance(run_inputs, bool) or run_inputs < 1:
        raise ConfigError(f"run_inputs must be an int >= 1 (steps x batch rows), got {run_inputs!r}")
    if model.cfg.activation != "topk" or not model.cfg.k:
        return None
    return int(run_inputs) * model.cfg.k / model.cfg.d_sae


def decoder_lr_multiple(model: SparseCoder, cfg: TrainConfig, run_inputs: int) -> float:
    """The decoder's learning rate over the peak rate (:func:`learning_rate`) in a run of
    ``run_inputs`` inputs (``steps * batch rows``): ``cfg.decoder_lr_scale`` when given; else, for a
    TopK dictionary, ``sqrt(7,500 / fires)`` kept within [1, 10], with ``fires`` each latent's
    expected firings over the run (:func:`expected_fires`), and 1 for ReLU and JumpReLU.
    A given value that is not a finite number > 0 raises ConfigError.

    A TopK latent fires on about ``k / d_sae`` of the inputs, so only that fraction of the steps
    turns its decoder row; Adam's per-coordinate normalisation gives a rarely updated row steps of
    about ``lr / sqrt(rate)``, so in one pass over the data a row moves in proportion to
    ``sqrt(rate)``: the multiple gives rows that fire less often the movement they need, and a run
    long enough for every latent to fire on 7,500 inputs none. On the planted-feature protocol
    after one epoch of ~200k inputs (``benchmarks/sae_sweep.py``): d 256 x 8,192 latents x k 16
    recovered 202 of 4,096 features at 1 and 1,123 at the rule's 4.4 (SAELens 928); d 128 x 4,096 x
    k 16 14 of 2,048 at 1 and 190 at 3.1 (SAELens 20). Over five epochs a multiple above 1 costs final FVU: at the
    protocol (256 x 2,048 x k 16, 240 steps of 4,096) 0.0766 at 2.26 against 0.0754 at 1 with the
    linear schedule (minimal loop 0.0752)."""
    given = cfg.decoder_lr_scale
    fires = expected_fires(model, run_inputs)
    if given is not None:
        if not _finite_positive(given):
            raise ConfigError(f"decoder_lr_scale must be a finite number > 0 (or None: chosen from the shape and the run's length), "
                              f"got "
                              f"{given!r}")
        return float(given)
    if fires is None:
        return 1.0
    return float(min(max(math.sqrt(_FIRES_AT_ONE / fires), 1.0), _MOST_DECODER_MULTIPLE))


def lr_schedule(model: SparseCoder, cfg: TrainConfig, run_inputs: int) -> str:
    """The learning-rate schedule of a run of ``run_inputs`` inputs: ``cfg.lr_schedule`` when given;
    else, for TopK, ``"wsd"`` while each latent is expected to fire on fewer than 7,500 inputs over
    the run (:func:`expected_fires`) and ``"linear"`` from there, and ``"wsd"`` for ReLU and JumpReLU.

    A short run needs the constant phase to move its latents at all; a long one ends more precisely
    with the rate decaying from the start. One epoch of the planted protocol (``sae_bench.py``,
    1,536 firings per latent, measured at decoder multiple 2.26) recovered 940 of 1,024 features with ``"wsd"``
    and 825 with ``"linear"``; five epochs (7,680 firings) reached FVU 0.0761 with ``"wsd"`` and 0.0754 with
    ``"linear"`` (both at decoder multiple 1; the minimal loop 0.0752, SAELens and sparsify 0.0763)."""
    given = cfg.lr_schedule
    fires = expected_fires(model, run_inputs)
    if given is not None:
        if given not in _SCHEDULES:
            raise ConfigError(f"lr_schedule must be 'wsd', 'linear' or 'constant' (or None: chosen from the run's "
                              f"length), got {given!r}")
        return given
    return "wsd" if fires is None or fires < _FIRES_AT_ONE else "linear"


def _param_groups(model: SparseCoder, params: list[torch.Tensor], lr: float,
                  scale: float) -> list[dict[str, Any]]:
    """Adam's parameter groups: the decoder weights at ``lr * scale``, the rest at ``lr`` (at scale
    1 one group in ``params``' order, so earlier checkpoints' optimiser states still fit)."""
    if scale == 1.0:
        return [{"params": params, "lr": lr}]
    decoder = [p for p in params if p is model.W_dec]
    rest = [p for p in params if p is not model.W_dec]
    groups = [{"params": rest, "lr": lr}]
    if decoder:
        groups.append({"params": decoder, "lr": lr * scale})
    return groups


def _finite(loss: torch.Tensor, params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)


def fit(
    model: SparseCoder,
    batches: Iterable[Any],
    total_steps: int,
    cfg: TrainConfig = TrainConfig(),  # noqa: B008 - frozen dataclass
    *,
    progress: bool | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    log_every: int = 10,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    checkpoint_tag: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` for up to ``total_steps`` batches from ``batches``.

    Args:
        batches: yields ``x`` or ``(x, y)`` float tensors ``[batch, d]`` (under torch.distributed:
            this rank's rows of each global batch, e.g. from :func:`.distributed.shard_batches`).
        total_steps: the schedule's length (training stops there or when batches run out); times
            the first batch's rows (all ranks' together), the run's length in inputs that the
            default multiple and schedule follow (:func:`decoder_lr_multiple`, :func:`lr_schedule`).
        progress: show a tqdm bar (None: only on a terminal).
        on_step: called with ``(step, metrics)`` every ``log_every`` steps.
        checkpoint_dir: where checkpoints go (the latest is kept; completed training leaves its
            last one there). checkpoint_every: write one every this many steps (None: only at the
            last step, when ``checkpoint_dir`` is given).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` (start afresh when it
            holds none); one written for another model, schedule or ``checkpoint_tag`` is refused.
        checkpoint_tag: JSON settings that must match on resume (a pipeline's layer, seed, data).
    """
    if isinstance(total_steps, float) and total_steps.is_integer():
        total_steps = int(total_steps)
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ConfigError(f"total_steps must be a whole number >= 1, got {total_steps!r}")
    total_steps = int(total_steps)
    if cfg.lr_schedule is not None and cfg.lr_schedule not in _SCHEDULES:
        raise ConfigError(f"lr_schedule must be 'wsd', 'linear' or 'constant' (or None: chosen from the run's length), "
                          f"got {cfg.lr_schedule!r}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1 (or None), got {checkpoint_every}")
    if (resume or checkpoint_every is not None) and checkpoint_dir is None:
        raise ConfigError("checkpointing needs a folder: pass checkpoint_dir= with resume=/checkpoint_every=")
    rank, world = distributed.world()
    batch_sum = distributed.all_sum if world > 1 else None
    coder_class = model.__class__  # a dictionary (not a language model): its forward decides the loss
    if batch_sum is not None and coder_class.forward is not SparseCoder.forward:
        raise ConfigError(f"data-parallel training supports TopK and ReLU dictionaries; {coder_class.__name__} "
                          "computes its own loss: train it in one process")
    lr = learning_rate(model, cfg)  # refuses a given value that is not a finite number > 0
    if cfg.decoder_lr_scale is not None:  # likewise, before any data is drawn
        decoder_lr_multiple(model, cfg, total_steps)
    found = checkpoint.latest(checkpoint_dir) if resume and checkpoint_dir is not None else None
    restorable = hasattr(batches, "restore_state") and hasattr(batches, "checkpoint_state")
    it: Iterator[Any] | None = None
    if found is not None:  # the run's batch rows, as it recorded them (earlier ones: inputs per update)
        state = found.meta["fit"]
        rows0 = state.get("rows") or max(round(state["tokens"] / max(found.step - state["skipped"], 1)), 1)
    else:  # the first batch says how many rows a step takes (the rules below depend on the run's length)
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise NotEnoughDataError("training received no batches: is the layer empty?")
        it = itertools.chain([first], it)
        x0 = first[0] if isinstance(first, (tuple, list)) else first
        rows0 = x0.shape[0] if batch_sum is None else int(batch_sum(torch.tensor(x0.shape[0])))
        if rows0 < 1:
            log.warning("the first batch has no rows: the decoder multiple and schedule take the run as %d inputs",
                        total_steps)
    run_inputs = total_steps * max(int(rows0), 1)
    decoder_scale = decoder_lr_multiple(model, cfg, run_inputs)
    schedule = lr_schedule(model, cfg, run_inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(_param_groups(model, params, lr, decoder_scale), lr=lr, betas=cfg.betas,
                           foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, cfg, schedule))
    d_sae = model.cfg.d_sae
    device = model.W_dec.device  # the bookkeeping lives where the latents are computed
    fire_counts = torch.zeros(d_sae, dtype=torch.long, device=device)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    topk = model.cfg.activation == "topk"
    history: list[dict[str, float | int]] = []
    tokens = 0
    step = 0
    dead_after = cfg.dead_tokens
    skipped = 0
    # the multiple the run uses (given or chosen); at 1 the fingerprint is what it was before
    # decoder_lr_scale existed, so older checkpoints trained that way resume
    # (the rate and schedule it uses too: 1e-2 and "wsd", as every run before they followed the
    # width and the run's length, at widths up to 256 and in runs too short for their latents)
    train = {**asdict(cfg), "lr": lr, "lr_schedule": schedule, "decoder_lr_scale": decoder_scale}
    if decoder_scale == 1.0:
        del train["decoder_lr_scale"]
    fingerprint = {"architecture": model.architecture, "total_steps": total_steps, "train": train,
                   "model": {k: v for k, v in model.cfg.to_dict().items() if k != "metadata"},
                   "params": {n: list(p.shape) for n, p in model.named_parameters()}, **(checkpoint_tag or {})}
    if found is not None:
        checkpoint.check_fingerprint(found, fingerprint)
        with torch.no_grad():
            model.load_state_dict(found.group("model"))
        checkpoint.load_optimizer_state(opt, found.meta["optimizer"], found.group("opt"))
        checkpoint.load_scheduler_state(sched, found.meta["scheduler"])
        fire_counts, since_fired = found.tensors["fit.fire_counts"].clone(), found.tensors["fit.since_fired"].clone()
        step, tokens, skipped, dead_after, history = (found.step, state["tokens"], state["skipped"],
                                                      state["dead_after"], state["history"])
        if restorable:
            batches.restore_state(found.meta["data"], found.group("data"))  # type: ignore[attr-defined]
        log.info("resuming %s from step %d (%s)", model.architecture, step, found.path)
    elif resume:
        log.info("no checkpoint in %s: training %s from the start", checkpoint_dir, model.architecture)
    if world > 1 and found is None:
        distributed.broadcast_module(model)  # data-dependent initialisation: every rank starts from rank 0's
    if it is None:
        it = iter(batches)
    if found is not None and not restorable:
        for _ in range(step):  # a plain iterable: its first `step` batches were consumed before the checkpoint
            if next(it, None) is None:
                raise CheckpointError(f"the checkpoint {str(found.path)!r} is at step {step}, but the batches ran out "
                                      "before it: resume with the same data")
    if found is not None:  # last: replaying the batches above may have drawn from these generators
        checkpoint.load_rng_state(found.meta["rng"], found.tensors)

    def save() -> None:
        # on every rank: a stream whose ranks read apart gathers their positions here
        data_meta, data_tensors = (batches.checkpoint_state() if restorable  # type: ignore[attr-defined]
                                   else ({"consumed": step}, {}))
        if rank == 0:
            opt_meta, opt_tensors = checkpoint.optimizer_state(opt)
            rng_meta, rng_tensors = checkpoint.rng_state()
            meta = {"fingerprint": checkpoint.normalise(fingerprint), "optimizer": opt_meta,
                    "scheduler": checkpoint.scheduler_state(sched), "rng": rng_meta, "data": data_meta,
                    "fit": {"tokens": tokens, "skipped": skipped, "dead_after": dead_after, "history": history,
                            "rows": rows0}}
            tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors, **rng_tensors,
                       **{f"data.{k}": v for k, v in data_tensors.items()},
                       "fit.fire_counts": fire_counts, "fit.since_fired": since_fired}
            checkpoint.write(checkpoint_dir, step, meta, tensors)  # type: ignore[arg-type]
        if world > 1:
            torch.distributed.barrier()

    def after_step() -> None:
        if checkpoint_dir is not None and ((checkpoint_every is not None and step % checkpoint_every == 0)
                                           or step == total_steps):
            save()

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {model.architecture}", unit="step",
               disable=None if progress is None else not progress)
    try:
        for batch in it:
            if step >= total_steps:
                break
            x, y = (batch if isinstance(batch, (tuple, list)) else (batch, None))
            rows = x.shape[0] if batch_sum is None else int(batch_sum(torch.tensor(x.shape[0])))
            if dead_after is None:
                dead_after = max(min(10_000_000, total_steps * rows // 10), rows)
            dead = (since_fired >= dead_after) if (topk and cfg.auxk) else None
            out = model(x, y, dead_mask=dead) if batch_sum is None else model(x, y, dead_mask=dead,
                                                                              batch_sum=batch_sum)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            loss = out.loss
            if batch_sum is not None:
                distributed.sum_gradients(params)
                loss = batch_sum(out.loss)
            if not _finite(loss, params):  # one bad batch must not poison Adam's moments
                skipped += 1
                log.warning("step %d: non-finite loss or gradient on a batch of %d rows; step skipped", step, rows)
                if skipped > max(10, total_steps // 20):
                    raise TrainingDivergedError(f"{skipped} of {step + 1} training steps gave NaN or inf; lower lr "
                                                f"(now {lr}) or set TrainConfig(grad_clip=1.0)")
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                after_step()
                continue
            model.remove_gradient_parallel_to_decoder()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            model.set_decoder_norm_to_unit()
            with torch.no_grad():
                if topk:
                    fired = torch.bincount(out.latent_indices[out.latent_acts > 0], minlength=d_sae)
                else:
                    fired = (out.latent_acts > 0).sum(0)
                if batch_sum is not None:
                    fired = batch_sum(fired)
                fire_counts += fired
                since_fired += rows
                since_fired[fired > 0] = 0
            tokens += rows
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                parts = torch.stack([out.loss.detach(), out.fvu.detach(), out.auxk_loss.detach()])
                if batch_sum is not None:
                    parts = batch_sum(parts)
                metrics = {"step": step, "loss": float(parts[0]), "fvu": float(parts[1]), "auxk": float(parts[2]),
                           "dead": float((since_fired >= (dead_after or 1)).float().mean()),
                           "lr": float(sched.get_last_lr()[0])}
                history.append(metrics)
                bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead']:.2%}")
                if on_step is not None:
                    on_step(step, metrics)
            after_step()
    finally:
        bar.close()
        model.eval()
    if step == 0:
        raise NotEnoughDataError("training received no batches: is the layer empty?")
    log.info("trained %s for %d steps on %d inputs", model.architecture, step, tokens)
    return FitResult(step, tokens, fire_counts.cpu(), history, skipped,
                     {"lr": lr, "decoder_lr_multiple": decoder_scale, "lr_schedule": schedule})
