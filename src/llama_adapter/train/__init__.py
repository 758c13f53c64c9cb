"""The shared trainer."""

from .config import TrainConfig
from .trainer import Trainer, TrainResult, lm_loss

__all__ = ["TrainConfig", "TrainResult", "Trainer", "lm_loss"]
