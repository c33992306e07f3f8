"""`adapt_dataset` end to end: TPT over a dataset with per-batch prediction files, then a resume.

    python benchmarks/tta_dataset.py [--arch ViT-B-16] [--classes 1000] [--images 256] [--batch-size 16] [--views 64]
    torchrun --nproc_per_node N benchmarks/tta_dataset.py ...   # the same, sharded over N processes

Random weights (no download) and random images of the model's input size. Prints one JSON line: images/s,
seconds per image and peak memory of the run writing to `--out` (a temporary directory), the bytes stored per
image, and a resume check: the newest half of the batch files is deleted (as if the run had been killed there),
the run resumed, and its predictions compared bitwise with the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import promptkit
from promptkit.tta.runner import FIELDS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--views", type=int, default=64)
    args = parser.parse_args()
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    clip = promptkit.load_clip(args.arch, device=device)
    promptkit.training.distributed.setup(clip.device)
    size = clip.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.images, 3, size, size, generator=generator),
                         torch.randint(0, args.classes, (args.images,), generator=generator))
    data.classnames = [f"class {i}" for i in range(args.classes)]

    def run(out, resume=False):
        learner = promptkit.CoOp(clip, data.classnames, ctx_init="a photo of a")
        adapter = promptkit.TPT(learner, n_views=args.views, augment="crop")
        return promptkit.adapt_dataset(adapter, data, batch_size=args.batch_size, out=out, resume=resume,
                                       progress=False)

    main_rank = promptkit.training.distributed.is_main()
    out = Path(tempfile.mkdtemp(prefix="tta_dataset_")) if main_rank else None
    if torch.distributed.is_initialized():  # every rank writes to rank 0's directory
        shared = [str(out)]
        torch.distributed.broadcast_object_list(shared, src=0)
        out = Path(shared[0])
    full = run(out)
    files = sorted((out / "batches").iterdir())
    stored = sum(f.stat().st_size for f in files)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if main_rank:
        for f in files[len(files) // 2:]:
            f.unlink()
    resumed = run(out, resume=True)
    equal = all(torch.equal(full["predictions"][k], resumed["predictions"][k]) for k in FIELDS)
    if main_rank:
        print(json.dumps({"arch": args.arch, "classes": args.classes, "views": args.views, "ranks": full["ranks"],
                          "device": str(clip.device), "images": full["n"], "batch_size": args.batch_size,
                          "images_per_s": round(full["images_per_s"], 2),
                          "seconds_per_image": round(full["seconds_per_image"], 4),
                          "peak_memory_mb": round(full["peak_memory_mb"], 1),
                          "stored_bytes_per_image": round(stored / full["n"], 1),
                          "resumed_images": resumed["resumed"], "resume_equals_uninterrupted": equal}))
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
