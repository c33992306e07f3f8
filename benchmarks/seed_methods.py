"""CPL, Bayesian prompt learning and DPL against CoOp and CoCoOp on the embedded model and benchmark: accuracy and
calibration (ECE) on the photo `test` split and on each shifted domain, evaluated one domain at a time.

    python benchmarks/seed_methods.py [--classes base] [--shots 8] [--epochs 5] [--n-test 4] [--seed 1]

Offline: `promptkit-tiny` and the procedural benchmark ship with promptkit. Every learner is trained by
`PromptTrainer` on the same k-shot photo split with the same settings (SGD lr 0.002, batch 32, cosine, the
demo's; nothing tuned per method), from its own defaults; CoOp starts from "a photo of a" as CoCoOp does; the
Bayesian learner runs as the authors' shipped config (unconditional posterior, L = 10). Test batches hold one
domain each (`--domain-batch` images, DomainBed's 64), which is what DPL conditions its prompt on.

The defaults (the base half of the classes, 8 shots, 5 epochs, 4 test images per class and domain; zero-shot,
CoOp, Bayesian, DPL) are sized for 2 CPU cores. CoCoOp and CPL encode batch x classes prompts per training step
and classes prompts per test image, tens of times CoOp's cost: add them with `--methods ... CoCoOp CPL`.
"""
from __future__ import annotations

import argparse
import time

import promptkit
from promptkit.data import ProceduralBenchmark
from promptkit.data.procedural import SHIFTED_DOMAINS

from common import machine, table

METHODS = {"zero-shot": ("zeroshot", {}), "CoOp": ("coop", {"ctx_init": "a photo of a"}), "CoCoOp": ("cocoop", {}),
           "CPL": ("cpl", {}), "Bayesian (L=10)": ("bayesian", {"conditional": False}), "DPL": ("dpl", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="base", choices=["base", "all"])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--n-test", type=int, default=4, help="test images per class and domain")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--domain-batch", type=int, default=64)
    parser.add_argument("--methods", nargs="*", default=[m for m in METHODS if m not in ("CoCoOp", "CPL")],
                        choices=list(METHODS), help="default: all but CoCoOp and CPL, which take most of the time")
    args = parser.parse_args()
    clip = promptkit.load_clip("promptkit-tiny")
    bench = ProceduralBenchmark(seed=0, n_test=args.n_test)
    train = bench.split("train", shots=args.shots, seed=args.seed, classes=args.classes)
    tests = {"photo": bench.split("test", classes=args.classes),
             **{d: bench.split("shifted", domain=d, classes=args.classes) for d in SHIFTED_DOMAINS}}
    config = promptkit.TrainConfig(epochs=args.epochs, batch_size=32, device="cpu", seed=args.seed, output_dir=None,
                                   progress=False, log_every=0, eval_batch_size=args.domain_batch)
    rows, start = [], time.time()
    for label in args.methods:
        method, kwargs = METHODS[label]
        tic = time.time()
        learner = promptkit.create_learner(method, clip, train.classnames, seed=args.seed, **kwargs)
        trainer = promptkit.PromptTrainer(learner, config)
        if learner.prompt_parameters():
            trainer.fit(train)
        row = {"method": label}
        shifted_top1, shifted_ece = [], []
        for domain, data in tests.items():
            metrics = trainer.evaluate(data)
            row[f"{domain} top-1"] = round(metrics["top1"], 1)
            if domain == "photo":
                row["photo ECE"] = round(metrics["ece"], 1)
            else:
                shifted_top1.append(metrics["top1"])
                shifted_ece.append(metrics["ece"])
        row["shifted top-1 (mean)"] = round(sum(shifted_top1) / len(shifted_top1), 1)
        row["shifted ECE (mean)"] = round(sum(shifted_ece) / len(shifted_ece), 1)
        row["s"] = round(time.time() - tic)
        rows.append(row)
        print(row, flush=True)
    columns = ["method", "photo top-1", "photo ECE", *[f"{d} top-1" for d in SHIFTED_DOMAINS], "shifted top-1 (mean)",
               "shifted ECE (mean)", "s"]
    print(f"\npromptkit-tiny, {args.classes} classes ({len(train.classnames)}), {args.shots} shots (photo), "
          f"{args.n_test} test images per class and domain, {args.epochs} epochs, seed {args.seed}, test batches of "
          f"{args.domain_batch} images of one domain; {time.time() - start:.0f} s. Machine: {machine()}\n")
    print(table(rows, columns))


if __name__ == "__main__":
    main()
