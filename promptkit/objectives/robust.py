"""Objectives of the robust fine-tuning papers, for prompts: FLYP and CAR-FT."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..registry import register_objective
from ..templates import IMAGENET_TEMPLATES
from ..training import distributed
from . import Objective


@register_objective("flyp")
class FLYP(Objective):
    """FLYP (Goyal et al., "Finetune like you pretrain", CVPR 2023): CLIP's symmetric contrastive loss between
    the batch's image features and the text features of each image's class prompt, as the official code does
    (locuslab/FLYP): the text batch has one row per image, duplicates of a class included (they are negatives
    of each other), labels are the diagonal, CE averaged over both directions, CLIP's (frozen) logit scale.
    Under torchrun the features of every rank are gathered with their gradient (open_clip's
    `ClipLoss(gather_with_grad=True)`), so the loss is the global batch's, as one process computes it.
    The official code uses no cross-entropy beside it: `objectives=["flyp"]`."""

    whole_batch = True

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, out, labels):
        image = distributed.gather_with_grad(out.image_features.float())
        text = distributed.gather_with_grad(out.class_text_features()[labels].float())
        logits = out.learner.clip.logit_scale.float() * image @ text.t()
        target = torch.arange(len(logits), device=logits.device)
        return {"flyp": self.weight * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2}


@register_objective("carft")
class CARFT(Objective):
    """CAR-FT (Mao et al., "Context-Aware Robust Fine-Tuning", IJCV 2023): `weight` x KL(frozen zero-shot ||
    prompted) of the image's distribution over *context* prompts, so that prompting keeps what CLIP knows about
    an image's context (style, domain) while it learns the classes. One context embedding per template
    (`templates`, default CLIP's 80 ImageNet ones): the template filled with every class name, normalised
    features averaged over the classes and renormalised; distributions are softmax(logit scale x cosine).

    It acts on the image side only: for a learner whose image path carries no prompt the two distributions
    are the same and the term is exactly 0. The authors' code is not public; the context set and the
    direction follow the paper's description, the weight (1.0) is a default to tune.
    """

    def __init__(self, weight: float = 1.0, templates: Sequence[str] = IMAGENET_TEMPLATES):
        super().__init__()
        self.weight, self.templates = weight, list(templates)

    @torch.no_grad()
    def attach(self, learner) -> None:
        clip, names = learner.clip, learner.classnames
        contexts = [F.normalize(clip.encode_text(clip.tokenize([t.format(c) for c in names])).mean(0), dim=-1)
                    for t in self.templates]
        self.register_buffer("contexts", torch.stack(contexts), persistent=False)

    def forward(self, out, labels):
        scale = out.learner.clip.logit_scale.float()
        zero_shot = (scale * out.frozen_image_features().float() @ self.contexts.float().t()).log_softmax(-1)
        prompted = (scale * out.image_features.float() @ self.contexts.float().t()).log_softmax(-1)
        return {"carft": self.weight * F.kl_div(prompted, zero_shot, reduction="batchmean", log_target=True)}


@register_objective("contrastive-adapter")
class ContrastiveAdapterLoss(Objective):
    """The contrastive loss of contrastive adapters (Zhang & Ré, NeurIPS 2022), for the `contrastive-adapter`
    learner, with the sampling of the authors' code (datasets/contrastive_embeddings.py, train/contrastive.py):

    - anchors: the batch's samples that zero-shot CLIP misclassifies (the others add nothing);
    - positives: up to `n_positives` training samples of the anchor's class that zero-shot CLIP classifies
      correctly, drawn without replacement;
    - hard negatives: `n_negatives` drawn without replacement from the anchor's `n_neighbours` nearest training
      samples by cosine similarity of the *frozen* embeddings (the nearest one, the anchor itself, left out),
      those of the anchor's class then masked out;
    - with `text`, the class text embeddings too: the anchor's class a positive, the other classes negatives.
      The paper brings sample embeddings "close to both their ground-truth class embeddings and same-class
      sample embeddings" and reads cross-entropy as this InfoNCE over class embeddings; the authors' contrastive
      batches hold samples only and their sample commands alternate contrastive epochs with cross-entropy epochs
      (`--replicate 1/2`), which is what aligns the adapter with the class text. `text=False` gives their
      sample-only loss (add `"ce"` to the objectives for a cross-entropy beside it).

    Anchors and samples go through the adapter (text embeddings do not); with s the cosine similarity of adapted
    embeddings over `temperature`, each positive p gives -log(exp s(a, p) / (exp s(a, p) + sum_n exp s(a, n))),
    averaged over the anchor's positives; the anchors' losses are summed, as the authors accumulate one gradient
    per anchor over a step (their optimizer steps every 128 anchors). The bank comes from the learner's `fit`.
    """

    def __init__(self, temperature: float = 0.1, n_positives: int = 2048, n_negatives: int = 2048,
                 n_neighbours: int = 4096, text: bool = True):
        super().__init__()
        self.temperature, self.text = temperature, text
        self.n_positives, self.n_negatives, self.n_neighbours = n_positives, n_negatives, n_neighbours

    def attach(self, learner) -> None:
        if not hasattr(learner, "embed") or not hasattr(learner, "fit"):
            raise ValueError(f"the contrastive-adapter objective needs the contrastive-adapter learner (an adapter "
                             f"and a bank of training features), not {learner.method or type(learner).__name__}")

    def sample(self, anchors: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               bank_correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bank indices and validity masks of each anchor's positives [A, P] and hard negatives [A, K] (anchors:
        normalised frozen features [A, D] with their labels [A])."""
        n = len(bank)
        near = (anchors.float() @ bank.float().t()).topk(min(self.n_neighbours + 1, n), dim=1).indices[:, 1:]
        pick = torch.rand(near.shape, device=near.device).argsort(1)[:, :self.n_negatives]
        negatives = near.gather(1, pick)
        same_class = bank_labels[None] == labels[:, None]
        pool = torch.rand(len(anchors), n, device=bank.device).masked_fill(~(same_class & bank_correct[None]), -1)
        drawn = pool.topk(min(self.n_positives, n), dim=1)
        # Valid draws come first (scores >= 0): columns no anchor fills are dropped, where the authors embed
        # masked placeholders.
        keep = max(int((drawn.values >= 0).sum(1).max()), 1)
        return (drawn.indices[:, :keep], drawn.values[:, :keep] >= 0, negatives,
                bank_labels[negatives] != labels[:, None])

    def forward(self, out, labels):
        learner = out.learner
        frozen = out.frozen_image_features().float()
        text = learner.text_features().float()
        wrong = (frozen @ text.t()).argmax(-1).ne(labels)
        if not wrong.any() or not len(learner.bank_features):
            return {"contrastive": out.logits.sum() * 0}  # no anchor in this batch: a zero that keeps the graph
        anchors, anchor_labels = frozen[wrong], labels[wrong]
        positives, positive_valid, negatives, negative_valid = self.sample(
            anchors, anchor_labels, learner.bank_features, learner.bank_labels, learner.bank_correct)
        a, p, k = len(anchors), positives.shape[1], negatives.shape[1]
        # One pass through the adapter (its batch norm sees anchors, positives and negatives together).
        embedded = F.normalize(learner.embed(torch.cat([anchors, learner.bank_features[positives.flatten()],
                                                        learner.bank_features[negatives.flatten()]]),
                                             batch_statistics=True), dim=-1)
        z, zp, zn = embedded[:a], embedded[a:a + a * p].view(a, p, -1), embedded[a + a * p:].view(a, k, -1)
        s_pos = (z[:, None] * zp).sum(-1) / self.temperature
        s_neg = ((z[:, None] * zn).sum(-1) / self.temperature).masked_fill(~negative_valid, float("-inf"))
        if self.text:
            s_text = z @ text.t() / self.temperature  # [A, C]
            s_pos = torch.cat([s_text.gather(1, anchor_labels[:, None]), s_pos], 1)
            positive_valid = torch.cat([positive_valid.new_ones(a, 1), positive_valid], 1)
            s_neg = torch.cat([s_neg, s_text.scatter(1, anchor_labels[:, None], float("-inf"))], 1)
        log_prob = s_pos - torch.logaddexp(s_pos, s_neg.logsumexp(1, keepdim=True))
        counts = positive_valid.sum(1)
        per_anchor = -(log_prob * positive_valid).sum(1) / counts.clamp(min=1)
        return {"contrastive": per_anchor[counts > 0].sum()}
