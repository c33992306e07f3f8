"""PromptTuning: the seam between a learner and test-time prompt tuning (TPT, C-TPT)."""
from __future__ import annotations

import torch
from torch import nn


class PromptTuning:
    """Mixed into the learners whose text prompt can be tuned per test image. Test-time adapters use only
    this interface, never a learner's attributes; a learner without it has no tunable prompt (TPT refuses
    it and points to the adapters that need none).

    A learner offers one of two exact ways to tune:

    - batched (`batched_tuning` True): the adapter starts each sample from its own copy of
      `tunable_context` and asks `context_text_features` for the class text features of all copies in one
      pass. Exact when the text features depend on the tuned context only through that pass and the image
      features do not depend on it at all.
    - in place (every learner with the interface): the adapter tunes `tuning_parameter()` itself, one
      sample at a time through the learner's own `text_features` and `forward`, and restores it.

    The text features of a context are a function of the learner's prompt tensors, so an adapter may cache
    them keyed by the state of all of them (`tta.base.PromptState(learner)`).
    """

    batched_tuning: bool = False

    def tuning_parameter(self) -> nn.Parameter:
        """The tensor the in-place path tunes (and restores): the text context."""
        raise NotImplementedError(f"{type(self).__name__} does not name its tunable prompt")

    def tunable_context(self, image_features: torch.Tensor | None = None) -> torch.Tensor | None:
        """The context tuning starts from (batched path).

        Args:
            image_features: normalised features [B, D] of the images being adapted.

        Returns:
            Without image features: the context every image starts from, or None when it depends on the
            image (the adapter may then share work between images only in the first case). With them: one
            context per image [B, ...], whose trailing shape `context_text_features` takes.
        """
        raise NotImplementedError(f"{type(self).__name__} is tuned in place only (batched_tuning is False)")

    def context_text_features(self, contexts: torch.Tensor) -> torch.Tensor:
        """Normalised class text features [B, C, D] for B contexts [B, ...] (shaped as `tunable_context`'s),
        differentiable with respect to them: one text pass over the B x C prompts (batched path)."""
        raise NotImplementedError(f"{type(self).__name__} is tuned in place only (batched_tuning is False)")
