"""The layer-name grammar of the store, in one place.

* Model layers: ``llm.layer.N`` (the residual stream after block N) and ``llm.layer.N.KIND``
  (see :mod:`interlatent.hooks`); Gym layers ``{module}:pre`` / ``{module}:post``; anything else
  is stored under the name it was written with.
* Latent layers name the layer they were trained on: ``latent_sae:{source}`` (an SAE's latents)
  and ``latent:{source}`` (a transcoder's), where ``source`` is the *canonical* stored name, so
  one layer has one latent layer whichever spelling trained it.
* A transcoder for ``llm.layer.N`` maps ``llm.layer.N.mlp_in`` to ``llm.layer.N.mlp_out``; for a
  Gym layer ``L``, ``L:pre`` to ``L:post``.
* A layer being built (a re-trained latent layer before it replaces the old one) lives under
  ``~building:{name}``; readers never list it, and the next build of that name removes a leftover.

This module knows nothing about SQL or models.
"""

from __future__ import annotations

import re

from interlatent.errors import ConfigError
from interlatent.hooks import PREFIX, TL_HOOKS

SAE_PREFIX = "latent_sae:"
TRANSCODER_PREFIX = "latent:"
LATENT_PREFIXES = (SAE_PREFIX, TRANSCODER_PREFIX)  # the longer first: "latent_sae:" also starts "latent"
BUILDING_PREFIX = "~building:"

_TL_TO_KIND = {v: k for k, v in TL_HOOKS.items()}
_RAW = re.compile(r"^blocks\.(?P<block>-?\d+)\.(?P<rest>.+)$")
_CANON = re.compile(r"^llm\.layer\.(?P<block>-?\d+)(?:\.(?P<kind>[a-z_]+))?$")


def split_latent(name: str) -> tuple[str | None, str]:
    """``("latent_sae:", "llm.layer.1")`` for ``"latent_sae:llm.layer.1"``; ``(None, name)`` otherwise."""
    for prefix in LATENT_PREFIXES:
        if name.startswith(prefix):
            return prefix, name[len(prefix):]
    return None, name


def latent_layer_name(prefix: str, source: str) -> str:
    """The latent layer of a dictionary trained on ``source`` (already canonical)."""
    if prefix not in LATENT_PREFIXES:
        raise ConfigError(f"latent prefix must be one of {LATENT_PREFIXES}, got {prefix!r}")
    return f"{prefix}{source}"


def canonical_hook_name(name: str) -> str:
    """The store's name for a raw TransformerLens hook of a known kind (``blocks.1.hook_resid_post``
    -> ``llm.layer.1``, ``blocks.1.hook_mlp_out`` -> ``llm.layer.1.mlp_out``); other names unchanged."""
    m = _RAW.match(name)
    if not m or m["rest"] not in _TL_TO_KIND:
        return name
    kind = _TL_TO_KIND[m["rest"]]
    return f"{PREFIX}{m['block']}" if kind == "resid_post" else f"{PREFIX}{m['block']}.{kind}"


def tl_hook_name(name: str) -> str | None:
    """The TransformerLens hook of a canonical model layer (``llm.layer.1`` ->
    ``blocks.1.hook_resid_post``); raw ``blocks.`` names are returned as they are; None otherwise."""
    m = _CANON.match(name)
    if m:
        kind = m["kind"] or "resid_post"
        return f"blocks.{m['block']}.{TL_HOOKS[kind]}" if kind in TL_HOOKS else None
    return name if _RAW.match(name) else None


def block_of(name: str) -> int | None:
    """The block index of a canonical or raw TransformerLens layer name, else None."""
    m = _CANON.match(name) or _RAW.match(name)
    return int(m["block"]) if m else None


def transcoder_io(layer: str) -> tuple[str, str]:
    """A transcoder's default (input, output) layers for ``layer``."""
    m = _CANON.match(canonical_hook_name(layer))
    if m and m["kind"] is None:
        return f"{PREFIX}{m['block']}.mlp_in", f"{PREFIX}{m['block']}.mlp_out"
    return f"{layer}:pre", f"{layer}:post"


def building_name(name: str) -> str:
    """Where a layer called ``name`` is built before it replaces the stored one."""
    return f"{BUILDING_PREFIX}{name}"


def is_building(name: str) -> bool:
    """True for a layer still being built (never listed by readers)."""
    return name.startswith(BUILDING_PREFIX)


_NEGATIVE_BLOCK = re.compile(r"(?P<head>(?:^|.*[.:])layer\.)(?P<idx>-\d+)(?P<tail>(?:\..*|:.*)?)$")


def with_block_counted(name: str, n_blocks: int) -> str | None:
    """``name`` with its negative block index counted from the end of a model of ``n_blocks``
    blocks (``llm.layer.-1`` -> ``llm.layer.3``, also inside ``latent_sae:llm.layer.-1.mlp_out``);
    None when ``name`` has no negative block index."""
    m = _NEGATIVE_BLOCK.match(name)
    if m is None:
        return None
    return f"{m['head']}{int(m['idx']) + int(n_blocks)}{m['tail'] or ''}"
