"""``LLMCollector``: run prompts through a language model and store activations at hook points.

One forward pass per batch reads only the requested hook points, through the model's backend
(:mod:`interlatent.backends`: it stops after the deepest requested block), and one
store write per batch (in a background writer thread by default, :mod:`interlatent.db.background`)
keeps every real token — never a pad — with its prompt index, position,
token id and text, prompt-level context (once per prompt) and per-token metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interlatent.db import LatentDB, Run
from interlatent.db.background import batch_writer
from interlatent.db.store import dumps
from interlatent.backends import make_backend
from interlatent.errors import ConfigError
from interlatent.hooks import KINDS
from interlatent.llm.capture import Capture, CapturedBatch, ModelFacts, PromptBatch
from interlatent.llm.prompts import TokenText, check_label, check_labels, check_layer_indices, check_prompt, short
from interlatent.llm.resume import find_resumable, prompts_digest

log = logging.getLogger(__name__)

PromptContextFn = Callable[[str, int], dict[str, Any]]
TokenMetricsFn = Callable[[str, int, list[str]], dict[str, Any]]
BUILTIN_METRICS = ("next_token_loss", "next_token_entropy")


@dataclass
class RunPlan:
    """A collection decided before its first forward pass (see :meth:`LLMCollector._plan`)."""

    prompts: list[str]
    batches: list[PromptBatch]  # in the order they are written
    model: str  # the model's name for the run
    config: dict[str, Any]  # the run's stored config
    write_options: dict[str, Any]  # dtypes, layer_meta, duplicates: what every write is given
    names: list[str]  # the layers collected
    resume: bool  # prompts already stored were skipped: their runs are marked resumed afterwards
    n_copies: int  # prompts stored again although their text was stored or listed (duplicates="new")
    n_units: int  # prompts to run


class LLMCollector:
    """Collect activations of a model into a store: a TransformerLens ``HookedTransformer`` /
    ``TransformerBridge`` / ``HookedEncoder``, or a Hugging Face causal LM or BERT-style encoder.

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
        write_queue: forward batches that may wait for the store (default 4): a background thread
            writes them (its own connection to the store; queued batches are also capped at
            ``write_queue_bytes`` of activations) while the model runs the next ones. Its errors are
            raised here, with their own type; on Ctrl-C or SIGTERM the queued batches are written
            whole and the run is marked interrupted. ``0`` or ``None``: write each batch in this
            thread before the next forward pass. The stored data is the same either way.
        write_queue_bytes: most bytes of activations waiting in that queue (default 256 MiB).

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
        write_queue: int | None = 4,
        write_queue_bytes: int = 256 * 2**20,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if write_queue is not None and (isinstance(write_queue, bool) or not isinstance(write_queue, int)
                                        or write_queue < 0):
            raise ConfigError(f"write_queue must be an int >= 0 or None (0/None: write in this thread), "
                              f"got {write_queue!r}")
        if write_queue_bytes < 1:
            raise ConfigError(f"write_queue_bytes must be >= 1, got {write_queue_bytes}")
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
        self.layer_indices = check_layer_indices(layer_indices)
        self.hooks = list(hooks) if hooks else None
        self.max_channels = max_channels
        self.prompt_context_fn = prompt_context_fn
        self.token_metrics_fn = token_metrics_fn
        self.batch_size = batch_size
        self.dtype = dtype
        self.metrics = tuple(metrics)
        self.padding_side = padding_side
        self.prepend_bos = prepend_bos
        self.write_queue = write_queue or 0
        self.write_queue_bytes = write_queue_bytes
        self.last_run_id: int | None = None

    @property
    def capture(self) -> Capture:
        """The settings that shape each record, as the model side of collection takes them."""
        return Capture(tuple(self.layer_indices), tuple(self.hooks) if self.hooks else None, self.max_channels,
                       self.token_metrics_fn, self.dtype, self.metrics, self.padding_side, self.prepend_bos)

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
        resume: bool = False,
        show_progress: bool | None = None,
    ) -> int:
        """Run ``prompts`` through ``llm`` and store the activations. Returns the run id.

        Args:
            llm: any model :func:`interlatent.backends.make_backend` takes (TransformerLens 3 or 4,
                Hugging Face causal LM or encoder). Encoders store every real position; they take
                no next-token ``metrics`` and no ``max_new_tokens``.
            tok: the tokenizer (None: the TransformerLens model's own).
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
            resume: continue an interrupted collection (Ctrl-C, SIGTERM, a killed process) of the
                same ``prompts``: the latest interrupted run collected with the same model, hook
                points, dtype, channels, generation, metrics and prompt list is found (else
                :class:`~interlatent.errors.ResumeError` says what differs, or that there is
                nothing to resume), its stored prompts are skipped, the rest collected into a new
                run, and the interrupted run is marked ``resumed``. The store then holds what one
                uninterrupted collection would have stored. Needs ``duplicates="attach"``.
        """
        prompts, labels, given = self._check_run(prompts, labels, max_new_tokens, duplicates, prompt_indices, resume)
        backend = make_backend(llm, tok, need_tokenizer=True)
        facts = self.capture.facts(backend, max_new_tokens)
        plan = self._plan(facts, lambda texts, positions: self.capture.prompt_ids(backend, texts, max_new_tokens,
                                                                                   positions),
                          prompts, labels, given, duplicates, max_new_tokens, temperature)
        resumes = find_resumable(self.db, facts.name, plan.config) if resume else None
        generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
        token_text = TokenText(backend.tokenizer)
        # the records of a batch are built in the writer's thread (token texts decoded there, while the
        # model runs the next batch) unless a user function or the logits take part
        deferred = self.write_queue > 0 and self.token_metrics_fn is None and not self.metrics
        results = ((len(batch.positions), self._payload(self.capture.forward(
                        backend, facts, batch, max_new_tokens, temperature, generator, token_text), deferred))
                   for batch in plan.batches)
        run_id = self._store(plan, results, show_progress)
        if resumes is not None and self.db.runs().set_index("run_id")["status"].get(resumes) != "resumed":
            self.db.finish_run(resumes, "resumed", f"resumed by run {run_id}")
        return run_id

    @staticmethod
    def _payload(captured: CapturedBatch, deferred: bool) -> CapturedBatch | list[Any]:
        return captured if deferred else captured.build()

    # ------------------------------------------------------------------ the run's parts
    def _check_run(self, prompts: Sequence[str], labels: Sequence[Any] | None, max_new_tokens: int, duplicates: str,
                   prompt_indices: Sequence[int] | None, resume: bool = False
                   ) -> tuple[list[str], list[Any] | None, list[int] | None]:
        """The run's arguments checked before any model runs: ``(prompts, labels, explicit indices)``."""
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
        if not prompts:
            raise ConfigError("prompts is empty: pass at least one prompt text")
        for i, p in enumerate(prompts):
            check_prompt(i, p)
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if duplicates not in ("attach", "new"):
            raise ConfigError(f"duplicates must be 'attach' or 'new', got {duplicates!r}")
        if resume and duplicates != "attach":
            raise ConfigError("resume=True skips the prompts already stored, which needs duplicates='attach'; "
                              "got duplicates='new'")
        if labels is not None:
            labels = check_labels(labels, len(prompts))
        return prompts, labels, self._given_indices(prompts, prompt_indices)

    def _plan(self, facts: ModelFacts, encode: Callable[[list[str], list[int]], list[list[int]]], prompts: list[str],
              labels: list[Any] | None, given: list[int] | None, duplicates: str, max_new_tokens: int,
              temperature: float) -> RunPlan:
        """Everything decided before the first forward pass: contexts and labels, which prompts to
        collect (duplicates, prompts already stored), their token ids (``encode(texts, positions)``),
        the indices the store should give them, and the batches. Registers string label classes."""
        points = facts.points
        contexts = [self._context(p, i, None if labels is None else labels[i]) for i, p in enumerate(prompts)]
        prompt_labels = [c.get("label") for c in contexts]
        for i, lb in enumerate(prompt_labels):
            check_label(lb, f"the label of prompt {i}")

        units = self._units(prompts, prompt_labels, duplicates, given)
        n_copies = 0
        if duplicates == "new":
            stored = {row[0] for row in self._stored_rows(prompts)}
            n_copies = len(prompts) - len(set(prompts)) + sum(1 for p in set(prompts) if p in stored)
        encoded = dict(zip(units, encode([prompts[i] for i in units], units)))
        hints = (dict(enumerate(given)) if given is not None
                 else self._plan_indices(prompts, units, encoded, aligned=duplicates == "attach"))
        resume = duplicates == "attach" and given is None and not max_new_tokens
        if resume:
            done = self._complete(prompts, units, encoded, [p.name for p in points])
            if done:
                log.info("%d of %d prompts already stored with every requested layer: skipped, no forward pass",
                         len(done), len(units))
                units = [i for i in units if i not in done]
        string_labels = sorted({prompt_labels[i] for i in units if isinstance(prompt_labels[i], str)})
        if string_labels:
            self.db.register_label_classes(string_labels)
        order = sorted(units, key=lambda i: -len(encoded[i]))  # similar lengths batch together
        batches = [PromptBatch(
            positions=chunk, ids=[encoded[i] for i in chunk], texts=[prompts[i] for i in chunk],
            labels=[prompt_labels[i] for i in chunk], contexts=[contexts[i] for i in chunk],
            prompt_indices=[None if given is None else given[i] for i in chunk], hints=[hints[i] for i in chunk],
        ) for chunk in (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))]
        config = {
            "hook_points": [p.name for p in points], "hook_names": {p.name: p.tl_name for p in points},
            "batch_size": self.batch_size, "dtype": self.dtype, "max_channels": self.max_channels,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "metrics": list(self.metrics),
            "n_prompts": len(prompts), "backend": facts.backend_type, "n_blocks": facts.n_blocks,
            "duplicates": duplicates, "prompts_sha256": prompts_digest(prompts),
        }
        layer_meta = {p.name: {"hook_name": p.tl_name, "n_blocks": facts.n_blocks, "block": p.block,
                               "hook_kind": p.kind, "model": facts.name} for p in points}
        write_options = {"dtypes": {p.name: self.dtype for p in points}, "layer_meta": layer_meta,
                         "duplicates": duplicates}
        return RunPlan(prompts, batches, facts.name, config, write_options, [p.name for p in points], resume,
                       n_copies, len(units))

    def _store(self, plan: RunPlan, results: Iterable[tuple[int, Any]] | Callable[[Run], Iterable[tuple[int, Any]]],
               show_progress: bool | None, commit: Callable[..., Any] | None = None) -> int:
        """Write each batch's result, in order, as one run: ``results`` (or ``results(run)``, called
        once the run has started) yields ``(prompts, payload)``;
        ``commit(run, payload, counts=, **write_options)`` writes a payload (default: a list of
        records, with ``run.write``). The run ends ``complete``, or ``interrupted`` on any exception."""
        counts: dict[str, int] = {}
        bar = tqdm(total=plan.n_units, desc="collect", unit="prompt", disable=None if show_progress is None
                   else not show_progress)
        with bar, torch.inference_mode(), self.db.run(kind="llm", model=plan.model, config=plan.config) as run, \
                batch_writer(self.db, run.run_id, self.write_queue if commit is None else 0,
                             {**plan.write_options, "counts": counts}, max_bytes=self.write_queue_bytes) as sink:
            self.last_run_id = run.run_id
            for n, payload in (results(run) if callable(results) else results):
                if commit is not None:
                    commit(run, payload, counts=counts, **plan.write_options)
                elif isinstance(payload, CapturedBatch):
                    sink.submit(payload.build, nbytes=payload.nbytes)  # the writer builds the records
                else:
                    sink.submit(payload)
                bar.update(n)
        if plan.resume:
            self.db.mark_resumed(run.run_id, plan.prompts, plan.names)  # their data is whole again
        self._report(counts, plan.n_copies, len(plan.prompts))
        return run.run_id

    def _context(self, text: str, idx: int, label: Any) -> dict[str, Any]:
        """The prompt's context: ``prompt_context_fn``'s dict, with ``labels``' entry as its label."""
        ctx: dict[str, Any] = {}
        if self.prompt_context_fn is not None:
            got = self.prompt_context_fn(text, idx)
            if not isinstance(got, Mapping):
                raise ConfigError(f"prompt_context_fn must return a dict; for prompt {idx} it returned "
                                  f"{type(got).__name__} {short(got)}; return e.g. {{'label': ...}}")
            ctx = dict(got)
            bad = [k for k in ctx if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"prompt_context_fn's dict for prompt {idx} has non-string keys {bad[:3]}; "
                                  "context keys must be str")
            try:
                dumps(ctx)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"prompt_context_fn's dict for prompt {idx} cannot be stored as JSON ({exc}): "
                                  f"{short(ctx)}; use str, numbers, lists and dicts") from exc
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
