"""Unsupervised prompt tuning and adversarially robust prompts on the embedded model and benchmark.

    python benchmarks/unsupervised_robust.py [--epochs 5] [--shots 16] [--eval-per-class 4] [--pgd-steps 10] [--only robust]

Unsupervised: POUF and self-learning (GCE, hard and soft pseudo-labels, and UPL's top-16-per-class selection with
zero-shot pseudo-labels) are trained on the images of the `shifted` split without its labels, and evaluated on the
same images with them (the transductive setting of POUF and UPL: the unlabelled target set is the one predicted),
against zero-shot CLIP. Robust: TeCoA's visual prompts and CoOp, both trained on the `--shots` `train` split, on
`test` clean and under L-inf PGD (eps 1/255 on pixels in [0, 1], `--pgd-steps` steps of eps/4, random start).

Every learner uses its published recipe (optimizer, learning rate, momentum, weight decay, batch size capped at
`--batch`) and the method's default keywords; only the number of epochs is shared (`--epochs`), scaled to this
small benchmark. Offline: `promptkit-tiny` and the procedural benchmark ship with promptkit.
"""
from __future__ import annotations

import argparse
import time

import torch

import promptkit
from promptkit.data import ProceduralBenchmark, Subset, Unlabeled

from common import machine, table

UNSUPERVISED = [
    ("pouf", "pouf", {}),
    ("self-learning (GCE, current model)", "self-learning", {}),
    ("self-learning (hard)", "self-learning", {"loss": "hard"}),
    ("self-learning (soft)", "self-learning", {"loss": "soft"}),
    ("UPL (hard, zero-shot top-16/class)", "self-learning", {"loss": "hard", "teacher": "zero-shot", "top_k": 16}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="largest batch (recipes' batches above it are capped)")
    parser.add_argument("--eval-per-class", type=int, default=4, help="test images per class attacked")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16, help="training images per class of CoOp and TeCoA")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", choices=["unsupervised", "robust"], default=None, help="run one of the two tables")
    parser.add_argument("--rows", type=int, nargs="*", default=None,
                        help="which unsupervised rows to train (0-based, in the order of UNSUPERVISED; default all)")
    args = parser.parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    clip = promptkit.load_clip("promptkit-tiny")
    bench = ProceduralBenchmark(seed=0)
    shifted = bench.split("shifted")

    def train(method, data, val=None, protocol="few-shot", **kwargs):
        recipe = promptkit.recipes.get_recipe(method, protocol, None if protocol == "unsupervised" else args.shots)
        config = recipe.config
        config.epochs, config.batch_size = args.epochs, min(config.batch_size, args.batch)
        config.device, config.output_dir, config.progress, config.log_every = "cpu", None, False, 0
        # Tensors on a CPU: nothing to augment, so one cached pass of the images is exact.
        config.precision, config.augment, config.cache_passes, config.seed = "fp32", None, 1, args.seed
        learner = promptkit.create_learner(method, clip, bench.classnames, seed=args.seed,
                                           **{**recipe.method_kwargs, **kwargs})
        promptkit.PromptTrainer(learner, config).fit(data, val)
        return learner

    def evaluate(learner, data, **attack):
        trainer = promptkit.PromptTrainer(learner, promptkit.TrainConfig(device="cpu", output_dir=None, progress=False))
        return trainer.evaluate(data, **attack)

    unsupervised = robust = ""
    if args.only != "robust":
        unsupervised = run_unsupervised(args, clip, bench, shifted, train, evaluate)
    if args.only != "unsupervised":
        robust = run_robust(args, clip, bench, train, evaluate)
    if unsupervised:
        print(f"\nUnsupervised, trained on the {len(shifted)} unlabelled `shifted` images, {args.epochs} epochs:\n")
        print(unsupervised)
    if robust:
        print(f"\nRobust, trained on {args.shots}-shot `train`, {args.epochs} epochs; {len(bench.classnames) * args.eval_per_class} "
              f"`test` images, PGD eps 1/255, {args.pgd_steps} steps of 0.25/255, random start:\n")
        print(robust)
    print(f"\n{time.time() - start:.0f} s on {machine()}")


def run_unsupervised(args, clip, bench, shifted, train, evaluate) -> str:
    rows = [{"method": "zero-shot", "shifted top-1": evaluate(promptkit.ZeroShotCLIP(clip, bench.classnames),
                                                              shifted)["top1"], "s": 0.0}]
    print(rows[-1], flush=True)
    for i, (name, method, kwargs) in enumerate(UNSUPERVISED):
        if args.rows is not None and i not in args.rows:
            continue
        tic = time.time()
        learner = train(method, Unlabeled(shifted), protocol="unsupervised", **kwargs)
        rows.append({"method": name, "shifted top-1": evaluate(learner, shifted)["top1"], "s": time.time() - tic})
        print(rows[-1], flush=True)
    return table(rows, ["method", "shifted top-1", "s"])


def run_robust(args, clip, bench, train, evaluate) -> str:
    """The same attacked subset of `test` for every learner."""
    per_class = bench.n_test
    chosen = [c * per_class + i for c in range(len(bench.classnames)) for i in range(args.eval_per_class)]
    test = Subset(bench.split("test"), chosen)
    attack = dict(attack="pgd", eps=1 / 255, steps=args.pgd_steps, step_size=0.25 / 255, seed=0)
    shots_split = bench.split("train", shots=args.shots, seed=args.seed)
    rows = []
    for name, learner in [("zero-shot", lambda: promptkit.ZeroShotCLIP(clip, bench.classnames)),
                          ("coop", lambda: train("coop", shots_split)),
                          ("tecoa", lambda: train("tecoa", shots_split, protocol="cross-dataset"))]:
        tic = time.time()
        metrics = evaluate(learner(), test, **attack)
        rows.append({"method": name, "clean top-1": metrics["top1"], "PGD top-1": metrics["robust_top1"],
                     "s": time.time() - tic})
        print(rows[-1], flush=True)
    return table(rows, ["method", "clean top-1", "PGD top-1", "s"])


if __name__ == "__main__":
    main()
