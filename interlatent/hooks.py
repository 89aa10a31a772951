"""Hook-point names, in one place.

``llm.layer.N`` is the residual stream after block N (TransformerLens ``blocks.N.hook_resid_post``;
for Hugging Face models, the output of decoder block N). ``llm.layer.N.KIND`` names the other points
of block N:

=============  ==================================  ==========================================
kind           TransformerLens hook                Hugging Face module hook
=============  ==================================  ==========================================
resid_pre      ``blocks.N.hook_resid_pre``         input of decoder block N
resid_mid      ``blocks.N.hook_resid_mid``         input of the block's second layer norm
attn_out       ``blocks.N.hook_attn_out``          output of the block's attention module
mlp_in         ``blocks.N.ln2.hook_normalized``    input of the block's MLP (after its norm)
mlp_out        ``blocks.N.hook_mlp_out``           output of the block's MLP
resid_post     ``blocks.N.hook_resid_post``        output of decoder block N
=============  ==================================  ==========================================

``mlp_in`` is the MLP's actual input (after its layer norm), so a transcoder sees exactly what the
MLP sees. The table is for decoders (TransformerLens 3 and 4 share the hook names); BERT-style
encoders, which normalise after each residual sum, map some kinds to other hooks and modules (see
:mod:`interlatent.backends.encoder`). Negative block indices count from the end and are stored as the real index. Raw
TransformerLens hook names are accepted too; they map to the canonical name when there is one.
This module knows nothing about SQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from interlatent.errors import LayerNotFoundError, unknown_name

PREFIX = "llm.layer."

#: kind -> TransformerLens hook name inside block N
TL_HOOKS: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "attn_out": "hook_attn_out",
    "mlp_in": "ln2.hook_normalized",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}
KINDS: tuple[str, ...] = tuple(TL_HOOKS)
_TL_TO_KIND = {v: k for k, v in TL_HOOKS.items()}
# hook points TransformerLens only fires when a model flag is set
_TL_FLAGGED = {
    "hook_mlp_in": "model.set_use_hook_mlp_in(True)",
    "hook_attn_in": "model.set_use_attn_in(True)",
    "hook_q_input": "model.set_use_split_qkv_input(True)",
    "hook_k_input": "model.set_use_split_qkv_input(True)",
    "hook_v_input": "model.set_use_split_qkv_input(True)",
    "attn.hook_result": "model.set_use_attn_result(True)",
}

_CANON = re.compile(r"^llm\.layer\.(?P<block>-?\d+)(?:\.(?P<kind>[a-z_]+))?$")
_RAW = re.compile(r"^blocks\.(?P<block>-?\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point: where to read, and the name it is stored under."""

    block: int  # the real (non-negative) block index
    kind: str  # one of KINDS, or "raw" for another TransformerLens hook
    tl_name: str  # the TransformerLens hook name, e.g. "blocks.3.hook_resid_post"

    @property
    def name(self) -> str:
        """The store's layer name: ``llm.layer.N`` / ``llm.layer.N.kind`` / the raw hook name."""
        if self.kind == "resid_post":
            return f"{PREFIX}{self.block}"
        if self.kind == "raw":
            return self.tl_name
        return f"{PREFIX}{self.block}.{self.kind}"


def canonical_names(n_blocks: int) -> list[str]:
    """Every canonical hook-point name of a model with ``n_blocks`` blocks."""
    out = []
    for b in range(n_blocks):
        out.append(f"{PREFIX}{b}")
        out += [f"{PREFIX}{b}.{k}" for k in KINDS if k != "resid_post"]
    return out


def _block(index: int, n_blocks: int, spec: str) -> int:
    real = index + n_blocks if index < 0 else index
    if not 0 <= real < n_blocks:
        raise LayerNotFoundError(
            f"block index {index} in {spec!r} is out of range for a model with {n_blocks} blocks "
            f"(valid: 0..{n_blocks - 1}, or -{n_blocks}..-1 from the end)"
        )
    return real


def resolve(spec: str | int, n_blocks: int, raw_hooks: Iterable[str] | None = None) -> HookPoint:
    """Resolve a hook-point spec against a model.

    Args:
        spec: ``llm.layer.N[.kind]``, a block index (int, resid_post), or a raw TransformerLens hook
            name such as ``blocks.N.hook_mlp_out``.
        n_blocks: the model's number of blocks.
        raw_hooks: the model's TransformerLens hook names (``model.hook_dict``), to validate raw
            names; None accepts only raw names that map to a canonical kind.

    Raises:
        LayerNotFoundError: unknown name or kind (with the closest valid names) or out-of-range block.
    """
    if isinstance(spec, int):
        return HookPoint(_block(spec, n_blocks, str(spec)), "resid_post",
                         f"blocks.{_block(spec, n_blocks, str(spec))}.hook_resid_post")
    m = _CANON.match(spec)
    if m:
        kind = m["kind"] or "resid_post"
        if kind not in TL_HOOKS:
            raise unknown_name("hook kind", kind, KINDS, hint=f"in {spec!r}; kinds are {', '.join(KINDS)}")
        block = _block(int(m["block"]), n_blocks, spec)
        return HookPoint(block, kind, f"blocks.{block}.{TL_HOOKS[kind]}")
    m = _RAW.match(spec)
    if m:
        block = _block(int(m["block"]), n_blocks, spec)
        rest = m["rest"]
        name = f"blocks.{block}.{rest}"
        if rest in _TL_TO_KIND:
            return HookPoint(block, _TL_TO_KIND[rest], name)
        if raw_hooks is not None:
            pool = set(raw_hooks)
            if name not in pool:
                raise unknown_name("hook point", spec, pool | set(canonical_names(n_blocks)))
            return HookPoint(block, "raw", name)
    pool = set(canonical_names(n_blocks)) | set(raw_hooks or ())
    raise unknown_name("hook point", spec, pool, hint="names look like 'llm.layer.3' or 'llm.layer.3.mlp_out'")


def flag_needed(tl_name: str) -> str | None:
    """The call that makes a TransformerLens hook fire, if it is one that is off by default."""
    for suffix, call in _TL_FLAGGED.items():
        if tl_name.endswith(suffix):
            return call
    return None


def expand(layer_indices: Sequence[int], hooks: Sequence[str] | None) -> list[str | int]:
    """Specs for the collector: each kind in ``hooks`` applied to every index, full names kept."""
    if not hooks:
        return list(layer_indices)
    out: list[str | int] = []
    for h in hooks:
        if h in TL_HOOKS:
            out += [f"{PREFIX}{i}" if h == "resid_post" else f"{PREFIX}{i}.{h}" for i in layer_indices]
        else:
            out.append(h)
    return out


#: raw TransformerLens points whose activation is not ``[batch, pos, ...]`` (heads come second)
NOT_BY_POSITION = ("attn.hook_pattern", "attn.hook_attn_scores")


def indexed_by_position(point: HookPoint) -> bool:
    """False for points whose activation's second axis is not the token position (attention
    patterns and scores are ``[batch, head, query, key]``)."""
    return not point.tl_name.endswith(NOT_BY_POSITION)
