"""The shared prompt trainer."""
from .config import TrainConfig
from .trainer import NonFiniteLossError, PromptTrainer

__all__ = ["TrainConfig", "PromptTrainer", "NonFiniteLossError"]
