"""promptkit TPT vs a faithful naive TPT loop: seconds per test image, peak memory, and agreement.

    python benchmarks/tta_speed.py [--archs ViT-B-32 ViT-B-16] [--classes 200 1000] [--images 4] [--views 64]
                                   [--device cuda --amp bf16]

(default classes: 200 and 1000 on a GPU, 200 on CPU, where the naive loop at C=1000 takes minutes per image)

Both adapt CoOp's context (initialised from "a photo of a", as TPT on CLIP) with TPT's defaults
(1 AdamW step, lr 5e-3, 10% confident views) on the same pre-generated views, random weights (no
download). The naive loop is the research code's: one image at a time, the views re-encoded at every
step, the full 77-token text encoder over all classes, a final re-encode for the prediction.
Agreement: the largest |logit difference| between the two, relative to the adaptation's own effect
(largest |adapted - unadapted| of the naive loop), and whether top-1 agrees. promptkit runs with both text
paths: every class over all its positions ("full rows", `FrozenCLIP.shared_prefix=False`) and the common
[SOS]+context prefix once per context ("shared prefix", the default). `--amp bf16` (CUDA only, as TPT's
autocast): everything under bf16 autocast, as TPT runs under AMP, so the variants agree to bf16 rounding
only. On CUDA each variant first adapts one untimed image (warm-up; for promptkit this also encodes the
shared step-0 text pass, paid once per run) and peak memory is torch.cuda.max_memory_allocated after it.
Last column: building the 64 views from a 500x375 photo (crops, then AugMix), which `TPT.forward` adds to
the adaptation time; both loops get the same pre-built views.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch


def naive_tpt(learner, views, amp, lr=5e-3, selection=0.1):
    """The research loop (azshue/TPT), one image at a time on the learner's own CoOp context."""
    import torch.nn.functional as F

    import promptkit

    clip, out = learner.clip, []
    for sample in views:
        ctx = learner.ctx.detach().clone().requires_grad_(True)  # episodic: reset prompt and optimizer
        optimizer = torch.optim.AdamW([ctx], lr=lr)
        hooks = [promptkit.learners.coop.context_hook(clip, ctx, learner.ctx_pos)]

        def logits_of(images):
            with amp, promptkit.inject(hooks):
                text = F.normalize(clip.model.encode_text(learner.tokens).float(), dim=-1)  # all 77 tokens
                image = F.normalize(clip.model.encode_image(images).float(), dim=-1)
            return clip.logit_scale * image @ text.t()

        logits = logits_of(sample)                                       # every view, every step
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        chosen = logits[torch.argsort(entropy)[: int(len(sample) * selection)]].log_softmax(-1)
        avg = torch.logsumexp(chosen, 0) - math.log(len(chosen))
        loss = -(avg.exp() * avg).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            out.append(logits_of(sample[:1])[0])                         # final re-encode
    return torch.stack(out)


def worker(cfg: dict) -> dict:
    import promptkit
    from common import autocast, peak_memory_mb, setup_worker

    device, clip, names, size = setup_worker(cfg)
    learner = promptkit.CoOp(clip, names, ctx_init="a photo of a").to(device)
    views = torch.randn(cfg["images"], cfg["views"], 3, size, size, generator=torch.Generator().manual_seed(1))
    views = views.to(device)
    with torch.no_grad():
        unadapted = learner(views[:, 0]).float().cpu()
    tpt = promptkit.TPT(learner, n_views=cfg["views"], autocast=cfg["amp"] == "bf16")

    def run(views):
        if cfg["variant"] == "naive":
            return naive_tpt(learner, views, autocast(cfg))
        return torch.cat([tpt.adapt_views(views[i:i + cfg["batch"]]) for i in range(0, len(views), cfg["batch"])])

    if device.type == "cuda":  # warm-up outside the timing: kernels, allocator, cuDNN plans for the timed shapes
        run(views[:cfg["batch"]])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    logits = run(views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / cfg["images"]
    result = {"s_per_image": seconds, "peak_mb": peak_memory_mb(device),
              "logits": logits.detach().float().cpu().tolist(), "unadapted": unadapted.tolist()}
    if cfg["variant"] == "promptkit" and cfg["shared_prefix"]:  # once: it does not depend on the text path
        result.update(view_generation(learner, cfg))
    return result


def view_generation(learner, cfg: dict) -> dict:
    """Seconds per image to build the views from 500x375 photos (PIL, ImageNet's typical size): crops
    cut from the full-resolution photo, and AugMix on top, as `TPT.forward` does."""
    from PIL import Image

    import promptkit

    pixels = torch.randint(0, 256, (cfg["images"], 375, 500, 3), generator=torch.Generator().manual_seed(2))
    photos = [Image.fromarray(p.numpy().astype("uint8")) for p in pixels]
    out = {}
    for augment in ("crop", "augmix"):
        tpt = promptkit.TPT(learner, n_views=cfg["views"], augment=augment)
        tpt.views(photos[:1])  # warm-up
        if learner.clip.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tpt.views(photos)
        if learner.clip.device.type == "cuda":
            torch.cuda.synchronize()
        out[f"views_{augment}_s"] = (time.perf_counter() - start) / len(photos)
    return out


def main():
    from common import add_common_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--classes", nargs="+", type=int, default=[200, 1000] if torch.cuda.is_available() else [200])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="images adapted at once by promptkit")
    add_common_args(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from common import PATHS, machine, run_isolated, table

    if args.amp != "none" and not args.device.startswith("cuda"):
        parser.error("--amp: TPT autocasts on CUDA only; use --device cuda")
    rows = []
    for arch in args.archs:
        for classes in args.classes:
            cfg = dict(arch=arch, classes=classes, images=args.images, views=args.views, batch=args.batch,
                       device=args.device, threads=args.threads, amp=args.amp)
            naive = run_isolated(__file__, {**cfg, "variant": "naive"})
            paths = {name: run_isolated(__file__, {**cfg, "variant": "promptkit", "shared_prefix": shared})
                     for name, shared in PATHS.items()}
            a, before = torch.tensor(naive["logits"]), torch.tensor(naive["unadapted"])
            effect = (a - before).abs().max().item()
            row = {"arch": arch, "C": classes, "naive s/image": naive["s_per_image"]}
            for name, fast in paths.items():
                b = torch.tensor(fast["logits"])
                row[f"{name} s/image"] = fast["s_per_image"]
                row[f"{name} speed-up"] = naive["s_per_image"] / fast["s_per_image"]
                row[f"{name} max |Δlogit| / effect"] = (a - b).abs().max().item() / max(effect, 1e-12)
                row[f"{name} top-1 agrees"] = bool((a.argmax(-1) == b.argmax(-1)).all())
            row["naive peak MB"] = naive["peak_mb"]
            row.update({f"{name} peak MB": fast["peak_mb"] for name, fast in paths.items()})
            fast = paths["shared prefix"]
            row["views s/image (crop / AugMix)"] = f"{fast['views_crop_s']:.3g} / {fast['views_augmix_s']:.3g}"
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nTPT, {args.views} views, 1 step, {args.images} images, {args.device}, amp {args.amp}. "
          f"Machine: {machine()}\n")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
