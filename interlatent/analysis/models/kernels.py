"""TopK kernels: selection, sparse decoding and the autograd nodes whose backward passes only touch
active latents, with the plain dense reference a test compares them to.

Notation (one batch): ``x`` is ``[batch, d_in]``, ``W_enc`` ``[d_sae, d_in]``, ``W_dec``
``[d_sae, d_out]``, and the codes are ``(acts, indices)``, both ``[batch, k]``:

* encode: ``pre = (x - b_in) W_enc^T + b_enc``, ``(acts, indices) = relu(topk(pre, k))``
* decode: ``out[b] = sum_j acts[b, j] * W_dec[indices[b, j]]`` (an ``embedding_bag``)

AuxK adds a second code of the top ``k_aux`` pre-activations among dead latents, decoded through
the same ``W_dec``. Every weight gradient of these sparse codes is a sum of outer products into
the rows of active latents; :class:`TransposedPlan` sorts the entries by latent once and forms
each such sum as one CSR product, so no ``[batch, d_sae]`` tensor exists in the backward pass.

Entry points: :func:`topk_select`, :func:`topk_encode`, :func:`topk_code` (training forward with
AuxK), :func:`sparse_decode`, :func:`fvu_loss` (the loss, with a one-pass backward), and
:func:`dense_topk_code` / :func:`dense_fvu` (the references).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor


class TopKSelection(NamedTuple):
    """The top ``k`` of each row (ReLU'd) and the AuxK top ``k_aux`` among dead latents."""

    acts: Float[Tensor, "batch k"]
    indices: Int[Tensor, "batch k"]
    aux_acts: Float[Tensor, "batch k_aux"]
    aux_indices: Int[Tensor, "batch k_aux"]


class TopKCode(NamedTuple):
    """A TopK training forward: the decoded output (without ``b_dec``) and both codes
    (``aux_decoded`` is a broadcast zero when there is no AuxK code)."""

    decoded: Float[Tensor, "batch d_out"]
    acts: Float[Tensor, "batch k"]
    indices: Int[Tensor, "batch k"]
    aux_decoded: Float[Tensor, "batch d_out"]
    aux_acts: Float[Tensor, "batch k_aux"]
    aux_indices: Int[Tensor, "batch k_aux"]


# ---------------------------------------------------------------------------- sparse pieces
def sparse_decode(acts: Float[Tensor, "batch k"], indices: Int[Tensor, "batch k"],
                  weight: Float[Tensor, "d_sae d_out"]) -> Float[Tensor, "batch d_out"]:
    """``sum_j acts[b, j] * weight[indices[b, j]]`` without materialising ``[batch, d_sae]``."""
    if indices.shape[1] == 0:
        return acts.new_zeros((acts.shape[0], weight.shape[1]))
    return F.embedding_bag(indices, weight, per_sample_weights=acts.to(weight.dtype), mode="sum")


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # CSR support is marked beta; these kernels are tested here
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class TransposedPlan:
    """Row-sparse patterns ``[batch, k_s]`` (one per part ``s``) sorted by latent, once.

    Gradients of sparse codes are sums of outer products ``sum_{b,j} v[b, j] * m[b]`` into row
    ``indices[b, j]`` of a ``[d_sae, d]`` matrix. Sorting the entries by latent turns that into one
    CSR ``[d_sae, parts * batch] @ [parts * batch, d]`` product, which reads each dense row once per
    entry and never materialises ``[batch * k, d]``. Parts (main TopK, AuxK) stack along the batch
    axis, so entries never collide and every CSR row has sorted, unique columns.
    """

    def __init__(self, parts: list[Int[Tensor, "batch k_s"]], n_latents: int):
        batch = parts[0].shape[0]
        flat = torch.cat([rearrange(p, "batch k -> (batch k)") for p in parts])
        key = flat.to(torch.int16 if n_latents <= 2**15 else torch.int32)  # narrow keys sort 2-4x faster
        self.order = torch.argsort(key, stable=True)
        self.flat = flat
        self.n_latents = n_latents
        # int32 CSR indices (when they fit) halve the index traffic of every product
        itype = torch.int32 if flat.numel() < 2**31 - 1 and batch * len(parts) < 2**31 - 1 else torch.int64
        self.crow = torch.zeros(n_latents + 1, dtype=itype, device=flat.device)
        torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=self.crow[1:])
        cols = torch.cat([torch.arange(batch, dtype=itype, device=flat.device).repeat_interleave(p.shape[1]) + s * batch
                          for s, p in enumerate(parts)])
        self.col = cols.index_select(0, self.order)

    def matmul(self, values: list[Tensor], dense: list[Tensor]) -> Float[Tensor, "d_sae d"]:
        """``sum_s sum_{b,j} values[s][b, j] * dense[s][b]`` into row ``parts[s][b, j]``."""
        v = torch.cat([rearrange(t, "batch k -> (batch k)") for t in values])
        m = torch.cat(dense) if len(dense) > 1 else dense[0]
        if m.dtype not in (torch.float32, torch.float64):  # no CSR kernels: index_add the outer products
            out = m.new_zeros((self.n_latents, m.shape[1]))
            rows = self.col.long().new_empty(self.col.shape).scatter_(0, self.order, self.col.long())
            return out.index_add_(0, self.flat, v[:, None].to(m.dtype) * m[rows])
        return _csr(self.crow, self.col, v.index_select(0, self.order).to(m.dtype), (self.n_latents, m.shape[0])) @ m

    def row_sums(self, values: list[Tensor]) -> Float[Tensor, " d_sae"]:
        """``sum_{b,j} values[s][b, j]`` into entry ``parts[s][b, j]`` (bias gradients)."""
        v = torch.cat([rearrange(t, "batch k -> (batch k)") for t in values])
        return v.new_zeros(self.n_latents).index_add_(0, self.flat, v)


def sampled_dot(grad: Float[Tensor, "batch d"], indices: Int[Tensor, "batch k"],
                weight: Float[Tensor, "d_sae d"]) -> Float[Tensor, "batch k"]:
    """``<grad[b], weight[indices[b, j]]>`` for every entry, without gathering ``[batch, k, d]``."""
    batch, k = indices.shape
    if k == 0:
        return grad.new_zeros((batch, 0))
    if grad.dtype in (torch.float32, torch.float64) and weight.dtype == grad.dtype:
        crow = torch.arange(0, batch * k + 1, k, device=indices.device)
        pattern = _csr(crow, rearrange(indices, "batch k -> (batch k)"), grad.new_zeros(batch * k),
                       (batch, weight.shape[0]))
        out = torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0)
        return rearrange(out.values(), "(batch k) -> batch k", k=k)
    return einsum(weight[indices].to(grad.dtype), grad, "batch k d, batch d -> batch k")


# ---------------------------------------------------------------------------- selection
def topk_select(pre: Float[Tensor, "batch d_sae"], k: int, k_aux: int = 0,
                dead: Bool[Tensor, " d_sae"] | None = None) -> TopKSelection:
    """Top ``k`` of each row (ReLU'd) and, for AuxK, the top ``k_aux`` among ``dead`` latents."""
    if dead is not None and k_aux > 0:
        dead_idx = dead.nonzero().squeeze(1)
        if dead_idx.numel() == pre.shape[1] and k_aux >= k:
            # every latent is dead: the row's top k lie within its top k_aux, so select once
            aux_values, aux_indices = pre.topk(k_aux, dim=-1, sorted=False)
            values, sub = aux_values.topk(k, dim=-1, sorted=False)
            indices = aux_indices.gather(1, sub)
        else:  # only the dead columns take part: cheap when few latents are dead
            values, indices = pre.topk(k, dim=-1, sorted=False)
            aux_values, sub = pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
            aux_indices = dead_idx[sub]
    else:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        aux_values = pre.new_zeros((pre.shape[0], 0))
        aux_indices = indices.new_zeros((pre.shape[0], 0))
    return TopKSelection(values.clamp_min(0), indices, aux_values.clamp_min(0), aux_indices)


# ---------------------------------------------------------------------------- autograd nodes
class _TopKEncode(torch.autograd.Function):
    """TopK encoder of ``x - b_in`` whose backward pass only touches the ``k`` active latents."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, b_in: Tensor, weight: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
        x_c = x - b_in
        sel = topk_select(torch.addmm(bias, x_c, weight.t()), k)
        ctx.save_for_backward(x_c, weight, sel.indices, sel.acts > 0)
        ctx.mark_non_differentiable(sel.indices)
        return sel.acts, sel.indices

    @staticmethod
    def backward(ctx: Any, grad_acts: Tensor, _grad_indices: Any):  # type: ignore[override]
        x_c, weight, indices, live = ctx.saved_tensors
        # g[b, j] = dL/dpre[b, indices[b, j]]: the ReLU passes the gradient only where acts > 0
        g = grad_acts * live
        plan = TransposedPlan([indices], weight.shape[0])
        # dL/db_enc[i] = sum_{(b,j): indices[b,j]=i} g[b, j]
        grad_b = plan.row_sums([g])
        # dL/dx[b] = sum_j g[b, j] * W_enc[indices[b, j]]
        grad_x = sparse_decode(g, indices, weight) if ctx.needs_input_grad[0] else None
        # dL/db_in = -sum_b dL/dx[b] = -(dL/db_enc) @ W_enc: no per-row gradient needed
        grad_b_in = -(grad_b @ weight) if ctx.needs_input_grad[1] else None
        # dL/dW_enc[i] = sum_{(b,j): indices[b,j]=i} g[b, j] * (x[b] - b_in)
        grad_w = plan.matmul([g], [x_c])
        return grad_x, grad_b_in, grad_w, grad_b, None


class _TopKCode(torch.autograd.Function):
    """Training forward of a TopK dictionary: encode, select, decode — with AuxK — in one node.

    The entries are sorted by latent once (:class:`TransposedPlan`) and every weight gradient is
    one CSR product over them; gradients of the latent values are sampled dot products. Nothing of
    size ``[batch, d_sae]`` is built in the backward pass, AuxK included, and AuxK reaches the encoder.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, b_in: Tensor, w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, k: int, k_aux: int,
                dead: Tensor | None, workspace: Tensor | None):
        x = x - b_in
        # pre-activations only live until the selection below, so a reused workspace is safe
        pre = torch.addmm(b_enc, x, w_enc.t(), out=workspace) if workspace is not None else torch.addmm(b_enc, x, w_enc.t())
        sel = topk_select(pre, k, k_aux, dead)
        out = sparse_decode(sel.acts, sel.indices, w_dec)
        # without AuxK the aux output is a broadcast zero, not a [batch, d_out] buffer filled each step
        aux_out = sparse_decode(sel.aux_acts, sel.aux_indices, w_dec) if k_aux > 0 else out.new_zeros(()).expand_as(out)
        ctx.save_for_backward(x, w_enc, w_dec, *sel)
        ctx.mark_non_differentiable(sel.indices, sel.aux_indices)
        ctx.set_materialize_grads(False)  # unused outputs stay None instead of zero tensors
        return out, sel.acts, sel.indices, aux_out, sel.aux_acts, sel.aux_indices

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None, grad_acts: Tensor | None, _grad_idx: Any,  # type: ignore[override]
                 grad_aux_out: Tensor | None, grad_aux_acts: Tensor | None, _grad_aux_idx: Any):
        x, w_enc, w_dec, acts, idx, aux_acts, aux_idx = ctx.saved_tensors
        has_aux = aux_idx.shape[1] > 0
        grad_out = x.new_zeros((x.shape[0], w_dec.shape[1])) if grad_out is None else grad_out
        parts, values, g_parts, dec_grads = [idx], [acts], [], [grad_out]
        # dL/dacts[b, j] = <dL/dout[b], W_dec[idx[b, j]]> (+ any direct gradient of acts),
        # then through the ReLU: g[b, j] = dL/dpre[b, idx[b, j]]
        g = sampled_dot(grad_out, idx, w_dec)
        if grad_acts is not None:
            g = g + grad_acts
        g_parts.append(g * (acts > 0))
        if has_aux:  # the same for the AuxK code, decoded through the same W_dec
            grad_aux_out = torch.zeros_like(grad_out) if grad_aux_out is None else grad_aux_out
            ga = sampled_dot(grad_aux_out, aux_idx, w_dec)
            if grad_aux_acts is not None:
                ga = ga + grad_aux_acts
            parts.append(aux_idx)
            values.append(aux_acts)
            g_parts.append(ga * (aux_acts > 0))
            dec_grads.append(grad_aux_out)
        plan = TransposedPlan(parts, w_enc.shape[0])
        # dL/dW_enc[i] = sum_{(b,j): idx[b,j]=i} g[b, j] * (x[b] - b_in), over both codes
        grad_w_enc = plan.matmul(g_parts, [x] * len(parts))
        # dL/db_enc[i] = sum_{(b,j): idx[b,j]=i} g[b, j]
        grad_b_enc = plan.row_sums(g_parts)
        # dL/dW_dec[i] = sum_{(b,j): idx[b,j]=i} acts[b, j] * dL/dout[b]
        grad_w_dec = plan.matmul(values, dec_grads)
        grad_x = None
        if ctx.needs_input_grad[0]:  # dL/dx[b] = sum_j g[b, j] * W_enc[idx[b, j]], only when asked
            grad_x = sparse_decode(g_parts[0], idx, w_enc)
            if has_aux:
                grad_x = grad_x + sparse_decode(g_parts[1], aux_idx, w_enc)
        # dL/db_in = -sum_b dL/dx[b] = -(dL/db_enc) @ W_enc (an SAE's input is centred on b_dec)
        grad_b_in = -(grad_b_enc @ w_enc) if ctx.needs_input_grad[1] else None
        return grad_x, grad_b_in, grad_w_enc, grad_b_enc, grad_w_dec, None, None, None, None


class _FVU(torch.autograd.Function):
    """``sum |target - pred|^2 / sum |target - mean(target)|^2`` with a one-pass backward.

    Plain autograd spends five ``[batch, d]`` passes on the backward of the squared error (the
    power's own ``pow``, a copy, two products, the difference's negation); this saves the
    difference once and writes ``dL/dpred = 2 g (pred - target) / total`` in one product. The
    target gets no gradient: :func:`fvu_loss` only takes this path when it needs none."""

    @staticmethod
    def forward(ctx: Any, target: Tensor, pred: Tensor) -> Tensor:
        total = (target - target.mean(0, keepdim=True)).pow(2).sum().clamp_min(torch.finfo(target.dtype).tiny)
        diff = pred - target
        flat = rearrange(diff, "batch d -> (batch d)")
        ctx.save_for_backward(diff, total)
        ctx.pred_dtype = pred.dtype
        return torch.dot(flat, flat) / total

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        diff, total = ctx.saved_tensors
        grad_pred = diff * (2 * grad / total) if ctx.needs_input_grad[1] else None
        return None, grad_pred.to(ctx.pred_dtype) if grad_pred is not None else None


def fvu_loss(target: Float[Tensor, "batch d"], pred: Float[Tensor, "batch d"]) -> Float[Tensor, ""]:
    """Fraction of variance unexplained, ``sum |y - y_hat|^2 / sum |y - mean(y)|^2``, with the
    one-pass backward of :class:`_FVU` when ``target`` needs no gradient (a target that does goes
    through plain autograd, :func:`dense_fvu`)."""
    if target.requires_grad and torch.is_grad_enabled():
        return dense_fvu(target, pred)
    return _FVU.apply(target, pred)


def dense_fvu(target: Float[Tensor, "batch d"], pred: Float[Tensor, "batch d"]) -> Float[Tensor, ""]:
    """The plain autograd FVU: what :func:`fvu_loss` must equal."""
    total = (target - target.mean(0, keepdim=True)).pow(2).sum()
    return (target - pred).pow(2).sum() / total.clamp_min(torch.finfo(target.dtype).tiny)


# ---------------------------------------------------------------------------- entry points
def topk_encode(x: Float[Tensor, "batch d_in"], b_in: Float[Tensor, " d_in"], w_enc: Float[Tensor, "d_sae d_in"],
                b_enc: Float[Tensor, " d_sae"], k: int) -> tuple[Float[Tensor, "batch k"], Int[Tensor, "batch k"]]:
    """TopK codes of ``x``; differentiable (sparse backward) when gradients are enabled."""
    if torch.is_grad_enabled():
        return _TopKEncode.apply(x, b_in, w_enc, b_enc, k)
    sel = topk_select(torch.addmm(b_enc, x - b_in, w_enc.t()), k)
    return sel.acts, sel.indices


def topk_code(x: Float[Tensor, "batch d_in"], b_in: Float[Tensor, " d_in"], w_enc: Float[Tensor, "d_sae d_in"],
              b_enc: Float[Tensor, " d_sae"], w_dec: Float[Tensor, "d_sae d_out"], k: int, *, k_aux: int = 0,
              dead: Bool[Tensor, " d_sae"] | None = None, workspace: Tensor | None = None) -> TopKCode:
    """Encode, select (with AuxK over ``dead`` latents when ``k_aux > 0``) and decode in one autograd
    node. ``workspace`` is an optional reused ``[batch, d_sae]`` buffer for the pre-activations."""
    return TopKCode(*_TopKCode.apply(x, b_in, w_enc, b_enc, w_dec, k, k_aux, dead, workspace))


def dense_topk_code(x: Float[Tensor, "batch d_in"], b_in: Tensor, w_enc: Float[Tensor, "d_sae d_in"],
                    b_enc: Float[Tensor, " d_sae"], w_dec: Float[Tensor, "d_sae d_out"],
                    k: int) -> Float[Tensor, "batch d_out"]:
    """The plain dense TopK forward (no sparse kernels, plain autograd): what the fast path must equal."""
    pre = (x - b_in) @ w_enc.t() + b_enc
    values, idx = pre.topk(k, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, idx, values.clamp_min(0))
    return dense @ w_dec


__all__ = ["TopKCode", "TopKSelection", "TransposedPlan", "dense_fvu", "dense_topk_code", "fvu_loss", "sampled_dot",
           "sparse_decode", "topk_code", "topk_encode", "topk_select"]
