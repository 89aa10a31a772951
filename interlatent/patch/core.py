"""``LatentPatch``: splice, ablate, clamp and steer dictionary latents inside a running model.

A patch is a trained SAE or transcoder bound to its hook point(s). At the hook it encodes the
activation, edits the latents, and writes the edit back as a *delta* on the original activation
(``x + decode(f_edited) - decode(f)``), so a patch without edits leaves the model bit-identical;
``keep_error=False`` replaces the activation by the reconstruction instead. A transcoder reads its
input hook (the MLP's normalized input) and replaces its output hook (``hook_mlp_out``) in the same
forward pass.

For a ``HookedTransformer``: ``patch.hooks(...)`` gives ``fwd_hooks`` for ``run_with_hooks``, and
``with patch.applied(model, ...)`` installs them through the model's hook context. For a Hugging
Face model, ``applied`` registers removable ``nn.Module`` hooks. Leaving the block removes every
hook, also on exceptions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from interlatent import naming
from interlatent.analysis.models import SparseCoder, Transcoder, load_module
from interlatent.errors import ConfigError, LayerNotFoundError, ShapeError
from interlatent.hooks import HookPoint, resolve

log = logging.getLogger(__name__)

MODES = ("zero", "mean")


@dataclass(frozen=True)
class Edits:
    """What to do to the latents: ablate (zero or mean), clamp to a value, steer by adding."""

    ablate: tuple[int, ...] = ()
    mode: str = "zero"
    clamp: dict[int, float] = field(default_factory=dict)
    steer: dict[int, float] = field(default_factory=dict)
    positions: tuple[int, ...] | None = None
    keep_error: bool = True

    @property
    def empty(self) -> bool:
        return not (self.ablate or self.clamp or self.steer)

    def latents(self) -> list[int]:
        return sorted(set(self.ablate) | set(self.clamp) | set(self.steer))


def _is_hooked_transformer(model: Any) -> bool:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, HookedTransformer)


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

    def edits(self, ablate: Sequence[int] | None = None, mode: str = "zero", clamp: dict[int, float] | None = None,
              steer: dict[int, float] | None = None, positions: Sequence[int] | int | None = None,
              keep_error: bool = True) -> Edits:
        """Validate edit arguments (unknown latents, bad modes, missing means raise here)."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        ablate_t = tuple(int(i) for i in (ablate or ()))
        clamp = {int(k): float(v) for k, v in (clamp or {}).items()}
        steer = {int(k): float(v) for k, v in (steer or {}).items()}
        bad = [i for i in (*ablate_t, *clamp, *steer) if not 0 <= i < self.d_sae]
        if bad:
            raise ConfigError(f"unknown latent indices {bad}: {self.name} has latents 0..{self.d_sae - 1}")
        if ablate_t and mode == "mean" and self.latent_means is None:
            raise ConfigError("mode='mean' needs latent means: build the patch with LatentPatch.from_db(...) or "
                              "pass latent_means=")
        pos = None if positions is None else tuple(int(p) for p in np.atleast_1d(positions))
        return Edits(ablate_t, mode, clamp, steer, pos, keep_error)

    def points(self, n_blocks: int, hook_names: Any = None) -> tuple[HookPoint, HookPoint]:
        """The (input, output) hook points against a model; raises for names the model lacks."""
        try:
            return resolve(self.in_layer, n_blocks, hook_names), resolve(self.out_layer, n_blocks, hook_names)
        except LayerNotFoundError as exc:
            raise LayerNotFoundError(f"the patch for {self.layer!r} does not fit this model: {exc}") from None

    def check_model(self, model: Any) -> tuple[HookPoint, HookPoint]:
        """Check hook names and widths against ``model`` before anything runs."""
        if _is_hooked_transformer(model):
            p_in, p_out = self.points(model.cfg.n_layers, model.hook_dict.keys())
            widths = {"in": model.cfg.d_model, "out": model.cfg.d_model}
            if p_in.kind == "raw" or p_out.kind == "raw":
                widths = {}
        else:
            from interlatent.llm.backends import find_blocks, hf_module_for

            blocks = find_blocks(model)
            p_in, p_out = self.points(len(blocks))
            hf_module_for(blocks, p_in)
            hf_module_for(blocks, p_out)
            d = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
            widths = {"in": d, "out": d} if d else {}
        for role, want in (("in", self.module.cfg.d_in), ("out", self.module.cfg.out_dim)):
            have = widths.get(role)
            if have is not None and have != want:
                point = p_in if role == "in" else p_out
                raise ShapeError(f"dictionary {self.name} expects width {want} at {point.name}, but the model's "
                                 f"activation there has width {have}")
        return p_in, p_out

    @staticmethod
    def check_positions(edits: Edits, seq_len: int) -> None:
        if edits.positions is None:
            return
        bad = [p for p in edits.positions if not -seq_len <= p < seq_len]
        if bad:
            raise ConfigError(f"positions {bad} are outside the sequence (length {seq_len}; valid -{seq_len}.."
                              f"{seq_len - 1})")

    # ------------------------------------------------------------------ the edit itself
    def _edit_latents(self, f: Float[Tensor, "batch pos d_sae"], edits: Edits) -> Tensor:
        n_pos = f.shape[1]
        at = torch.zeros(n_pos, dtype=torch.bool)
        if edits.positions is None:
            at[:] = True
        else:
            at[[p % n_pos for p in edits.positions]] = True

        def mask(latents: Sequence[int]) -> Tensor:
            chosen = torch.zeros(f.shape[-1], dtype=torch.bool)
            chosen[list(latents)] = True
            return at[:, None] & chosen[None, :]  # [pos, d_sae]

        g = f
        if edits.ablate:
            fill = torch.zeros(f.shape[-1], dtype=f.dtype) if edits.mode == "zero" else self.latent_means.to(f.dtype)
            g = torch.where(mask(edits.ablate), fill, g)
        if edits.clamp:
            value = torch.zeros(f.shape[-1], dtype=f.dtype)
            value[list(edits.clamp)] = torch.tensor(list(edits.clamp.values()), dtype=f.dtype)
            g = torch.where(mask(edits.clamp), value, g)
        if edits.steer:
            add = torch.zeros(f.shape[-1], dtype=f.dtype)
            add[list(edits.steer)] = torch.tensor(list(edits.steer.values()), dtype=f.dtype)
            g = g + torch.where(mask(edits.steer), add, torch.zeros((), dtype=f.dtype))
        return g

    def _replacement(self, x_in: Tensor, x_out: Tensor, edits: Edits) -> Tensor:
        """New output activation ``[batch, pos, d_out]`` from input ``x_in`` and original ``x_out``."""
        if x_in.shape[-1] != self.module.cfg.d_in or x_out.shape[-1] != self.module.cfg.out_dim:
            raise ShapeError(f"dictionary {self.name} expects widths {self.module.cfg.d_in} -> "
                             f"{self.module.cfg.out_dim}; the model gave {x_in.shape[-1]} -> {x_out.shape[-1]}")
        self.check_positions(edits, x_in.shape[1])
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

    # ------------------------------------------------------------------ TransformerLens
    def hooks(self, ablate: Sequence[int] | None = None, mode: str = "zero", clamp: dict[int, float] | None = None,
              steer: dict[int, float] | None = None, positions: Sequence[int] | int | None = None,
              keep_error: bool = True, *, model: Any = None) -> list[tuple[str, Callable[..., Tensor]]]:
        """``fwd_hooks`` for ``HookedTransformer.run_with_hooks``. Pass ``model=`` to check hook names and
        widths now rather than during the forward pass."""
        edits = self.edits(ablate, mode, clamp, steer, positions, keep_error)
        if model is not None:
            p_in, p_out = self.check_model(model)
            in_name, out_name = p_in.tl_name, p_out.tl_name
        else:
            names = []
            for n in (self.in_layer, self.out_layer):
                if n.startswith("llm.layer.-"):
                    raise ConfigError(f"{n!r} counts blocks from the end: pass model= to resolve it")
                names.append(resolve(n, 10**6).tl_name if n.startswith("llm.layer.") else n)
            in_name, out_name = names
        if in_name == out_name:
            def splice(act: Tensor, hook: Any) -> Tensor:
                return self._replacement(act, act, edits)

            return [(in_name, splice)]
        captured: dict[str, Tensor] = {}

        def read(act: Tensor, hook: Any) -> None:
            captured["x"] = act

        def write(act: Tensor, hook: Any) -> Tensor:
            if "x" not in captured:
                raise ConfigError(f"transcoder input hook {in_name!r} did not fire before {out_name!r}")
            return self._replacement(captured.pop("x"), act, edits)

        return [(in_name, read), (out_name, write)]

    # ------------------------------------------------------------------ any model
    @contextmanager
    def applied(self, model: Any, ablate: Sequence[int] | None = None, mode: str = "zero",
                clamp: dict[int, float] | None = None, steer: dict[int, float] | None = None,
                positions: Sequence[int] | int | None = None, keep_error: bool = True) -> Iterator[LatentPatch]:
        """Install the patch on ``model`` for the duration of the block (TransformerLens or HF)."""
        edits = self.edits(ablate, mode, clamp, steer, positions, keep_error)
        p_in, p_out = self.check_model(model)
        if _is_hooked_transformer(model):
            fwd = self.hooks(ablate, mode, clamp, steer, positions, keep_error, model=model)
            with model.hooks(fwd_hooks=fwd):
                yield self
            return
        with _hf_hooks(model, self, p_in, p_out, edits):
            yield self

    def run(self, model: Any, tokens: Tensor, **edit_kwargs: Any) -> Tensor:
        """Logits of ``model`` on ``tokens`` with the patch applied (positions checked first)."""
        edits = self.edits(**edit_kwargs)
        self.check_positions(edits, tokens.shape[-1])
        with self.applied(model, **edit_kwargs), torch.no_grad():
            return logits_of(model, tokens)


def logits_of(model: Any, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Logits ``[batch, pos, vocab]`` of a HookedTransformer or a Hugging Face causal LM."""
    if _is_hooked_transformer(model):
        return model(tokens, attention_mask=attention_mask) if attention_mask is not None else model(tokens)
    out = model(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
    return out.logits


@contextmanager
def at_hook(model: Any, point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """While the block runs, call ``fn(activation)`` at ``point`` on every forward pass; a tensor it
    returns replaces the activation, None leaves it. TransformerLens: through the model's hook
    context; Hugging Face: a removable forward (pre-)hook on the point's module."""
    if _is_hooked_transformer(model):
        with model.hooks(fwd_hooks=[(point.tl_name, lambda act, hook: fn(act))]):
            yield
        return
    from interlatent.llm.backends import find_blocks, hf_module_for

    module, side = hf_module_for(find_blocks(model), point)
    if side == "post":
        def post(_m: nn.Module, _args: Any, out: Any) -> Any:
            first = out[0] if isinstance(out, tuple) else out
            new = fn(first)
            if new is None:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = module.register_forward_hook(post)
    else:
        def pre(_m: nn.Module, args: Any, kwargs: Any) -> Any:
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _hf_hooks(model: nn.Module, patch: LatentPatch, p_in: HookPoint, p_out: HookPoint, edits: Edits) -> Iterator[None]:
    """A patch on a Hugging Face model: read the input point (transcoders), rewrite the output point."""
    captured: dict[str, Tensor] = {}
    same = p_in.name == p_out.name

    def rewrite(original: Tensor) -> Tensor:
        return patch._replacement(original if same else captured.pop("x"), original, edits)

    with ExitStack() as stack:
        if not same:
            stack.enter_context(at_hook(model, p_in, lambda act: captured.__setitem__("x", act)))
        stack.enter_context(at_hook(model, p_out, rewrite))
        yield


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
    return json.loads(json.dumps({"ablate": list(edits.ablate), "mode": edits.mode, "clamp": edits.clamp,
                                  "steer": edits.steer, "positions": None if edits.positions is None
                                  else list(edits.positions), "keep_error": edits.keep_error}))
