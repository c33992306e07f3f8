"""Ensembles of learners in weight space (WiSE-FT interpolation, model soups, PAINT patching) and in output
space, and the debiasing projection of text features; also `promptkit soup`, the CLI of soups."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .learners.base import PromptLearner, check_classnames

PAINT_ALPHAS = tuple(i / 10 for i in range(11))


# -- weight space ------------------------------------------------------------------------------------
def check_compatible(learners: Sequence[PromptLearner], what: str) -> None:
    """Refuses learners whose prompt tensors cannot be averaged: another method, other keywords, other
    tensor names or shapes, another base model or other class names.

    Raises:
        ValueError: naming the first pair that differs and every way it differs.
    """
    first = learners[0]
    own = first.prompt_state_dict()
    for i, other in enumerate(learners[1:], 1):
        diffs = []
        if type(other) is not type(first) or other.method != first.method:
            diffs.append(f"method {first.method or type(first).__name__!r} vs {other.method or type(other).__name__!r}")
        keys = sorted(k for k in first.hparams.keys() | other.hparams.keys()
                      if first.hparams.get(k) != other.hparams.get(k))
        if keys:
            diffs.append("keywords " + ", ".join(f"{k}={first.hparams.get(k)!r} vs {other.hparams.get(k)!r}"
                                                 for k in keys))
        sig, other_sig = first.clip.signature(), other.clip.signature()
        keys = sorted(k for k in sig if sig[k] != other_sig.get(k))
        if keys:
            diffs.append("base model " + ", ".join(f"{k} {sig[k]} vs {other_sig.get(k)}" for k in keys))
        else:  # same structure; prompts of other weights would still mean something else
            bases = [(c.arch, c.pretrained) for c in (first.clip, other.clip)]
            if bases[0] != bases[1]:
                diffs.append(f"base model weights {bases[0][0]}/{bases[0][1]} vs {bases[1][0]}/{bases[1][1]}")
        if other.classnames != first.classnames:
            diffs.append(f"class names {first.classnames[:5]} vs {other.classnames[:5]}"
                         + (f" ({first.n_classes} vs {other.n_classes} classes)" if first.n_classes != other.n_classes
                            else ""))
        state = other.prompt_state_dict()
        names = sorted(own.keys() ^ state.keys())
        if names:
            diffs.append(f"tensors only in one of them: {names}")
        shapes = [f"{k} {tuple(own[k].shape)} vs {tuple(state[k].shape)}" for k in sorted(own.keys() & state.keys())
                  if own[k].shape != state[k].shape]
        if shapes:
            diffs.append("shapes " + ", ".join(shapes))
        if diffs:
            raise ValueError(f"learners 0 and {i} cannot be {what}: " + "; ".join(diffs))


def _combine(learners: Sequence[PromptLearner], weights: Sequence[float]) -> PromptLearner:
    """A new learner like `learners[0]` whose floating tensors are `sum(w * tensor)` over the learners; other
    tensors (counters) must agree, and are copied."""
    states = [learner.prompt_state_dict() for learner in learners]
    combined = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            # A Python sum starting from 0: alpha 0 or 1 of an interpolation gives a or b bitwise.
            combined[key] = sum(w * s[key].to(first.device) for w, s in zip(weights, states))
        elif all(torch.equal(first, s[key].to(first.device)) for s in states[1:]):
            combined[key] = first
        else:
            raise ValueError(f"{key} is a {first.dtype} tensor that differs between the learners; it cannot be "
                             f"averaged")
    return _rebuild(learners[0], combined)


def _rebuild(learner: PromptLearner, state: dict, classnames: Sequence[str] | None = None) -> PromptLearner:
    """A new learner of `learner`'s class and keywords on its CLIP (other class names if given), holding `state`."""
    # Seeded: building it must not draw from the caller's random state (its initial tensors are overwritten).
    new = type(learner)(learner.clip, list(classnames or learner.classnames), seed=0, **learner.hparams)
    new.load_prompt_state_dict(state)
    return new


def interpolate(a: PromptLearner, b: PromptLearner, alpha: float, extrapolate: bool = False) -> PromptLearner:
    """WiSE-FT's weight-space ensemble (Wortsman et al., 2022): a new learner whose prompt tensors are
    `(1 - alpha) * a + alpha * b`. With `a` the initialisation (e.g. CoOp from "a photo of a", i.e. zero-shot)
    and `b` the fine-tuned prompts, alpha trades the fine-tuned task against robustness.

    Args:
        a: the learner at alpha 0 (the result has its method, keywords, class names and CLIP).
        b: the learner at alpha 1; same method, keywords, tensors, base model and class names as `a`.
        alpha: mixing coefficient in [0, 1]; 0 gives `a` and 1 gives `b` exactly.
        extrapolate: allow alpha outside [0, 1] (moving past `a` or `b`).

    Raises:
        ValueError: alpha outside [0, 1] without `extrapolate`, or incompatible learners (the message says
            what differs).
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    if not extrapolate and not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}; pass extrapolate=True to go beyond a or b")
    check_compatible([a, b], "interpolated")
    return _combine([a, b], [1 - alpha, alpha])


def soup(runs: Sequence, clip=None, method: str = "uniform", val=None) -> tuple[PromptLearner, list[dict]]:
    """A prompt soup (Wortsman et al., "Model soups", 2022): the average of the prompt tensors of several runs.

    uniform: the mean of all runs. greedy (the paper's recipe): runs sorted by validation top-1, best first; each
    is added to the soup if the soup's validation top-1 does not drop (>=), else left out.

    Args:
        runs: learners, or `save_pretrained` directories (a training run's `--out` directory, holding
            `prompts/`, also works); at least 2, compatible (as `interpolate`).
        clip: the FrozenCLIP to load directories on.
        method: "uniform" or "greedy".
        val: validation dataset; required for greedy, optional for uniform (then every run and the soup are
            evaluated for the table).

    Returns:
        (souped learner, table): one dict per run, in the order tried: `run`, `val_top1` (the run alone),
        `soup_val_top1` (greedy: the soup with this run added), `kept`; for uniform with `val` a last row
        `run="soup"`.

    Raises:
        ValueError: fewer than 2 runs, an unknown method, greedy without `val`, incompatible runs.
    """
    if method not in ("uniform", "greedy"):
        raise ValueError(f"unknown soup method {method!r}; use 'uniform' or 'greedy'")
    if len(runs) < 2:
        raise ValueError(f"a soup needs at least 2 runs, got {len(runs)}; a soup of one run is that run")
    if method == "greedy" and val is None:
        raise ValueError("a greedy soup needs a validation dataset (val=...) to rank and accept the runs")
    names = [str(r) if isinstance(r, (str, Path)) else f"learner {i}" for i, r in enumerate(runs)]
    learners = [_load_run(r, clip) for r in runs]
    check_compatible(learners, "souped")
    if method == "uniform":
        souped = _combine(learners, [1 / len(learners)] * len(learners))
        if val is None:
            return souped, [{"run": name, "kept": True} for name in names]
        table = [{"run": name, "val_top1": _top1(learner, val), "kept": True} for name, learner in zip(names, learners)]
        return souped, table + [{"run": "soup", "val_top1": _top1(souped, val), "kept": True}]
    scores = [_top1(learner, val) for learner in learners]
    order = sorted(range(len(learners)), key=lambda i: -scores[i])  # stable: ties keep the given order
    kept, best = [order[0]], scores[order[0]]
    table = [{"run": names[order[0]], "val_top1": best, "soup_val_top1": best, "kept": True}]
    for i in order[1:]:
        trial = kept + [i]
        accuracy = _top1(_combine([learners[j] for j in trial], [1 / len(trial)] * len(trial)), val)
        table.append({"run": names[i], "val_top1": scores[i], "soup_val_top1": accuracy, "kept": accuracy >= best})
        if accuracy >= best:
            kept, best = trial, accuracy
    return _combine([learners[j] for j in kept], [1 / len(kept)] * len(kept)), table


def patch(zero_shot: PromptLearner, finetuned: PromptLearner, patch_val, supported_val,
          alphas: Sequence[float] = PAINT_ALPHAS) -> tuple[PromptLearner, list[dict]]:
    """PAINT (Ilharco et al., "Patching open-vocabulary models by interpolating weights", 2022): interpolate the
    zero-shot and fine-tuned prompts, and pick the mixing coefficient on held-out data as the paper does: the
    alpha that maximises the average of the patched task's and the supported task's validation accuracy
    (ties: the smallest alpha, the one closest to the unpatched model).

    Args:
        zero_shot: the unpatched learner (alpha 0), e.g. CoOp initialised from "a photo of a", untrained.
        finetuned: the same learner trained on the patching task (alpha 1).
        patch_val: validation dataset of the patching task.
        supported_val: validation dataset of a supported task; other class names are used where the prompts
            do not depend on the classes (shared context), otherwise it needs the learner's classes.
        alphas: the coefficients tried, each in [0, 1].

    Returns:
        (learner at the chosen alpha, table): one dict per alpha with `alpha`, `patched_top1`,
        `supported_top1`, `mean_top1`, `chosen`.
    """
    if not alphas:
        raise ValueError("alphas is empty; give the mixing coefficients to try, e.g. (0, 0.1, ..., 1)")
    check_compatible([zero_shot, finetuned], "interpolated")
    candidates, table = [], []
    for alpha in alphas:
        learner = interpolate(zero_shot, finetuned, alpha)
        patched, supported = _top1(learner, patch_val), _top1(_for_dataset(learner, supported_val), supported_val)
        candidates.append(learner)
        table.append({"alpha": float(alpha), "patched_top1": patched, "supported_top1": supported,
                      "mean_top1": (patched + supported) / 2, "chosen": False})
    best = min(range(len(table)), key=lambda i: (-table[i]["mean_top1"], table[i]["alpha"]))
    table[best]["chosen"] = True
    return candidates[best], table


def _for_dataset(learner: PromptLearner, dataset) -> PromptLearner:
    """`learner`, or the same prompts rebuilt on `dataset`'s class names when they differ."""
    names = getattr(dataset, "classnames", None)
    if names is None or check_classnames(names) == learner.classnames:
        return learner
    return _rebuild(learner, learner.prompt_state_dict(), names)


def _load_run(run, clip) -> PromptLearner:
    if isinstance(run, PromptLearner):
        return run
    from .checkpoint import CONFIG_NAME, load_pretrained

    if clip is None:
        raise ValueError(f"soup of directories needs the clip to load them on (got run {run})")
    path = Path(run)
    if not (path / CONFIG_NAME).exists() and (path / "prompts" / CONFIG_NAME).exists():
        path = path / "prompts"  # a training run's --out directory
    return load_pretrained(path, clip)


def _top1(learner, dataset) -> float:
    from .training import PromptTrainer, TrainConfig

    config = TrainConfig(output_dir=None, progress=False, device=str(learner.clip.device))
    return PromptTrainer(learner, config).evaluate(dataset)["top1"]


# -- output space -----------------------------------------------------------------------------------
class LogitEnsemble(nn.Module):
    """Output-space ensemble: logits are the weighted mean of the members' logits. Evaluates like a learner
    (`PromptTrainer.evaluate`, `ensemble(images)`); nothing in it is trained or saved."""

    def __init__(self, learners: Sequence[PromptLearner], weights: Sequence[float] | None = None):
        super().__init__()
        if len(learners) < 1:
            raise ValueError("ensemble_logits needs at least one learner")
        for i, other in enumerate(learners[1:], 1):
            if other.classnames != learners[0].classnames:
                raise ValueError(f"learners 0 and {i} cannot be ensembled: class names {learners[0].classnames[:5]} "
                                 f"vs {other.classnames[:5]} ({learners[0].n_classes} vs {other.n_classes} classes)")
        weights = torch.ones(len(learners)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (len(learners),) or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError(f"weights must be {len(learners)} non-negative numbers, not all zero; got "
                             f"{weights.tolist()}")
        self.members = nn.ModuleList(learners)
        self.weights = (weights / weights.sum()).tolist()
        self.method = "ensemble"

    @property
    def clip(self):
        return self.members[0].clip

    @property
    def classnames(self) -> list[str]:
        return self.members[0].classnames

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def text_features(self) -> list[torch.Tensor]:
        """Each member's class text features, to pass back to `forward` once per evaluation."""
        return [m.text_features() for m in self.members]

    def forward(self, images: torch.Tensor, *, text_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        text_features = text_features or self.text_features()
        return sum(w * m(images, text_features=t) for w, m, t in zip(self.weights, self.members, text_features))


def ensemble_logits(learners: Sequence[PromptLearner], weights: Sequence[float] | None = None) -> LogitEnsemble:
    """The output-space ensemble of `learners` (same class names; methods and base models may differ):
    logits = sum(w_i * logits_i) / sum(w), uniform without `weights`."""
    return LogitEnsemble(learners, weights)


# -- debiasing ----------------------------------------------------------------------------------------
def debias_projection(bias_features: torch.Tensor, pair_features: torch.Tensor | None = None,
                      lam: float = 1000.0) -> torch.Tensor:
    """Chuang et al., "Debiasing vision-language models via biased prompts" (2023), in float64.

    Plain: `P0 = I - V (V^T V)^-1 V^T` with V's columns the embeddings of prompts describing the spurious
    attribute, so `P0 z` has no component along them. As the official code (chingyaoc/debias_vl), V is first
    replaced by an orthonormal basis of its span (there a TruncatedSVD), which gives the same P0 and also
    works when prompts are linearly dependent.

    Calibrated (with positive pairs, embeddings of prompts that should read the same once debiased, e.g.
    "a landbird on water" / "a landbird in a forest"): `P = argmin ||P - P0||^2 + lam/|S| sum ||P z_i - P z_j||^2`
    = `P0 (I + lam M)^-1`, `M = 1/|S| sum (z_i - z_j)(z_i - z_j)^T`: the paper's closed form, and what the
    official code computes (default lam 1000, its `--lam`). The official code gives the pairs as index pairs into
    class-by-attribute prompts; here they are given as features directly.

    Args:
        bias_features: [K, D] normalised embeddings of the bias prompts.
        pair_features: [S, 2, D] embeddings of the positive pairs, or None for the plain projection.
        lam: weight of the pairs' invariance.

    Returns:
        P, [D, D]; a text feature z becomes `normalize(P z)`.
    """
    if bias_features.dim() != 2 or len(bias_features) == 0:
        raise ValueError(f"bias_features must be [K, D] with K >= 1, got {tuple(bias_features.shape)}")
    v = bias_features.detach().double().t()
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    basis = u[:, s > s.max() * v.shape[0] * torch.finfo(s.dtype).eps]
    eye = torch.eye(v.shape[0], dtype=torch.float64, device=v.device)
    p0 = eye - basis @ basis.t()
    if pair_features is None:
        return p0
    if pair_features.dim() != 3 or pair_features.shape[1] != 2 or len(pair_features) == 0:
        raise ValueError(f"pair_features must be [S, 2, D] with S >= 1, got {tuple(pair_features.shape)}")
    d = (pair_features[:, 0] - pair_features[:, 1]).detach().double().to(v.device)
    m = d.t() @ d / len(d)
    # P0 G^-1 = (G^-1 P0)^T: G and P0 are symmetric.
    return torch.linalg.solve(eye + lam * m, p0).t()


class Debiased(nn.Module):
    """A learner whose class text features are projected by `projection` and renormalised; image features,
    logits and evaluation as the wrapped learner's."""

    forward = PromptLearner.forward
    logits = PromptLearner.logits

    def __init__(self, learner: PromptLearner, projection: torch.Tensor):
        super().__init__()
        if type(learner).forward is not PromptLearner.forward:
            raise ValueError(f"{learner.method or type(learner).__name__} computes its class text features per "
                             f"image, inside forward; debias needs a learner whose text features are one [C, D] "
                             f"matrix (text_features())")
        self.learner = learner
        self.register_buffer("projection", projection.to(learner.clip.device))
        self.method = learner.method

    @property
    def clip(self):
        return self.learner.clip

    @property
    def classnames(self) -> list[str]:
        return self.learner.classnames

    @property
    def n_classes(self) -> int:
        return self.learner.n_classes

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.learner.encode_image(images)

    def text_features(self) -> torch.Tensor:
        text = self.learner.text_features()
        return F.normalize(text.double() @ self.projection.t(), dim=-1).to(text.dtype)


def debias(learner: PromptLearner, bias_prompts: Sequence[str],
           positive_pairs: Sequence[tuple[str, str]] | None = None, lam: float = 1000.0) -> Debiased:
    """Wraps `learner` so that its text features lose the directions of `bias_prompts` (Chuang et al., 2023;
    see `debias_projection`): plain projection, or calibrated with `positive_pairs` of prompts.

    Args:
        learner: any learner with one class text feature matrix (not CoCoOp or CAVPT).
        bias_prompts: prompts describing the spurious attribute, e.g. ["a photo of water", "a photo of land"].
        positive_pairs: pairs of prompts that should read the same after debiasing, e.g.
            [("a landbird on water", "a landbird on land")], for the calibrated projection.
        lam: weight of the pairs' invariance (the official code's default).

    Raises:
        ValueError: no bias prompts, an empty prompt, or positive pairs that are not pairs.
    """
    if isinstance(bias_prompts, str) or not bias_prompts or not all(str(p).strip() for p in bias_prompts):
        raise ValueError(f"bias_prompts must be a non-empty list of non-empty prompts describing the spurious "
                         f"attribute, e.g. ['a photo of water', 'a photo of land']; got {bias_prompts!r}")
    clip = learner.clip

    def embed(prompts):
        with torch.no_grad():
            return clip.encode_text(clip.tokenize(list(prompts))).float()

    pairs = None
    if positive_pairs is not None:
        if not positive_pairs or any(len(pair) != 2 or isinstance(pair, str) for pair in positive_pairs):
            raise ValueError(f"positive_pairs must be a non-empty list of (prompt, prompt) pairs, got "
                             f"{positive_pairs!r}")
        pairs = embed([p for pair in positive_pairs for p in pair]).view(len(positive_pairs), 2, -1)
    return Debiased(learner, debias_projection(embed(bias_prompts), pairs, lam))


# -- CLI: promptkit soup ------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser, command: str) -> None:
    from .training.cli import add_model_and_data_args

    add_model_and_data_args(parser)
    parser.add_argument("--runs", nargs="+", required=True,
                        help="save_pretrained directories (or training --out directories holding prompts/)")
    parser.add_argument("--method", default="uniform", choices=["uniform", "greedy"],
                        help="uniform: mean of all runs; greedy: add runs best first while val top-1 does not drop")
    parser.add_argument("--out", required=True, help="directory for the souped prompts (save_pretrained)")


def run(args: argparse.Namespace) -> int:
    from .checkpoint import CONFIG_NAME
    from .training.cli import _folder, has_splits, load_model, load_split

    out = Path(args.out)
    if (out / CONFIG_NAME).exists():
        raise FileExistsError(f"--out {out} already holds prompts ({CONFIG_NAME}); choose another directory")
    clip = load_model(args)
    val = load_split(args, clip, "val") if has_splits(args) else _folder(args, clip)
    souped, table = soup(args.runs, clip, method=args.method, val=val)
    souped.save_pretrained(out)
    for row in table:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    print(f"soup of {sum(r['kept'] for r in table if r['run'] != 'soup')} runs saved to {out}")
    return 0
