"""The planted-feature protocol (BENCHMARKS.md) over a grid of training shapes, side by side.

Shapes: ``d`` in {128, 256, 768}, latents ``ratio * d`` with ratio in {8, 32}, ``k`` in {16, 64},
batch in {2048, 4096}. Each shape plants ``latents / 2`` unit features, each active with
probability ``(k / 2) / features`` (the protocol's 1,024 features for 2,048 latents and ~8 active
for k 16), magnitudes U[0.5, 1.5] and N(0, 0.01²) noise, always from the data seed, which differs
from every model seed.

Rows: ours (SparseAutoencoder / Transcoder + fit), the minimal plain-PyTorch loop of
``sae_bench.py``, EleutherAI sparsify and SAELens (SAEs only), all on ``--device``.

* steps/s: one training step per row (lr 1e-3), rows interleaved, without and with AuxK active over
  every latent; the median of ``--repeats`` blocks; "x minimal" is the median of the per-block
  ratios row / minimal loop, with their min-max in the JSON.
* peak MB: the memory one training step takes above the row's steady state (weights, Adam moments,
  a batch), measured in a fresh subprocess per row. CPU: ``/proc/self/status`` VmHWM after
  resetting it (``/proc/self/clear_refs``) minus VmRSS before the step, with glibc's dynamic mmap
  threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave RSS; CUDA:
  ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step.
* quality (shapes in ``--quality-shapes``): every row trained one epoch (ours with its defaults,
  the others with Adam lr 1e-2 decaying linearly to 0; ``--peer-lr ours``: at the peak rate ours'
  defaults choose for the shape, so the rows differ only in what else they do), then recovered planted features (best
  decoder cosine > 0.9), FVU on the evaluation vectors and the fraction of latents never active.
  ``--ours-variant init_scale=0.1,decoder_lr_scale=10,lr_schedule=linear`` adds a quality row of
  ours with other settings (the model's ``init_scale`` or any ``TrainConfig`` field).

    .venv/bin/python benchmarks/sae_sweep.py --d 128 --ratio 8 --k 16 --batch 2048 --threads 1 \
        --quality-shapes 128x8x16x2048 --json sweep.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.util
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sae_bench as bench
from _timing import header

PEERS = ("ours", "minimal", "sparsify", "SAELens")
LABELS = {"ours": "ours", "minimal": "minimal loop", "sparsify": "sparsify", "SAELens": "SAELens"}
QUALITY_NAMES = {"ours (defaults)": "ours", "ours (variant)": "variant", "minimal loop": "minimal",
                 "sparsify": "sparsify", "SAELens": "SAELens"}
LABELS["variant"] = "ours (variant)"


def sweep_shape(d: int, ratio: int, k: int, batch: int, n_train: int = 200_000, n_eval: int = 20_000) -> bench.Shape:
    """The protocol scaled to ``d`` and ``ratio * d`` latents: half as many planted features, k / 2 active."""
    d_sae = ratio * d
    return bench.Shape(d=d, n_feat=d_sae // 2, d_sae=d_sae, k=k, batch=batch, active=k / 2, n_train=n_train,
                       n_eval=n_eval)


def label(shape: bench.Shape) -> str:
    """``d x ratio x k x batch``, the form ``--quality-shapes`` takes."""
    return f"{shape.d}x{shape.d_sae // shape.d}x{shape.k}x{shape.batch}"


def estimated_bytes(shape: bench.Shape, transcoder: bool) -> int:
    """A generous estimate of the sweep's peak for one shape: data, every row's weights, gradients
    and Adam moments held at once (they are interleaved), and a dense ``[batch, latents]`` step."""
    data = (shape.n_train + shape.n_eval) * shape.d * 4 * (2 if transcoder else 1)
    draw = min(shape.n_train, max(1, 2**28 // shape.n_feat)) * shape.n_feat * 4 * 3
    rows = len(PEERS) + 1  # the kernels' floor keeps a copy of the encoder
    weights = rows * 4 * 2 * shape.d_sae * shape.d * 4
    step = 10 * shape.batch * shape.d_sae * 4  # a dense step (SAELens) holds ~10 such tensors
    return data + draw + weights + step


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+)", meminfo).group(1)) * 1024


# ---------------------------------------------------------------------------- throughput
def throughput(shape: bench.Shape, transcoder: bool, x, y, device: str, repeats: int, steps_per: int) -> dict:
    """Steps/s of every row without and with AuxK, interleaved, with the ratios to the minimal loop."""
    out: dict = {}
    for aux in (False, True):
        steps = bench.step_functions(transcoder, shape, bench.batches(x, y, shape.batch), aux, device,
                                     rows=tuple(r for r in PEERS if r != "SAELens" or not transcoder))
        times = bench.timed(steps, repeats, steps_per, device)
        key = "auxk" if aux else "no_auxk"
        out[key] = {}
        for name, t in times.items():
            ratios = [a / b for a, b in zip(t, times["minimal"])]
            out[key][name] = {"steps_per_s": statistics.median(t), "min": min(t), "max": max(t),
                              "ratio_vs_minimal": statistics.median(ratios), "ratio_min": min(ratios),
                              "ratio_max": max(ratios)}
        del steps
        gc.collect()
    return out


# ---------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _pin_mmap_threshold(threshold: int = 65536) -> None:
    """Make glibc serve every allocation over ``threshold`` bytes by mmap and unmap it on free, so
    a freed tensor leaves RSS (the same as ``MALLOC_MMAP_THRESHOLD_``; a no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops the dynamic adjustment
    except (OSError, AttributeError):
        pass


def measure_step_peak(row: str, shape: bench.Shape, transcoder: bool, aux: bool, device: str) -> dict[str, float]:
    """The memory one training step of ``row`` takes above its steady state (run it in a fresh
    process, :func:`step_peak`, so that no other row is resident). ``steady_mb`` is what building
    the row and two steps added: weights, Adam's moments, workspaces, the peer's own imports."""
    small = replace(shape, n_train=3 * shape.batch, n_eval=1)
    if not device.startswith("cuda"):
        _pin_mmap_threshold()
    for name, module in (("SAELens", "sae_lens.saes.topk_sae"), ("sparsify", "sparsify")):
        if row == name and importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)  # its import is not the step's memory
    _, _, x, y, _, _ = bench.planted(transcoder, small, device=device)
    before = torch.cuda.memory_allocated() if device.startswith("cuda") else _status_kb("VmRSS") * 1024
    steps = bench.step_functions(transcoder, small, bench.batches(x, y, small.batch), aux, device, rows=(row,))
    if row not in steps:
        raise ValueError(f"row {row!r} is not available here (SAELens has no transcoder; is the package installed?)")
    step = steps[row]
    for _ in range(2):  # Adam's moments and every lazily built buffer exist after these
        step()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        base = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        step()
        peak = _status_kb("VmHWM") * 1024
    return {"step_peak_mb": (peak - base) / 2**20, "steady_mb": (base - before) / 2**20}


def step_peak(row: str, shape: bench.Shape, transcoder: bool, aux: bool, device: str, threads: int) -> dict[str, float]:
    """:func:`measure_step_peak` in a fresh subprocess (so no other row's memory is resident)."""
    spec = {"row": row, "shape": asdict(shape), "transcoder": transcoder, "aux": aux, "device": device,
            "threads": threads}
    done = subprocess.run([sys.executable, __file__, "--peak-row", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory run of {row} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_row_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    res = measure_step_peak(spec["row"], bench.Shape(**spec["shape"]), spec["transcoder"], spec["aux"], spec["device"])
    print(json.dumps(res))


# ---------------------------------------------------------------------------- quality
def quality(shape: bench.Shape, transcoder: bool, data, device: str,
            variant: dict | None = None, peer_lr: float | None = 1e-2) -> dict[str, dict[str, float]]:
    """Every row trained one epoch, scored: recovered (cosine > 0.9), FVU, dead fraction and more;
    ``variant``: also ours with those settings (see :func:`parse_variant`)."""
    rows = bench.train_rows(transcoder, shape, data, shape.epoch, device, variant=variant, peer_lr=peer_lr)
    return {QUALITY_NAMES[name]: {**q, "seconds": s} for name, q, s in rows if name in QUALITY_NAMES}


# ---------------------------------------------------------------------------- one shape, the table
def run_shape(shape: bench.Shape, transcoder: bool, device: str, repeats: int, steps_per: int, threads: int,
              with_quality: bool, with_memory: bool = True, variant: dict | None = None,
              peer_lr: float | None = 1e-2) -> dict:
    """Every figure of one shape: throughput, peak step memory and (``with_quality``) one-epoch quality."""
    data = bench.planted(transcoder, shape, device=device)
    _, _, x, y, _, _ = data
    result: dict = {"shape": asdict(shape), "label": label(shape), "epoch_steps": shape.epoch,
                    "throughput": throughput(shape, transcoder, x, y, device, repeats, steps_per)}
    rows = [r for r in PEERS if r in result["throughput"]["no_auxk"]]
    if with_memory:
        result["memory"] = {r: {key: step_peak(r, shape, transcoder, aux, device, threads)
                                for key, aux in (("no_auxk", False), ("auxk", True))} for r in rows}
    if with_quality:
        result["quality"] = quality(shape, transcoder, data, device, variant, peer_lr)
        result["peer_lr"] = "ours" if peer_lr is None else peer_lr
        if variant:
            result["variant"] = dict(variant)
    return result


def table(result: dict) -> str:
    """One shape's figures as a text table: rows are implementations."""
    s = bench.Shape(**result["shape"])
    title = (f"d {s.d}, {s.d_sae:,} latents ({s.d_sae // s.d}d), k {s.k}, batch {s.batch:,}; {s.n_feat:,} planted "
             f"features, ~{s.active:g} active; 1 epoch = {result['epoch_steps']} steps")
    head = f"{'':14s}{'steps/s':>9s}{'steps/s':>9s}{'x minimal':>16s}{'peak MB':>15s}{'recovered':>11s}{'FVU':>8s}"
    sub = f"{'':14s}{'no AuxK':>9s}{'AuxK':>9s}{'no AuxK / AuxK':>16s}{'no AuxK / AuxK':>15s}{'@1 epoch':>11s}"
    lines = [title, f"{head}{'dead':>8s}", sub]
    for row in PEERS:
        if row not in result["throughput"]["no_auxk"]:
            continue
        t = result["throughput"]["no_auxk"][row]
        ta = result["throughput"]["auxk"][row]
        mem = result.get("memory", {}).get(row)
        mem_s = f"{mem['no_auxk']['step_peak_mb']:.1f} / {mem['auxk']['step_peak_mb']:.1f}" if mem else "-"
        q = result.get("quality", {}).get(row)
        q_s = (f"{q['rec90']:>6d}/{s.n_feat:<4d}{q['fvu']:8.4f}{q['dead']:8.2%}" if q else f"{'-':>11s}{'-':>8s}{'-':>8s}")
        lines.append(f"{LABELS[row]:14s}{t['steps_per_s']:9.2f}{ta['steps_per_s']:9.2f}"
                     f"{t['ratio_vs_minimal']:>8.2f} / {ta['ratio_vs_minimal']:<5.2f}{mem_s:>15s}{q_s}")
    q = result.get("quality", {}).get("variant")
    if q:  # quality only: the variant trains at ours' speed
        lines.append(f"{LABELS['variant']:14s}{'-':>9s}{'-':>9s}{'-':>16s}{'-':>15s}{q['rec90']:>6d}/{s.n_feat:<4d}"
                     f"{q['fvu']:8.4f}{q['dead']:8.2%}")
        lines.append(f"  variant: {', '.join(f'{k}={v}' for k, v in result['variant'].items())}")
    if "quality" in result:
        lr = result.get("peer_lr", 1e-2)
        lines.append(f"  quality: the minimal loop and peers at Adam lr "
                     f"{'ours chooses for the shape' if lr == 'ours' else lr}, decaying linearly")
    return "\n".join(lines)


def parse_variant(text: str | None) -> dict | None:
    """``"init_scale=0.1,decoder_lr_scale=10,lr_schedule=linear"`` -> settings of an extra row of
    ours: ``init_scale`` (the model's) or any :class:`TrainConfig` field; numbers become floats
    (integers for integer fields), ``true`` / ``false`` / ``none`` their values. Raises ValueError
    naming an unknown key or a value that does not parse."""
    if not text:
        return None
    from dataclasses import fields

    from interlatent.analysis.train.fit import TrainConfig

    known = {f.name: f for f in fields(TrainConfig)}
    out: dict = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ValueError(f"--ours-variant items are key=value, got {item!r}")
        if key != "init_scale" and key not in known:
            raise ValueError(f"--ours-variant: unknown setting {key!r}; expected init_scale or one of "
                             f"{', '.join(sorted(known))}")
        if raw.lower() in ("true", "false", "none"):
            out[key] = {"true": True, "false": False, "none": None}[raw.lower()]
            continue
        try:
            value = float(raw)
        except ValueError:
            value = raw
        if isinstance(value, float) and key in known and known[key].type in (int, "int", "int | None"):
            value = int(value)
        out[key] = value
    init_scale = out.get("init_scale")
    if init_scale is not None and not (isinstance(init_scale, float) and init_scale > 0):
        raise ValueError(f"--ours-variant: init_scale must be a number > 0, got {init_scale!r}")
    return out


def selected_shapes(args: argparse.Namespace) -> list[bench.Shape]:
    return [sweep_shape(d, r, k, b, args.train_vectors, args.eval_vectors)
            for d, r, k, b in itertools.product(args.d, args.ratio, args.k, args.batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, nargs="+", default=[128, 256, 768], help="input widths")
    ap.add_argument("--ratio", type=int, nargs="+", default=[8, 32], help="latents per input dimension")
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64], help="TopK's k")
    ap.add_argument("--batch", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--quality-shapes", nargs="*", default=None, metavar="DxRxKxB",
                    help="shapes trained one epoch for quality ('all'; default: the first selected shape)")
    ap.add_argument("--transcoder", action="store_true", help="the in -> out variant (SAELens has none)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (every row on it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing blocks per row")
    ap.add_argument("--steps-per", type=int, default=3, help="steps in one timing block")
    ap.add_argument("--train-vectors", type=int, default=200_000)
    ap.add_argument("--eval-vectors", type=int, default=20_000)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory subprocesses")
    ap.add_argument("--ours-variant", default=None, metavar="K=V,...",
                    help="also train ours with these settings in the quality runs: init_scale or TrainConfig fields, "
                         "e.g. init_scale=0.1,decoder_lr_scale=10,lr_schedule=linear")
    ap.add_argument("--peer-lr", choices=("protocol", "ours"), default="protocol",
                    help="quality rows of the minimal loop and peers: Adam at 1e-2 (protocol) or at the peak rate "
                         "ours' defaults choose for the shape (ours)")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write every figure here")
    ap.add_argument("--peak-row", default=None, help=argparse.SUPPRESS)  # the per-row memory subprocess
    args = ap.parse_args()
    if args.peak_row is not None:
        _peak_row_main(args.peak_row)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible to torch")
    try:
        variant = parse_variant(args.ours_variant)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    shapes = selected_shapes(args)
    wanted = ({label(s) for s in shapes} if args.quality_shapes == ["all"]
              else set(args.quality_shapes) if args.quality_shapes is not None else {label(shapes[0])})
    header(f"planted-feature sweep, {'transcoder' if args.transcoder else 'SAE'}, device {args.device}, "
           f"{len(shapes)} shapes")
    results, skipped = [], []
    for shape in shapes:
        need, have = estimated_bytes(shape, args.transcoder), available_bytes(args.device)
        if need > 0.8 * have:
            msg = f"{label(shape)}: skipped, needs ~{need / 2**30:.1f} GiB of {have / 2**30:.1f} GiB available"
            print(msg, flush=True)
            skipped.append({"label": label(shape), "reason": msg})
            continue
        res = run_shape(shape, args.transcoder, args.device, args.repeats, args.steps_per, args.threads,
                        label(shape) in wanted, not args.no_memory, variant,
                        None if args.peer_lr == "ours" else 1e-2)
        results.append(res)
        print(table(res) + "\n", flush=True)
    if args.transcoder:
        print("SAELens: no transcoder, row skipped")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                                         "transcoder": args.transcoder, "repeats": args.repeats,
                                         "steps_per": args.steps_per, "shapes": results, "skipped": skipped},
                                        indent=1))


if __name__ == "__main__":
    main()
