"""KgCoOp: knowledge-guided context optimisation (Yao et al., CVPR 2023)."""
from __future__ import annotations

from typing import Sequence

from ..registry import register_method
from .coop import CoOp


@register_method("kgcoop")
class KgCoOp(CoOp):
    """CoOp's context trained with CE + the `kgcoop` objective: `weight` x (1 - mean cosine(learned class text
    features, hand-crafted ones)), which keeps the learned prompts close to CLIP's general knowledge.

    Defaults are the official code's: weight 8.0, 4 context tokens from "a photo of a", KgCoOp's hand-crafted
    template for `dataset` (its own per-dataset table; None: "a photo of a {}.") unless `templates` is given.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None, ctx_init: str | None = "a photo of a",
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 weight: float = 8.0, dataset: str | None = None, templates: Sequence[str] | None = None):
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.set_objectives(["ce", ("kgcoop", dict(weight=weight, dataset=dataset, templates=templates))])
