"""Every registered method: time per training iteration (training_loss forward + backward) and peak memory.

    python benchmarks/methods.py [--arch ViT-B-32] [--classes 100] [--batch 8] [--iters 2] [--head linear-probe]
                                 [--bank 1600] [--kwargs '{"checkpoint_text": false}'] [--device cuda --amp bf16]

Random weights (no download), same images for all; each method runs in its own process, once with each
text path: every prompt over all its positions ("full rows", `FrozenCLIP.shared_prefix=False`) and a
prefix common to the prompts encoded once ("shared prefix", the default; methods it does not apply to
run the full rows either way). Methods whose image path carries no prompt can use the trainer's
image-feature cache: their time is given with cached features (what PromptTrainer does), the others encode
the batch every step. TeCoA's step includes its 2-step PGD attack on the batch (3 extra image passes, 2 of them
with a backward to the pixels); POUF's and self-learning's read no label (they are timed on the same batch).
`--head` gives every learner that LP-FT head (stage 2's step; stage 1 is the linear probe's one-off fit);
`--bank N` first calls the `fit` of learners built from data with N random image features (the contrastive
adapter's pool of positives and hard negatives, Tip-Adapter's cache), as the trainer does with the training
set's. `--kwargs JSON`: constructor keywords for every method run (e.g. CoCoOp's `text_batch`, `checkpoint_text`),
shown in the row's name. `--amp bf16`: the steps under torch.autocast(device, bf16). Peak memory: the process's
peak resident set on CPU, torch.cuda.max_memory_allocated on CUDA.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

# Constructor keywords that keep the benchmark's one-off set-up short (noted in the table).
SETUP = {"promptsrc": {"templates": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                                     "a photo of the small {}."]}}
# Methods with several prompt types: one row each.
VARIANTS = {"mvlpt": [{"prompt": "text"}, {"prompt": "visual"}, {"prompt": "unified"}]}


def worker(cfg: dict) -> dict:
    import promptkit
    from common import autocast, peak_memory_mb, setup_worker

    device, clip, names, size = setup_worker(cfg)
    images = torch.randn(cfg["batch"], 3, size, size, device=device)
    labels = torch.arange(cfg["batch"], device=device) % cfg["classes"]
    start = time.perf_counter()
    head = {"head": cfg["head"]} if cfg.get("head") else {}
    learner = promptkit.create_learner(cfg["method"], clip, names, **SETUP.get(cfg["method"], {}),
                                       **cfg.get("kwargs", {}), **head).to(device)
    setup = time.perf_counter() - start
    cached = not learner.image_prompted
    with torch.no_grad():
        features = learner.encode_image(images) if cached else None
        # A learner built from data and then trained (CPL's class images) gets its data first, as in the trainer;
        # the feature-level heads are measured before `fit` (see the README).
        if hasattr(learner, "fit") and learner.prompt_parameters() and not cfg.get("bank"):
            learner.fit(features if cached else learner.encode_image(images), labels)
    if cfg.get("bank") and hasattr(learner, "fit"):
        bank = torch.nn.functional.normalize(torch.randn(cfg["bank"], clip.embed_dim, device=device), dim=-1)
        learner.fit(bank, torch.arange(cfg["bank"], device=device) % cfg["classes"])
    params = learner.prompt_parameters()

    def step():
        with autocast(cfg):
            if cached:
                out = learner.training_loss(labels, image_features=features)
            else:
                out = learner.training_loss(labels, images)
        # As the trainer: a gradient rule (ProGrad) takes one backward per term it combines.
        terms = out.gradient_terms or ({"loss": out.loss} if out.loss.requires_grad else {})
        for term in terms.values():
            torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)

    if cfg["method"] == "zeroshot":
        def step():  # nothing to train: one evaluation forward
            with torch.no_grad(), autocast(cfg):
                learner(image_features=features)
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(cfg["iters"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"s_per_iter": (time.perf_counter() - start) / cfg["iters"], "setup_s": setup,
            "peak_mb": peak_memory_mb(device), "cache": cached,
            "params": sum(p.numel() for p in learner.prompt_parameters())}


def main():
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--head", default=None, choices=["zeroshot", "linear-probe"], help="LP-FT head for every method")
    parser.add_argument("--bank", type=int, default=0, help="image features handed to the learners' fit first")
    parser.add_argument("--kwargs", type=json.loads, default={}, help="constructor keywords (JSON) for every method")
    add_common_args(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import promptkit
    from common import PATHS, machine, run_isolated, table

    rows = []
    for method in args.methods or promptkit.list_methods():
        for kwargs in VARIANTS.get(method, [{}]):
            kwargs = {**kwargs, **args.kwargs}
            cfg = dict(method=method, kwargs=kwargs, arch=args.arch, classes=args.classes, batch=args.batch,
                       iters=args.iters, device=args.device, threads=args.threads, head=args.head, bank=args.bank,
                       amp=args.amp)
            paths = {name: run_isolated(__file__, {**cfg, "shared_prefix": shared}) for name, shared in PATHS.items()}
            full, shared = paths["full rows"], paths["shared prefix"]
            label = " ".join([method, *(f"{k}={v}" for k, v in kwargs.items())])
            rows.append({"method": label, "full rows s/iter": full["s_per_iter"],
                         "shared prefix s/iter": shared["s_per_iter"],
                         "speed-up": full["s_per_iter"] / shared["s_per_iter"],
                         "full rows peak MB": full["peak_mb"], "shared prefix peak MB": shared["peak_mb"],
                         "prompt params": shared["params"], "image-feature cache": "yes" if shared["cache"] else "no",
                         "set-up s (once)": shared["setup_s"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.arch}, C={args.classes}, batch {args.batch}, {args.device}, amp {args.amp}; promptsrc with the "
          f"7-template ensemble{'; head=' + args.head if args.head else ''}{'; bank %d' % args.bank if args.bank else ''}. "
          f"Machine: {machine()}\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
