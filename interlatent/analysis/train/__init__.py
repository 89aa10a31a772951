"""Training: sparse dictionaries (SAE, transcoder) and linear probes on stored activations."""

from interlatent.analysis.train.fit import (
    FitResult,
    TrainConfig,
    decoder_lr_multiple,
    expected_fires,
    fit,
    learning_rate,
    lr_schedule,
)
from interlatent.analysis.train.pipelines import (
           SAEPipeline,
           TrainResult,
           TranscoderPipeline,
           backfill,
)
from interlatent.analysis.train.probe import ProbeResult, train_linear_probe

__all__ = ["FitResult", "ProbeResult", "SAEPipeline", "TrainConfig", "TrainResult", "TranscoderPipeline", "backfill",
           "decoder_lr_multiple", "expected_fires", "fit", "learning_rate", "lr_schedule",
           "train_linear_probe"]
