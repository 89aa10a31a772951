"""``train_linear_probe``: a linear read-out of a stored layer, scored on held-out prompts.

The split is by prompt (tokens of one prompt, or copies of one text, never land on both sides,
which would leak) and is recorded in the saved config (``metadata["split"]["test_prompt_indices"]``);
the report carries held-out accuracy next to the majority-class baseline (classification) or
held-out R² next to the predict-the-training-mean baseline of 0 (regression: ``1 - SS_res / SS_tot``
with ``SS_tot`` taken around the training targets' mean).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from interlatent.analysis.dataset import LinearProbeDataset, ProbeData
from interlatent.analysis.models import LinearProbe, LinearProbeConfig, save_module
from interlatent.analysis.train.splits import (
    _safe,
    artifact_parent,
    new_artifact_folder,
    require_artifact_writable,
    split_groups,
    split_prompts,
    weights_sha256,
)
from interlatent.db import LatentDB
from interlatent.errors import (
    NotEnoughDataError,
    TrainingDivergedError,
    closest,
    unknown_name,
)

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    """A trained probe and its held-out scores."""

    module: LinearProbe
    metrics: dict[str, Any]
    artifact_id: int | None
    path: Path | None


def _fit(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
         weight_decay: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    regression = probe.cfg.task == "regression"
    y_mean = y.mean() if regression else None
    y_std = y.std().clamp_min(1e-8) if regression else None
    if regression:  # learn standardised targets; fold the scale back into the layer at the end
        y = (y - y_mean) / y_std
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            out = probe(x[idx])
            loss = F.mse_loss(out.squeeze(-1), y[idx]) if regression else F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe.eval()
    if regression:
        with torch.no_grad():
            probe.linear.weight.mul_(y_std)
            probe.linear.bias.mul_(y_std).add_(y_mean)


def train_linear_probe(
    db: LatentDB,
    layer: str,
    target_key: str,
    task: str = "classification",
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 256,
    pool: str | None = "auto",
    test_fraction: float = 0.25,
    weight_decay: float = 1e-4,
    seed: int = 0,
    split_key: str | None = None,
    save: bool = True,
    out_dir: str | Path | None = None,
) -> ProbeResult:
    """Train a linear probe on ``layer`` to predict ``target_key`` and score it on held-out prompts.

    Args:
        target_key: ``"label"`` or ``"prompt_label"`` (the prompt label), a token metric, or a
            prompt-context key.
        task: ``"classification"`` (cross-entropy; reports accuracy and the majority baseline) or
            ``"regression"`` (MSE; reports R²).
        pool: ``"mean"`` or ``"last"`` (one row per prompt), None (one row per token), or
            ``"auto"`` (default): ``"mean"`` for a prompt-level target (the prompt label, a
            prompt-context key, or a token metric constant within every prompt), else per token.
            A prompt-level label scored per token counts each prompt's tokens as if they were
            independent examples, and reads a single token's activation where the whole prompt
            carries the label; pooling gives one row per prompt, which is what the held-out accuracy
            should count. Pass ``pool=None`` for token-level rows anyway; ``metrics["pool"]`` says
            which was used.
        test_fraction: fraction of prompts (or of ``split_key`` groups) held out.
        split_key: a prompt-context key whose groups stay on one side of the split (e.g. a dilemma
            id, so the test set holds unseen dilemmas).
        save: write the probe (safetensors + JSON) and record it in the store (a read-only store
            is refused before training; ``save=False`` trains and scores without recording).

    Rows whose features (or regression targets) hold NaN or inf are left out with a warning;
    ``metrics["dropped_nonfinite_rows"]`` counts them. A probe whose weights end non-finite raises
    :class:`TrainingDivergedError` instead of reporting a score.
    """
    db.check_complete(layer, what="probe training")
    if save:
        require_artifact_writable(db, artifact_parent(db, out_dir), "train_linear_probe",
                                  "or pass save=False to train and score without recording")
    if pool == "auto":
        pool = "mean" if LinearProbeDataset(db, layer, target_key, task=task).prompt_level() else None
        if pool is not None:
            log.info("probe target %r is prompt-level: pooling each prompt's tokens (pool='mean'); pass pool=None "
                     "for one row per token", target_key)
    ds = LinearProbeDataset(db, layer, target_key, pool=pool, task=task)
    data = ds.load()
    train_mask, test_mask = _split(db, data, test_fraction, seed, split_key)
    if not train_mask.any() or not test_mask.any():
        dropped = (f" ({data.dropped_nonfinite} rows with NaN or inf features were dropped)"
                   if data.dropped_nonfinite else "")
        raise NotEnoughDataError(f"the split of {len(np.unique(data.groups))} prompt(s) left no training or no test "
                                 f"rows{dropped}; add prompts or change test_fraction")
    x = torch.from_numpy(data.x)
    classes = data.classes or []
    test_prompts = sorted(int(p) for p in np.unique(data.groups[test_mask]))
    cfg = LinearProbeConfig(d_in=x.shape[1], task=task, n_classes=max(len(classes), 2),
                            classes=[c if isinstance(c, (str, int, float)) else str(c) for c in classes],
                            metadata={"layer": ds.layer, "target": target_key, "pool": pool, "seed": seed,
                                      "split": {"test_fraction": test_fraction, "split_key": split_key,
                                                "test_prompt_indices": test_prompts}})
    probe = LinearProbe(cfg)
    xt = x[torch.from_numpy(train_mask)]
    with torch.no_grad():
        probe.mean.copy_(xt.mean(0))
        probe.std.copy_(xt.std(0).clamp_min(1e-6))
    y = torch.from_numpy(data.y)
    y = y.float() if task == "regression" else y.long()
    torch.manual_seed(seed)
    _fit(probe, xt, y[torch.from_numpy(train_mask)], epochs=epochs, lr=lr, batch_size=batch_size,
         weight_decay=weight_decay, seed=seed)
    bad = [n for n, p in probe.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a score from NaN weights is no score: never report or save it
        raise TrainingDivergedError(f"the probe on {ds.layer!r} -> {target_key!r} diverged: {bad} hold NaN or inf "
                                    f"after training; lower lr (now {lr}) or epochs (now {epochs})")
    metrics = _score(probe, x, y, train_mask, test_mask, task)
    metrics.update({"layer": ds.layer, "target": target_key, "pool": pool, "task": task,
                    "n_train": int(train_mask.sum()), "n_test": int(test_mask.sum()),
                    "test_prompts": int(len(np.unique(data.groups[test_mask]))), "classes": cfg.classes,
                    "dropped_nonfinite_rows": data.dropped_nonfinite})
    artifact_id = path = None
    if save:
        path = new_artifact_folder(artifact_parent(db, out_dir), f"probe_{_safe(ds.layer)}_{_safe(target_key)}",
                                   len(db.artifacts()))
        try:
            save_module(probe, path)
            artifact_id = db.add_artifact(f"probe:{ds.layer}:{target_key}", "probe", architecture=probe.architecture,
                                          layer=ds.layer, path=path.resolve(),
                                          config={**probe.config_dict(), "weights_sha256": weights_sha256(path)},
                                          metrics=metrics)
        except BaseException:  # the folder is this call's own: nothing recorded points at it
            shutil.rmtree(path, ignore_errors=True)
            raise
    log.info("probe %s -> %s: %s", ds.layer, target_key, metrics)
    return ProbeResult(probe, metrics, artifact_id, path)


def _split(db: LatentDB, data: ProbeData, test_fraction: float, seed: int,
           split_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    prompts = sorted(set(data.groups.tolist()))
    if split_key is not None:
        keys = sorted({k for c in db.sequences()["context"] for k in c})
        if split_key not in keys:
            near = closest(split_key, keys)
            listed = ", ".join(repr(k) for k in near + [k for k in keys if k not in near]) or "none"
            raise unknown_name("split key", split_key, keys,
                               hint=f"split_key names a prompt-context key; the stored context keys are {listed}")
    _, test = split_prompts(prompts, test_fraction, seed, split_groups(db, prompts, split_key))
    test_mask = np.isin(data.groups, test)
    return ~test_mask, test_mask


@torch.no_grad()
def _score(probe: LinearProbe, x: torch.Tensor, y: torch.Tensor, train_mask: np.ndarray, test_mask: np.ndarray,
           task: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split, mask in (("train", train_mask), ("test", test_mask)):
        m = torch.from_numpy(mask)
        pred = probe.predict(x[m])
        if task == "classification":
            out[f"{split}_accuracy"] = float((pred == y[m]).float().mean())
        else:
            resid = float(((pred - y[m]) ** 2).sum())
            total = float(((y[m] - y[torch.from_numpy(train_mask)].mean()) ** 2).sum())
            out[f"{split}_r2"] = 1.0 - resid / max(total, 1e-30)
    if task == "classification":
        train_y = y[torch.from_numpy(train_mask)]
        majority = int(torch.bincount(train_y).argmax())
        out["baseline_accuracy"] = float((y[torch.from_numpy(test_mask)] == majority).float().mean())
        out["accuracy"] = out["test_accuracy"]
    else:
        out["r2"] = out["test_r2"]
        out["baseline_r2"] = 0.0
    return out
