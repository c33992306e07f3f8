"""Zero-shot CLIP with hand-crafted prompts (Radford et al., 2021)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..registry import register_method
from ..templates import dataset_template
from .base import PromptLearner


@register_method("zeroshot", aliases=("zero-shot",))
class ZeroShotCLIP(PromptLearner):
    """Classifies with text features of hand-crafted templates, ensembled like CLIP.

    Args:
        clip: the frozen model.
        classnames: class names in label order.
        templates: format strings with one `{}`; several are ensembled (mean of normalised
            features, renormalised). See `promptkit.templates`. Default: `dataset`'s template.
        dataset: a dataset name selecting CoOp's per-dataset template (None: "a photo of a {}.").
    """

    def __init__(self, clip, classnames: Sequence[str], templates: Sequence[str] | None = None,
                 dataset: str | None = None):
        super().__init__(clip, classnames)
        if isinstance(templates, str):
            templates = (templates,)
        templates = templates or (dataset_template(dataset, "coop"),)
        if any("{}" not in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings with one '{}' for the class name")
        self.templates = list(templates)
        # Constant: computed once, moved with the module, never saved.
        self.register_buffer("_text_features", clip.zero_shot_text_features(self.classnames, self.templates),
                             persistent=False)

    def text_features(self) -> torch.Tensor:
        return self._text_features
