"""ProGrad: prompt-aligned gradient (Zhu et al., ICCV 2023)."""
from __future__ import annotations

from typing import Sequence

from .._keywords import renamed
from ..registry import register_method
from ..templates import dataset_template
from .coop import CoOp


@register_method("prograd")
class ProGrad(CoOp):
    """CoOp's context trained along directions that do not contradict zero-shot CLIP: the `prograd` gradient
    rule (`promptkit.objectives`), per prompt tensor g - `weight` (g . k / |k|^2) k when the cross-entropy
    gradient g conflicts with the gradient k of KL(zero-shot || learned), on the whole batch's gradients.

    Defaults are the official code's: weight (the paper's lambda) 1.0, temperature 1, 16 context tokens
    initialised as zero vectors followed by the words of ProGrad's hand-crafted template before the class name
    ("a photo of a" -> 12 zeros + 4 words), that template (ProGrad's per-dataset table, `dataset`) for the
    zero-shot model.

    Args:
        ctx_init: "template" (the template's words before the class name), other words, or None (random).
        dataset: a dataset name (e.g. "oxford_pets") selecting ProGrad's template; None: "a photo of a {}.".
        templates: explicit templates for the zero-shot model (overrides `dataset`).
        weight, temperature: projection strength (was `lambda_`) and KL temperature.
    """

    @renamed(lambda_="weight")
    def __init__(self, clip, classnames: Sequence[str], n_ctx: int | None = 16, ctx_init: str | None = "template",
                 class_specific: bool = False, class_token_position: str = "end", init_std: float = 0.02,
                 weight: float = 1.0, temperature: float = 1.0, dataset: str | None = None,
                 templates: Sequence[str] | None = None):
        if ctx_init == "template":
            # The official code uses the template's words as ctx_init: it needs the class name last.
            ctx_init = dataset_template(dataset, "prograd").split("{}")[0].strip() or None
        super().__init__(clip, classnames, n_ctx, ctx_init, class_specific, class_token_position, init_std)
        self.set_objectives([("prograd", dict(weight=weight, temperature=temperature, dataset=dataset,
                                              templates=templates))])
