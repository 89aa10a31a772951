"""Data-parallel training with ``torch.distributed`` (gloo on CPU, or any backend).

Every rank holds the whole dictionary. Each step's *global* batch (the batch a one-process run
would take) is split by rows: rank ``r`` of ``W`` trains on rows ``[r * B // W, (r + 1) * B // W)``
(:func:`rows_of`), so the ranks' parts are disjoint and their union is the global batch. A rank
gets its part either by reading the whole stream and keeping its rows (:func:`shard_batches`), or,
in the pipelines, by reading only its own data partitions
(:class:`~interlatent.analysis.train.stream.PartitionedStream`), whose concatenation is that part. The loss
of each part is its share of the global batch's loss (FVU with the global batch's mean and
variance, see :func:`interlatent.analysis.models.sparse.fvu`), so the gradients are summed over the
ranks; fire counts and the batch size are summed too, and the initial weights are broadcast from
rank 0. Every rank then makes the same update and stays identical to the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over every rank (a new tensor, outside autograd)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def sum_gradients(params: list[nn.Parameter]) -> None:
    """Replace each parameter's gradient with its sum over the ranks (a missing gradient counts as 0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def rows_of(n: int, rank: int, world_size: int) -> slice:
    """The rows of an ``n``-row global batch that rank ``rank`` of ``world_size`` trains on."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def shard(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's rows of a global batch ``x`` or ``(x, y)``."""
    if isinstance(batch, (tuple, list)):
        return tuple(None if t is None else t[rows_of(t.shape[0], rank, world_size)] for t in batch)
    return batch[rows_of(batch.shape[0], rank, world_size)]


def shard_batches(batches: Iterable[Any], rank: int | None = None, world_size: int | None = None) -> Iterator[Any]:
    """This rank's part of every global batch of ``batches`` (rank and size default to the process group's)."""
    here, size = world()
    rank = here if rank is None else rank
    size = size if world_size is None else world_size
    for batch in batches:
        yield shard(batch, rank, size)


def gather_to_first(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list in rank order; None on the other ranks). A collective:
    every rank must call it."""
    rank, size = world()
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
