"""Test-time adapters on top of any learner."""
from .augment import make_views
from .runner import adapt_dataset
from .tda import TDA
from .tpt import CTPT, TPT
from .zero import Zero

__all__ = ["TPT", "CTPT", "Zero", "TDA", "make_views", "adapt_dataset"]
