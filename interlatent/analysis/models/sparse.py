"""Sparse dictionaries: ``SparseAutoencoder`` and ``Transcoder``.

Both encode an input into a wide latent space and decode into an output space:

* SAE:        ``f = act(W_enc (x - b_dec) + b_enc)``,   ``x_hat = W_dec^T f + b_dec``
* Transcoder: ``f = act(W_enc (x - b_in) + b_enc)``,    ``y_hat = W_dec^T f + b_dec (+ W_skip x)``

``act`` is TopK (default: the ``k`` largest pre-activations, then ReLU) or ReLU with an L1
penalty. TopK latents travel as ``(latent_acts [batch k], latent_indices [batch k])``; decoding
them is an ``embedding_bag`` (a sparse gather-sum) and the encoder's backward pass only touches the
``k`` active latents per row, so training never pays for a dense ``[batch, d_sae]`` gradient, AuxK
included. Those kernels live in :mod:`interlatent.analysis.models.kernels`;
:func:`dense_topk_reference` is the plain version a test compares to.

Weights: ``W_enc`` is ``[d_sae, d_in]`` (row i reads latent i), ``W_dec`` is ``[d_sae, d_out]``
(row i writes latent i), kept unit-norm during training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interlatent.analysis.models.kernels import (
    dense_topk_code,
    fvu_loss,
    sparse_decode,
    topk_code,
    topk_encode,
)
from interlatent.errors import ConfigError, ShapeError

ACTIVATIONS = ("topk", "relu", "jumprelu")  # jumprelu: JumpReLUSAE (analysis/models/jumprelu.py)


@dataclass(frozen=True)
class SparseCoderConfig:
    """Shape and sparsity of a dictionary."""

    d_in: int
    """Width of the input activations."""
    d_sae: int
    """Number of latents (the dictionary width)."""
    k: int | None = 32
    """Active latents per input for TopK; None for ReLU."""
    activation: str = "topk"
    """``"topk"``, ``"relu"`` (ReLU + L1) or ``"jumprelu"`` (a learnt threshold per latent)."""
    d_out: int | None = None
    """Width of the output (transcoders); None means d_in."""
    skip: bool = False
    """Transcoders only: add a linear skip connection from input to output."""
    l1_coefficient: float = 1e-3
    """ReLU only: weight of the L1 penalty on latent activations (times decoder norms)."""
    k_aux: int | None = None
    """TopK only: latents used by the AuxK loss on dead latents (None: d_in // 2)."""
    auxk_coefficient: float = 1 / 32
    """TopK only: weight of the AuxK loss."""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """Free-form: source layer, hook name, model, training settings."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if self.activation == "topk":
            if self.k is None or not 1 <= self.k <= self.d_sae:
                raise ConfigError(f"TopK needs 1 <= k <= d_sae={self.d_sae}, got k={self.k}")
        if self.skip and self.d_out is None:
            raise ConfigError("skip=True is for transcoders (give d_out)")

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def aux_k(self) -> int:
        return min(self.k_aux if self.k_aux is not None else max(self.d_in // 2, 1), self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EncoderOutput(NamedTuple):
    """Latents of a batch: TopK gives ``[batch k]`` values and indices; ReLU gives dense values."""

    latent_acts: Float[Tensor, "batch k"] | Float[Tensor, "batch d_sae"]
    latent_indices: Int[Tensor, "batch k"] | None


class ForwardOutput(NamedTuple):
    """What one forward pass computes, losses included."""

    output: Float[Tensor, "batch d_out"]
    """The reconstruction (SAE) or predicted output (transcoder)."""
    latent_acts: Tensor
    latent_indices: Tensor | None
    fvu: Float[Tensor, ""]
    """Fraction of variance unexplained of the batch."""
    auxk_loss: Float[Tensor, ""]
    l1_loss: Float[Tensor, ""]
    loss: Float[Tensor, ""]


BatchSum = Callable[[Tensor], Tensor]
"""Sums a tensor over every part of a batch split between processes (an all-reduce)."""


def fvu(target: Float[Tensor, "batch d"], pred: Float[Tensor, "batch d"],
        batch_sum: BatchSum | None = None) -> Float[Tensor, ""]:
    """Fraction of variance unexplained: ``sum |y - y_hat|^2 / sum |y - mean(y)|^2`` (in one process
    the backward pass takes one ``[batch, d]`` product,
    :func:`~interlatent.analysis.models.kernels.fvu_loss`).

    With ``batch_sum`` the rows are this process's part of a larger batch: the mean and the
    denominator are the whole batch's, so the parts' values add up to the whole batch's FVU."""
    if batch_sum is None:
        return fvu_loss(target, pred)
    n = batch_sum(target.new_tensor(float(target.shape[0])))
    mean = batch_sum(target.detach().sum(0, keepdim=True)) / n
    total = batch_sum((target.detach() - mean).pow(2).sum())
    return (target - pred).pow(2).sum() / total.clamp_min(torch.finfo(target.dtype).tiny)


class SparseCoder(nn.Module):
    """Shared machinery of SAEs and transcoders (see the module docstring)."""

    architecture = "sparse_coder"
    default_init = "random"
    """How :meth:`init_from_data` sets latent directions unless told: ``"random"`` or ``"samples"``."""

    def __init__(self, cfg: SparseCoderConfig, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 init_scale: float = 0.5):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(cfg.d_sae, cfg.out_dim, generator=gen, dtype=dtype)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # encoder = decoder transpose at init (for a transcoder, a fresh unit-norm read-out)
        # encoder = decoder transpose at init, scaled by init_scale (0.5 learnt fastest on the
        # planted-feature benchmark); a transcoder gets a fresh unit-norm read-out, scaled alike
        if cfg.out_dim == cfg.d_in:
            w_enc = w_dec.clone()
        else:
            w_enc = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=dtype)
            w_enc /= w_enc.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(w_enc * init_scale)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.out_dim, dtype=dtype))
        self._pre_buffer: Tensor | None = None  # training workspace, see _workspace

    # ------------------------------------------------------------------ pieces
    def _workspace(self, x: Tensor) -> Tensor | None:
        """A ``[batch, d_sae]`` buffer for training pre-activations, kept between steps.

        Allocating 32 MB afresh each step costs page faults that a reused buffer does not; it is
        only used while training, never shared between devices, dtypes or batch sizes."""
        if not self.training:
            return None
        shape = (x.shape[0], self.cfg.d_sae)
        dtype = torch.promote_types(x.dtype, self.W_enc.dtype)  # what x - b_in and the matmul produce
        buf = self._pre_buffer
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != x.device:
            buf = torch.empty(shape, dtype=dtype, device=x.device)
            self._pre_buffer = buf
        return buf

    def train(self, mode: bool = True) -> SparseCoder:
        if not mode:
            self._pre_buffer = None
        return super().train(mode)

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _input_bias(self) -> Tensor:
        raise NotImplementedError

    def _check(self, x: Tensor, width: int, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != width:
            raise ShapeError(f"{type(self).__name__} expects {what} of shape [batch, {width}], got {tuple(x.shape)}")

    def pre_acts(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        self._check(x, self.cfg.d_in, "inputs")
        return torch.addmm(self.b_enc, x - self._input_bias(), self.W_enc.t())

    def encode(self, x: Float[Tensor, "batch d_in"]) -> EncoderOutput:
        """Latents of ``x``: TopK values and indices, or dense ReLU activations."""
        if self.cfg.activation == "relu":
            return EncoderOutput(F.relu(self.pre_acts(x)), None)
        self._check(x, self.cfg.d_in, "inputs")
        return EncoderOutput(*topk_encode(x, self._input_bias(), self.W_enc, self.b_enc, self.cfg.k))

    def encode_dense(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        """Latents as a dense ``[batch, d_sae]`` matrix (zeros where inactive); differentiable."""
        pre = self.pre_acts(x)
        if self.cfg.activation == "relu":
            return F.relu(pre)
        values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, values.clamp_min(0))

    def decode(self, latent_acts: Tensor, latent_indices: Int[Tensor, "batch k"] | None = None,
               x: Float[Tensor, "batch d_in"] | None = None) -> Float[Tensor, "batch d_out"]:
        """Output from latents: sparse ``(acts, indices)`` or a dense ``[batch, d_sae]`` matrix."""
        if latent_indices is None:
            if latent_acts.shape[-1] != self.cfg.d_sae:
                raise ShapeError(f"dense latents must have width d_sae={self.cfg.d_sae}, got {latent_acts.shape[-1]}")
            out = latent_acts @ self.W_dec + self.b_dec
        else:
            out = sparse_decode(latent_acts, latent_indices, self.W_dec) + self.b_dec
        return self._add_skip(out, x)

    def _skip(self, x: Tensor | None) -> Tensor | float:
        return 0.0

    def _add_skip(self, out: Tensor, x: Tensor | None) -> Tensor:
        """``out`` plus the skip connection's term, with no full-width add when there is none."""
        skip = self._skip(x)
        return out + skip if isinstance(skip, Tensor) else out

    # ------------------------------------------------------------------ training forward
    def forward(self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"] | None = None,
                dead_mask: Bool[Tensor, " d_sae"] | None = None, *,
                batch_sum: BatchSum | None = None) -> ForwardOutput:
        """Encode, decode and score against ``target`` (the input for an SAE). ``dead_mask`` marks
        latents that have not fired lately: with TopK they get the AuxK loss. ``batch_sum``: the
        rows are one process's part of a batch (see :func:`fvu`); the losses returned are this
        part's share, and the parts' losses (and gradients) add up to the whole batch's."""
        target = x if target is None else target
        self._check(target, self.cfg.out_dim, "targets")
        zero = x.new_zeros(())
        if self.cfg.activation == "relu":
            acts = F.relu(self.pre_acts(x))
            out = self._add_skip(acts @ self.W_dec + self.b_dec, x)
            err = fvu(target, out, batch_sum)
            per_row = reduce(acts * self.W_dec.norm(dim=-1), "batch d_sae -> batch", "sum")
            if batch_sum is None:
                l1 = per_row.mean()
                scale = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            else:
                n = batch_sum(target.new_tensor(float(target.shape[0])))
                mean = batch_sum(target.detach().sum(0)) / n
                l1 = per_row.sum() / n
                scale = (batch_sum((target.detach() - mean).pow(2).sum()) / n).clamp_min(1e-12)
            loss = err + self.cfg.l1_coefficient * l1 / scale.sqrt()
            return ForwardOutput(out, acts, None, err, zero, l1, loss)
        use_aux = dead_mask is not None and bool(dead_mask.any())
        k_aux = min(self.cfg.aux_k, int(dead_mask.sum())) if use_aux else 0
        code = topk_code(x, self._input_bias(), self.W_enc, self.b_enc, self.W_dec, self.cfg.k, k_aux=k_aux,
                         dead=dead_mask if use_aux else None, workspace=self._workspace(x))
        out = self._add_skip(code.decoded + self.b_dec, x)
        err = fvu(target, out, batch_sum)
        auxk = zero
        if use_aux:
            residual = (target - out).detach()
            scale = min(1.0, int(dead_mask.sum()) / max(self.cfg.aux_k, 1))
            auxk = scale * fvu(residual, code.aux_decoded, batch_sum)
            auxk = torch.nan_to_num(auxk, nan=0.0)
        loss = err + self.cfg.auxk_coefficient * auxk
        return ForwardOutput(out, code.acts, code.indices, err, auxk, zero, loss)

    # ------------------------------------------------------------------ constraints
    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out the gradient component that would change decoder row norms."""
        if self.W_dec.grad is None:
            return
        parallel = einsum(self.W_dec.grad, self.W_dec, "d_sae d, d_sae d -> d_sae")
        self.W_dec.grad.sub_(parallel[:, None] * self.W_dec)

    @torch.no_grad()
    def init_bias_from(self, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"] | None = None,
                       method: str = "geometric_median") -> None:
        """Set the decoder bias to the geometric median (or mean) of a sample of the targets."""
        target = x if y is None else y
        self.b_dec.copy_(geometric_median(target) if method == "geometric_median" else target.mean(0))

    @torch.no_grad()
    def init_from_data(self, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"] | None = None, *,
                       weights: str | None = None, bias: str = "geometric_median", seed: int | None = 0) -> None:
        """Initialise from a sample of the training data: biases, then (optionally) latent directions.

        ``weights="samples"``: latent ``i`` reads the centred input of a random sample ``j`` and
        writes that sample's centred target, both unit-norm (the encoder keeps its init scale). An
        SAE keeps encoder = decoder transpose; a transcoder's read and write directions start as a
        matched pair instead of two unrelated random vectors. With fewer samples than latents, the
        rest keep their random init. ``weights="random"`` keeps the random directions. ``None``
        takes the architecture's default (:attr:`default_init`): samples for transcoders, random
        for SAEs, which is what measured best for each (see ``benchmarks/sae_bench.py``).
        """
        weights = self.default_init if weights is None else weights
        if weights not in ("samples", "random"):
            raise ConfigError(f"weights must be 'samples' or 'random', got {weights!r}")
        self.init_bias_from(x, y, method=bias)
        if weights == "random":
            return
        target = x if y is None else y
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        n = min(x.shape[0], self.cfg.d_sae)
        pick = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
        reads = x[pick].to(self.W_enc.dtype) - self._input_bias()
        writes = target[pick].to(self.W_dec.dtype) - self.b_dec
        ok = (reads.norm(dim=-1) > 1e-6) & (writes.norm(dim=-1) > 1e-6)  # a sample at the centre says nothing
        rows = torch.arange(n, device=x.device)[ok]
        scale = self.W_enc[rows].norm(dim=-1, keepdim=True)
        self.W_enc[rows] = reads[ok] / reads[ok].norm(dim=-1, keepdim=True) * scale
        self.W_dec[rows] = writes[ok] / writes[ok].norm(dim=-1, keepdim=True)

    # ------------------------------------------------------------------ saving
    def config_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, **self.cfg.to_dict()}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> SparseCoder:
        fields = {k: v for k, v in config.items() if k != "architecture"}
        return cls(SparseCoderConfig(**fields))


class SparseAutoencoder(SparseCoder):
    """A sparse autoencoder: reconstructs its input through ``d_sae`` sparse latents."""

    architecture = "sparse_autoencoder"

    def __init__(self, cfg: SparseCoderConfig, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 init_scale: float = 0.5):
        if cfg.d_out not in (None, cfg.d_in) or cfg.skip:
            raise ConfigError("a SparseAutoencoder has d_out == d_in and no skip; use Transcoder for in -> out maps")
        super().__init__(cfg, seed=seed, dtype=dtype, init_scale=init_scale)

    def _input_bias(self) -> Tensor:
        return self.b_dec


class Transcoder(SparseCoder):
    """A transcoder: predicts a component's output from its input through sparse latents."""

    architecture = "transcoder"
    default_init = "samples"

    def __init__(self, cfg: SparseCoderConfig, *, seed: int | None = None, dtype: torch.dtype = torch.float32,
                 init_scale: float = 0.5):
        if cfg.d_out is None:
            cfg = SparseCoderConfig(**{**cfg.to_dict(), "d_out": cfg.d_in})
        super().__init__(cfg, seed=seed, dtype=dtype, init_scale=init_scale)
        self.b_in = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype), requires_grad=False)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.out_dim, dtype=dtype))

    def _input_bias(self) -> Tensor:
        return self.b_in

    def _skip(self, x: Tensor | None) -> Tensor | float:
        if not self.cfg.skip:
            return 0.0
        if x is None:
            raise ConfigError("a transcoder with a skip connection needs its input to decode: decode(..., x=x)")
        return x @ self.W_skip

    @torch.no_grad()
    def init_bias_from(self, x: Tensor, y: Tensor | None = None, method: str = "geometric_median") -> None:
        """Centre the input on its mean and set the decoder bias from the outputs."""
        self.b_in.copy_(x.mean(0))
        target = x if y is None else y
        self.b_dec.copy_(geometric_median(target) if method == "geometric_median" else target.mean(0))


@torch.no_grad()
def geometric_median(points: Float[Tensor, "n d"], iters: int = 30, eps: float = 1e-6) -> Float[Tensor, " d"]:
    """Weiszfeld's algorithm, started from the mean."""
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=-1).clamp_min(eps)
        weights = 1.0 / dist
        new = reduce(points * weights[:, None], "n d -> d", "sum") / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


def dense_topk_reference(model: SparseCoder, x: Tensor) -> Tensor:
    """Plain dense TopK forward of ``model`` (no sparse kernels): what the fast path must equal."""
    dense = dense_topk_code(x, model._input_bias(), model.W_enc, model.b_enc, model.W_dec, model.cfg.k)
    return dense + model.b_dec + model._skip(x)


def expand_latents(acts: Tensor, indices: Tensor | None, d_sae: int) -> Tensor:
    """Dense ``[batch, d_sae]`` latents from TopK ``(acts, indices)`` (identity for dense acts)."""
    if indices is None:
        return acts
    return acts.new_zeros((acts.shape[0], d_sae)).scatter(-1, indices, acts)


__all__ = [
    "EncoderOutput", "ForwardOutput", "SparseAutoencoder", "SparseCoder", "SparseCoderConfig", "Transcoder",
    "dense_topk_reference", "expand_latents", "fvu", "geometric_median", "sparse_decode",
]
