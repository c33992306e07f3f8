"""Built-in methods; importing this package registers them."""
from .base import LossOutput, PromptLearner
from .coop import CoOp
from .zeroshot import ZeroShotCLIP

__all__ = ["LossOutput", "PromptLearner", "CoOp", "ZeroShotCLIP"]
