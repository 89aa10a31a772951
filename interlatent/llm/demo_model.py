"""The embedded demo model: a small TransformerLens model trained here on a generated corpus.

On TransformerLens 3 it is a ``HookedTransformer``; on TransformerLens 4 (which has no
``HookedTransformer``) the same weights boot through the ``TransformerBridge``'s native path
(``TransformerBridge.boot_native``), mapped from TransformerLens 3's parameter names to the
bridge's (:func:`bridge_state_dict`; :func:`hooked_state_dict` maps back), so both versions share
one cache and give the same logits.

``demo_model()`` trains it on first use (deterministically from a seed, a couple of minutes on two
cores, with a progress bar) and caches it under the user cache directory keyed by its config;
later calls load it in seconds. ``demo_model(quick=True)`` is a smaller, shorter-trained variant
for tests. The tokenizer is a byte-level BPE trained on the same corpus, saved next to the weights
and attached so ``to_tokens`` / ``to_str_tokens`` work (from an absolute path, as TransformerLens
re-loads tokenizers by ``name_or_path``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from interlatent.llm import demo_corpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoModelConfig:
    """Everything that determines the demo model (its cache key)."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 96
    vocab_size: int = 1024
    steps: int = 500
    batch_size: int = 24
    lr: float = 3e-3
    n_dilemma_texts: int = 6000
    n_general: int = 2000
    seed: int = 0
    version: int = 1

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = DemoModelConfig(n_layers=2, d_model=64, n_heads=4, d_mlp=256, vocab_size=512, steps=150, batch_size=16,
                        n_dilemma_texts=2000, n_general=500)


def cache_dir() -> Path:
    """``$INTERLATENT_CACHE`` or ``~/.cache/interlatent`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get("INTERLATENT_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")  # empty means unset
    return (base / "interlatent").resolve()


def _train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>")
    tok.save_pretrained(str(folder))
    return tok


def has_hooked_transformer() -> bool:
    """True on TransformerLens 3 (``HookedTransformer``), False on 4 (``TransformerBridge`` only)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # TransformerLens 4 raises ImportError naming the bridge
        return False
    return True


def _tl_config(cfg: DemoModelConfig, d_vocab: int) -> Any:
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(**_config_fields(cfg, d_vocab), seed=cfg.seed)


def _config_fields(cfg: DemoModelConfig, d_vocab: int) -> dict[str, Any]:
    return dict(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
                d_mlp=cfg.d_mlp, n_ctx=cfg.n_ctx, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN",
                model_name=f"interlatent-demo-{cfg.key()}", default_prepend_bos=True)


#: TransformerLens 3 parameter (inside a block or at the top) -> (bridge parameter, conversion)
_TO_BRIDGE: dict[str, tuple[str, str]] = {
    "embed.W_E": ("embed.weight", ""), "pos_embed.W_pos": ("pos_embed.weight", ""),
    "ln_final.w": ("ln_final.weight", ""), "ln_final.b": ("ln_final.bias", ""),
    "unembed.W_U": ("unembed.weight", "d v -> v d"), "unembed.b_U": ("unembed.bias", ""),
    "ln1.w": ("ln1.weight", ""), "ln1.b": ("ln1.bias", ""), "ln2.w": ("ln2.weight", ""), "ln2.b": ("ln2.bias", ""),
    "attn.W_Q": ("attn.q.weight", "h m d -> (h d) m"), "attn.b_Q": ("attn.q.bias", "h d -> (h d)"),
    "attn.W_K": ("attn.k.weight", "h m d -> (h d) m"), "attn.b_K": ("attn.k.bias", "h d -> (h d)"),
    "attn.W_V": ("attn.v.weight", "h m d -> (h d) m"), "attn.b_V": ("attn.v.bias", "h d -> (h d)"),
    "attn.W_O": ("attn.o.weight", "h d m -> m (h d)"), "attn.b_O": ("attn.o.bias", ""),
    "mlp.W_in": ("mlp.in.weight", "m f -> f m"), "mlp.b_in": ("mlp.in.bias", ""),
    "mlp.W_out": ("mlp.out.weight", "f m -> m f"), "mlp.b_out": ("mlp.out.bias", ""),
}
_NOT_WEIGHTS = ("attn.IGNORE", "attn.mask")  # TransformerLens 3 buffers
_BLOCK = re.compile(r"^blocks\.(?P<block>\d+)\.(?P<rest>.+)$")


def _inverse(pattern: str) -> str:
    left, right = pattern.split(" -> ")
    return f"{right} -> {left}"


def bridge_state_dict(state: dict[str, Tensor], n_heads: int) -> dict[str, Tensor]:
    """A TransformerLens 3 state dict in the native ``TransformerBridge``'s names and layouts
    (``W_Q [head, d_model, d_head]`` -> ``q.weight [(head d_head), d_model]``, ...)."""
    out = {}
    for name, value in state.items():
        m = _BLOCK.match(name)
        prefix, rest = (f"blocks.{m['block']}.", m["rest"]) if m else ("", name)
        if rest in _NOT_WEIGHTS:
            continue
        target, pattern = _TO_BRIDGE[rest]
        out[prefix + target] = rearrange(value, pattern).contiguous() if pattern else value
    return out


def hooked_state_dict(state: dict[str, Tensor], n_heads: int) -> dict[str, Tensor]:
    """The inverse of :func:`bridge_state_dict`: bridge names back to TransformerLens 3's."""
    back = {target: (source, pattern) for source, (target, pattern) in _TO_BRIDGE.items()}
    out = {}
    for name, value in state.items():
        m = _BLOCK.match(name)
        prefix, rest = (f"blocks.{m['block']}.", m["rest"]) if m else ("", name)
        source, pattern = back[rest]
        if pattern:
            value = rearrange(value, _inverse(pattern), **({"h": n_heads} if "h" in pattern.split() else {}))
        out[prefix + source] = value.contiguous()
    return out


def _new_model(cfg: DemoModelConfig, tok: Any) -> Any:
    """A freshly initialised demo model: ``HookedTransformer`` on TransformerLens 3, the native
    ``TransformerBridge`` on 4."""
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer

        return HookedTransformer(_tl_config(cfg, len(tok)), tokenizer=tok)
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    fields = _config_fields(cfg, len(tok))
    name = fields.pop("model_name")
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**fields), tokenizer=tok, model_name=name)
    model.cfg.model_name = name
    return model


def _state_for_saving(model: Any, cfg: DemoModelConfig) -> dict[str, Tensor]:
    """The weights in TransformerLens 3's names, whichever version trained them."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return state if has_hooked_transformer() else hooked_state_dict(state, cfg.n_heads)


def _load(folder: Path, cfg: DemoModelConfig) -> Any:
    from interlatent.llm.loading import load_local_tokenizer

    tok = load_local_tokenizer(folder)
    model = _new_model(cfg, tok)
    state = load_file(str(folder / "model.safetensors"))
    if has_hooked_transformer():
        missing, unexpected = model.load_state_dict(state, strict=False)
        stray = [k for k in missing if not k.endswith(_NOT_WEIGHTS)] + list(unexpected)
        if stray:
            raise KeyError(f"the cached demo weights do not fit the model: {stray[:5]}")
    else:
        model.load_state_dict(bridge_state_dict(state, cfg.n_heads), strict=True)
    model.eval()
    model.demo_config = cfg  # type: ignore[attr-defined]
    return model


def _batches(tok: Any, texts: list[str], cfg: DemoModelConfig, gen: torch.Generator):
    """Texts packed into BOS-started rows of n_ctx tokens (a text never spans two rows)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    from interlatent.backends import encode_texts

    encoded = [enc.ids for enc in encode_texts(tok, texts)]
    rows, row = [], [bos]
    for ids in encoded:
        piece = [*ids, eos]
        if len(row) + len(piece) > cfg.n_ctx:
            rows.append(row + [tok.pad_token_id] * (cfg.n_ctx - len(row)))
            row = [bos]
        row += piece[: cfg.n_ctx - 1]
    rows.append(row + [tok.pad_token_id] * (cfg.n_ctx - len(row)))
    data = torch.tensor(rows, dtype=torch.long)
    while True:
        for idx in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            yield data[idx]


def train_demo_model(cfg: DemoModelConfig, folder: Path, progress: bool | None = None) -> Any:
    """Train the demo model described by ``cfg`` and save it (weights, config, tokenizer) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = demo_corpus.corpus(cfg.n_dilemma_texts, cfg.n_general, cfg.seed)
    tok = _train_tokenizer(texts, cfg.vocab_size, folder)
    from interlatent.llm.loading import load_local_tokenizer

    tok = load_local_tokenizer(folder)
    torch.manual_seed(cfg.seed)
    model = _new_model(cfg, tok)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.steps))
    pad = tok.pad_token_id
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training the demo model (first use only)", unit="step",
               disable=None if progress is None else not progress, mininterval=0.5)
    batches = _batches(tok, texts, cfg, gen)
    for _ in bar:
        tokens = next(batches)
        logits = model(tokens)
        target = tokens[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=pad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    save_file(_state_for_saving(model, cfg), str(folder / "model.safetensors"))
    (folder / "demo_config.json").write_text(json.dumps({**asdict(cfg), "final_loss": float(loss.detach()),
                                                         "train_seconds": time.perf_counter() - start}, indent=2))
    log.info("demo model trained in %.0fs (final loss %.3f)", time.perf_counter() - start, float(loss.detach()))
    return _load(folder, cfg)


def demo_model(quick: bool = False, *, config: DemoModelConfig | None = None, progress: bool | None = None) -> Any:
    """The embedded demo model (tokenizer attached), trained on first use and cached: a
    ``HookedTransformer`` on TransformerLens 3, a ``TransformerBridge`` on 4.

    Args:
        quick: the small variant for tests (150 steps: seconds on a free core, about a minute on
            a loaded one).
        config: a custom :class:`DemoModelConfig` (cached under its own key).
        progress: show a progress bar while training (None: only when stderr is a terminal).
    """
    cfg = config or (QUICK if quick else DemoModelConfig())
    folder = cache_dir() / "demo_model" / cfg.key()
    if (folder / "model.safetensors").is_file() and (folder / "demo_config.json").is_file():
        try:
            return _load(folder, cfg)
        except Exception as exc:  # a half-written cache: train again
            log.warning("cached demo model in %s is unreadable (%s); training it again", folder, exc)
    log.info("training the %sdemo model (%d steps; first use only) and caching it in %s (set INTERLATENT_CACHE "
             "to move the cache)", "quick " if cfg == QUICK else "", cfg.steps, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model = train_demo_model(cfg, tmp, progress=progress)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return _load(folder, cfg)
