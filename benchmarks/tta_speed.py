"""promptkit TPT vs a faithful naive TPT loop: seconds per test image, peak memory, and agreement.

    python benchmarks/tta_speed.py [--archs ViT-B-32 ViT-B-16] [--classes 200 1000] [--images 4] [--views 64]

Both adapt CoOp's context (initialised from "a photo of a", as TPT on CLIP) with TPT's defaults
(1 AdamW step, lr 5e-3, 10% confident views) on the same pre-generated views, random weights (no
download). The naive loop is the research code's: one image at a time, the views re-encoded at every
step, the full 77-token text encoder over all classes, a final re-encode for the prediction.
Agreement: the largest |logit difference| between the two, relative to the adaptation's own effect
(largest |adapted - unadapted| of the naive loop), and whether top-1 agrees.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch


def naive_tpt(learner, views, lr=5e-3, selection=0.1):
    import torch.nn.functional as F

    import promptkit

    clip, out = learner.clip, []
    for sample in views:
        model = copy.deepcopy(learner)  # episodic: a fresh prompt and optimizer per image
        model.clip = clip
        optimizer = torch.optim.AdamW([model.ctx], lr=lr)

        def logits_of(images):
            with promptkit.inject(model.text_hooks()):
                text = F.normalize(clip.model.encode_text(model.tokens), dim=-1)
            return clip.logit_scale * F.normalize(clip.model.encode_image(images), dim=-1) @ text.t()

        logits = logits_of(sample)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        chosen = logits[torch.argsort(entropy, stable=True)[: int(len(sample) * selection)]].log_softmax(-1)
        avg = torch.logsumexp(chosen, 0) - math.log(len(chosen))
        loss = -(avg.exp() * avg).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            out.append(logits_of(sample[:1])[0])
    return torch.stack(out)


def worker(cfg: dict) -> dict:
    import promptkit
    from common import peak_memory_mb

    torch.manual_seed(0)
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    clip = promptkit.load_clip(cfg["arch"], device=device)
    names = [f"class number {i}" for i in range(cfg["classes"])]
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    learner = promptkit.CoOp(clip, names, ctx_init="a photo of a").to(device)
    views = torch.randn(cfg["images"], cfg["views"], 3, size, size, generator=torch.Generator().manual_seed(1))
    views = views.to(device)
    with torch.no_grad():
        unadapted = learner(views[:, 0]).float().cpu()
    start = time.perf_counter()
    if cfg["variant"] == "naive":
        logits = naive_tpt(learner, views)
    else:
        tpt = promptkit.TPT(learner, n_views=cfg["views"])
        logits = torch.cat([tpt.adapt_views(views[i:i + cfg["batch"]]) for i in range(0, len(views), cfg["batch"])])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / cfg["images"]
    return {"s_per_image": seconds, "peak_mb": peak_memory_mb(device), "logits": logits.detach().float().cpu().tolist(),
            "unadapted": unadapted.tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--classes", nargs="+", type=int, default=[200])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="images adapted at once by promptkit")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from common import machine, run_isolated, table

    rows = []
    for arch in args.archs:
        for classes in args.classes:
            cfg = dict(arch=arch, classes=classes, images=args.images, views=args.views, batch=args.batch,
                       device=args.device, threads=args.threads)
            naive = run_isolated(__file__, {**cfg, "variant": "naive"})
            fast = run_isolated(__file__, {**cfg, "variant": "promptkit"})
            a, b, before = (torch.tensor(naive["logits"]), torch.tensor(fast["logits"]),
                            torch.tensor(naive["unadapted"]))
            effect = (a - before).abs().max().item()
            rows.append({"arch": arch, "C": classes, "naive s/image": naive["s_per_image"],
                         "promptkit s/image": fast["s_per_image"],
                         "speed-up": naive["s_per_image"] / fast["s_per_image"],
                         "max |Δlogit| / adaptation effect": (a - b).abs().max().item() / max(effect, 1e-12),
                         "top-1 agrees": bool((a.argmax(-1) == b.argmax(-1)).all()),
                         "naive peak MB": naive["peak_mb"], "promptkit peak MB": fast["peak_mb"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nTPT, {args.views} views, 1 step, {args.images} images, {args.device}. Machine: {machine()}\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
