"""`promptkit demo`: the whole toolkit, end to end, offline, on the embedded model and benchmark.

Zero-shot, CoOp (accuracy vs shots), a multimodal method (MaPLe), base-to-novel generalisation,
and test-time adaptation (TPT, Zero) on the shifted domain. Writes `results.json`, `results.md`
and PNG plots. Nothing is tuned per method: every learner uses its published defaults except the
number of epochs, which is scaled to this small benchmark and shared by all.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

SHOTS = (1, 2, 4, 8, 16)
# CoOp starts from "a photo of a" (its 4-token variant), so short runs start at the zero-shot model.
KWARGS = {"coop": {"ctx_init": "a photo of a"}}


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", default="promptkit-demo", help="output directory (default: ./promptkit-demo)")
    parser.add_argument("--quick", action="store_true", help="smaller run for CI (fewer shots, views, epochs)")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    results = run_demo(args.out, quick=args.quick, seed=args.seed)
    print(results["markdown"])
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.md and plots in {time.time() - results['start']:.0f} s")
    return 0


def run_demo(out, quick: bool = False, seed: int = 1) -> dict:
    from . import TPT, CoOp, PromptTrainer, TrainConfig, Zero, ZeroShotCLIP, create_learner, load_clip, load_pretrained
    from .data import ProceduralBenchmark
    from .metrics import classification_metrics
    from .plots import plot_accuracy_vs_shots, plot_reliability

    start, out = time.time(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip = load_clip("promptkit-tiny")
    bench = ProceduralBenchmark(seed=0)
    names = bench.classnames
    shots = (4, 16) if quick else SHOTS
    epochs = 10 if quick else 20
    n_tta = 48 if quick else 288  # test images adapted; every view costs one image encode
    rows, curves, logits_for_plot = [], {"coop": {}}, {}

    plan = ["zero-shot"] + [f"coop {k}-shot" for k in shots] + ["maple", "base-to-novel coop", "base-to-novel maple",
                                                                  "tpt", "zero"]
    bar = tqdm(plan, desc="promptkit demo", unit="step")

    splits = {}

    def get_split(name, **kwargs):  # each split is rendered once
        key = (name, tuple(sorted(kwargs.items())))
        if key not in splits:
            splits[key] = bench.split(name, **kwargs)
        return splits[key]

    def evaluate(learner, name, classes="all"):
        dataset = get_split(name, classes=classes)
        trainer = PromptTrainer(learner, TrainConfig(device="cpu", output_dir=None))
        return trainer.evaluate(dataset), dataset

    def add(method, split, metrics):
        rows.append({"method": method, "split": split, "top1": round(float(metrics["top1"]), 2),
                     "ece": round(float(metrics["ece"]), 2)})
        bar.set_postfix_str(f"{method}/{split} {metrics['top1']:.1f}%")

    def train(name, classes="all", k=16):
        data = get_split("train", shots=k, seed=seed, classes=classes)
        learner = create_learner(name, clip, data.classnames, **KWARGS.get(name, {}))
        config = TrainConfig(epochs=epochs, batch_size=32, device="cpu", seed=seed, output_dir=None,
                             log_every=0, progress=False)
        PromptTrainer(learner, config).fit(data)
        return learner

    zero_shot = ZeroShotCLIP(clip, names)
    for split in ("test", "shifted"):
        metrics, _ = evaluate(zero_shot, split)
        add("zero-shot", split, metrics)
    bar.update()

    for k in shots:
        coop = train("coop", k=k)
        metrics, test = evaluate(coop, "test")
        curves["coop"][k] = metrics["top1"]
        if k == 16:
            add("coop", "test", metrics)
            add("coop", "shifted", evaluate(coop, "shifted")[0])
            with torch.no_grad():
                logits_for_plot["coop"] = coop(torch.stack([x for x, _ in test]))
        bar.update()
    curves["zero-shot"] = {k: rows[0]["top1"] for k in shots}

    maple = train("maple")
    for split in ("test", "shifted"):
        add("maple", split, evaluate(maple, split)[0])
    bar.update()

    # Base-to-novel: train on base classes, test on base and on unseen novel classes with the same prompts.
    for method in ("coop", "maple"):
        learner = train(method, classes="base")
        learner.save_pretrained(out / f"{method}-base")
        add(method, "base", evaluate(learner, "test", "base")[0])
        novel = load_pretrained(out / f"{method}-base", clip, classnames=bench.novel_classnames)
        add(method, "novel", evaluate(novel, "test", "novel")[0])
        bar.update()
    for split, classes in (("base", "base"), ("novel", "novel")):
        add("zero-shot", split, evaluate(ZeroShotCLIP(clip, getattr(bench, f"{classes}_classnames")), "test", classes)[0])

    # Test-time adaptation on the shifted domain, starting from zero-shot CLIP ("a photo of a" context).
    shifted = get_split("shifted", classes="all")
    pick = torch.randperm(len(shifted), generator=torch.Generator().manual_seed(seed))[:n_tta]
    images = torch.stack([shifted[i][0] for i in pick])
    labels = torch.tensor([shifted[i][1] for i in pick])
    start_prompt = CoOp(clip, names, ctx_init="a photo of a")
    n_views = 8 if quick else 32
    # The adapters see a seeded subset of the shifted split (every view costs an image encode): zero-shot is
    # reported on exactly those images beside them.
    subset = f"shifted ({len(images)}-image subset)"
    add("zero-shot", subset, classification_metrics(
        torch.cat([zero_shot(images[i:i + 256]).detach() for i in range(0, len(images), 256)]), labels))
    for method, adapter in (("tpt", TPT(start_prompt, n_views=n_views, augment="crop")),
                            ("zero", Zero(ZeroShotCLIP(clip, names), n_views=n_views, augment="crop"))):
        torch.manual_seed(seed)
        logits = torch.cat([adapter(images[i:i + 32]).detach() for i in range(0, len(images), 32)])
        add(method, subset, classification_metrics(logits, labels))
        bar.update()
    bar.close()

    plot_accuracy_vs_shots(curves, out / "accuracy_vs_shots.png")
    test = get_split("test", classes="all")
    plot_reliability(logits_for_plot["coop"], torch.tensor(test.targets), out / "reliability_coop.png",
                     title="CoOp 16-shot, test split")
    markdown = _markdown(rows)
    (out / "results.md").write_text(markdown + "\n")
    result = {"rows": rows, "coop_accuracy_vs_shots": curves["coop"], "quick": quick, "seed": seed,
              "seconds": round(time.time() - start, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "markdown": markdown, "start": start}


def _markdown(rows) -> str:
    lines = ["| method | split | top-1 (%) | ECE (%) |", "|---|---|---:|---:|"]
    lines += [f"| {r['method']} | {r['split']} | {r['top1']:.2f} | {r['ece']:.2f} |" for r in rows]
    return "\n".join(lines)
