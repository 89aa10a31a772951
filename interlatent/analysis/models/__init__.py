"""Trained modules and their on-disk format: ``config.json`` + ``weights.safetensors``.

The ``architecture`` string in the config picks the class that loads it (:data:`REGISTRY`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from interlatent.analysis.models.jumprelu import JumpReLUSAE, JumpReLUTranscoder
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
    JumpReLUSAE.architecture: JumpReLUSAE,
    JumpReLUTranscoder.architecture: JumpReLUTranscoder,
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


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100_000_000


def read_safetensors_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` of every tensor in a safetensors file, read from its header
    alone (nothing is loaded). Raises :class:`ArtifactError` for a file that is not a complete
    safetensors file: too short, a header that is not JSON, or tensors that run past its end."""
    path = Path(path)
    size = path.stat().st_size
    fix = f"re-save it with save_module(module, {str(path.parent)!r})"
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise ArtifactError(f"{path} is not a safetensors file (or is truncated): {size} bytes, header length "
                                f"{n}; {fix}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} has a header that is not JSON ({exc}); {fix}") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} has a header that is not a JSON object; {fix}")
    data = size - 8 - n
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}; {fix}") from None
        want = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
        if dtype not in _ITEMSIZE or end - begin != want or begin < 0:
            raise ArtifactError(f"{path}: tensor {name!r} ({dtype}, shape {shape}) does not match its "
                                f"{end - begin} stored bytes; {fix}")
        if end > data:
            raise ArtifactError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, which holds "
                                f"{data}; {fix}")
        out[name] = (shape, dtype)
    return out


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{cfg_path} is not valid JSON ({exc}); it should be the config save_module wrote") \
            from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{cfg_path} holds a JSON {type(config).__name__}, expected an object with "
                            "'architecture' and the module's config fields")
    return config


def load_module(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a module saved by :func:`save_module`; the config's architecture picks the class.

    The config is checked against the weights' safetensors header before anything is allocated:
    tensor names, shapes and dtypes must be those the config describes. Every problem (missing or
    malformed files, bad JSON, config fields the class does not take, truncated weights, a shape
    or dtype mismatch) raises :class:`ArtifactError` naming it.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise ArtifactError(f"{str(folder)!r} is not a saved module: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_config(cfg_path)
    arch = config.get("architecture")
    if not isinstance(arch, str) or arch not in REGISTRY:
        raise ArtifactError(f"unknown architecture {arch!r} in {cfg_path}; known: {sorted(REGISTRY)}")
    cls = REGISTRY[arch]
    try:
        with torch.device("meta"):  # shapes and dtypes only: a wrong width allocates nothing
            skeleton = cls.from_config_dict(config)  # type: ignore[attr-defined]
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ArtifactError(f"the config in {cfg_path} does not build a {arch}: {exc}") from None
    want = {k: (tuple(v.shape), _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)))
            for k, v in skeleton.state_dict().items()}
    have = read_safetensors_header(w_path)
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or unexpected:
        raise ArtifactError(f"weights in {w_path} do not match {arch}: missing {missing}, unexpected {unexpected}")
    for name, (shape, dtype) in want.items():
        if have[name][0] != shape:
            raise ArtifactError(f"tensor {name!r} in {w_path} has shape {have[name][0]}, but the config in "
                                f"{cfg_path} needs {shape}; the config and weights come from different modules")
        if have[name][1] != dtype:
            raise ArtifactError(f"tensor {name!r} in {w_path} is {have[name][1]}, expected {dtype}; save the module "
                                "with save_module (it writes the module's own dtype)")
    module = cls.from_config_dict(config)  # type: ignore[attr-defined]
    try:
        state = load_file(str(w_path), device=str(device))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"could not read the weights in {w_path}: {exc}") from None
    module.load_state_dict(state, strict=True)
    return module.to(device).eval()


__all__ = [
    "REGISTRY", "EncoderOutput", "ForwardOutput", "JumpReLUSAE", "JumpReLUTranscoder", "LinearProbe",
    "LinearProbeConfig", "SparseAutoencoder", "SparseCoder", "SparseCoderConfig", "Transcoder", "expand_latents",
    "fvu", "load_module", "read_safetensors_header", "save_module",
]
