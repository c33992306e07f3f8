"""Built-in methods; importing this package registers them."""
from .base import LossOutput, PromptLearner
from .bayesian import BayesianPrompt
from .cavpt import CAVPT
from .cocoop import CoCoOp
from .coop import CoOp
from .cpl import CPL
from .dpl import DPL
from .heads import CLIPAdapter, LinearProbe, TipAdapter, TipAdapterF
from .ivlp import IVLP, MaPLe
from .kgcoop import KgCoOp
from .mvlpt import MVLPT
from .prograd import ProGrad
from .promptsrc import PromptSRC
from .tecoa import TeCoA
from .tuning import PromptTuning
from .unsupervised import POUF, SelfLearning
from .vpt import VPT
from .zeroshot import ZeroShotCLIP

__all__ = ["LossOutput", "PromptLearner", "PromptTuning", "ZeroShotCLIP", "CoOp", "CoCoOp", "KgCoOp", "ProGrad", "MVLPT",
           "VPT", "IVLP", "MaPLe", "PromptSRC", "CAVPT", "CLIPAdapter", "TipAdapter", "TipAdapterF", "LinearProbe",
           "TeCoA", "POUF", "SelfLearning", "CPL", "BayesianPrompt", "DPL"]
