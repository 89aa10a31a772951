"""The activation store: ``LatentDB`` and the records writers hand it."""

from interlatent.db.records import SequenceRecord, SparseActs
from interlatent.db.stats import StatBlock
from interlatent.db.store import Activations, LatentDB, LayerInfo, Run

__all__ = ["Activations", "LatentDB", "LayerInfo", "Run", "SequenceRecord", "SparseActs", "StatBlock"]
