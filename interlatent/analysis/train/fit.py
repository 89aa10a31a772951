"""The fitting loop of sparse dictionaries: it only sees an iterator of tensors.

``fit(model, batches, total_steps, cfg)`` takes batches ``x`` (SAE) or ``(x, y)`` (transcoder),
runs Adam with a linear decay to zero, keeps decoder rows unit-norm, tracks which latents have not
fired lately and gives them the AuxK loss. Evaluation, saving and the store live in the pipelines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from interlatent.analysis.models.sparse import SparseCoder
from interlatent.errors import ConfigError, NotEnoughDataError, TrainingDivergedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a dictionary."""

    lr: float = 1e-2
    """Peak Adam learning rate (decays linearly to 0 by the last step)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``lr``."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    lr_schedule: str = "wsd"
    """``"wsd"`` (constant, then a linear decay to 0 over the last ``decay_fraction`` of the
    steps), ``"linear"`` (decay to 0 from the start) or ``"constant"``."""
    decay_fraction: float = 0.7
    """``"wsd"`` only: the fraction of steps spent decaying."""
    auxk: bool = True
    """TopK only: apply the AuxK loss to dead latents."""
    dead_tokens: int | None = None
    """A latent is dead after this many inputs without firing (None: a tenth of the run, at most 10M)."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (None: no clipping)."""


@dataclass
class FitResult:
    """What training did: steps, inputs seen, per-latent fire counts and a loss history."""

    steps: int
    tokens: int
    fire_counts: torch.Tensor
    history: list[dict[str, float | int]] = field(default_factory=list)
    skipped_steps: int = 0
    """Steps whose loss or gradient was not finite: no update was made for them."""

    @property
    def dead_fraction(self) -> float:
        """Fraction of latents that never fired during training."""
        return float((self.fire_counts == 0).float().mean())


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "wsd":
        decay = max(int(round(total * cfg.decay_fraction)), 1)
        start = total - decay
        return 1.0 if step < start else max(0.0, (total - step) / decay)
    span = max(total - cfg.warmup_steps, 1)
    return max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


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
) -> FitResult:
    """Train ``model`` for up to ``total_steps`` batches from ``batches``.

    Args:
        batches: yields ``x`` or ``(x, y)`` float tensors ``[batch, d]``.
        total_steps: the schedule's length (training stops there or when batches run out).
        progress: show a tqdm bar (None: only on a terminal).
        on_step: called with ``(step, metrics)`` every ``log_every`` steps.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    if cfg.lr_schedule not in ("wsd", "linear", "constant"):
        raise ConfigError(f"lr_schedule must be 'wsd', 'linear' or 'constant', got {cfg.lr_schedule!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total_steps, cfg))
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
    model.train()
    bar = tqdm(total=total_steps, desc=f"train {model.architecture}", unit="step", disable=None if progress is None
               else not progress)
    try:
        for batch in batches:
            if step >= total_steps:
                break
            x, y = (batch if isinstance(batch, (tuple, list)) else (batch, None))
            if dead_after is None:
                dead_after = max(min(10_000_000, total_steps * x.shape[0] // 10), x.shape[0])
            dead = (since_fired >= dead_after) if (topk and cfg.auxk) else None
            out = model(x, y, dead_mask=dead)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if not _finite(out.loss, params):  # one bad batch must not poison Adam's moments
                skipped += 1
                log.warning("step %d: non-finite loss or gradient on a batch of %d rows; step skipped", step, x.shape[0])
                if skipped > max(10, total_steps // 20):
                    raise TrainingDivergedError(f"{skipped} of {step + 1} training steps gave NaN or inf; lower lr "
                                                f"(now {cfg.lr}) or set TrainConfig(grad_clip=1.0)")
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
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
                fire_counts += fired
                since_fired += x.shape[0]
                since_fired[fired > 0] = 0
            tokens += x.shape[0]
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                metrics = {"step": step, "loss": float(out.loss.detach()), "fvu": float(out.fvu.detach()), "auxk": float(out.auxk_loss.detach()),
                           "dead": float((since_fired >= (dead_after or 1)).float().mean()),
                           "lr": float(sched.get_last_lr()[0])}
                history.append(metrics)
                bar.set_postfix(fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead']:.2%}")
                if on_step is not None:
                    on_step(step, metrics)
    finally:
        bar.close()
        model.eval()
    if step == 0:
        raise NotEnoughDataError("training received no batches: is the layer empty?")
    log.info("trained %s for %d steps on %d inputs", model.architecture, step, tokens)
    return FitResult(step, tokens, fire_counts.cpu(), history, skipped)
