"""Training: one fit loop (``loop.fit``) that pre-training, fine-tuning and later objectives plug into."""

from lmlab.training.config import TRAIN_PRESETS, PretrainConfig, load_config
from lmlab.training.loop import Job, TrainingError, fit
from lmlab.training.pretrain import pretrain

__all__ = ["TRAIN_PRESETS", "Job", "PretrainConfig", "TrainingError", "fit", "load_config", "pretrain"]
