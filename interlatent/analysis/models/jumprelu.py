"""``JumpReLUSAE`` and ``JumpReLUTranscoder``: dictionaries whose latents fire only above a learnt
threshold.

``f = ReLU(pre) * (pre > threshold)`` with ``pre = W_enc (x - b_dec) + b_enc`` and a threshold
``[d_sae]`` per latent (Rajamanoharan et al. 2024, the architecture of Gemma Scope and SAELens's
``"jumprelu"``); decoding is the plain ``x_hat = W_dec^T f + b_dec``. Latents are dense
``[batch d_sae]`` (most entries zero), like a ReLU SAE's. ``JumpReLUTranscoder`` is the same
activation on a transcoder (SAELens's ``"jumprelu_transcoder"`` / ``"jumprelu_skip_transcoder"``).

The module is for dictionaries trained elsewhere (:func:`interlatent.analysis.interop.load_saelens`):
it encodes, decodes, patches, attributes, saves and exports; it is not trained here (the threshold
has no gradient through the step), so its forward pass scores a batch but its loss is the FVU alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from interlatent.analysis.models.sparse import (
    EncoderOutput,
    ForwardOutput,
    SparseAutoencoder,
    SparseCoderConfig,
    Transcoder,
    fvu,
)
from interlatent.errors import ConfigError


def _jumprelu_config(cfg: SparseCoderConfig, what: str) -> SparseCoderConfig:
    if cfg.activation != "jumprelu":
        raise ConfigError(f"a {what} needs activation='jumprelu', got {cfg.activation!r}")
    return dataclasses.replace(cfg, k=None) if cfg.k is not None else cfg  # a threshold, not a count


class _JumpReLU:
    """The activation and forward pass both JumpReLU dictionaries share."""

    threshold: nn.Parameter

    def encode_dense(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        """``ReLU(pre) * (pre > threshold)``: zero wherever the pre-activation is at or below the threshold."""
        pre = self.pre_acts(x)  # type: ignore[attr-defined]
        return F.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def encode(self, x: Float[Tensor, "batch d_in"]) -> EncoderOutput:
        return EncoderOutput(self.encode_dense(x), None)

    def forward(self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"] | None = None,
                dead_mask: Bool[Tensor, " d_sae"] | None = None) -> ForwardOutput:
        """Encode, decode and score against ``target`` (the input for an SAE): FVU; no AuxK or L1 term."""
        target = x if target is None else target
        self._check(target, self.cfg.out_dim, "targets")  # type: ignore[attr-defined]
        acts = self.encode_dense(x)
        out = acts @ self.W_dec + self.b_dec + self._skip(x)  # type: ignore[attr-defined]
        err = fvu(target, out)
        zero = x.new_zeros(())
        return ForwardOutput(out, acts, None, err, zero, zero, err)


class JumpReLUSAE(_JumpReLU, SparseAutoencoder):
    """A sparse autoencoder with a JumpReLU activation (see the module docstring)."""

    architecture = "jumprelu_sae"

    def __init__(self, cfg: SparseCoderConfig, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 init_scale: float = 0.5):
        super().__init__(_jumprelu_config(cfg, "JumpReLUSAE"), seed=seed, dtype=dtype, init_scale=init_scale)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))


class JumpReLUTranscoder(_JumpReLU, Transcoder):
    """A transcoder with a JumpReLU activation (see the module docstring)."""

    architecture = "jumprelu_transcoder"

    def __init__(self, cfg: SparseCoderConfig, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 init_scale: float = 0.5):
        super().__init__(_jumprelu_config(cfg, "JumpReLUTranscoder"), seed=seed, dtype=dtype, init_scale=init_scale)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))


__all__ = ["JumpReLUSAE", "JumpReLUTranscoder"]
