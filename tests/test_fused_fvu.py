"""The FVU loss's one-pass backward and the training step built on it equal the plain autograd path."""

from __future__ import annotations

import pytest
import torch

import interlatent.analysis.models.sparse as sparse_module
from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig, Transcoder
from interlatent.analysis.models.kernels import dense_fvu, fvu_loss, topk_code


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fvu_loss_value_and_gradient_equal_plain_autograd(dtype):
    gen = torch.Generator().manual_seed(0)
    target = (3 * torch.randn(512, 24, generator=gen) + 1).to(dtype)
    base = (target + 0.3 * torch.randn(512, 24, generator=gen).to(dtype)).detach()
    grads, values = [], []
    for loss_fn in (fvu_loss, dense_fvu):
        pred = base.clone().requires_grad_(True)
        value = loss_fn(target, pred)
        (2.5 * value).backward()
        values.append(value.detach())
        grads.append(pred.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=0)
    scale = float(grads[1].abs().max())
    assert grads[0].dtype == dtype and scale > 1e-6  # a gradient that could differ
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6 * scale)


def test_a_target_that_needs_a_gradient_gets_the_plain_one():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(64, 8, generator=gen, requires_grad=True)
    pred = torch.randn(64, 8, generator=gen, requires_grad=True)
    fvu_loss(target, pred).backward()
    g_target, g_pred = target.grad.clone(), pred.grad.clone()
    target.grad = pred.grad = None
    dense_fvu(target, pred).backward()
    torch.testing.assert_close(g_target, target.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_pred, pred.grad, rtol=1e-6, atol=1e-7)


def test_a_constant_target_gives_the_same_loss_as_before():
    target = torch.ones(16, 4)
    exact = target.clone().requires_grad_(True)  # nothing to explain, nothing unexplained: 0
    assert float(fvu_loss(target, exact).detach()) == float(dense_fvu(target, exact).detach()) == 0.0
    off = torch.zeros(16, 4, requires_grad=True)  # an error over no variance: inf, as before
    assert torch.equal(fvu_loss(target, off), dense_fvu(target, off)) and torch.isinf(fvu_loss(target, off))


def _step_grads(model, x, y, dead):
    model.zero_grad(set_to_none=True)
    out = model(x, y, dead_mask=dead)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip"])
@pytest.mark.parametrize("with_dead", [None, "some", "all"])
def test_training_step_gradients_equal_the_previous_loss_path(kind, with_dead, monkeypatch):
    torch.manual_seed(2)
    extra = {"sae": {}, "transcoder": {"d_out": 12}, "skip": {"d_out": 12, "skip": True}}[kind]
    cls = SparseAutoencoder if kind == "sae" else Transcoder
    m = cls(SparseCoderConfig(d_in=16, d_sae=128, k=6, k_aux=10, **extra), seed=3)
    m.train()
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_()
        if kind == "skip":
            m.W_skip.normal_(std=0.1)
    x = torch.randn(256, 16)
    y = torch.randn(256, m.cfg.out_dim) if extra else None
    dead = {None: None, "some": torch.rand(128) < 0.4, "all": torch.ones(128, dtype=torch.bool)}[with_dead]
    fast_out, fast = _step_grads(m, x, y, dead)
    monkeypatch.setattr(sparse_module, "fvu_loss", dense_fvu)  # the loss as it was computed before
    plain_out, plain = _step_grads(m, x, y, dead)
    assert fast.keys() == plain.keys() and "W_enc" in fast
    for name in fast:  # to 1e-6 of each gradient's own scale
        scale = float(plain[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-6, atol=1e-6 * scale, msg=name)
    torch.testing.assert_close(fast_out.loss, plain_out.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(fast_out.auxk_loss, plain_out.auxk_loss, rtol=1e-6, atol=1e-7)


def test_without_auxk_the_aux_output_is_a_broadcast_zero():
    torch.manual_seed(4)
    x, w = torch.randn(32, 8), torch.randn(64, 8, requires_grad=True)
    code = topk_code(x, torch.zeros(8), w, torch.zeros(64), w, 4)
    assert code.aux_decoded.shape == (32, 8) and not code.aux_decoded.any()
    assert code.aux_decoded.stride() == (0, 0)  # no [batch, d_out] buffer is written
    code.decoded.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
