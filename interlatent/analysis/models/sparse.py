"""Sparse dictionaries: ``SparseAutoencoder`` and ``Transcoder``.

Both encode an input into a wide latent space and decode into an output space:

* SAE:        ``f = act(W_enc (x - b_dec) + b_enc)``,   ``x_hat = W_dec^T f + b_dec``
* Transcoder: ``f = act(W_enc (x - b_in) + b_enc)``,    ``y_hat = W_dec^T f + b_dec (+ W_skip x)``

``act`` is TopK (default: the ``k`` largest pre-activations, then ReLU) or ReLU with an L1
penalty. TopK latents travel as ``(latent_acts [batch k], latent_indices [batch k])``; decoding
them is an ``embedding_bag`` (a sparse gather-sum) and the encoder's backward pass only touches the
``k`` active latents per row (an ``index_add``), so training never pays for a dense
``[batch, d_sae]`` gradient. :func:`dense_topk_reference` is the plain version a test compares to.

Weights: ``W_enc`` is ``[d_sae, d_in]`` (row i reads latent i), ``W_dec`` is ``[d_sae, d_out]``
(row i writes latent i), kept unit-norm during training.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, reduce
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interlatent.errors import ConfigError, ShapeError

ACTIVATIONS = ("topk", "relu")


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
    """``"topk"`` or ``"relu"`` (ReLU + L1)."""
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


class _TopKEncode(torch.autograd.Function):
    """TopK encoder with a backward pass that only touches active latents.

    Forward: ``pre = x W^T + b``; the top ``k`` of each row, ReLU'd; optionally also the top
    ``k_aux`` among ``dead`` latents (for AuxK). Backward: gradients for W and b from those entries
    only — an ``index_add`` of ``[batch*k, d_in]`` rows, or (with AuxK rows) one dense
    ``G^T x`` over a scattered gradient matrix, whichever is cheaper.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, k: int, k_aux: int,
                dead: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = torch.addmm(bias, x, weight.t())
        values, indices = pre.topk(k, dim=-1, sorted=False)
        acts = values.clamp_min(0)
        if dead is not None and k_aux > 0:
            masked = pre.masked_fill(~dead, -math.inf)
            aux_values, aux_indices = masked.topk(k_aux, dim=-1, sorted=False)
            aux_acts = torch.where(torch.isfinite(aux_values), aux_values.clamp_min(0), 0.0)
        else:
            aux_acts = x.new_zeros((x.shape[0], 0))
            aux_indices = indices.new_zeros((x.shape[0], 0))
        ctx.save_for_backward(x, indices, acts > 0, aux_indices, aux_acts > 0)
        ctx.d_sae = weight.shape[0]
        ctx.weight = weight.detach()
        ctx.mark_non_differentiable(indices, aux_indices)
        return acts, indices, aux_acts, aux_indices

    @staticmethod
    def backward(ctx: Any, grad_acts: Tensor, _gi: Any, grad_aux: Tensor | None, _ga: Any):  # type: ignore[override]
        x, indices, live, aux_indices, aux_live = ctx.saved_tensors
        g = grad_acts * live
        has_aux = aux_indices.shape[1] > 0 and grad_aux is not None
        grad_x = None
        if has_aux:
            dense = x.new_zeros((x.shape[0], ctx.d_sae))
            dense.scatter_add_(1, indices, g)
            dense.scatter_add_(1, aux_indices, grad_aux * aux_live)
            grad_w = dense.t() @ x
            grad_b = dense.sum(0)
        else:
            flat = rearrange(indices, "batch k -> (batch k)")
            contrib = rearrange(einsum(g, x, "batch k, batch d -> batch k d"), "batch k d -> (batch k) d")
            grad_w = x.new_zeros((ctx.d_sae, x.shape[1])).index_add_(0, flat, contrib)
            grad_b = x.new_zeros(ctx.d_sae).index_add_(0, flat, rearrange(g, "batch k -> (batch k)"))
        if ctx.needs_input_grad[0]:  # an SAE's input is centred on b_dec, which learns through it
            weight = ctx.weight
            grad_x = dense @ weight if has_aux else sparse_decode(g, indices, weight)
        return grad_x, grad_w, grad_b, None, None, None


def sparse_decode(acts: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"],
                  weight: Float[Tensor, "d_sae d_out"]) -> Float[Tensor, "batch d_out"]:
    """``sum_j acts[b, j] * weight[indices[b, j]]`` without materialising ``[batch, d_sae]``."""
    if indices.shape[1] == 0:
        return acts.new_zeros((acts.shape[0], weight.shape[1]))
    return F.embedding_bag(indices, weight, per_sample_weights=acts.to(weight.dtype), mode="sum")


def fvu(target: Float[Tensor, "batch d"], pred: Float[Tensor, "batch d"]) -> Float[Tensor, ""]:
    """Fraction of variance unexplained: ``sum |y - y_hat|^2 / sum |y - mean(y)|^2``."""
    total = (target - target.mean(0, keepdim=True)).pow(2).sum()
    return (target - pred).pow(2).sum() / total.clamp_min(torch.finfo(target.dtype).tiny)


class SparseCoder(nn.Module):
    """Shared machinery of SAEs and transcoders (see the module docstring)."""

    architecture = "sparse_coder"

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

    # ------------------------------------------------------------------ pieces
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
        x_c = x - self._input_bias()
        if torch.is_grad_enabled() and (self.W_enc.requires_grad or self.b_enc.requires_grad):
            acts, idx, _, _ = _TopKEncode.apply(x_c, self.W_enc, self.b_enc, self.cfg.k, 0, None)
            return EncoderOutput(acts, idx)
        values, idx = torch.addmm(self.b_enc, x_c, self.W_enc.t()).topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(values.clamp_min(0), idx)

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
        return out + self._skip(x)

    def _skip(self, x: Tensor | None) -> Tensor | float:
        return 0.0

    # ------------------------------------------------------------------ training forward
    def forward(self, x: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_out"] | None = None,
                dead_mask: Bool[Tensor, " d_sae"] | None = None) -> ForwardOutput:
        """Encode, decode and score against ``target`` (the input for an SAE). ``dead_mask`` marks
        latents that have not fired lately: with TopK they get the AuxK loss."""
        target = x if target is None else target
        self._check(target, self.cfg.out_dim, "targets")
        zero = x.new_zeros(())
        if self.cfg.activation == "relu":
            acts = F.relu(self.pre_acts(x))
            out = acts @ self.W_dec + self.b_dec + self._skip(x)
            err = fvu(target, out)
            l1 = reduce(acts * self.W_dec.norm(dim=-1), "batch d_sae -> batch", "sum").mean()
            scale = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            loss = err + self.cfg.l1_coefficient * l1 / scale.sqrt()
            return ForwardOutput(out, acts, None, err, zero, l1, loss)
        x_c = x - self._input_bias()
        use_aux = dead_mask is not None and bool(dead_mask.any())
        k_aux = min(self.cfg.aux_k, int(dead_mask.sum())) if use_aux else 0
        acts, idx, aux_acts, aux_idx = _TopKEncode.apply(x_c, self.W_enc, self.b_enc, self.cfg.k, k_aux,
                                                         dead_mask if use_aux else None)
        out = sparse_decode(acts, idx, self.W_dec) + self.b_dec + self._skip(x)
        err = fvu(target, out)
        auxk = zero
        if use_aux:
            residual = (target - out).detach()
            aux_out = sparse_decode(aux_acts, aux_idx, self.W_dec)
            scale = min(1.0, int(dead_mask.sum()) / max(self.cfg.aux_k, 1))
            auxk = scale * fvu(residual, aux_out)
            auxk = torch.nan_to_num(auxk, nan=0.0)
        loss = err + self.cfg.auxk_coefficient * auxk
        return ForwardOutput(out, acts, idx, err, auxk, zero, loss)

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
    """Plain dense TopK forward (no sparse kernels): what the fast path must equal."""
    pre = (x - model._input_bias()) @ model.W_enc.t() + model.b_enc
    values, idx = pre.topk(model.cfg.k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, idx, values.clamp_min(0))
    return dense @ model.W_dec + model.b_dec + model._skip(x)


def expand_latents(acts: Tensor, indices: Tensor | None, d_sae: int) -> Tensor:
    """Dense ``[batch, d_sae]`` latents from TopK ``(acts, indices)`` (identity for dense acts)."""
    if indices is None:
        return acts
    return acts.new_zeros((acts.shape[0], d_sae)).scatter(-1, indices, acts)


__all__ = [
    "EncoderOutput", "ForwardOutput", "SparseAutoencoder", "SparseCoder", "SparseCoderConfig", "Transcoder",
    "dense_topk_reference", "expand_latents", "fvu", "geometric_median", "sparse_decode",
]
