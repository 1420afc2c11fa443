"""Pre-training: one fit loop (``loop.pretrain``) that any objective, model and corpus plug into."""

from lmlab.training.config import TRAIN_PRESETS, PretrainConfig, load_config
from lmlab.training.loop import TrainingError, pretrain

__all__ = ["TRAIN_PRESETS", "PretrainConfig", "TrainingError", "load_config", "pretrain"]
