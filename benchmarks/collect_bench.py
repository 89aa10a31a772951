"""Collection overhead vs the bare forward pass, and bytes per token per layer.

A 4-layer, d_model 256 HookedTransformer (random init, vocab 4,096) over 32,768 tokens: the bare
forward to the same depth (``stop_at_layer``, same tokenised batches), then LLMCollector storing one
layer (all channels, float16) and four hook points, interleaved A B C A B C ...

    .venv/bin/python benchmarks/collect_bench.py [--prompts 256] [--tokens 128] [--threads 1] [--write-queue 4]

``--write-queue 0`` writes each batch in the forward thread (no background writer). The default run
is long enough (about 1.5 s of forward per repeat here) that the store's fixed costs — creating
it, the last batch's write, which no forward pass overlaps — and timer noise do not decide a 5 %
target; ``--prompts 64`` (8,192 tokens) shows how they weigh on a short run.

``--contention`` measures instead how much the bare forward slows while another process keeps the
second core busy (a pure-Python loop; a memory-bound numpy copy; SQLite inserting 64 KiB blobs):
the floor that any work beside the forward pass — a background writer included — adds on the
machine, however well it is hidden from the forward thread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import describe, header, interleaved, ratio  # noqa: E402

from interlatent import LatentDB, LLMCollector  # noqa: E402


def build(vocab: int, n_ctx: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words.update({"<bos>": vocab - 2, "<unk>": vocab - 1})
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>")
    folder = Path(tempfile.mkdtemp(prefix="collect_bench_tok_")).resolve()
    tok.save_pretrained(str(folder))
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tok.init_kwargs["name_or_path"] = str(folder)
    cfg = HookedTransformerConfig(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, n_ctx=n_ctx,
                                  d_vocab=vocab, act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg, tokenizer=tok).eval()
    return model, tok


LOADS = {
    "pure-Python loop": "while True: pass",
    "numpy copy (memory-bound)": "import numpy as np\na = np.ones(2**25)\nwhile True: b = a.copy()",
    "SQLite blob inserts": ("import os, sqlite3, tempfile\nc = sqlite3.connect(os.path.join(tempfile.mkdtemp(), 'x.db'))\n"
                            "c.execute('CREATE TABLE t(b BLOB)')\nrows = [(os.urandom(65536),)] * 64\nwhile True:\n"
                            "    c.executemany('INSERT INTO t VALUES (?)', rows); c.commit()\n"
                            "    c.execute('DELETE FROM t'); c.commit()"),
}


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (a median needs one measurement)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def contention(bare, repeats: int) -> None:
    """The bare forward alone and with each load running in another process, interleaved."""
    times: dict[str, list[float]] = {"alone": [], **{name: [] for name in LOADS}}
    bare()  # warm-up: the first pass allocates and is not measured
    for _ in range(repeats):
        for name in times:
            proc = None if name == "alone" else subprocess.Popen([sys.executable, "-c", LOADS[name]])
            try:
                if proc is not None:
                    time.sleep(0.3)  # the load is running
                start = time.perf_counter()
                bare()
                times[name].append(time.perf_counter() - start)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
    alone = statistics.median(times["alone"])
    for name, t in times.items():
        print(f"bare forward, {name:26s} median {statistics.median(t) * 1e3:8.1f} ms  "
              f"x{statistics.median(t) / alone:.3f} the forward alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per prompt (BOS included)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=at_least_one, default=5)
    ap.add_argument("--write-queue", type=int, default=4, help="LLMCollector's write_queue (0: synchronous)")
    ap.add_argument("--contention", action="store_true",
                    help="only the bare forward's slowdown while another process keeps the other core busy")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = build(4096, args.tokens)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{t}" for t in rng.integers(0, 4000, args.tokens - 1)) for _ in range(args.prompts)]
    work = Path(tempfile.mkdtemp(prefix="collect_bench_"))
    counter = {"i": 0}
    batches = []
    for b in range(0, len(prompts), args.batch):
        ids = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]] for p in prompts[b : b + args.batch]]
        batches.append(torch.tensor(ids))
    n_tok = sum(t.numel() for t in batches)
    depth = 2  # collect block 1 (and points of blocks 0-1): the forward stops after block 1

    def bare() -> None:
        with torch.inference_mode():
            for tokens in batches:
                model(tokens, attention_mask=torch.ones_like(tokens), return_type=None, stop_at_layer=depth)

    def collect(layer_indices, hooks) -> float:
        counter["i"] += 1
        path = work / f"c{counter['i']}.db"
        with LatentDB(path) as db:
            LLMCollector(db, layer_indices=layer_indices, hooks=hooks, batch_size=args.batch,
                         write_queue=args.write_queue).run(
                model, tok, prompts=prompts, show_progress=False)
            return path.stat().st_size

    def one_layer() -> None:
        collect([1], None)

    def four_points() -> None:
        collect([1], ["resid_pre", "mlp_in", "mlp_out", "resid_post"])

    if args.contention:
        header(f"bare forward, {n_tok} tokens, with another process busy on the other core")
        contention(bare, args.repeats)
        return
    header(f"collection, {n_tok} tokens, 4 layers d_model 256, write_queue {args.write_queue}")
    times = interleaved({"bare forward": bare, "collect 1 layer": one_layer, "collect 4 points": four_points},
                        repeats=args.repeats)
    for name, t in times.items():
        print(f"{name:17s} {describe(t)}  {n_tok / np.median(t):,.0f} tokens/s")
    for label, name, target in (("one layer  ", "collect 1 layer", 1.05), ("four points", "collect 4 points", 1.15)):
        pairs = sorted(a / b for a, b in zip(times[name], times["bare forward"]))
        print(f"{label} / bare forward: {ratio(times, name, 'bare forward'):.3f}x  (target <= {target}x; "
              f"per-pair ratios {pairs[0]:.3f}..{pairs[-1]:.3f})")
    size1 = collect([1], None)
    size4 = collect([1], ["resid_pre", "mlp_in", "mlp_out", "resid_post"])
    print(f"bytes per token per layer: one layer {size1 / n_tok:.1f}, four points {size4 / n_tok / 4:.1f}  "
          f"(target <= 2 x 256 + 48 = 560)")


if __name__ == "__main__":
    main()
