"""Training: sparse dictionaries (SAE, transcoder) and linear probes on stored activations."""

from interlatent.analysis.train.fit import FitResult, TrainConfig, decoder_lr_multiple, fit, learning_rate
from interlatent.analysis.train.pipelines import (
           SAEPipeline,
           TrainResult,
           TranscoderPipeline,
           backfill,
)
from interlatent.analysis.train.probe import ProbeResult, train_linear_probe

__all__ = ["FitResult", "ProbeResult", "SAEPipeline", "TrainConfig", "TrainResult", "TranscoderPipeline", "backfill",
           "decoder_lr_multiple", "fit", "learning_rate", "train_linear_probe"]
