"""PromptTrainer vs a faithful naive CoOp loop: time per training iteration and peak memory.

    python benchmarks/train_speed.py [--archs ViT-B-32 ViT-B-16] [--classes 100 1000] [--iters 3]
                                     [--device cuda --amp bf16]

All train CoOp (n_ctx 16, batch 8, SGD, no augmentation) on the same random images with random
weights (no download). The naive loop is what CoOp/Dassl does each step: the image encoder on the
batch and the full 77-token text encoder over all classes. PromptTrainer caches image features
(encoded once; reported separately as a one-off) and runs the text encoder over the first
max(EOT)+1 tokens only, either every class over all its positions ("full rows",
`FrozenCLIP.shared_prefix=False`) or the common [SOS]+context prefix once and each class over its
name only ("shared prefix", the default). Each measurement runs in its own process; the ratios
compare measurements of one run. `--amp bf16`: the naive loop under torch.autocast(device, bf16), the
trainer with precision="bf16" (which autocasts on CUDA only: CUDA only). Peak memory: the process's
peak resident set on CPU, torch.cuda.max_memory_allocated on CUDA.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def worker(cfg: dict) -> dict:
    import torch.nn.functional as F

    import promptkit
    from common import autocast, peak_memory_mb, setup_worker

    device, clip, names, size = setup_worker(cfg)
    batch, iters = 8, cfg["iters"]
    images = torch.randn(batch * 2, 3, size, size)
    labels = torch.arange(batch * 2) % cfg["classes"]
    learner = promptkit.CoOp(clip, names, n_ctx=16).to(device)
    if cfg["variant"] == "naive":
        optimizer = torch.optim.SGD(learner.prompt_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
        model = clip.model

        def step(i):
            x = images[(i % 2) * batch:(i % 2 + 1) * batch].to(device)
            y = labels[(i % 2) * batch:(i % 2 + 1) * batch].to(device)
            with autocast(cfg):
                image = F.normalize(model.encode_image(x).float(), dim=-1)
                with promptkit.inject(learner.text_hooks()):
                    text = F.normalize(model.encode_text(learner.tokens).float(), dim=-1)   # all 77 positions
            loss = F.cross_entropy(clip.logit_scale * image @ text.t(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step(0)  # warm-up
        start = time.perf_counter()
        for i in range(iters):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_iter, once = (time.perf_counter() - start) / iters, 0.0
    else:
        dataset = torch.utils.data.TensorDataset(images, labels)
        dataset.classnames, dataset.targets = names, labels.tolist()
        epochs = max(1, iters // 2)
        config = promptkit.TrainConfig(epochs=epochs, batch_size=batch, output_dir=None, progress=False,
                                       log_every=0, warmup_epochs=0, device=str(device),
                                       precision="bf16" if cfg["amp"] == "bf16" else "fp32")
        trainer = promptkit.PromptTrainer(learner, config)
        trainer._cache_features(dataset)  # warm-up of both paths
        with autocast(cfg):
            loss = learner.training_loss(labels[:batch].to(device), images[:batch].to(device)).loss
        loss.backward()
        start = time.perf_counter()
        once = trainer._cache_features(dataset) is not None and time.perf_counter() - start
        start = time.perf_counter()
        trainer.fit(dataset)  # builds the cache once, then 2 steps per epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_iter = (time.perf_counter() - start - once) / (2 * epochs)
    return {"per_iter_s": per_iter, "once_s": once, "peak_mb": peak_memory_mb(device)}


def main():
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--classes", nargs="+", type=int, default=[100])
    parser.add_argument("--iters", type=int, default=3)
    add_common_args(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from common import PATHS, machine, run_isolated, table

    if args.amp != "none" and not args.device.startswith("cuda"):
        parser.error("--amp: PromptTrainer autocasts on CUDA only; use --device cuda")
    rows = []
    for arch in args.archs:
        for classes in args.classes:
            cfg = dict(arch=arch, classes=classes, iters=args.iters, device=args.device, threads=args.threads,
                       amp=args.amp)
            naive = run_isolated(__file__, {**cfg, "variant": "naive"})
            row = {"arch": arch, "C": classes, "naive s/iter": naive["per_iter_s"]}
            paths = {name: run_isolated(__file__, {**cfg, "variant": "promptkit", "shared_prefix": shared})
                     for name, shared in PATHS.items()}
            for name, fast in paths.items():
                row[f"{name} s/iter"] = fast["per_iter_s"]
                row[f"{name} speed-up"] = naive["per_iter_s"] / fast["per_iter_s"]
            row["shared / full rows speed-up"] = paths["full rows"]["per_iter_s"] / paths["shared prefix"]["per_iter_s"]
            row["feature cache (once, 16 images) s"] = paths["shared prefix"]["once_s"]
            row["naive peak MB"] = naive["peak_mb"]
            row.update({f"{name} peak MB": fast["peak_mb"] for name, fast in paths.items()})
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nCoOp training step, n_ctx 16, batch 8, {args.device}, amp {args.amp}. Machine: {machine()}\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
