"""Prompt methods trained on unlabelled target images: POUF and self-learning (with UPL's selection)."""
from __future__ import annotations

from typing import Sequence

from ..registry import register_method
from .coop import CoOp


@register_method("pouf")
class POUF(CoOp):
    """POUF (Tanwisuth et al., ICML 2023), prompt tuning: CoOp's context, from "a photo of a" as the official
    `ClipClassifier(learn_prompt=True)`, trained on unlabelled target images with the `pouf` objective
    (`transport_weight` x transport between class-text prototypes and image features + `mi_weight` x minus
    their mutual information). The official prompt run also trains CLIP's logit scale (at lr 5e-5); it stays
    frozen here.

    Args:
        clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std: as `CoOp`.
        transport_weight: the official `--trade-off`.
        mi_weight: the official `--lambda-im`.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None, ctx_init: str | None = "a photo of a",
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 transport_weight: float = 1.0, mi_weight: float = 0.3):
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.set_objectives([("pouf", dict(transport_weight=transport_weight, mi_weight=mi_weight))])


@register_method("self-learning")
class SelfLearning(CoOp):
    """Self-learning of CoOp's context on unlabelled target images (Rusak et al., TMLR 2022; UPL, Huang et al.
    2022): the `self-learning` objective, GCE (q = 0.8) on the current model's pseudo-labels by default, the
    paper's recommended loss. The context starts from "a photo of a", so the first pseudo-labels are zero-shot
    CLIP's. UPL is `loss="hard", teacher="zero-shot", top_k=16` (its 16 ctx tokens: `n_ctx=16, ctx_init=None`).

    Args:
        clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std: as `CoOp`.
        loss, q, teacher, top_k, templates: as the `self-learning` objective.
    """

    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = None, ctx_init: str | None = "a photo of a",
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 loss: str = "gce", q: float = 0.8, teacher: str = "current", top_k: int | None = None,
                 templates: Sequence[str] = ("a photo of a {}.",)):
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.set_objectives([("self-learning", dict(loss=loss, q=q, teacher=teacher, top_k=top_k,
                                                    templates=list(templates)))])
