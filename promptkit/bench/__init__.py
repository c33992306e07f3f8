"""`promptkit bench`: the papers' tables (few-shot, base-to-novel, cross-dataset, domain generalisation) in
one command, every cell a resumable run, evaluation features cached, results against the published numbers."""
from .features import FeatureCache, model_digest
from .sweep import PROTOCOLS, Cell, harmonic_mean, plan, run_bench
from .tables import PUBLISHED, summarize

__all__ = ["run_bench", "plan", "Cell", "PROTOCOLS", "FeatureCache", "model_digest", "harmonic_mean", "summarize",
           "PUBLISHED"]
