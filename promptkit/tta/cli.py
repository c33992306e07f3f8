"""`promptkit tta`: test-time adaptation over a dataset; prints top-1, top-5, ECE, seconds per image and peak
memory as one JSON line. Under `torchrun` the batches are shared out over the ranks (`runner.adapt_dataset`)."""
from __future__ import annotations

import argparse
import json

import torch

from ..training.cli import (_folder, add_load_args, add_model_and_data_args, check_value, has_splits, keyword_types,
                            load_model, load_split)


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_and_data_args(parser)
    parser.add_argument("--method", default="tpt", help="a registered test-time adapter: tpt, ctpt, zero or tda")
    add_load_args(parser, "zero-shot CLIP, as a CoOp context 'a photo of a' for TPT/C-TPT")
    parser.add_argument("--split", default=None, help="split to adapt on (default: test; 'shifted' for procedural)")
    parser.add_argument("--batch-size", type=int, default=16, help="test images adapted at once")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (in a seeded order)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (0: in the main process)")
    parser.add_argument("--dataset", default=None,
                        help="the authors' settings for this dataset (e.g. imagenet, imagenet_a, dtd): views, "
                             "lambda, caches, classifier templates; default: the adapter's own defaults")
    parser.add_argument("--out", default=None,
                        help="directory for the predictions, written batch by batch (top-k logits, label), so that "
                             "--resume can continue a killed run")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: finished batches are read back, not adapted again")
    parser.add_argument("--independent-streams", action="store_true",
                        help="TDA under torchrun: one independent stream (own caches) per rank, over 1/N of the "
                             "batches; without it TDA refuses more than one process")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="adapter keywords, e.g. steps=1 n_views=64")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_pretrained
    from ..learners import CoOp, ZeroShotCLIP
    from ..registry import ADAPTERS, create_adapter
    from ..training import distributed
    from ..training.config import parse_overrides
    from . import TDA  # noqa: F401  (registers the adapters)
    from .defaults import adapter_defaults, classifier_templates
    from .runner import adapt_dataset, check_ranks

    adapter_cls = ADAPTERS.get(args.method)
    adapter_defaults(adapter_cls.method, args.dataset)  # an unknown dataset name fails before the model loads
    keywords, overrides = keyword_types(adapter_cls), parse_overrides(args.overrides)
    for key, value in overrides.items():  # checked before the model loads
        if key not in keywords:
            raise ValueError(f"unknown key {key!r}; {args.method} keywords: {', '.join(keywords)}")
        check_value(key, value, keywords[key], args.method)
    check_ranks(adapter_cls, distributed.world_size(), args.independent_streams)
    if args.resume and not args.out:
        raise ValueError("--resume continues the run in --out DIR: pass --out too")
    splits = has_splits(args)
    clip = load_model(args)
    distributed.setup(clip.device)
    split = args.split or ("shifted" if args.data == "procedural" else "test")
    # Image files reach the adapter as PIL images: as in TPT, crops are cut from the full-resolution photo.
    dataset = load_split(args, clip, split, photos=True) if splits else _folder(args, clip, photos=True)
    if args.load:
        learner = load_pretrained(args.load, clip, strict=args.strict, classnames=dataset.classnames)
    elif adapter_cls.method in ("tpt", "ctpt"):
        learner = CoOp(clip, dataset.classnames, ctx_init="a photo of a")
    else:
        learner = ZeroShotCLIP(clip, dataset.classnames, templates=classifier_templates(args.method, args.dataset))
    try:
        adapter = create_adapter(args.method, learner, dataset=args.dataset, **overrides)
    except TypeError as err:  # a learner TPT cannot tune: a user mistake
        raise ValueError(f"{args.method}: {err}") from err
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:args.limit].tolist()
    result = adapt_dataset(adapter, dataset, batch_size=args.batch_size, indices=order, out=args.out,
                           resume=args.resume, workers=args.workers, independent_streams=args.independent_streams,
                           description=f"{args.method} on {split}")
    if distributed.is_main():
        print(json.dumps({"method": args.method, "split": split, "top1": round(result["top1"], 2),
                          "top5": round(result["top5"], 2), "ece": round(result["ece"], 2), "n": result["n"],
                          "adapted": result["adapted"], "resumed": result["resumed"], "ranks": result["ranks"],
                          "images_per_s": _round(result["images_per_s"], 2),
                          "seconds_per_image": _round(result["seconds_per_image"], 4),
                          "peak_memory_mb": round(result["peak_memory_mb"], 1)}))
    return 0


def _round(value, digits):
    return None if value is None else round(value, digits)
