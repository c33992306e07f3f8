"""MVLPT on the embedded model and benchmark: a target prompt started from a multi-task source prompt vs from
"a photo of a".

    python benchmarks/mvlpt_transfer.py [--shots 1 4] [--seeds 1] [--epochs 20]

Source (MVLPT): one prompt learned jointly on two tasks with different classes: `sketch` (the sketch domain,
the 24 base classes) and `photo` (the photo domain, the 24 novel classes), 16 shots each, each image scored
against its own task's classes. Targets: the `noisy` and `palette` domains with all 48 classes, k shots,
tested on 24 images per class of that domain. Every prompt is MCoOp's text context started from "a photo of a"
(4 tokens, class name at the end), so the arms differ only in where the target starts: "a photo of a" (= CoOp)
or the source prompt (`init_from`). Offline: `promptkit-tiny` and the procedural benchmark ship with promptkit.
"""
from __future__ import annotations

import argparse
import time

import torch

import promptkit
from promptkit.data import MultiTaskDataset, ProceduralBenchmark

from common import machine, table

TARGETS = ("noisy", "palette")
PROMPT = dict(prompt="text", ctx_init="a photo of a", class_token_position="end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    start = time.time()
    clip = promptkit.load_clip("promptkit-tiny")
    bench = ProceduralBenchmark(seed=0)
    names = bench.classnames

    def config(seed, n):
        # CoOp's recipe scaled to the benchmark (as `promptkit demo`): at least 20 epochs and 40 steps.
        epochs = max(args.epochs, -(-40 * 32 // n))
        return promptkit.TrainConfig(epochs=epochs, batch_size=32, device="cpu", seed=seed, output_dir=None,
                                     progress=False, log_every=0)

    tests = {}
    with torch.no_grad():  # text prompts only: the test images are encoded once, not per evaluation
        for domain in TARGETS:
            data = bench.split("test", domain=domain)
            tests[domain] = (clip.encode_image(data.images), torch.tensor(data.targets))

    def top1(learner, domain):
        features, labels = tests[domain]
        with torch.no_grad():
            return 100 * (learner(image_features=features).argmax(-1) == labels).float().mean().item()
    sources = {}
    print(f"test images encoded: {time.time() - start:.0f} s", flush=True)
    for seed in args.seeds:
        source_data = MultiTaskDataset({
            "sketch": bench.split("train", shots=16, seed=seed, domain="sketch", classes="base"),
            "photo": bench.split("train", shots=16, seed=seed, domain="photo", classes="novel")})
        source = promptkit.create_learner("mvlpt", clip, source_data.classnames, tasks=source_data.tasks, **PROMPT)
        promptkit.PromptTrainer(source, config(seed, len(source_data))).fit(source_data)
        sources[seed] = source
        print(f"source, seed {seed}: {time.time() - start:.0f} s", flush=True)

    scores: dict[tuple, list[float]] = {}
    for domain in TARGETS:
        zero_shot = promptkit.create_learner("mvlpt", clip, names, **PROMPT)  # untrained: "a photo of a {}."
        scores[(domain, "-", "zero-shot (\"a photo of a\")")] = [top1(zero_shot, domain)]
        for seed, source in sources.items():
            transferred = promptkit.create_learner("mvlpt", clip, names, **PROMPT)
            transferred.init_from(source)
            scores.setdefault((domain, "-", "source prompt, no target training"), []).append(
                top1(transferred, domain))
        for k in args.shots:
            for seed, source in sources.items():
                train = bench.split("train", shots=k, seed=seed, domain=domain)
                for arm in ("from \"a photo of a\" (CoOp)", "from the sketch + photo source (MVLPT)"):
                    learner = promptkit.create_learner("mvlpt", clip, names, **PROMPT)
                    if "MVLPT" in arm:
                        learner.init_from(source)
                    promptkit.PromptTrainer(learner, config(seed, len(train))).fit(train)
                    scores.setdefault((domain, str(k), arm), []).append(top1(learner, domain))
                    print(f"{domain} {k}-shot seed {seed} {arm}: {scores[(domain, str(k), arm)][-1]:.2f} "
                          f"({time.time() - start:.0f} s)", flush=True)
    rows = [{"target domain": domain, "shots": k, "target prompt": arm,
             "top-1": f"{sum(v) / len(v):.2f}" + (f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else "")}
            for (domain, k, arm), v in scores.items()]
    print(f"\npromptkit-tiny; source: sketch (base classes) + photo (novel classes), 16 shots each; seeds "
          f"{args.seeds} (mean, range); {time.time() - start:.0f} s. Machine: {machine()}\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
