"""Trained modules and their on-disk format: ``config.json`` + ``weights.safetensors``.

The ``architecture`` string in the config picks the class that loads it (:data:`REGISTRY`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from interlatent.analysis.models.probe import LinearProbe, LinearProbeConfig
from interlatent.analysis.models.sparse import (
    EncoderOutput,
    ForwardOutput,
    SparseAutoencoder,
    SparseCoder,
    SparseCoderConfig,
    Transcoder,
    expand_latents,
    fvu,
)
from interlatent.errors import ArtifactError

REGISTRY: dict[str, type[nn.Module]] = {
    SparseAutoencoder.architecture: SparseAutoencoder,
    Transcoder.architecture: Transcoder,
    LinearProbe.architecture: LinearProbe,
}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"


def save_module(module: nn.Module, folder: str | Path) -> Path:
    """Write ``config.json`` and ``weights.safetensors`` into ``folder`` (created). Returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = module.config_dict()  # type: ignore[operator]
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"architecture": config["architecture"]})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    return folder


def load_module(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a module saved by :func:`save_module`; the config's architecture picks the class."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise ArtifactError(f"{str(folder)!r} is not a saved module: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    config: dict[str, Any] = json.loads(cfg_path.read_text())
    arch = config.get("architecture")
    if arch not in REGISTRY:
        raise ArtifactError(f"unknown architecture {arch!r} in {cfg_path}; known: {sorted(REGISTRY)}")
    module = REGISTRY[arch].from_config_dict(config)  # type: ignore[attr-defined]
    state = load_file(str(w_path), device=str(device))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"weights in {w_path} do not match {arch}: missing {missing}, unexpected {unexpected}")
    return module.to(device).eval()


__all__ = [
    "REGISTRY", "EncoderOutput", "ForwardOutput", "LinearProbe", "LinearProbeConfig", "SparseAutoencoder",
    "SparseCoder", "SparseCoderConfig", "Transcoder", "expand_latents", "fvu", "load_module", "save_module",
]
