"""Collection with model replicas in a Ray actor pool; the driver alone commits the store.

:func:`collect_distributed` plans the run exactly as :class:`~interlatent.llm.LLMCollector` does
(the same prompts skipped, indices, batches and run config), asks the workers for what needs the
model (hook points, token ids), then hands each worker one batch at a time. A worker builds its own
replica once, runs the collector's own capture path (:class:`~interlatent.llm.capture.Capture`) and
passes its records to a :class:`RecordSink`; the driver commits the sinks' payloads in batch order,
as one run, so the store ends up holding what a single-process collection stores, byte for byte.

Two sinks: :class:`ReturnRecords` sends the records back to the driver, which writes them with the
store's writer. :class:`WriteShards` (the default for a parquet-tier store whose shard root the
workers reach: a local folder on their machine or a shared fsspec URL) has each worker encode its
batch's blocks and write the shard files itself, with the store's own codec and shard writer
(:mod:`interlatent.db.shardwriter`); only small manifests travel back, and the driver commits the
catalog rows that refer to the files, one transaction per batch. A file whose batch is never
committed (its worker or the driver died) lies in the run's folder: it is kept while the driver is
alive and deleted by the next writable open once the run is over.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

import torch

from interlatent.backends import make_backend, model_from
from interlatent.db import LatentDB, Run, SequenceRecord
from interlatent.db.shardwriter import ShardWriter
from interlatent.distributed.engine import check_workers, fetch, require_ray
from interlatent.errors import ConfigError
from interlatent.llm.capture import Capture, ModelFacts, PromptBatch
from interlatent.llm.collector import LLMCollector, PromptContextFn, TokenMetricsFn
from interlatent.llm.prompts import TokenText

log = logging.getLogger(__name__)


class RecordSink:
    """Where a worker's records go (:meth:`emit`, on the worker) and how the driver stores what it
    returned (:meth:`commit`, on the driver, batch by batch in order, inside the run)."""

    def bind(self, run: Run, **write_options: Any) -> RecordSink:
        """Called on the driver as each batch is handed out: the sink that worker gets (default:
        this one). ``write_options`` are ``Run.write``'s."""
        return self

    def emit(self, batch_no: int, records: list[SequenceRecord]) -> Any:
        """Called on the worker with batch ``batch_no``'s records; returns the payload sent back."""
        raise NotImplementedError

    def commit(self, run: Run, payload: Any, **write_options: Any) -> None:
        """Called on the driver with one batch's payload; ``write_options`` are ``Run.write``'s."""
        raise NotImplementedError


class ReturnRecords(RecordSink):
    """The records travel back to the driver, which writes them with the store's writer."""

    def emit(self, batch_no: int, records: list[SequenceRecord]) -> list[SequenceRecord]:
        return records

    def commit(self, run: Run, payload: list[SequenceRecord], **write_options: Any) -> None:
        run.write(payload, **write_options)


class WriteShards(ReturnRecords):
    """Each worker encodes its batch's blocks and writes the store's shard files itself; the driver
    commits the catalog rows (:mod:`interlatent.db.shardwriter`). For a parquet-tier store whose
    shard root other processes reach (:attr:`~interlatent.db.LatentDB.shard_root_shared`)."""

    def __init__(self) -> None:
        self.writer: ShardWriter | None = None

    def bind(self, run: Run, **write_options: Any) -> WriteShards:
        bound = copy.copy(self)
        bound.writer = run.db.shard_writer(run.run_id, write_options.get("dtypes"))
        return bound

    def emit(self, batch_no: int, records: list[SequenceRecord]) -> list[SequenceRecord]:
        if self.writer is None:
            raise ConfigError("WriteShards.emit needs the sink bound to a run (WriteShards().bind(run)); "
                              "collect_distributed binds it")
        return self.writer.write(records)


def _default_sink(db: LatentDB) -> RecordSink:
    if db.activation_tier == "parquet" and not db.shard_root_shared:
        log.info("the shard root %s is only reachable from this process: the workers return their records "
                 "and this process writes the shards", db.shard_root)
    return WriteShards() if db.shard_root_shared else ReturnRecords()


def _tokenizer_from(thing: Any) -> Any:
    """``thing`` when it is a tokenizer (or None), else ``thing()``: a factory building one."""
    if thing is None or hasattr(thing, "encode") or hasattr(thing, "convert_ids_to_tokens") or not callable(thing):
        return thing
    return thing()


class Replica:
    """A worker: one model replica, built on first use from the model (or factory) it was given.
    Each call carries the collection's settings, so one replica serves any number of runs."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._backend: Any = None
        self._token_text: Any = None

    def backend(self) -> Any:
        if self._backend is None:
            self._backend = make_backend(model_from(self.model), _tokenizer_from(self.tokenizer), need_tokenizer=True)
            self._token_text = TokenText(self._backend.tokenizer)
        return self._backend

    def facts(self, capture: Capture, max_new_tokens: int) -> ModelFacts:
        return capture.facts(self.backend(), max_new_tokens)

    def prompt_ids(self, capture: Capture, texts: list[str], positions: list[int],
                   max_new_tokens: int) -> list[list[int]]:
        return capture.prompt_ids(self.backend(), texts, max_new_tokens, positions)

    def collect(self, capture: Capture, facts: ModelFacts, sink: RecordSink, batch_no: int, batch: PromptBatch,
                max_new_tokens: int) -> Any:
        with torch.inference_mode():
            records = capture.records(self.backend(), facts, batch, max_new_tokens, 0.0, None, self._token_text)
        return sink.emit(batch_no, records)


class ReplicaPool:
    """``num_workers`` model replicas (Ray actors), kept between collections: pass the pool as
    :func:`collect_distributed`'s ``model`` to reuse them. Close it (or use it as a context
    manager) to free them.

    Args:
        model: the model (an ``nn.Module`` that pickles: each worker gets a copy) or a picklable
            factory called once on each worker to build its replica (for a model too large to ship),
            used as it is given (call ``.eval()`` in the factory where the model has dropout).
        tokenizer: None (the model's own), a tokenizer, or a picklable factory returning one.
        num_workers: replicas.
        worker_options: ``ray.remote`` options of each replica (default ``{"num_cpus": 1}``;
            e.g. ``{"num_gpus": 1}``).
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, num_workers: int = 2,
                 worker_options: dict[str, Any] | None = None) -> None:
        check_workers(num_workers)
        self.ray = require_ray()
        actor = self.ray.remote(**(worker_options or {"num_cpus": 1}))(Replica)
        model_ref, tok_ref = self.ray.put(model), self.ray.put(tokenizer)
        self.actors = [actor.remote(model_ref, tok_ref) for _ in range(num_workers)]

    def close(self) -> None:
        """End the replicas' processes."""
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_distributed(
    model: Any,
    tokenizer: Any,
    db: LatentDB,
    prompts: Sequence[str],
    *,
    layer_indices: Sequence[int] = (-1,),
    hooks: Sequence[str] | None = None,
    max_channels: int | None = None,
    prompt_context_fn: PromptContextFn | None = None,
    token_metrics_fn: TokenMetricsFn | None = None,
    batch_size: int = 8,
    dtype: str = "float16",
    metrics: Sequence[str] = (),
    padding_side: str = "right",
    prepend_bos: bool | None = None,
    labels: Sequence[Any] | None = None,
    max_new_tokens: int = 0,
    prompt_indices: Sequence[int] | None = None,
    duplicates: str = "attach",
    num_workers: int = 2,
    worker_options: dict[str, Any] | None = None,
    sink: RecordSink | None = None,
    show_progress: bool | None = None,
) -> int:
    """Collect like ``LLMCollector(db, ...).run(model, tokenizer, prompts=...)`` with ``num_workers``
    model replicas on the connected Ray cluster (a local one is started when none is). Returns the run id.

    Args:
        model: a :class:`ReplicaPool` (its replicas are used; pass ``tokenizer=None``, and
            ``num_workers`` / ``worker_options`` are the pool's), or what :class:`ReplicaPool`
            takes: the model or a picklable factory, for replicas started for this run and ended
            after it.
        tokenizer: None (the model's own), a tokenizer, or a picklable factory returning one.
        db: the store; only this process writes its catalog (and, unless the workers write
            them, its shards).
        num_workers: model replicas (Ray actors).
        worker_options: ``ray.remote`` options of each replica (default ``{"num_cpus": 1}``).
        sink: what a worker does with its records: :class:`WriteShards` (the default for a
            parquet-tier store whose shard root the workers reach) or :class:`ReturnRecords` (the
            default otherwise).

    The other arguments are :class:`~interlatent.llm.LLMCollector`'s and its ``run``'s, with the
    same meaning; ``prompt_context_fn`` runs here, ``token_metrics_fn`` on the workers (it must
    pickle). Generation (``max_new_tokens``) is greedy. The run is marked ``complete``, or
    ``interrupted`` when anything fails (a worker's exception is raised here as itself; a lost
    worker as :class:`~interlatent.errors.WorkerError`) — batches written before stay, and running
    again resumes.
    """
    collector = LLMCollector(db, layer_indices, hooks=hooks, max_channels=max_channels,
                             prompt_context_fn=prompt_context_fn, token_metrics_fn=token_metrics_fn,
                             batch_size=batch_size, dtype=dtype, metrics=metrics, padding_side=padding_side,
                             prepend_bos=prepend_bos)
    prompts, labels, given = collector._check_run(prompts, labels, max_new_tokens, duplicates, prompt_indices)
    sink = _default_sink(db) if sink is None else sink
    if isinstance(sink, WriteShards) and not db.shard_root_shared:
        raise ConfigError(f"sink=WriteShards() needs a parquet-tier store whose shard root the workers reach; "
                          f"{str(db.path)!r} keeps its activations in "
                          f"{'SQLite' if db.shard_root is None else repr(db.shard_root)}: pass sink=ReturnRecords() "
                          "(the default there)")
    own = not isinstance(model, ReplicaPool)
    if not own and tokenizer is not None:
        raise ConfigError("a ReplicaPool's replicas already have their tokenizer (given to ReplicaPool); pass "
                          "tokenizer=None with a pool")
    pool = ReplicaPool(model, tokenizer, num_workers=num_workers, worker_options=worker_options) if own else model
    ray, actors = pool.ray, pool.actors
    if not actors:
        raise ConfigError("this ReplicaPool was closed; start a new one")
    try:
        capture = ray.put(collector.capture)
        facts = fetch(ray, actors[0].facts.remote(capture, max_new_tokens), "collection")

        def encode(texts: list[str], positions: list[int]) -> list[list[int]]:
            step = -(-len(texts) // len(actors)) or 1
            refs = [a.prompt_ids.remote(capture, texts[i : i + step], positions[i : i + step], max_new_tokens)
                    for a, i in zip(actors, range(0, len(texts), step))]
            return [ids for part in fetch(ray, refs, "collection") for ids in part]

        plan = collector._plan(facts, encode, prompts, labels, given, duplicates, max_new_tokens, 0.0)
        sink_ref, facts_ref = ray.put(sink), ray.put(facts)

        def results(run: Run) -> Iterator[tuple[int, Any]]:
            def submit(actor: Any, batch_no: int, batch: PromptBatch) -> Any:
                bound = sink.bind(run, **plan.write_options)
                return actor.collect.remote(capture, facts_ref, sink_ref if bound is sink else bound, batch_no,
                                            batch, max_new_tokens)

            return _in_order(ray, actors, submit, plan.batches)

        run_id = collector._store(plan, results, show_progress, commit=sink.commit)
        if isinstance(sink, WriteShards):  # the driver never saw the values: index them in one pass
            for name in plan.names:
                if db.layer_info(name).storage == "dense":
                    db.build_index(name)
        return run_id
    finally:
        if own:
            pool.close()


def _in_order(ray: Any, actors: list[Any], submit: Callable[[Any, int, PromptBatch], Any],
              batches: list[PromptBatch]) -> Iterator[tuple[int, Any]]:
    """``(prompts, payload)`` of every batch, in batch order; ``submit(actor, batch_no, batch)``
    starts a batch on an actor and returns its result's reference. Each actor works on one batch at
    a time; at most two batches per actor wait here for an earlier one."""
    free, busy = list(actors), {}
    waiting: dict[int, Any] = {}
    submitted = done = 0
    while done < len(batches):
        while free and submitted < len(batches) and submitted - done < 2 * len(actors):
            actor = free.pop()
            busy[submit(actor, submitted, batches[submitted])] = (actor, submitted)
            submitted += 1
        if done in waiting:
            yield len(batches[done].positions), waiting.pop(done)
            done += 1
            continue
        ready, _ = ray.wait(list(busy), num_returns=1)
        actor, n = busy.pop(ready[0])
        free.append(actor)
        waiting[n] = fetch(ray, ready[0], "collection")
