"""``LLMCollector``: run prompts through a language model and store activations at hook points.

One forward pass per batch reads only the requested hook points (TransformerLens: a names filter and
``stop_at_layer`` past the deepest block; Hugging Face: module hooks and an early stop), and one
store write per batch keeps every real token — never a pad — with its prompt index, position,
token id and text, prompt-level context (once per prompt) and per-token metrics.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interlatent.db import LatentDB, SequenceRecord
from interlatent.db.store import dumps
from interlatent.errors import ConfigError, ShapeError
from interlatent.hooks import KINDS, HookPoint, expand
from interlatent.llm.backends import Backend, make_backend

log = logging.getLogger(__name__)

PromptContextFn = Callable[[str, int], dict[str, Any]]
TokenMetricsFn = Callable[[str, int, list[str]], dict[str, Any]]
BUILTIN_METRICS = ("next_token_loss", "next_token_entropy")


class LLMCollector:
    """Collect activations of a ``HookedTransformer`` or a Hugging Face causal LM into a store.

    Args:
        db: the store to write into.
        layer_indices: block indices (negative counts from the end); each gives ``llm.layer.N``.
        hooks: hook kinds applied to every index (``"resid_post"``, ``"resid_pre"``, ``"resid_mid"``,
            ``"attn_out"``, ``"mlp_in"``, ``"mlp_out"``), and/or full names (``"llm.layer.2.mlp_out"``,
            raw TransformerLens names such as ``"blocks.2.hook_mlp_out"``). Default: resid_post.
        max_channels: store only the first ``max_channels`` channels of each hook point.
        prompt_context_fn: ``(prompt_text, prompt_idx) -> dict`` stored once per prompt; its
            ``"label"`` entry becomes the prompt's label.
        token_metrics_fn: ``(prompt_text, prompt_idx, tokens) -> {name: value}`` with a scalar
            (the same for every token) or one number per token.
        batch_size: prompts per forward pass.
        dtype: storage dtype: ``"float16"`` (default), ``"float32"`` or ``"bfloat16"``.
        metrics: built-in per-token metrics from the logits: ``"next_token_loss"``,
            ``"next_token_entropy"`` (they need the full forward pass, unembedding included).
        padding_side: ``"right"`` (default) or ``"left"``; pads are masked and never stored.
        prepend_bos: None follows the model (TransformerLens ``cfg.default_prepend_bos``; for
            Hugging Face, what its tokenizer does).

    ``prompt_idx`` passed to the functions is the prompt's position in ``prompts``. Prompts longer
    than the model's context are truncated to it, with a logged warning.
    """

    def __init__(
        self,
        db: LatentDB,
        layer_indices: Sequence[int] = (-1,),
        *,
        hooks: Sequence[str] | None = None,
        max_channels: int | None = None,
        prompt_context_fn: PromptContextFn | None = None,
        token_metrics_fn: TokenMetricsFn | None = None,
        batch_size: int = 8,
        dtype: str = "float16",
        metrics: Sequence[str] = (),
        padding_side: str = "right",
        prepend_bos: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_channels is not None and max_channels < 1:
            raise ConfigError(f"max_channels must be a positive int or None, got {max_channels}")
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        unknown = [m for m in metrics if m not in BUILTIN_METRICS]
        if unknown:
            raise ConfigError(f"unknown built-in metrics {unknown}; available: {list(BUILTIN_METRICS)}")
        if isinstance(hooks, str):
            hooks = [hooks]
        for h in hooks or ():
            if not isinstance(h, str):
                raise ConfigError(f"hooks must be names (str); got {h!r} ({type(h).__name__})")
            if "." not in h and h not in KINDS:
                from interlatent.errors import unknown_name

                raise unknown_name("hook kind", h, KINDS, hint="or pass a full name like 'llm.layer.2.mlp_out'")
        self.db = db
        self.layer_indices = _check_layer_indices(layer_indices)
        self.hooks = list(hooks) if hooks else None
        self.max_channels = max_channels
        self.prompt_context_fn = prompt_context_fn
        self.token_metrics_fn = token_metrics_fn
        self.batch_size = batch_size
        self.dtype = dtype
        self.metrics = tuple(metrics)
        self.padding_side = padding_side
        self.prepend_bos = prepend_bos
        self.last_run_id: int | None = None

    # ------------------------------------------------------------------ tokenisation
    def _encode(self, backend: Backend, prompts: Sequence[str], room: int, positions: Sequence[int]
                ) -> list[list[int]]:
        """Token ids of each prompt (BOS as configured, truncated to the context); ``positions`` are
        the prompts' positions in the caller's list, for messages."""
        tok = backend.tokenizer
        bos_id = getattr(tok, "bos_token_id", None)
        prepend = backend.default_prepend_bos() if self.prepend_bos is None else self.prepend_bos
        if prepend and bos_id is None:
            raise ConfigError("prepend_bos is set but the tokenizer has no bos_token_id; pass prepend_bos=False")
        limit = backend.n_ctx - room
        out = []
        for i, enc in zip(positions, backend.encode(prompts)):
            if len(enc.ids) != enc.n_real:
                raise ShapeError(f"prompt {i} encodes to {len(enc.ids)} ids but the tokenizer's attention mask "
                                 f"counts {enc.n_real} real tokens: the encoding was padded. This is a bug in "
                                 "Interlatent's tokenisation; please report it with the tokenizer used")
            ids = [bos_id, *enc.ids] if prepend else list(enc.ids)
            if not ids:
                raise ConfigError(f"prompt {i} tokenizes to nothing; drop it or pass prepend_bos=True")
            if len(ids) > limit:
                log.warning("prompt %d has %d tokens; truncated to the model's context (%d%s)", i, len(ids),
                            limit, f" minus {room} generated" if room else "")
                ids = ids[:limit]
            out.append(ids)
        return out

    @staticmethod
    def _pad(batch: list[list[int]], side: str, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, ids in enumerate(batch):
            sl = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
            tokens[b, sl] = torch.tensor(ids, dtype=torch.long)
            mask[b, sl] = 1
        return tokens.to(device), mask.to(device)

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _generate(backend: Backend, tokens: torch.Tensor, mask: torch.Tensor, n_new: int,
                  temperature: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded greedy (or sampled) continuation by ``n_new`` tokens."""
        for _ in range(n_new):
            logits = backend.logits(tokens, mask)[:, -1, :].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            else:
                nxt = logits.argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, nxt.to(tokens.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt, dtype=mask.dtype)], dim=1)
        return tokens, mask

    # ------------------------------------------------------------------ the run
    def run(
        self,
        llm: Any,
        tok: Any = None,
        *,
        prompts: Sequence[str],
        labels: Sequence[Any] | None = None,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        seed: int = 0,
        prompt_indices: Sequence[int] | None = None,
        duplicates: str = "attach",
        show_progress: bool | None = None,
    ) -> int:
        """Run ``prompts`` through ``llm`` and store the activations. Returns the run id.

        Args:
            llm: a ``HookedTransformer`` or a Hugging Face causal LM.
            tok: the tokenizer (None: the HookedTransformer's own).
            prompts: the texts. Empty strings and texts that are not valid Unicode (lone
                surrogates) are refused before anything runs.
            labels: one label per prompt (str, int, float or None), stored as the prompt's label
                and as ``"label"`` in its context, like ``prompt_context_fn``'s ``"label"``; both
                given and disagreeing is refused.
            max_new_tokens: generate this many tokens after each prompt (greedy, or sampled at
                ``temperature`` with ``seed``) and store their activations too, marked generated.
            prompt_indices: the store's prompt index of each prompt (explicit indices; a different
                text already stored at one is refused). Default: the store chooses, inside each
                write's transaction: a prompt already stored joins its sequence (see
                ``duplicates``); a new prompt takes the index planned for it (its position in
                ``prompts`` after the indices already used, or the indices it had when the store
                holds part of this same list, as after an interrupted run) when that index is
                still free, else the next free one (another writer took it meanwhile).
            duplicates: ``"attach"`` (default): a text already stored with the same token ids
                attaches to that sequence — layers it lacks are written, layers it has are
                skipped (logged); its stored label, context and token metrics are kept (metrics
                it lacks are added). Prompts stored with the same token ids and every requested
                layer are skipped right after tokenising, without a forward pass (logged), so
                re-running an interrupted collection resumes it (with ``max_new_tokens`` the
                generated ids are not known before the forward pass: those prompts run, and
                attach when their ids match). The same text with other token ids (another
                ``prepend_bos``, context length or tokenizer) becomes a new sequence, with a
                warning. A text repeated within ``prompts`` is collected once (``prompt_idx`` of
                its first occurrence). ``"new"``: every prompt becomes a new sequence, and a
                warning says how many repeat a stored or listed text.
        """
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
        if not prompts:
            raise ConfigError("prompts is empty: pass at least one prompt text")
        for i, p in enumerate(prompts):
            _check_prompt(i, p)
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if duplicates not in ("attach", "new"):
            raise ConfigError(f"duplicates must be 'attach' or 'new', got {duplicates!r}")
        if labels is not None:
            labels = _check_labels(labels, len(prompts))
        given = self._given_indices(prompts, prompt_indices)
        backend = make_backend(llm, tok)
        points = self._points(backend)
        contexts = [self._context(p, i, None if labels is None else labels[i]) for i, p in enumerate(prompts)]
        prompt_labels = [c.get("label") for c in contexts]
        for i, lb in enumerate(prompt_labels):
            _check_label(lb, f"the label of prompt {i}")

        units = self._units(prompts, prompt_labels, duplicates, given)
        n_copies = 0
        if duplicates == "new":
            stored = {row[0] for row in self._stored_rows(prompts)}
            n_copies = len(prompts) - len(set(prompts)) + sum(1 for p in set(prompts) if p in stored)
        encoded = dict(zip(units, self._encode(backend, [prompts[i] for i in units], max_new_tokens, units)))
        hints = (dict(enumerate(given)) if given is not None
                 else self._plan_indices(prompts, units, encoded, aligned=duplicates == "attach"))
        if duplicates == "attach" and given is None and not max_new_tokens:
            done = self._complete(prompts, units, encoded, [p.name for p in points])
            if done:
                log.info("%d of %d prompts already stored with every requested layer: skipped, no forward pass",
                         len(done), len(units))
                units = [i for i in units if i not in done]
        string_labels = sorted({prompt_labels[i] for i in units if isinstance(prompt_labels[i], str)})
        if string_labels:
            self.db.register_label_classes(string_labels)
        order = sorted(units, key=lambda i: -len(encoded[i]))  # similar lengths batch together
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        need_logits = bool(self.metrics)
        side = "left" if max_new_tokens else self.padding_side
        pad_id = self._pad_id(backend)
        token_text = _TokenText(backend.tokenizer)
        config = {
            "hook_points": [p.name for p in points], "hook_names": {p.name: p.tl_name for p in points},
            "batch_size": self.batch_size, "dtype": self.dtype, "max_channels": self.max_channels,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "metrics": list(self.metrics),
            "n_prompts": len(prompts), "backend": type(backend).__name__, "n_blocks": backend.n_blocks,
            "duplicates": duplicates,
        }
        layer_meta = {p.name: {"hook_name": p.tl_name, "n_blocks": backend.n_blocks, "block": p.block,
                               "hook_kind": p.kind, "model": backend.name} for p in points}
        dtypes = {p.name: self.dtype for p in points}
        generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
        counts: dict[str, int] = {}
        bar = tqdm(total=len(units), desc="collect", unit="prompt", disable=None if show_progress is None
                   else not show_progress)
        checked_widths = False
        with bar, torch.inference_mode(), self.db.run(kind="llm", model=backend.name, config=config) as run:
            self.last_run_id = run.run_id
            for batch in batches:
                tokens, mask = self._pad([encoded[i] for i in batch], side, pad_id, backend.device)
                n_prompt = mask.sum(dim=1)
                if max_new_tokens:
                    tokens, mask = self._generate(backend, tokens, mask, max_new_tokens, temperature, generator)
                captured, logits = backend.forward(tokens, mask, points, need_logits)
                missing = [p.tl_name for p in points if p.tl_name not in captured]
                if missing:
                    raise ConfigError(f"hook points {missing} never fired during the forward pass; "
                                      "check that the model computes them")
                if not checked_widths:
                    self._check_widths(points, captured)
                    checked_widths = True
                records = self._records(batch, prompts, given, hints, contexts, prompt_labels, tokens, mask,
                                        n_prompt, points, captured, logits, token_text)
                _check_positions(batch, records, mask, [len(encoded[i]) + max_new_tokens for i in batch])
                run.write(records, dtypes=dtypes, layer_meta=layer_meta, duplicates=duplicates, counts=counts)
                bar.update(len(batch))
        if duplicates == "attach" and given is None and not max_new_tokens:
            self.db.mark_resumed(run.run_id, prompts, [p.name for p in points])  # their data is whole again
        self._report(counts, n_copies, len(prompts))
        return run.run_id

    def _context(self, text: str, idx: int, label: Any) -> dict[str, Any]:
        """The prompt's context: ``prompt_context_fn``'s dict, with ``labels``' entry as its label."""
        ctx: dict[str, Any] = {}
        if self.prompt_context_fn is not None:
            got = self.prompt_context_fn(text, idx)
            if not isinstance(got, Mapping):
                raise ConfigError(f"prompt_context_fn must return a dict; for prompt {idx} it returned "
                                  f"{type(got).__name__} {_short(got)}; return e.g. {{'label': ...}}")
            ctx = dict(got)
            bad = [k for k in ctx if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"prompt_context_fn's dict for prompt {idx} has non-string keys {bad[:3]}; "
                                  "context keys must be str")
            try:
                dumps(ctx)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"prompt_context_fn's dict for prompt {idx} cannot be stored as JSON ({exc}): "
                                  f"{_short(ctx)}; use str, numbers, lists and dicts") from exc
        if label is not None:
            if ctx.get("label") is not None and ctx["label"] != label:
                raise ConfigError(f"prompt {idx}: labels gives {label!r} but prompt_context_fn gives label "
                                  f"{ctx['label']!r}; pass one of them, or make them agree")
            ctx["label"] = label
        return ctx

    def _given_indices(self, prompts: list[str], given: Sequence[int] | None) -> list[int] | None:
        if given is None:
            return None
        out = []
        for i in given:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise ConfigError(f"prompt_indices must be ints; got {i!r} ({type(i).__name__})")
            out.append(int(i))
        if len(out) != len(prompts) or len(set(out)) != len(out):
            raise ConfigError(f"prompt_indices must be {len(prompts)} distinct ints (one per prompt); got "
                              f"{len(out)} with {len(out) - len(set(out))} repeated")
        return out

    @staticmethod
    def _units(prompts: list[str], labels: list[Any], duplicates: str, given: list[int] | None) -> list[int]:
        """Positions in ``prompts`` to collect: every one, or the first occurrence of each text."""
        if duplicates == "new" or given is not None:
            return list(range(len(prompts)))
        first: dict[str, int] = {}
        for i, p in enumerate(prompts):
            if p in first and labels[first[p]] != labels[i]:
                log.warning("prompt %d repeats the text of prompt %d with another label (%r, not %r); it is "
                            "stored once, with the first label", i, first[p], labels[i], labels[first[p]])
            first.setdefault(p, i)
        repeated = len(prompts) - len(first)
        if repeated:
            log.info("%d prompts repeat an earlier text of this list; each text is collected once "
                     "(duplicates='new' stores every copy)", repeated)
        return sorted(first.values())

    def _stored_rows(self, texts: Sequence[str]) -> list[tuple[Any, ...]]:
        """(text, prompt_index, token-id bytes, has generated tokens, seq_id) of the stored prompt
        sequences with these texts (an indexed lookup by text)."""
        rows: list[tuple[Any, ...]] = []
        uniq = sorted(set(texts))
        for start in range(0, len(uniq), 500):
            chunk = uniq[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += self.db._q(
                "SELECT s.text, s.prompt_index, t.token_ids, t.generated IS NOT NULL, s.seq_id FROM sequences s"
                f" JOIN tokens t ON t.seq_id = s.seq_id WHERE s.kind = 'prompt' AND s.text IN ({marks})",
                chunk)  # noqa: S608 (placeholders only)
        return rows

    def _complete(self, prompts: list[str], units: list[int], encoded: dict[int, list[int]],
                  names: list[str]) -> set[int]:
        """Prompts already stored, with the same token ids, in a sequence holding every requested layer."""
        seqs: dict[tuple[str, bytes], list[int]] = {}
        for text, _, blob, generated, seq_id in self._stored_rows([prompts[i] for i in units]):
            if not generated:
                seqs.setdefault((text, bytes(blob)), []).append(int(seq_id))
        if not seqs:
            return set()
        holding = {sid for ids in seqs.values() for sid in ids}
        for name in names:  # one (layer_id, seq_id)-indexed lookup per layer
            layer = self.db._q("SELECT layer_id FROM layers WHERE name = ?", (name,))
            if not layer:
                return set()
            have: set[int] = set()
            ids = sorted(holding)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                have.update(r[0] for r in self.db._q(
                    f"SELECT seq_id FROM activations WHERE layer_id = ? AND seq_id IN ({','.join('?' * len(chunk))})",
                    (layer[0][0], *chunk)))  # noqa: S608 (placeholders only)
            holding &= have
        done = set()
        for i in units:
            key = (prompts[i], np.asarray(encoded[i], dtype="<i4").tobytes())
            if any(sid in holding for sid in seqs.get(key, [])):
                done.add(i)
        return done

    def _plan_indices(self, prompts: list[str], units: list[int], encoded: dict[int, list[int]],
                      aligned: bool) -> dict[int, int]:
        """The index each prompt to collect would like. A prompt stored with the same token ids keeps
        its index (it will attach). New prompts take ``base + position`` where ``base`` lines up with
        where this list's stored prompts are (a re-run, an extension, a resumed run; only when
        ``aligned``) and those indices are free, else the next free indices in list order. The store
        checks each one is still free when it writes (another writer may have taken it)."""
        next_free = int(self.db._q("SELECT COALESCE(MAX(prompt_index) + 1, 0) FROM sequences")[0][0])
        if next_free == 0:
            return {i: i for i in units}
        exact: dict[tuple[str, bytes], int] = {}
        if aligned:
            for text, index, blob, _, _ in self._stored_rows([prompts[i] for i in units]):
                exact.setdefault((text, bytes(blob)), int(index))
        attach = {i: exact[key] for i in units
                  if (key := (prompts[i], np.asarray(encoded[i], dtype="<i4").tobytes())) in exact}
        new = [i for i in units if i not in attach]
        for base, _ in Counter(index - i for i, index in attach.items()).most_common(3):
            if base < 0 or any(attach[i] != base + i for i in attach):
                continue
            lo, hi = base + min(new, default=0), base + max(new, default=0)
            taken = {r[0] for r in self.db._q("SELECT prompt_index FROM sequences WHERE prompt_index BETWEEN ? AND ?",
                                             (lo, hi))}
            if not any(base + i in taken for i in new):
                return {**attach, **{i: base + i for i in new}}
        if attach and new:
            log.info("store already holds other prompts; the %d new prompts take indices from %d", len(new), next_free)
        return {**attach, **{i: next_free + k for k, i in enumerate(new)}}

    def _report(self, counts: dict[str, int], n_copies: int, n_prompts: int) -> None:
        attached, skipped = counts.get("attached", 0), counts.get("layers_skipped", 0)
        if attached:
            log.info("%d prompts were already stored and joined their sequences; %d layer%s they already held "
                     "%s skipped", attached, skipped, "" if skipped == 1 else "s", "was" if skipped == 1 else "were")
        if counts.get("retokenised"):
            log.warning("%d prompts have the text of a stored sequence but another tokenisation (prepend_bos, "
                        "context length, generation or tokenizer changed); they were stored as new sequences",
                        counts["retokenised"])
        if n_copies:
            log.warning("duplicates='new': stored %d of %d prompts as new sequences although their text was "
                        "already stored or listed; prompt-level splits see each copy", n_copies, n_prompts)

    def _points(self, backend: Backend) -> list[HookPoint]:
        seen: dict[str, HookPoint] = {}
        for spec in expand(self.layer_indices, self.hooks):
            point = backend.resolve(spec)
            seen.setdefault(point.name, point)
        if not seen:
            raise ConfigError("no hook points requested: pass layer_indices and/or hooks")
        return list(seen.values())

    @staticmethod
    def _pad_id(backend: Backend) -> int:
        tok = backend.tokenizer
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tok, attr, None)
            if value is not None:
                return int(value)
        return 0  # any id works: pads are masked out and never stored

    def _check_widths(self, points: Sequence[HookPoint], captured: dict[str, torch.Tensor]) -> None:
        if self.max_channels is None:
            return
        for p in points:
            width = int(np.prod(captured[p.tl_name].shape[2:]))
            if self.max_channels > width:
                raise ConfigError(f"max_channels={self.max_channels} exceeds the width {width} of {p.name}; "
                                  "pass max_channels=None to store every channel")

    def _records(self, batch: list[int], prompts: list[str], given: list[int] | None, hints: dict[int, int],
                 contexts: list[dict[str, Any]],
                 labels: list[Any], tokens: torch.Tensor, mask: torch.Tensor, n_prompt: torch.Tensor,
                 points: Sequence[HookPoint], captured: dict[str, torch.Tensor], logits: torch.Tensor | None,
                 token_text: _TokenText) -> list[SequenceRecord]:
        host = {}
        for p in points:
            act = captured[p.tl_name]
            act = act.reshape(act.shape[0], act.shape[1], -1)  # raw hooks with head dims: flatten
            if self.max_channels is not None:
                act = act[..., : self.max_channels]
            if self.dtype == "float16":  # cast here (cheaper copies) unless a value would overflow
                lo, hi = torch.aminmax(act)
                act = act.half() if max(float(hi), -float(lo)) <= 65504.0 else act.float()
            host[p.name] = act.cpu().numpy() if act.dtype == torch.float16 else act.float().cpu().numpy()
        lp = torch.log_softmax(logits.float(), dim=-1) if logits is not None else None
        mask_np = mask.cpu().numpy().astype(bool)
        tokens_np = tokens.cpu().numpy()
        records = []
        for b, i in enumerate(batch):
            real = np.flatnonzero(mask_np[b])
            ids = tokens_np[b, real].tolist()
            toks = token_text(ids)
            metrics: dict[str, np.ndarray] = {}
            if lp is not None:
                metrics.update(_logit_metrics(lp[b, real], tokens[b, real], self.metrics))
            if self.token_metrics_fn is not None:
                for name, value in (self.token_metrics_fn(prompts[i], i, toks) or {}).items():
                    metrics[name] = _per_token(name, value, len(ids), i)
            generated = None
            if tokens.shape[1] > 0 and int(n_prompt[b]) < len(ids):
                generated = np.arange(len(ids)) >= int(n_prompt[b])
            records.append(SequenceRecord(
                token_ids=ids, tokens=toks, activations={name: arr[b, real] for name, arr in host.items()},
                text=prompts[i], label=labels[i], context=contexts[i], metrics=metrics, generated=generated,
                prompt_index=None if given is None else given[i], index_hint=hints[i],
            ))
        return records


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_layer_indices(layer_indices: Any) -> list[int]:
    if isinstance(layer_indices, (int, np.integer)) and not isinstance(layer_indices, (bool, np.bool_)):
        layer_indices = [layer_indices]
    if isinstance(layer_indices, (str, bytes, Mapping)) or not hasattr(layer_indices, "__iter__"):
        raise ConfigError(f"layer_indices must be a list of block indices (ints); got {_short(layer_indices)}")
    layer_indices = list(layer_indices)
    out = []
    for value in layer_indices:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"layer_indices must be ints (block indices, negative from the end); got {value!r} "
                              f"({type(value).__name__}) in {_short(layer_indices)}; pass e.g. [0, -1]")
        out.append(int(value))
    return out


def _check_prompt(i: int, text: Any) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"prompt {i} is a {type(text).__name__}, expected str")
    if not text:
        raise ConfigError(f"prompt {i} is an empty string; remove it (an empty prompt has no tokens)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"prompt {i} is not valid Unicode: {exc.reason} {text[exc.start:exc.end]!r} at "
                          f"character {exc.start} of {_short(text)}; a lone surrogate usually comes from "
                          "decoding bytes with errors='surrogateescape' — decode with errors='replace'") from exc


def _check_label(label: Any, what: str) -> None:
    if label is None or isinstance(label, str):
        return
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (Real, np.number)):
        raise ConfigError(f"{what} is {_short(label)} ({type(label).__name__}); a label must be a str, an int, "
                          "a float or None")
    if isinstance(label, float) and not math.isfinite(label):
        raise ConfigError(f"{what} is {label!r}; a numeric label must be finite (use None for no label)")


def _check_labels(labels: Any, n: int) -> list[Any]:
    if isinstance(labels, (str, bytes, Mapping)) or not hasattr(labels, "__iter__"):
        raise ConfigError(f"labels must be a list with one label per prompt; got {_short(labels)}")
    out = [lb.item() if isinstance(lb, np.generic) else lb for lb in labels]
    if len(out) != n:
        raise ConfigError(f"labels has {len(out)} entries for {n} prompts; pass one label (or None) per prompt")
    for i, lb in enumerate(out):
        _check_label(lb, f"labels[{i}]")
    return out


def _check_positions(batch: list[int], records: list[SequenceRecord], mask: torch.Tensor,
                     expected: list[int]) -> None:
    """Every record stores exactly the attention mask's real positions (no pad, none lost)."""
    real = mask.sum(dim=1).tolist()
    for b, (i, rec) in enumerate(zip(batch, records)):
        if not rec.n_positions == len(rec.token_ids) == int(real[b]) == expected[b]:
            raise ShapeError(f"prompt {i}: {rec.n_positions} positions to store, the attention mask has "
                             f"{int(real[b])} real tokens and tokenisation gave {expected[b]}; refusing to "
                             "write (an internal inconsistency: please report it)")


def _per_token(name: str, value: Any, n: int, prompt: int) -> np.ndarray:
    if np.isscalar(value) or value is None:
        try:
            return np.full(n, np.nan if value is None else float(value), dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"token metric {name!r} of prompt {prompt} is {value!r}; metrics must be numeric "
                              "(put text in prompt_context_fn instead)") from exc
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise ShapeError(f"token metric {name!r} of prompt {prompt} has shape {arr.shape}; expected a scalar or "
                         f"one value per token ({n})")
    return arr


def _logit_metrics(logprobs: torch.Tensor, ids: torch.Tensor, wanted: Sequence[str]) -> dict[str, np.ndarray]:
    """Next-token loss (NaN at the last position) and entropy from one prompt's log-probs [pos, vocab]."""
    out = {}
    if "next_token_loss" in wanted:
        loss = torch.full((ids.shape[0],), math.nan)
        if ids.shape[0] > 1:
            loss[:-1] = -logprobs[:-1].gather(-1, ids[1:, None]).squeeze(-1).cpu()
        out["next_token_loss"] = loss.numpy()
    if "next_token_entropy" in wanted:
        out["next_token_entropy"] = (-(logprobs.exp() * logprobs).sum(-1)).cpu().numpy()
    return out


class _TokenText:
    """Decoded text of single token ids, cached (the same ids repeat across a corpus)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        new = [i for i in set(ids) if i not in self.cache]
        if new:
            backend = getattr(self.tokenizer, "_tokenizer", None)
            if backend is not None and hasattr(backend, "decode_batch"):
                texts = backend.decode_batch([[i] for i in new], skip_special_tokens=False)
            else:
                texts = self.tokenizer.batch_decode([[i] for i in new])
            self.cache.update(zip(new, texts))
        return [self.cache[i] for i in ids]
