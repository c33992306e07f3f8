"""16-shot table on the embedded model and benchmark: feature-level learners, CoOp, and the robust fine-tuning
recipes built on it (WiSE-FT interpolation, a greedy prompt soup), on the `test` (photo) and `shifted` splits.

    python benchmarks/robust_table.py [--shots 16] [--epochs 20] [--seeds 1 2 3]

Offline: `promptkit-tiny` and the procedural benchmark ship with promptkit. Each learner is trained by
`PromptTrainer` on the same k-shot split (seed 1; the soup's runs use the seeds given) and validated on its
`val` split (4 shots) where a learner searches a setting (Tip-Adapter's alpha/beta, the probe's C) or the soup
picks its runs. The robust fine-tuning papers' point is the shifted column.
"""
from __future__ import annotations

import argparse
import time

import promptkit
from promptkit.data import ProceduralBenchmark

from common import machine, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    clip = promptkit.load_clip("promptkit-tiny")
    bench = ProceduralBenchmark(seed=0)
    splits = {name: bench.split(name) for name in ("test", "shifted")}
    val = bench.split("val", shots=4, seed=1)

    def fit(method, seed=1, **kwargs):
        train = bench.split("train", shots=args.shots, seed=seed)
        learner = promptkit.create_learner(method, clip, train.classnames, seed=seed, **kwargs)
        config = promptkit.TrainConfig(epochs=args.epochs, batch_size=32, device="cpu", seed=seed, output_dir=None,
                                       progress=False, log_every=0, **({"optimizer": "adamw", "lr": 1e-3}
                                                                      if method == "tip-adapter-f" else {}))
        if learner.prompt_parameters() or hasattr(learner, "fit"):
            promptkit.PromptTrainer(learner, config).fit(train, val)
        return learner

    start = time.time()
    zero_shot = fit("zeroshot")
    # CoOp from "a photo of a": untrained it is zero-shot, so WiSE-FT interpolates between zero-shot and CoOp.
    untrained = promptkit.create_learner("coop", clip, bench.classnames, ctx_init="a photo of a")
    coops = [fit("coop", seed, ctx_init="a photo of a") for seed in args.seeds]
    rows = [("zero-shot", zero_shot), ("linear probe", fit("linear-probe")), ("CLIP-Adapter", fit("clip-adapter")),
            ("Tip-Adapter", fit("tip-adapter")), ("Tip-Adapter-F", fit("tip-adapter-f")), ("CoOp", coops[0]),
            ("WiSE-FT(CoOp, 0.5)", promptkit.interpolate(untrained, coops[0], 0.5))]
    souped, chosen = promptkit.soup(coops, method="greedy", val=val)
    rows.append((f"greedy soup of {len(coops)} CoOp seeds ({sum(r['kept'] for r in chosen)} kept)", souped))
    results = []
    for name, learner in rows:
        evaluator = promptkit.PromptTrainer(learner, promptkit.TrainConfig(device="cpu", output_dir=None))
        scores = {split: evaluator.evaluate(data)["top1"] for split, data in splits.items()}
        results.append({"learner": name, "test top-1": round(scores["test"], 2),
                        "shifted top-1": round(scores["shifted"], 2)})
    print(f"\npromptkit-tiny, {args.shots} shots, {args.epochs} epochs, seeds {args.seeds}; {time.time() - start:.0f} s. "
          f"Machine: {machine()}\n")
    print(table(results, ["learner", "test top-1", "shifted top-1"]))


if __name__ == "__main__":
    main()
