"""The probe points of integrated gradients on each latent's own path (``path="latent"`` of
:func:`~interlatent.patch.attribution.attribute`): the latents of each prompt split into groups that
keep apart the latents moving at the same positions, and each latent's gradient read at its path's
midpoint from its own group's probe."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

#: the latent path's probe points sit this far along each latent's move: f + PROBE * (baseline - f)
PROBE = 0.5


def _probe_groups(move: Float[Tensor, "batch pos d_sae"], groups: int, seed: int) -> Float[Tensor, "group batch d_sae"]:
    """0/1 membership of every (prompt, latent) in one of ``groups`` probe groups. Per prompt, the
    latents that move (``move`` non-zero at some position) are placed in descending order of
    ``||move_i||``, each into the group whose latents it overlaps least, the overlap of two latents
    being ``sum over positions |move_i| |move_j|`` (zero when they never move at the same position);
    among groups it overlaps equally, the one with the fewest latents (fewer latents moving in a
    probe also interact less across positions), then one drawn from ``seed``. Latents that do not
    move belong to no group; a prompt's groups are numbered from 0 without gaps."""
    gen = torch.Generator().manual_seed(int(seed))
    size = move.detach().abs().float().cpu()
    norm = size.norm(dim=1)  # [batch, d_sae]
    member = np.zeros((groups, size.shape[0], size.shape[2]), dtype=np.float32)
    for b in range(size.shape[0]):
        moving = torch.nonzero(norm[b] > 0).flatten()
        tie = torch.rand(len(moving), groups, generator=gen).numpy()
        if len(moving) == 0:
            continue
        rows = np.ascontiguousarray(size[b][:, moving].numpy().astype(np.float64).T)  # [n, pos]
        # a latent's overlap with group k is its moves dotted with the group's summed moves: [groups, pos]
        # (memory grows with the positions, not with the square of the moving latents)
        group_moves = np.zeros((groups, rows.shape[1]))
        chosen = np.zeros(len(moving), dtype=np.int64)
        sizes = [0] * groups
        ties = tie.tolist()
        for n in np.argsort(-norm[b, moving].numpy(), kind="stable").tolist():
            # the least overlap; among equals the smallest group, then the seeded draw
            load, tie_n = (group_moves @ rows[n]).tolist(), ties[n]
            least = min(load)
            k = load.index(least) if load.count(least) == 1 else \
                min((j for j in range(groups) if load[j] == least), key=lambda j: (sizes[j], tie_n[j]))
            chosen[n] = k
            group_moves[k] += rows[n]
            sizes[k] += 1
        # the groups a prompt uses take the lowest numbers (the same split), so that prompts share probes
        member[np.unique(chosen, return_inverse=True)[1], b, moving.numpy()] = 1.0
    return torch.from_numpy(member)


def _per_prompt(value: Tensor, n_prompts: int) -> bool:
    """Whether a metric's value has one entry per prompt (else it is one value for the batch)."""
    return isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n_prompts


def _latent_path_midpoints(probe: Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]], move: Tensor, groups: int,
                           n_prompts: int, seed: int, per_prompt: bool = True,
                           rows: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Each latent's gradient at the midpoint of its own path (see the module doc): ``groups`` probe
    points, at probe ``k`` the latents of group ``k`` (:func:`_probe_groups`) moved ``PROBE`` of the
    way to their baselines and the others clean; a latent's gradient is read from its group's probe.
    ``move``: ``[batch, pos, n]`` the moves (baseline - clean) of the latents that are probed (those
    that move somewhere). ``probe(offsets, copies)``: one gradient pass over ``copies`` stacked
    copies of the batch with those latents shifted by ``offsets`` ``[copies * batch, pos, n]`` ->
    (d metric / d those latents, d metric / d error, the first copy's logits). ``per_prompt``: the
    groups are drawn per prompt (the metric is a sum of per-prompt terms); else once for the batch,
    every prompt's positions taken together, so that a latent moves on every prompt in one probe.
    The clean point rides in the first pass. Returns (clean d metric / d error, the clean point's
    logits, the midpoint gradients ``[batch, pos, n]``)."""
    if per_prompt:
        member = _probe_groups(move, groups, seed)
    else:
        member = _probe_groups(rearrange(move, "batch pos s -> 1 (batch pos) s"), groups, seed)
        member = member.expand(groups, n_prompts, move.shape[-1])
    member = member[member.flatten(1).any(1)]  # a probe no latent moves in adds nothing: more steps than latents
    member = member.to(move.device)[:, :, None, :]  # [group, batch, 1, n]
    member = torch.cat([member.new_zeros((1, *member.shape[1:])), member])  # row block 0: the clean point
    per_pass = max(1, rows // n_prompts)  # row blocks stacked into one forward pass (``rows`` rows)
    half = PROBE * move.float()
    total = torch.zeros_like(half)
    for k0 in range(0, member.shape[0], per_pass):
        m = member[k0:k0 + per_pass]
        c = m.shape[0]
        offsets = rearrange(m * half, "group batch pos s -> (group batch) pos s").to(move.dtype)
        gk, gek, logits = probe(offsets, c)
        if k0 == 0:
            ge0, clean_logits = gek[:n_prompts], logits
        total += (rearrange(gk.float(), "(group batch) pos s -> group batch pos s", group=c) * m).sum(0)
    return ge0, clean_logits, total
