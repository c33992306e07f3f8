"""promptkit: prompt learning and test-time adaptation on frozen open_clip CLIP models."""
__version__ = "0.2.0"

from . import attacks, bench, data, recipes
from .bench import run_bench
from .checkpoint import import_coop_checkpoint, load_pretrained
from .clip import FrozenCLIP, load_clip
from .hooks import Hook, inject
from .learners import CoOp, LossOutput, PromptLearner, ZeroShotCLIP
from .metrics import classification_metrics
from .objectives import Objective, TrainOutputs
from .registry import (create_adapter, create_learner, create_objective, list_adapters, list_methods, list_objectives,
                       register_adapter, register_method, register_objective)
from .templates import IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_7, get_templates
from .training import PromptTrainer, TrainConfig
from .tta import CTPT, TDA, TPT, Zero, adapt_dataset
from .data import load_benchmark
from .weights import debias, ensemble_logits, interpolate, patch, soup

__all__ = [
    "FrozenCLIP", "load_clip",
    "PromptLearner", "LossOutput", "ZeroShotCLIP", "CoOp",
    "create_learner", "list_methods", "create_adapter", "list_adapters",
    "Objective", "TrainOutputs", "create_objective", "list_objectives", "register_objective",
    "register_method", "register_adapter", "load_pretrained",
    "import_coop_checkpoint",
    "PromptTrainer", "TrainConfig", "classification_metrics",
    "TPT", "CTPT", "Zero", "TDA", "adapt_dataset",
    "Hook", "inject",
    "IMAGENET_TEMPLATES", "IMAGENET_TEMPLATES_7", "get_templates",
    "interpolate", "ensemble_logits", "soup", "patch", "debias",
    "load_benchmark", "run_bench",
]
