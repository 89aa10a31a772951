"""The dictionary spliced in with its error term: at its output hook the activation becomes
``x + decode(g) - decode(f) + (e' - e)`` (see :mod:`interlatent.patch.attribution`), exactly ``x``
when the latents and error written are the clean ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from interlatent.errors import ShapeError
from interlatent.patch.core import LatentPatch, at_hook

# edit(f, e) -> (g, e'): the latents and error the splice writes, from the clean ones
Edit = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _encode(patch: LatentPatch, x_in: Tensor, x_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dictionary on one forward pass's activations: (flat input, flat reconstruction, clean
    latents ``f`` ``[batch, pos, d_sae]``, error ``e = x_out - decode(f)`` ``[batch, pos, d_out]``)."""
    module = patch.module
    if x_in.shape[-1] != module.cfg.d_in or x_out.shape[-1] != module.cfg.out_dim:
        raise ShapeError(f"dictionary {patch.name} expects widths {module.cfg.d_in} -> {module.cfg.out_dim}; "
                         f"the model gave {x_in.shape[-1]} -> {x_out.shape[-1]}")
    batch = x_in.shape[0]
    flat_in = rearrange(x_in.detach(), "batch pos d -> (batch pos) d").to(module.W_enc.dtype)
    with torch.no_grad():
        f_flat = module.encode_dense(flat_in)
        recon_f = module.decode(f_flat, x=flat_in)
        f = rearrange(f_flat, "(batch pos) s -> batch pos s", batch=batch)
        e = x_out.detach().to(recon_f.dtype) - rearrange(recon_f, "(batch pos) d -> batch pos d", batch=batch)
    return flat_in, recon_f, f, e


@contextmanager
def recorded(patch: LatentPatch, model: Any, record: dict[str, Tensor]) -> Iterator[None]:
    """While the block runs, ``record`` receives the clean ``"f"`` and ``"e"`` of the last forward
    pass at the patch's hook point, and the model runs unchanged (nothing is written back)."""
    p_in, p_out = patch.check_model(model)
    captured: dict[str, Tensor] = {}

    def read(x_out: Tensor) -> None:
        x_in = x_out if p_in.name == p_out.name else captured.pop("x")
        _, _, record["f"], record["e"] = _encode(patch, x_in, x_out)

    with ExitStack() as stack:
        if p_in.name != p_out.name:
            stack.enter_context(at_hook(model, p_in, lambda act: captured.__setitem__("x", act)))
        stack.enter_context(at_hook(model, p_out, read))
        yield


@contextmanager
def spliced(patch: LatentPatch, model: Any, edit: Edit, record: dict[str, Tensor] | None = None) -> Iterator[None]:
    """While the block runs, the patch's dictionary is spliced in with its error term, and ``edit(f,
    e)`` gives the latents ``g`` ``[batch, pos, d_sae]`` and error ``e'`` ``[batch, pos, d_out]`` written
    in place of the clean ``f`` and ``e``: the output becomes ``x + decode(g) - decode(f) + (e' - e)``
    (exactly ``x`` when ``g is f`` and ``e' is e``). Gradients flow into whatever ``g`` / ``e'`` depend on.
    ``record`` (if given) receives the clean ``"f"`` and ``"e"`` of the last forward pass."""
    p_in, p_out = patch.check_model(model)
    module = patch.module
    same = p_in.name == p_out.name
    captured: dict[str, Tensor] = {}

    def rewrite(x_out: Tensor) -> Tensor:
        x_in = x_out if same else captured.pop("x")
        flat_in, recon_f, f, e = _encode(patch, x_in, x_out)
        if record is not None:
            record["f"], record["e"] = f, e
        g, e_new = edit(f, e)
        recon_g = module.decode(rearrange(g, "batch pos s -> (batch pos) s"), x=flat_in)
        delta = rearrange(recon_g - recon_f, "(batch pos) d -> batch pos d", batch=x_in.shape[0]) + (e_new - e)
        return x_out + delta.to(x_out.dtype)

    with ExitStack() as stack:
        if not same:
            stack.enter_context(at_hook(model, p_in, lambda act: captured.__setitem__("x", act)))
        stack.enter_context(at_hook(model, p_out, rewrite))
        yield


__all__ = ["Edit", "recorded", "spliced"]
