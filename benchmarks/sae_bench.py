"""SAE and transcoder training on the planted-feature protocol (BENCHMARKS.md), side by side.

d 256, 1,024 planted unit features (each active with p 8/1024, magnitude U[0.5, 1.5]) plus N(0, 0.01²)
noise; 200,000 training then 20,000 evaluation vectors from one seeded generator whose seed differs
from every model seed. 2,048 latents, TopK k 16, batch 4,096, data in order (48 steps = 1 epoch).

Rows, all in one run: our SparseAutoencoder + fit (default TrainConfig), a minimal plain-PyTorch
TopK loop written here (the usual index_add sparse encoder backward, embedding_bag decode, AuxK
through dense autograd, Adam lr 1e-2 decaying linearly to 0, unit-norm decoder), and SAELens /
EleutherAI sparsify when installed. Throughput is timed interleaved
(ours, minimal, kernels, peers, ours, minimal ...) without and with AuxK active, next to the floor
of the forward kernels alone; quality after 48 and 240 steps.

Every piece takes a :class:`Shape` (default: the protocol's), so ``sae_sweep.py`` reuses them.

    .venv/bin/python benchmarks/sae_bench.py [--steps 48 240] [--transcoder] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import header  # noqa: E402

from interlatent.analysis.models import SparseAutoencoder, SparseCoderConfig, Transcoder  # noqa: E402
from interlatent.analysis.train.fit import TrainConfig, fit, learning_rate  # noqa: E402

DATA_SEED, MODEL_SEED = 20_251_201, 7


@dataclass(frozen=True)
class Shape:
    """One shape of the planted-feature protocol: data, dictionary and batch."""

    d: int = 256
    """Width of the vectors."""
    n_feat: int = 1024
    """Planted unit features."""
    d_sae: int = 2048
    """Latents of every dictionary under test."""
    k: int = 16
    """TopK's active latents."""
    batch: int = 4096
    active: float = 8.0
    """Expected active planted features per vector (each active with p = active / n_feat)."""
    n_train: int = 200_000
    n_eval: int = 20_000

    @property
    def k_aux(self) -> int:
        """AuxK's latents, as the field sets it (d // 2)."""
        return max(self.d // 2, 1)

    @property
    def epoch(self) -> int:
        """Steps of one pass over the training vectors."""
        return self.n_train // self.batch


PROTOCOL = Shape()
D, N_FEAT, N_TRAIN, N_EVAL, D_SAE, K, BATCH = (PROTOCOL.d, PROTOCOL.n_feat, PROTOCOL.n_train, PROTOCOL.n_eval,
                                              PROTOCOL.d_sae, PROTOCOL.k, PROTOCOL.batch)


def planted(transcoder: bool, shape: Shape = PROTOCOL, seed: int = DATA_SEED, device: str = "cpu"):
    """Features ``f`` (and ``g``), then training and evaluation vectors, from one seeded generator.

    The codes are drawn in chunks of rows (one chunk at the protocol's shape), so wide shapes never
    hold a ``[n_train, n_feat]`` matrix."""
    if seed == MODEL_SEED:
        raise ValueError(f"the data seed must differ from the model seed {MODEL_SEED}")
    gen = torch.Generator().manual_seed(seed)
    n_feat, d = shape.n_feat, shape.d
    f = torch.randn(n_feat, d, generator=gen)
    f /= f.norm(dim=-1, keepdim=True)
    g = torch.randn(n_feat, d, generator=gen)
    g /= g.norm(dim=-1, keepdim=True)
    p = shape.active / n_feat
    chunk = max(1, 2**28 // n_feat)

    def draw(n: int):
        xs, ys = [], []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            codes = (torch.rand(m, n_feat, generator=gen) < p) * (torch.rand(m, n_feat, generator=gen) + 0.5)
            xs.append(codes @ f + 0.01 * torch.randn(m, d, generator=gen))
            if transcoder:
                ys.append(codes @ g + 0.01 * torch.randn(m, d, generator=gen))
        x = torch.cat(xs).to(device)
        return x, (torch.cat(ys).to(device) if transcoder else None)

    (x_train, y_train), (x_eval, y_eval) = draw(shape.n_train), draw(shape.n_eval)
    return f.to(device), g.to(device), x_train, y_train, x_eval, y_eval


def batches(x: torch.Tensor, y: torch.Tensor | None, batch: int = BATCH):
    while True:
        for i in range(0, x.shape[0] - batch + 1, batch):
            yield x[i : i + batch] if y is None else (x[i : i + batch], y[i : i + batch])


class _MinimalSparseEncode(torch.autograd.Function):
    """The usual sparse backward of a TopK encoder: index_add the k outer products of each row.

    ``pre`` is also returned, so a loss on it (AuxK) flows back through plain dense autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, k):
        pre = F.linear(x, weight, bias)
        vals, idx = pre.topk(k, sorted=False)
        ctx.save_for_backward(x, weight, idx)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # no AuxK: no dense zero gradient for pre
        return vals, idx, pre

    @staticmethod
    def backward(ctx, grad_vals, _gi, grad_pre):
        x, weight, idx = ctx.saved_tensors
        flat = idx.flatten()
        grad_w = torch.zeros_like(weight).index_add_(0, flat, (grad_vals[:, :, None] * x[:, None, :]).flatten(0, 1))
        grad_b = weight.new_zeros(weight.shape[0]).index_add_(0, flat, grad_vals.flatten())
        grad_x = F.embedding_bag(idx, weight, per_sample_weights=grad_vals, mode="sum")
        if grad_pre is not None:
            grad_w += grad_pre.t() @ x
            grad_b += grad_pre.sum(0)
            grad_x += grad_pre @ weight
        return grad_x, grad_w, grad_b, None


class MinimalTopK(torch.nn.Module):
    """The plain reference: TopK SAE/transcoder with the usual sparse encoder backward
    (index_add), embedding_bag decode, and AuxK through dense autograd."""

    def __init__(self, d_in: int, d_out: int, seed: int, d_sae: int = D_SAE, k: int = K):
        super().__init__()
        self.d_sae, self.k = d_sae, k
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_out, generator=gen)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.clone() if d_in == d_out else torch.randn(d_sae, d_in, generator=gen) / d_in**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))

    def forward(self, x, y=None, dead=None):
        target = x if y is None else y
        x_in = x - self.b_dec if y is None else x
        vals, idx, pre = _MinimalSparseEncode.apply(x_in, self.W_enc, self.b_enc, self.k)
        acts = vals.relu()
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=acts, mode="sum") + self.b_dec
        loss = (out - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
        if dead is not None and dead.any():  # AuxK, as the field defines it
            k_aux = min(x.shape[1] // 2, int(dead.sum()))
            aux_vals, aux_idx = pre.masked_fill(~dead, -torch.inf).topk(k_aux, sorted=False)
            aux_out = F.embedding_bag(aux_idx, self.W_dec, per_sample_weights=aux_vals.relu(), mode="sum")
            e = (target - out).detach()
            loss = loss + (1 / 32) * (aux_out - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        return loss, idx, acts

    @torch.no_grad()
    def encode_decode(self, xb, transcoder: bool = False):
        """Output, TopK indices and values on a batch (what ``quality`` reads)."""
        x_in = xb if transcoder else xb - self.b_dec
        vals, idx = F.linear(x_in, self.W_enc, self.b_enc).topk(self.k, sorted=False)
        acts = vals.relu()
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=acts, mode="sum") + self.b_dec, idx, acts


def minimal_step(model: MinimalTopK, opt, x, y, dead):
    """One step of the minimal loop: loss, backward, decoder-parallel gradient removed, Adam, unit norm."""
    loss, idx, acts = model(x, y, dead)
    opt.zero_grad()
    loss.backward()
    with torch.no_grad():
        g = model.W_dec.grad
        g -= (g * model.W_dec).sum(-1, keepdim=True) * model.W_dec
    opt.step()
    with torch.no_grad():
        model.W_dec /= model.W_dec.norm(dim=-1, keepdim=True)
    return idx, acts


def train_minimal(model, data, steps, dead_all: bool, lr: float = 1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    dead = torch.ones(model.d_sae, dtype=torch.bool, device=model.W_dec.device) if dead_all else None
    fired = torch.zeros(model.d_sae, dtype=torch.long, device=model.W_dec.device)
    for _, batch in zip(range(steps), data):
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        idx, acts = minimal_step(model, opt, x, y, dead)
        sched.step()
        with torch.no_grad():
            fired += torch.bincount(idx[acts > 0], minlength=model.d_sae)
    return fired


def recovered(truth: torch.Tensor, w_dec: torch.Tensor, threshold: float = 0.9) -> int:
    """Planted features (rows of ``truth``) whose best cosine with any row of ``w_dec`` exceeds ``threshold``."""
    dec = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit = truth / truth.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return int(((unit @ dec.t()).max(-1).values > threshold).sum())


@torch.no_grad()
def quality(encode_decode, w_dec, w_enc, f, g, x_eval, y_eval, fired, transcoder: bool) -> dict[str, float]:
    target = x_eval if y_eval is None else y_eval
    err = tot = 0.0
    mean = target.double().mean(0)
    l0 = 0.0
    fired = fired.to(w_dec.device, copy=True)
    d_sae = w_dec.shape[0]
    for i in range(0, x_eval.shape[0], 4096):
        out, idx, acts = encode_decode(x_eval[i : i + 4096])
        t = target[i : i + 4096].double()
        err += float((t - out.double()).pow(2).sum())
        tot += float((t - mean).pow(2).sum())
        l0 += float((acts > 0).sum())
        fired += torch.bincount(idx[acts > 0], minlength=d_sae)
    truth = g if transcoder else f
    res = {"fvu": err / tot, "l0": l0 / x_eval.shape[0], "dead": float((fired == 0).float().mean()),
           "rec80": recovered(truth, w_dec, 0.8), "rec90": recovered(truth, w_dec, 0.9),
           "rec95": recovered(truth, w_dec, 0.95)}
    if transcoder:
        res["enc_rec80"] = recovered(f, w_enc, 0.8)
    return res


def saelens_sae(shape: Shape = PROTOCOL, device: str = "cpu"):
    """SAELens's TopK training SAE with the shape (None when SAELens is not installed)."""
    if importlib.util.find_spec("sae_lens") is None:
        return None
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(MODEL_SEED)
    return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=shape.d, d_sae=shape.d_sae, k=shape.k, dtype="float32",
                                                 device=device))


def saelens_step(sae, opt, x, dead):
    from sae_lens.saes.sae import TrainStepInput

    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    return out.feature_acts


def sparsify_sae(transcoder: bool = False, shape: Shape = PROTOCOL, device: str = "cpu"):
    """EleutherAI sparsify's SparseCoder with the shape (None when it is not installed)."""
    try:
        from sparsify import SparseCoder as EaiCoder
        from sparsify import SparseCoderConfig as EaiConfig
    except ImportError:  # not installed, or another package that is also called sparsify
        return None
    torch.manual_seed(MODEL_SEED)
    return EaiCoder(shape.d, EaiConfig(num_latents=shape.d_sae, k=shape.k, transcode=transcoder), device=device)


def sparsify_step(sae, opt, x, dead, y=None):
    out = sae(x, y, dead_mask=dead)
    loss = out.fvu + (1 / 32) * out.auxk_loss if dead is not None else out.fvu
    opt.zero_grad()
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    return out


@torch.no_grad()
def encode_decode(model, xb):
    """Our dictionary's output, TopK indices and values on a batch (what ``quality`` reads)."""
    enc = model.encode(xb)
    return model.decode(enc.latent_acts, enc.latent_indices, x=xb), enc.latent_indices, enc.latent_acts


def ours(transcoder: bool, shape: Shape = PROTOCOL, device: str = "cpu", **model_kwargs):
    cfg = SparseCoderConfig(d_in=shape.d, d_sae=shape.d_sae, k=shape.k, d_out=shape.d if transcoder else None)
    return (Transcoder if transcoder else SparseAutoencoder)(cfg, seed=MODEL_SEED, **model_kwargs).to(device)


def _split(batch):
    return batch if isinstance(batch, tuple) else (batch, None)


ROWS = ("ours", "minimal", "kernels", "SAELens", "sparsify")


def step_functions(transcoder: bool, shape: Shape, data, aux: bool, device: str = "cpu",
                   rows: tuple[str, ...] = ROWS) -> dict[str, Callable[[], object]]:
    """One training step (lr 1e-3, AuxK over every latent when ``aux``) of each of ``rows``, by name:
    ours, the minimal loop, the forward kernels alone, SAELens (SAEs only) and sparsify (when installed)."""
    dead = torch.ones(shape.d_sae, dtype=torch.bool, device=device) if aux else None
    steps: dict[str, Callable[[], object]] = {}
    a = ours(transcoder, shape, device) if {"ours", "kernels"} & set(rows) else None
    if "ours" in rows:
        opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, foreach=True)

        def step_a():
            xb, yb = _split(next(data))
            out = a(xb, yb, dead_mask=dead)
            opt_a.zero_grad()
            out.loss.backward()
            a.remove_gradient_parallel_to_decoder()
            opt_a.step()
            a.set_decoder_norm_to_unit()

        steps["ours"] = step_a
    if "minimal" in rows:
        b = MinimalTopK(shape.d, shape.d, MODEL_SEED, shape.d_sae, shape.k).to(device)
        opt_b = torch.optim.Adam(b.parameters(), lr=1e-3)
        steps["minimal"] = lambda: minimal_step(b, opt_b, *_split(next(data)), dead)
    if "kernels" in rows:
        w_k, b_k = a.W_enc.detach().clone(), a.b_enc.detach().clone()
        buf = torch.empty(shape.batch, shape.d_sae, device=device)

        @torch.no_grad()
        def step_k():  # the floor: the forward kernels every TopK step needs, nothing else
            xb, _ = _split(next(data))
            vals, idx = torch.addmm(b_k, xb, w_k.t(), out=buf).topk(shape.k, sorted=False)
            F.embedding_bag(idx, w_k, per_sample_weights=vals, mode="sum")
            if dead is not None:
                buf.topk(shape.k_aux, sorted=False)

        steps["kernels"] = step_k
    sl = None if transcoder or "SAELens" not in rows else saelens_sae(shape, device)
    if sl is not None:
        opt_c = torch.optim.Adam(sl.parameters(), lr=1e-3)
        steps["SAELens"] = lambda: saelens_step(sl, opt_c, _split(next(data))[0], dead)
    sp = sparsify_sae(transcoder, shape, device) if "sparsify" in rows else None
    if sp is not None:
        opt_d = torch.optim.Adam(sp.parameters(), lr=1e-3)

        def step_d():
            xb, yb = _split(next(data))
            sparsify_step(sp, opt_d, xb, dead, yb)

        steps["sparsify"] = step_d
    return steps


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(steps: dict[str, Callable[[], object]], repeats: int, steps_per: int, device: str = "cpu",
          ) -> dict[str, list[float]]:
    """Steps per second of every row, ``steps_per`` steps at a time, interleaved ``repeats`` times."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        fn()
    _sync(device)
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(steps_per):
                fn()
            _sync(device)
            times[name].append(steps_per / (time.perf_counter() - start))
    return times


def throughput(transcoder: bool, x, y, aux: bool, repeats: int, steps_per: int, shape: Shape = PROTOCOL,
               device: str = "cpu") -> dict[str, float]:
    """Steady vectors/s of one training step: ours vs the minimal loop (and peers), interleaved."""
    times = timed(step_functions(transcoder, shape, batches(x, y, shape.batch), aux, device), repeats, steps_per, device)
    out = {name: shape.batch * statistics.median(t) for name, t in times.items()}
    out["ratio"] = statistics.median(o / m for o, m in zip(times["ours"], times["minimal"]))
    out["ratio_kernels"] = statistics.median(o / m for o, m in zip(times["ours"], times["kernels"]))
    for peer in ("SAELens", "sparsify"):
        if peer in times:
            out[f"ratio_{peer}"] = statistics.median(o / m for o, m in zip(times["ours"], times[peer]))
    return out


def train_rows(transcoder: bool, shape: Shape, data, steps: int, device: str = "cpu", skip_row: bool = False,
               variant: dict | None = None, peer_lr: float | None = 1e-2) -> list[tuple[str, dict[str, float], float]]:
    """Train every row for ``steps`` steps (ours with its defaults; the minimal loop and peers with
    Adam at ``peer_lr`` decaying linearly to 0; None: the peak rate ours' defaults choose for the
    shape) and score it: ``(name, quality, seconds)`` per row. ``variant``: also an
    ``"ours (variant)"`` row, ours with these settings (``init_scale`` for the model, the rest
    :class:`TrainConfig` fields)."""
    f, g, x, y, xe, ye = data
    if peer_lr is None:
        peer_lr = learning_rate(ours(transcoder, shape, "cpu"), TrainConfig())
    init_x, init_y = x[: shape.batch], None if y is None else y[: shape.batch]

    def train_ours(settings: dict) -> tuple[dict[str, float], float]:
        settings = dict(settings)
        model = ours(transcoder, shape, device, **({"init_scale": settings.pop("init_scale")}
                                                   if "init_scale" in settings else {}))
        model.init_from_data(init_x, init_y)  # what the pipelines do
        start = time.perf_counter()
        res = fit(model, batches(x, y, shape.batch), steps, TrainConfig(**settings), progress=False)
        el = time.perf_counter() - start
        return quality(partial(encode_decode, model), model.W_dec, model.W_enc, f, g, xe, ye, res.fire_counts,
                       transcoder), el

    q, el = train_ours({})
    mini = MinimalTopK(shape.d, shape.d, MODEL_SEED, shape.d_sae, shape.k).to(device)
    with torch.no_grad():
        mini.b_dec.copy_((x if y is None else y)[: shape.batch].mean(0))
    start = time.perf_counter()
    fired = train_minimal(mini, batches(x, y, shape.batch), steps, dead_all=False, lr=peer_lr)
    el_m = time.perf_counter() - start
    qm = quality(partial(mini.encode_decode, transcoder=transcoder), mini.W_dec, mini.W_enc, f, g, xe, ye, fired,
                 transcoder)
    rows = [("ours (defaults)", q, el), ("minimal loop", qm, el_m)]
    if variant:
        rows.append(("ours (variant)", *train_ours(variant)))
    if transcoder and skip_row:  # the skip-connection variant: a linear path x -> y next to the latents
        sk = Transcoder(SparseCoderConfig(d_in=shape.d, d_sae=shape.d_sae, k=shape.k, d_out=shape.d, skip=True),
                        seed=MODEL_SEED).to(device)
        sk.init_from_data(init_x, init_y)
        start = time.perf_counter()
        res_sk = fit(sk, batches(x, y, shape.batch), steps, TrainConfig(), progress=False)
        el_sk = time.perf_counter() - start
        rows.append(("ours (skip=True)", quality(partial(encode_decode, sk), sk.W_dec, sk.W_enc, f, g, xe, ye,
                                                 res_sk.fire_counts, True), el_sk))
    sl = None if transcoder else saelens_sae(shape, device)
    if sl is not None:  # SAELens's TopK SAE, same data and schedule as the minimal loop
        opt = torch.optim.Adam(sl.parameters(), lr=peer_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        fired_sl = torch.zeros(shape.d_sae, dtype=torch.long, device=device)
        start = time.perf_counter()
        for _, xb in zip(range(steps), batches(x, None, shape.batch)):
            acts = saelens_step(sl, opt, xb, None)
            sched.step()
            fired_sl += (acts > 0).sum(0)
        el_s = time.perf_counter() - start

        def ed_s(xb, m=sl):
            with torch.no_grad():
                acts = m.encode(xb)
                vals, idx = acts.topk(shape.k, dim=-1)
                return m.decode(acts), idx, vals

        rows.append(("SAELens", quality(ed_s, sl.W_dec, sl.W_enc.t(), f, g, xe, ye, fired_sl, False), el_s))
    sp = sparsify_sae(transcoder, shape, device)
    if sp is not None:  # sparsify's SparseCoder, same data and schedule as the minimal loop
        opt = torch.optim.Adam(sp.parameters(), lr=peer_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        fired_sp = torch.zeros(shape.d_sae, dtype=torch.long, device=device)
        start = time.perf_counter()
        for _, batch in zip(range(steps), batches(x, y, shape.batch)):
            xb, yb = _split(batch)
            out = sparsify_step(sp, opt, xb, None, yb)
            sched.step()
            fired_sp += torch.bincount(out.latent_indices[out.latent_acts > 0], minlength=shape.d_sae)
        el_p = time.perf_counter() - start

        def ed_p(xb, m=sp):
            with torch.no_grad():
                enc = m.encode(xb)
                return m.decode(enc.top_acts, enc.top_indices), enc.top_indices, enc.top_acts

        rows.append(("sparsify", quality(ed_p, sp.W_dec, sp.encoder.weight, f, g, xe, ye, fired_sp, transcoder), el_p))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, nargs="*", default=[48, 240], help="quality checkpoints (none: throughput only)")
    ap.add_argument("--transcoder", action="store_true", help="the in -> out variant of the protocol")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kind = "transcoder" if args.transcoder else "SAE"
    header(f"planted-feature protocol, {kind}: d {D}, {N_FEAT} features, {D_SAE} latents, k {K}, batch {BATCH}")
    data = planted(args.transcoder)
    _, _, x, y, _, _ = data
    for aux in (False, True):
        t = throughput(args.transcoder, x, y, aux, args.repeats, 3)
        label = "AuxK active" if aux else "no AuxK    "
        print(f"throughput ({label}): ours {t['ours']:,.0f} vec/s  minimal loop {t['minimal']:,.0f} vec/s  "
              f"ratio {t['ratio']:.2f}x  (target >= 1.0x)")
        for peer in ("SAELens", "sparsify"):
            if peer in t:
                print(f"throughput ({label}): {peer} {t[peer]:,.0f} vec/s  ours / {peer} {t[f'ratio_{peer}']:.2f}x")
        print(f"throughput ({label}): forward kernels alone (matmul + TopK{' + AuxK TopK' if aux else ''} + decode, "
              f"no backward) {t['kernels']:,.0f} vec/s  ours / kernels {t['ratio_kernels']:.2f}x")
    if saelens_sae() is None:
        print("SAELens: not installed, row skipped")
    if sparsify_sae(args.transcoder) is None:
        print("sparsify (EleutherAI): not installed, row skipped")
    for steps in args.steps:
        for name, qq, seconds in train_rows(args.transcoder, PROTOCOL, data, steps, skip_row=True):
            extra = f"  encoder rec>0.8 {qq['enc_rec80']}" if "enc_rec80" in qq else ""
            print(f"{steps:4d} steps  {name:16s} FVU {qq['fvu']:.4f}  L0 {qq['l0']:.1f}  dead {qq['dead']:.2%}  "
                  f"recovered >0.8 {qq['rec80']}  >0.9 {qq['rec90']}  >0.95 {qq['rec95']} / {N_FEAT}{extra}  "
                  f"({steps * BATCH / seconds:,.0f} vec/s incl. bookkeeping)")


if __name__ == "__main__":
    main()
