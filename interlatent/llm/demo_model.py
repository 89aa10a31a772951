"""The embedded demo model: a small ``HookedTransformer`` trained here on a generated corpus.

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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
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


def _tl_config(cfg: DemoModelConfig, d_vocab: int) -> Any:
    from transformer_lens import HookedTransformerConfig

    return HookedTransformerConfig(n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                   d_head=cfg.d_model // cfg.n_heads, d_mlp=cfg.d_mlp, n_ctx=cfg.n_ctx,
                                   d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", seed=cfg.seed,
                                   model_name=f"interlatent-demo-{cfg.key()}", default_prepend_bos=True)


def _load(folder: Path, cfg: DemoModelConfig) -> Any:
    from transformer_lens import HookedTransformer

    from interlatent.llm.loading import load_local_tokenizer

    tok = load_local_tokenizer(folder)
    model = HookedTransformer(_tl_config(cfg, len(tok)), tokenizer=tok)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.eval()
    model.demo_config = cfg  # type: ignore[attr-defined]
    return model


def _batches(tok: Any, texts: list[str], cfg: DemoModelConfig, gen: torch.Generator):
    """Texts packed into BOS-started rows of n_ctx tokens (a text never spans two rows)."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    from interlatent.llm.backends import encode_texts

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
    from transformer_lens import HookedTransformer

    folder.mkdir(parents=True, exist_ok=True)
    texts = demo_corpus.corpus(cfg.n_dilemma_texts, cfg.n_general, cfg.seed)
    tok = _train_tokenizer(texts, cfg.vocab_size, folder)
    from interlatent.llm.loading import load_local_tokenizer

    tok = load_local_tokenizer(folder)
    torch.manual_seed(cfg.seed)
    model = HookedTransformer(_tl_config(cfg, len(tok)), tokenizer=tok)
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
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "demo_config.json").write_text(json.dumps({**asdict(cfg), "final_loss": float(loss.detach()),
                                                         "train_seconds": time.perf_counter() - start}, indent=2))
    log.info("demo model trained in %.0fs (final loss %.3f)", time.perf_counter() - start, float(loss.detach()))
    return _load(folder, cfg)


def demo_model(quick: bool = False, *, config: DemoModelConfig | None = None, progress: bool | None = None) -> Any:
    """The embedded demo ``HookedTransformer`` (tokenizer attached), trained on first use and cached.

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
