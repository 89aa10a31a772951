"""Writing a batch's activation blocks to shard files in another process than the store's writer.

A collection worker that holds a batch's records encodes their blocks exactly as the store's writer
would (:func:`~interlatent.db.codec.encode_block`: the layer's dtype, the same float16-overflow
rule), writes one shard file per (layer, row encoding) of the batch, as the writer does, and hands
back the records with each block replaced by a :class:`~interlatent.db.records.WrittenBlock`. The
store's writer commits those like any other records (:meth:`~interlatent.db.store.LatentDB.write`):
the same ``activations``, ``shards`` and ``layers`` rows, in one transaction per batch.

A :class:`ShardWriter` is made by the store (:meth:`~interlatent.db.tier.Tiers.shard_writer`) for
one run and pickles small: the shard root, the run, and the id and dtype of each layer the store
already holds. Files land under the run's folder, so while the run's process (the store's writer)
is alive no vacuum deletes them, and once it is gone those no commit refers to are orphans the next
writable open deletes. A block of a layer the store had not registered when the writer was made
goes to the run's ``staged`` folder, and its commit moves it into the layer's folder.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from interlatent.db import codec
from interlatent.db.records import SequenceRecord, SparseActs, WrittenBlock
from interlatent.db.shards import ShardBlock, ShardFiles, is_url
from interlatent.errors import ShardError

UNKNOWN_SEQ = -1  # the seq_id column of a worker's shard: the catalog gives sequences their ids at commit


@dataclasses.dataclass
class ShardWriter:
    """Encodes records' blocks and writes them to shards of one store's run (see the module).

    Fields:
        root: the shard root: an absolute folder or an fsspec URL.
        run_id: the run the blocks belong to (the files' ``run=`` folder).
        layers: layer name -> (layer id, storage dtype) of the layers the store holds.
        dtypes: storage dtype of a layer the store does not hold yet (default float16).
        float16_overflow: ``"promote"`` or ``"raise"``, the store's rule.
    """

    root: str
    run_id: int
    layers: dict[str, tuple[int, str]]
    dtypes: dict[str, str]
    float16_overflow: str
    _files: ShardFiles | None = dataclasses.field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": None}  # open files and caches stay in their process

    def files(self) -> ShardFiles:
        if self._files is None:
            if not is_url(self.root) and not os.path.isdir(self.root):
                raise ShardError(f"the store's shard root {self.root!r} is not a folder on this machine "
                                 f"({socket.gethostname()}): workers on other machines need a shard root they "
                                 "share (an fsspec URL, or a folder mounted at the same path), or pass "
                                 "sink=ReturnRecords() so that the driver writes the shards")
            self._files = ShardFiles(self.root, Path.cwd())  # an absolute root or a URL: no base
        return self._files

    def write(self, records: list[SequenceRecord]) -> list[SequenceRecord]:
        """Write the records' blocks; returns the records with a :class:`WrittenBlock` in place of
        each block. Every block is encoded before the first file is written, so a block that cannot be stored
        (float16 overflow under ``"raise"``) writes nothing."""
        groups: dict[tuple[Any, ...], list[tuple[int, str, codec.EncodedBlock]]] = {}
        for i, rec in enumerate(records):
            rec.validate()
            for layer, acts in rec.activations.items():
                if isinstance(acts, WrittenBlock):
                    raise ShardError(f"layer {layer!r} of prompt {rec.text!r:.40} is already written to a shard")
                layer_id, dtype = self.layers.get(layer, (None, self.dtypes.get(layer, "float16")))
                if not isinstance(acts, SparseActs):
                    acts = np.asarray(acts)
                width = acts.width if isinstance(acts, SparseActs) else int(acts.shape[1])
                index = rec.prompt_index if rec.prompt_index is not None else rec.index_hint
                block = codec.encode_block(acts, dtype, self.float16_overflow, layer, index)
                row_width = width if block.k is None else block.k
                key = (layer, layer_id, dtype, width, block.dtype, row_width, block.index_dtype)
                groups.setdefault(key, []).append((i, layer, block))
        written: dict[tuple[int, str], WrittenBlock] = {}
        for (_, layer_id, dtype, width, row_dtype, row_width, index_dtype), items in groups.items():
            blocks = [ShardBlock(UNKNOWN_SEQ, b.n_positions, b.data, b.indices) for _, _, b in items]
            rel, size, firsts = self.files().write(self.run_id, layer_id, row_dtype, row_width, index_dtype, blocks)
            rows = sum(b.n_positions for b in blocks)
            for (i, layer, b), first in zip(items, firsts):
                written[(i, layer)] = WrittenBlock(rel, int(first), b.n_positions, b.dtype, b.k, b.index_dtype, width,
                                                   dtype, rows, size)
        return [dataclasses.replace(rec, activations={layer: written[(i, layer)] for layer in rec.activations})
                for i, rec in enumerate(records)]

