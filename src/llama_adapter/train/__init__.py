"""The shared trainer."""

from ..loss import lm_loss
from .config import TrainConfig
from .trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "lm_loss"]
