"""Training checkpoints: everything a fit needs to continue as if it had never stopped.

A checkpoint is a folder ``step-{step:08d}/`` under the checkpoint directory holding
``state.safetensors`` (every tensor: weights, Adam moments, dead-latent counters, the torch and
numpy generator states, rows the data stream holds back) and ``state.json`` (the rest: step,
inputs seen, loss history, scheduler, Python's ``random`` state, the data stream's position and
the *fingerprint* of the configuration that wrote it). No pickle anywhere.

Writes are atomic: the folder is written under a temporary name, flushed to disk and renamed into
place, and only then are older checkpoints removed. A process killed mid-write leaves the previous
checkpoint (and a temporary folder the next write clears away). :func:`latest` ignores anything
that is not a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from interlatent.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
_PREFIX = "step-"
_TMP = ".tmp-"


@dataclass
class Checkpoint:
    """A checkpoint read back: its JSON part and its tensors, by name."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix.`` (prefix stripped)."""
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(directory: str | Path, step: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write checkpoint ``step`` atomically and remove the older ones; returns its folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{_TMP}*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / f"{_PREFIX}{step:08d}"
    tmp = directory / f"{_TMP}{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps({"format": FORMAT, "step": step, **meta}))
    for name in (STATE_TENSORS, STATE_JSON):
        _fsync(tmp / name)
    if final.exists():  # the same step written again (a resumed run re-reaching it): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(directory)
    for old in directory.glob(f"{_PREFIX}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint at step %d written to %s", step, final)
    return final


def latest(directory: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory`` (None when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = sorted((p for p in directory.glob(f"{_PREFIX}*") if (p / STATE_JSON).is_file()
                    and (p / STATE_TENSORS).is_file()), key=lambda p: p.name)
    if not found:
        return None
    path = found[-1]
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint ({exc}); delete it, or pass resume=False "
                              "to start over") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} has checkpoint format {meta.get('format')!r}, expected {FORMAT}; "
                              "delete it, or pass resume=False to start over")
    return Checkpoint(path, meta, tensors)


def remove(directory: str | Path) -> None:
    """Delete the checkpoints in ``directory`` (and the folder, when nothing else is left in it)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in list(directory.glob(f"{_PREFIX}*")) + list(directory.glob(f"{_TMP}*")):
        shutil.rmtree(p, ignore_errors=True)
    try:
        directory.rmdir()
    except OSError:
        pass


def check_fingerprint(ckpt: Checkpoint, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another configuration, naming every setting that differs.
    A different ``data_partitions`` (a pipeline's tag: absent where one stream fed every rank, as
    in every run before data partitions) names the value, and the CLI option, to resume with."""
    saved = ckpt.meta.get("fingerprint", {})
    now = normalise(expected)
    differ = [key for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]
    diffs = [f"{key}: checkpoint {saved.get(key, '<absent>')!r}, this run {now.get(key, '<absent>')!r}"
             for key in differ]
    if diffs:
        way_out = "resume with the settings it was written with"
        if "data_partitions" in differ:
            parts = saved.get("data_partitions", 1)
            way_out = (("it was written with one data stream on every rank (as every run before data partitions "
                        "was): " if "data_partitions" not in saved else "")
                       + f"resume with data_partitions={parts} (--data-partitions {parts} on the command line)"
                       + (" and the other settings it was written with" if len(differ) > 1 else ""))
        if "total_steps" not in differ:  # else the multiple and schedule follow from the run's length
            way_out += _decoder_multiple_hint(saved.get("train"), now.get("train"))
            way_out += _schedule_hint(saved.get("train"), now.get("train"))
        way_out += _lr_hint(saved.get("train"), now.get("train"))
        raise CheckpointError(f"the checkpoint {str(ckpt.path)!r} was written by a different training run ("
                              f"{'; '.join(diffs)}); {way_out}, pass another checkpoint_dir=, or resume=False to "
                              "start over")


def _decoder_multiple_hint(saved: Any, now: Any) -> str:
    """How to resume a fit checkpoint whose decoder learning-rate multiple differs from this run's
    (absent: 1, the multiple of every run before the default followed the dictionary's shape, and
    of runs long enough for their latents since)."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return ""
    was, wants = saved.get("decoder_lr_scale", 1.0), now.get("decoder_lr_scale", 1.0)
    if was == wants:
        return ""
    return (f" (its decoder learned at {was!r} times the learning rate: TrainConfig(decoder_lr_scale={was!r}), "
            f"--decoder-lr-scale {was!r} on the command line)")


def _lr_hint(saved: Any, now: Any) -> str:
    """How to resume a fit checkpoint trained at another peak learning rate (the default follows
    the dictionary's width: a run from before that, past width 256, trained at 1e-2)."""
    if not isinstance(saved, dict) or not isinstance(now, dict) or saved.get("lr") == now.get("lr"):
        return ""
    was = saved.get("lr")
    if was is None:
        return ""
    return f" (it trained at lr {was!r}: TrainConfig(lr={was!r}), --lr {was!r} on the command line)"


def _schedule_hint(saved: Any, now: Any) -> str:
    """How to resume a fit checkpoint trained on another learning-rate schedule (the default follows
    the run's length: a long TopK run from before that trained on "wsd")."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return ""
    was = saved.get("lr_schedule")
    if was is None or was == now.get("lr_schedule"):
        return ""
    return (f" (it trained on the {was!r} schedule: TrainConfig(lr_schedule={was!r}), --lr-schedule {was} on the "
            "command line)")


# ---------------------------------------------------------------------------- optimiser / scheduler
def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimiser's state as JSON plus named tensors ``opt.{param}.{key}``."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`optimizer_state` saved into ``opt``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value.clone()
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    return {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(sched: torch.optim.lr_scheduler.LRScheduler, meta: dict[str, Any]) -> None:
    sched.load_state_dict({**meta, "lr_lambdas": [None] * len(sched.optimizer.param_groups)})


# ---------------------------------------------------------------------------- generators
def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The global torch (CPU), numpy and Python ``random`` generators' states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    return meta, {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(keys.astype(np.int64))}


def load_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
