"""``LatentPatch``: splice, ablate, clamp and steer dictionary latents inside a running model.

A patch is a trained SAE or transcoder bound to its hook point(s). At the hook it encodes the
activation, edits the latents, and writes the edit back as a *delta* on the original activation
(``x + decode(f_edited) - decode(f)``), so a patch without edits leaves the model bit-identical;
``keep_error=False`` replaces the activation by the reconstruction instead. A transcoder reads its
input hook (the MLP's normalized input) and replaces its output hook (``hook_mlp_out``) in the same
forward pass.

The edits are one :class:`Edits` value, checked once when it is built. ``with patch.applied(model,
...)`` installs the patch through the model's backend (:mod:`interlatent.backends`: TransformerLens
3 / 4 hook contexts, Hugging Face module hooks); for TransformerLens, ``patch.hooks(...)`` also
gives ``fwd_hooks`` for ``run_with_hooks``. Leaving the block removes every hook, also on
exceptions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, SupportsFloat, SupportsIndex

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from interlatent import naming
from interlatent.analysis.models import SparseCoder, Transcoder, load_module
from interlatent.backends import HookFn, make_backend
from interlatent.errors import ConfigError, LayerNotFoundError, ShapeError
from interlatent.hooks import HookPoint, resolve

log = logging.getLogger(__name__)

MODES = ("zero", "mean")


def _latent_values(name: str, values: Mapping[SupportsIndex, SupportsFloat] | None) -> Mapping[int, float]:
    if values is None:
        return MappingProxyType({})
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name} must map latent index -> value, e.g. {{3: 5.0}}; got {type(values).__name__}")
    out = {int(k): float(v) for k, v in values.items()}
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    if bad:
        raise ConfigError(f"{name} values must be finite; got {bad}")
    return MappingProxyType(out)


@dataclass(frozen=True)
class Edits:
    """What to do to the latents, as one value checked when it is built.

    Attributes:
        ablate: latents to ablate (set to zero, or to their mean with ``mode="mean"``).
        mode: ``"zero"`` or ``"mean"``.
        clamp: latent -> the value it is set to.
        steer: latent -> the amount added to it.
        positions: the columns edited (negative from the end); None edits every position.
        keep_error: keep the dictionary's error term, so an edit is a delta on the original
            activation (no edit: bit-identical); False splices in the reconstruction.

    Keyword arguments of :meth:`LatentPatch.hooks`, :meth:`LatentPatch.applied` and the effects
    build one (:meth:`of`); :meth:`LatentPatch.edits` also checks it against the dictionary.
    """

    # what the constructor takes; after it, ablate and positions are tuples of int and clamp / steer
    # read-only mappings of int -> float
    ablate: Iterable[SupportsIndex] | SupportsIndex = ()
    mode: str = "zero"
    clamp: Mapping[SupportsIndex, SupportsFloat] | None = field(default_factory=dict)
    steer: Mapping[SupportsIndex, SupportsFloat] | None = field(default_factory=dict)
    positions: Iterable[SupportsIndex] | SupportsIndex | None = None
    keep_error: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        ablate = (self.ablate,) if isinstance(self.ablate, SupportsIndex) else self.ablate
        if isinstance(ablate, (str, bytes, Mapping)):
            raise ConfigError(f"ablate must be a list of latent indices, got {ablate!r}")
        object.__setattr__(self, "ablate", tuple(int(i) for i in ablate))
        object.__setattr__(self, "clamp", _latent_values("clamp", self.clamp))
        object.__setattr__(self, "steer", _latent_values("steer", self.steer))
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in np.atleast_1d(self.positions)))
        if not isinstance(self.keep_error, (bool, np.bool_)):
            raise ConfigError(f"keep_error must be True or False, got {self.keep_error!r}")
        object.__setattr__(self, "keep_error", bool(self.keep_error))

    @classmethod
    def of(cls, edits: Edits | None = None, **kwargs: Any) -> Edits:
        """``edits`` as it is, or one built from keyword arguments (None values mean the default);
        both at once is refused."""
        given = {k: v for k, v in kwargs.items() if v is not None}
        if edits is None:
            return cls(**given)
        if not isinstance(edits, Edits):
            raise ConfigError(f"edits must be an Edits value, got {type(edits).__name__}")
        if given:
            raise ConfigError(f"pass either edits= or the edit keywords, not both (got edits and {sorted(given)})")
        return edits

    @property
    def empty(self) -> bool:
        """True when no latent is edited (a splice with ``keep_error=False`` still changes the model)."""
        return not (self.ablate or self.clamp or self.steer)

    def latents(self) -> list[int]:
        """Every latent this edits, sorted."""
        return sorted(set(self.ablate) | set(self.clamp) | set(self.steer))

    def check_positions(self, seq_len: int) -> None:
        """Refuse positions outside a sequence of ``seq_len``."""
        if self.positions is None:
            return
        bad = [p for p in self.positions if not -seq_len <= p < seq_len]
        if bad:
            raise ConfigError(f"positions {bad} are outside the sequence (length {seq_len}; valid -{seq_len}.."
                              f"{seq_len - 1})")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, for the store's intervention records."""
        return {"ablate": list(self.ablate), "mode": self.mode, "clamp": {str(k): v for k, v in self.clamp.items()},
                "steer": {str(k): v for k, v in self.steer.items()},
                "positions": None if self.positions is None else list(self.positions), "keep_error": self.keep_error}


class LatentPatch:
    """A dictionary bound to the hook point(s) it reads and writes.

    Args:
        module: a trained :class:`SparseAutoencoder` or :class:`Transcoder`.
        layer: the layer it was trained on: ``llm.layer.N[.kind]`` or a raw hook name. An SAE reads
            and writes that point; a transcoder for ``llm.layer.N`` reads ``llm.layer.N.mlp_in`` and
            writes ``llm.layer.N.mlp_out`` unless ``in_layer`` / ``out_layer`` say otherwise.
        latent_means: ``[d_sae]`` mean activation of each latent (for ``mode="mean"``).
        name: the latent layer's name in the store, for records.
    """

    def __init__(self, module: SparseCoder, layer: str, *, in_layer: str | None = None, out_layer: str | None = None,
                 latent_means: Any = None, name: str | None = None) -> None:
        if not isinstance(module, SparseCoder):
            raise ConfigError(f"LatentPatch needs a SparseAutoencoder or Transcoder, got {type(module).__name__}")
        self.module = module.eval()
        self.layer = layer
        self.is_transcoder = isinstance(module, Transcoder)
        meta = module.cfg.metadata or {}
        if self.is_transcoder:
            canonical = naming.canonical_hook_name(layer)
            block = canonical.split(".")[2] if canonical.startswith("llm.layer.") else None
            self.in_layer = in_layer or meta.get("in_layer") or (f"llm.layer.{block}.mlp_in" if block else None)
            self.out_layer = out_layer or meta.get("out_layer") or (f"llm.layer.{block}.mlp_out" if block else None)
            if not self.in_layer or not self.out_layer:
                raise ConfigError(f"transcoder for {layer!r}: pass in_layer= and out_layer= (hook names)")
        else:
            self.in_layer = self.out_layer = in_layer or layer
        self.latent_means = None if latent_means is None else torch.as_tensor(np.asarray(latent_means),
                                                                              dtype=torch.float32)
        self.name = name or naming.latent_layer_name(naming.TRANSCODER_PREFIX if self.is_transcoder
                                                     else naming.SAE_PREFIX, naming.canonical_hook_name(layer))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_artifact(cls, path: str | Path, layer: str | None = None, **kwargs: Any) -> LatentPatch:
        """From a saved module folder (``config.json`` + ``weights.safetensors``)."""
        module = load_module(path)
        layer = layer or (module.cfg.metadata or {}).get("layer")
        if layer is None:
            raise ConfigError(f"the artifact at {path} does not record its layer; pass layer=")
        return cls(module, layer, **kwargs)

    @classmethod
    def from_db(cls, db: Any, latent_layer: str) -> LatentPatch:
        """From a backfilled latent layer of the store (``latent_sae:...`` / ``latent:...``): its
        artifact gives the module, its source layer the hook points, its stored values the means."""
        info = db.layer_info(latent_layer)
        db.check_complete(info.name, what="LatentPatch.from_db (mean ablation uses its stored latent means)")
        if info.artifact_id is None:
            raise ConfigError(f"{latent_layer!r} has no recorded artifact; train it with SAEPipeline or "
                              "TranscoderPipeline, or build LatentPatch(module, layer) yourself")
        art = db.get_artifact(info.artifact_id)
        module = load_module(art["path"], sha256=art["config"].get("weights_sha256"))
        meta = module.cfg.metadata or {}

        def hook_of(name: str | None) -> str | None:
            if name is None:
                return None
            src = db.layer_info(name)
            return src.name if src.name.startswith("llm.layer.") or not src.hook_name else src.hook_name

        means = latent_means_from_db(db, info.name)
        return cls(module, info.source or art["layer"], in_layer=hook_of(meta.get("in_layer")),
                   out_layer=hook_of(meta.get("out_layer")) if isinstance(module, Transcoder) else None,
                   latent_means=means, name=info.name)

    # ------------------------------------------------------------------ validation
    @property
    def d_sae(self) -> int:
        return self.module.cfg.d_sae

    def edits(self, ablate: Sequence[int] | Edits | None = None, mode: str | None = None,
              clamp: Mapping[int, float] | None = None, steer: Mapping[int, float] | None = None,
              positions: Sequence[int] | int | None = None, keep_error: bool | None = None, *,
              edits: Edits | None = None) -> Edits:
        """The edits (an :class:`Edits`, or built from the keywords: ``mode`` defaults to
        ``"zero"``, ``keep_error`` to True) checked against this dictionary: unknown latents and
        mean ablation without means raise here."""
        if isinstance(ablate, Edits):
            ablate, edits = None, ablate
        value = Edits.of(edits, ablate=ablate, mode=mode, clamp=clamp, steer=steer, positions=positions,
                         keep_error=keep_error)
        bad = [i for i in (*value.ablate, *value.clamp, *value.steer) if not 0 <= i < self.d_sae]
        if bad:
            raise ConfigError(f"unknown latent indices {bad}: {self.name} has latents 0..{self.d_sae - 1}")
        if value.ablate and value.mode == "mean" and self.latent_means is None:
            raise ConfigError("mode='mean' needs latent means: build the patch with LatentPatch.from_db(...) or "
                              "pass latent_means=")
        return value

    def points(self, n_blocks: int, hook_names: Any = None) -> tuple[HookPoint, HookPoint]:
        """The (input, output) hook points against a model of ``n_blocks`` blocks whose TransformerLens
        hook names are ``hook_names`` (None: canonical names only); raises for names it lacks."""
        try:
            return resolve(self.in_layer, n_blocks, hook_names), resolve(self.out_layer, n_blocks, hook_names)
        except LayerNotFoundError as exc:
            raise LayerNotFoundError(f"the patch for {self.layer!r} does not fit this model: {exc}") from None

    def check_model(self, model: Any) -> tuple[HookPoint, HookPoint]:
        """The (input, output) hook points on ``model`` (or its backend), hook names and widths
        checked before anything runs."""
        backend = make_backend(model)
        try:
            p_in, p_out = backend.resolve(self.in_layer), backend.resolve(self.out_layer)
        except LayerNotFoundError as exc:
            raise LayerNotFoundError(f"the patch for {self.layer!r} does not fit this model: {exc}") from None
        for point, want in ((p_in, self.module.cfg.d_in), (p_out, self.module.cfg.out_dim)):
            have = backend.width(point)
            if have is not None and have != want:
                raise ShapeError(f"dictionary {self.name} expects width {want} at {point.name}, but the model's "
                                 f"activation there has width {have}")
        return p_in, p_out

    @staticmethod
    def check_positions(edits: Edits, seq_len: int) -> None:
        """Refuse positions outside a sequence of ``seq_len`` (see :meth:`Edits.check_positions`)."""
        edits.check_positions(seq_len)

    # ------------------------------------------------------------------ the edit itself
    def _edit_latents(self, f: Float[Tensor, "batch pos d_sae"], edits: Edits) -> Float[Tensor, "batch pos d_sae"]:
        n_pos, d_sae, device, dtype = f.shape[1], f.shape[-1], f.device, f.dtype
        at = torch.zeros(n_pos, dtype=torch.bool, device=device)
        if edits.positions is None:
            at[:] = True
        else:
            at[[p % n_pos for p in edits.positions]] = True

        def mask(latents: Iterable[int]) -> Bool[Tensor, "pos d_sae"]:
            chosen = torch.zeros(d_sae, dtype=torch.bool, device=device)
            chosen[list(latents)] = True
            return at[:, None] & chosen[None, :]

        def values(table: Mapping[int, float]) -> Float[Tensor, " d_sae"]:
            out = torch.zeros(d_sae, dtype=dtype, device=device)
            out[list(table)] = torch.tensor(list(table.values()), dtype=dtype, device=device)
            return out

        g = f
        if edits.ablate:
            fill = (torch.zeros(d_sae, dtype=dtype, device=device) if edits.mode == "zero"
                    else self.latent_means.to(device=device, dtype=dtype))
            g = torch.where(mask(edits.ablate), fill, g)
        if edits.clamp:
            g = torch.where(mask(edits.clamp), values(edits.clamp), g)
        if edits.steer:
            g = g + torch.where(mask(edits.steer), values(edits.steer), torch.zeros((), dtype=dtype, device=device))
        return g

    def _replacement(self, x_in: Float[Tensor, "batch pos d_in"], x_out: Float[Tensor, "batch pos d_out"],
                     edits: Edits) -> Float[Tensor, "batch pos d_out"]:
        """New output activation from input ``x_in`` and original ``x_out``."""
        if x_in.shape[-1] != self.module.cfg.d_in or x_out.shape[-1] != self.module.cfg.out_dim:
            raise ShapeError(f"dictionary {self.name} expects widths {self.module.cfg.d_in} -> "
                             f"{self.module.cfg.out_dim}; the model gave {x_in.shape[-1]} -> {x_out.shape[-1]}")
        edits.check_positions(x_in.shape[1])
        batch = x_in.shape[0]
        flat_in = rearrange(x_in, "batch pos d -> (batch pos) d").to(self.module.W_enc.dtype)
        with torch.no_grad():
            f = rearrange(self.module.encode_dense(flat_in), "(batch pos) s -> batch pos s", batch=batch)
            g = self._edit_latents(f, edits) if not edits.empty else f
            flat_g = rearrange(g, "batch pos s -> (batch pos) s")
            recon_g = self.module.decode(flat_g, x=flat_in)
            if edits.keep_error:
                recon_f = self.module.decode(rearrange(f, "batch pos s -> (batch pos) s"), x=flat_in)
                delta = rearrange(recon_g - recon_f, "(batch pos) d -> batch pos d", batch=batch)
                return x_out + delta.to(x_out.dtype)
            return rearrange(recon_g, "(batch pos) d -> batch pos d", batch=batch).to(x_out.dtype)

    def hook_fns(self, p_in: HookPoint, p_out: HookPoint, edits: Edits) -> list[tuple[HookPoint, HookFn]]:
        """(point, function) pairs that apply ``edits`` (already checked): one rewrite at the point
        for an SAE; for a transcoder, a read of its input point and a rewrite of its output point."""
        if p_in.tl_name == p_out.tl_name:
            return [(p_out, lambda act: self._replacement(act, act, edits))]
        captured: dict[str, Tensor] = {}

        def read(act: Tensor) -> None:
            captured["x"] = act

        def write(act: Tensor) -> Tensor:
            if "x" not in captured:
                raise ConfigError(f"transcoder input hook {p_in.tl_name!r} did not fire before {p_out.tl_name!r}")
            return self._replacement(captured.pop("x"), act, edits)

        return [(p_in, read), (p_out, write)]

    # ------------------------------------------------------------------ TransformerLens fwd_hooks
    def hooks(self, ablate: Sequence[int] | Edits | None = None, mode: str | None = None,
              clamp: Mapping[int, float] | None = None, steer: Mapping[int, float] | None = None,
              positions: Sequence[int] | int | None = None, keep_error: bool | None = None, *,
              model: Any = None, edits: Edits | None = None) -> list[tuple[str, Callable[..., Tensor | None]]]:
        """``fwd_hooks`` for TransformerLens ``run_with_hooks`` (``HookedTransformer`` or
        ``TransformerBridge``), for an :class:`Edits` (first argument or ``edits=``) or the edit
        keywords. Pass ``model=`` to check hook names and widths now rather than during the pass."""
        value = self.edits(ablate, mode, clamp, steer, positions, keep_error, edits=edits)
        if model is not None:
            p_in, p_out = self.check_model(model)
        else:
            p_in, p_out = _unchecked_point(self.in_layer), _unchecked_point(self.out_layer)

        def tl(fn: HookFn) -> Callable[..., Tensor | None]:
            return lambda act, hook: fn(act)

        return [(p.tl_name, tl(fn)) for p, fn in self.hook_fns(p_in, p_out, value)]

    # ------------------------------------------------------------------ any model
    @contextmanager
    def applied(self, model: Any, ablate: Sequence[int] | Edits | None = None, mode: str | None = None,
                clamp: Mapping[int, float] | None = None, steer: Mapping[int, float] | None = None,
                positions: Sequence[int] | int | None = None, keep_error: bool | None = None, *,
                edits: Edits | None = None) -> Iterator[LatentPatch]:
        """Install the patch on ``model`` (any backend's model) for the duration of the block; leaving
        it, also on an exception, removes every hook."""
        value = self.edits(ablate, mode, clamp, steer, positions, keep_error, edits=edits)
        backend = make_backend(model)
        p_in, p_out = self.check_model(backend)
        with backend.at_hooks(self.hook_fns(p_in, p_out, value)):
            yield self

    def run(self, model: Any, tokens: Int[Tensor, "batch pos"], edits: Edits | None = None,
            **edit_kwargs: Any) -> Float[Tensor, "batch pos vocab"]:
        """Logits of ``model`` on ``tokens`` with the patch applied (positions checked first)."""
        value = self.edits(edits=edits, **edit_kwargs)
        value.check_positions(tokens.shape[-1])
        with self.applied(model, value), torch.no_grad():
            return logits_of(model, tokens)


def _unchecked_point(name: str) -> HookPoint:
    """A hook point named without a model to check it against: a canonical name with a
    non-negative block, or a raw TransformerLens name taken as it is."""
    if name.startswith("llm.layer.-"):
        raise ConfigError(f"{name!r} counts blocks from the end: pass model= to resolve it")
    return resolve(name, 10**6) if name.startswith("llm.layer.") else HookPoint(-1, "raw", name)


def logits_of(model: Any, tokens: Int[Tensor, "batch pos"],
              attention_mask: Shaped[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch pos vocab"]:
    """Logits of any backend's model (TransformerLens 3 / 4, Hugging Face causal LM or encoder head)."""
    return make_backend(model).logits(tokens, attention_mask)


def at_hook(model: Any, point: HookPoint, fn: HookFn) -> AbstractContextManager[None]:
    """While the block runs, call ``fn(activation)`` at ``point`` on every forward pass; a tensor it
    returns replaces the activation, None leaves it (see :meth:`Backend.at_hook`)."""
    return make_backend(model).at_hook(point, fn)


def latent_means_from_db(db: Any, latent_layer: str) -> np.ndarray:
    """Mean activation of every latent over all stored tokens (from stats when computed)."""
    info = db.layer_info(latent_layer)
    blocks = list(db.iter_statblocks(info.name))
    if len(blocks) == info.width:
        return np.array([b.mean for b in sorted(blocks, key=lambda b: b.channel)], dtype=np.float32)
    total = np.zeros(info.width, dtype=np.float64)
    n = 0
    for chunk in db.iter_activations(info.name, chunk_size=16_384):
        total += chunk.sum(0)
        n += chunk.shape[0]
    return (total / max(n, 1)).astype(np.float32)


def latent_frequencies_from_db(db: Any, latent_layer: str) -> np.ndarray:
    """Fraction of stored tokens on which each latent is active."""
    info = db.layer_info(latent_layer)
    fired = np.zeros(info.width, dtype=np.int64)
    n = 0
    for chunk in db.iter_activations(info.name, chunk_size=16_384):
        fired += (chunk > 0).sum(0)
        n += chunk.shape[0]
    return fired / max(n, 1)


def describe(edits: Edits) -> dict[str, Any]:
    """A JSON-ready description of edits, for the store's intervention records."""
    return edits.describe()
