"""``LinearProbe``: a linear read-out of activations, with the standardisation it was trained on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interlatent.errors import ConfigError, ShapeError

TASKS = ("classification", "regression")


@dataclass(frozen=True)
class LinearProbeConfig:
    """Shape and task of a probe."""

    d_in: int
    """Width of the input activations."""
    task: str = "classification"
    """``"classification"`` (softmax over classes) or ``"regression"`` (one output)."""
    n_classes: int = 2
    """Classification only: number of classes."""
    classes: list[Any] = field(default_factory=list)
    """Classification only: the target value of each class index."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form: layer, target, pooling, training settings."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "classification" and self.n_classes < 2:
            raise ConfigError(f"classification needs at least 2 classes, got {self.n_classes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LinearProbe(nn.Module):
    """``logits = W ((x - mean) / std) + b``; the standardisation is part of the module."""

    architecture = "linear_probe"

    def __init__(self, cfg: LinearProbeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        out = cfg.n_classes if cfg.task == "classification" else 1
        self.linear = nn.Linear(cfg.d_in, out)
        self.register_buffer("mean", torch.zeros(cfg.d_in))
        self.register_buffer("std", torch.ones(cfg.d_in))

    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch out"]:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise ShapeError(f"LinearProbe expects [batch, {self.cfg.d_in}], got {tuple(x.shape)}")
        return self.linear((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: Float[Tensor, "batch d_in"]) -> Tensor:
        """Class indices (classification) or values (regression)."""
        out = self(x)
        return out.argmax(-1) if self.cfg.task == "classification" else out.squeeze(-1)

    def config_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **self.cfg.to_dict()}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> LinearProbe:
        return cls(LinearProbeConfig(**{k: v for k, v in config.items() if k != "architecture"}))
