"""promptkit: prompt learning and test-time adaptation on frozen open_clip CLIP models."""
__version__ = "0.1.0"

from .checkpoint import import_coop_checkpoint, load_pretrained
from .clip import FrozenCLIP, load_clip
from .hooks import Hook, inject
from .learners import CoOp, LossOutput, PromptLearner, ZeroShotCLIP
from .registry import create_learner, list_methods, register_method
from .templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_7, get_templates

__all__ = [
    "FrozenCLIP", "load_clip",
    "PromptLearner", "LossOutput", "ZeroShotCLIP", "CoOp",
    "create_learner", "list_methods", "register_method", "load_pretrained", "import_coop_checkpoint",
    "Hook", "inject",
    "IMAGENET_TEMPLATES", "IMAGENET_TEMPLATES_7", "get_templates",
]
