"""`promptkit train` and `promptkit eval` (also the data and model options `promptkit tta` shares)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training.config import TrainConfig, parse_overrides


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="promptkit-tiny", help="open_clip architecture (default: promptkit-tiny)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    parser.add_argument("--data", required=True,
                        help="image folder (root/<class>/<images>), the image root of --split-json, or 'procedural'")
    parser.add_argument("--split-json", default=None, help="CoOp split file (split_zhou_*.json)")
    parser.add_argument("--classes", default="all", choices=["all", "base", "novel"], help="base-to-novel subset")


def load_model(args):
    import torch

    from ..clip import load_clip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_clip(args.arch, args.pretrained, device=device, precision=args.precision)


def load_split(args, clip, split: str, shots: int | None = None, seed: int = 1, photos: bool = False):
    """The dataset for `split` ("train", "val", "test"; "shifted" for the procedural benchmark); image
    files come preprocessed, or as PIL images with `photos`."""
    from ..data import CoOpSplitDataset, ImageFolderDataset, ProceduralBenchmark, few_shot

    if args.data == "procedural":
        return ProceduralBenchmark().split(split, shots=shots, seed=seed, classes=args.classes)
    transform = None if photos else clip.preprocess
    if args.split_json:
        dataset = CoOpSplitDataset(args.data, args.split_json, split, transform=transform)
    else:
        dataset = ImageFolderDataset(args.data, transform=transform)
    dataset = _classes(args, dataset)
    return few_shot(dataset, shots, seed) if shots else dataset


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    add_model_and_data_args(parser)
    if command == "train":
        parser.add_argument("--method", default="coop", help="a registered method (promptkit list-methods)")
        parser.add_argument("--shots", type=int, default=16)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--config", default=None, help="TrainConfig as JSON or YAML")
        parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="TrainConfig fields or method keywords, e.g. epochs=10 n_ctx=4")
    else:
        parser.add_argument("--load", default=None, help="save_pretrained directory (default: zero-shot)")
        parser.add_argument("--split", default="test")
        parser.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_pretrained
    from ..registry import create_learner
    from .trainer import PromptTrainer

    clip = load_model(args)
    if args.command == "eval":
        dataset = (load_split(args, clip, args.split) if (args.split_json or args.data == "procedural")
                   else _folder(args, clip))
        learner = (load_pretrained(args.load, clip, classnames=dataset.classnames) if args.load
                   else create_learner("zeroshot", clip, dataset.classnames))
        metrics = PromptTrainer(learner, TrainConfig(output_dir=None, eval_batch_size=args.batch_size,
                                                     device=str(clip.device))).evaluate(dataset)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()
                          if k != "per_class"}))
        return 0
    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    overrides = parse_overrides(args.overrides)
    fields = set(config.to_dict())
    train_keys = {k: v for k, v in overrides.items() if k in fields}
    method_keys = {k: v for k, v in overrides.items() if k not in fields}
    config = TrainConfig.from_dict({**config.to_dict(), **train_keys, "seed": args.seed, "output_dir": args.out,
                                    "device": str(clip.device)})
    train = load_split(args, clip, "train", shots=args.shots, seed=args.seed)
    val = load_split(args, clip, "val", shots=min(args.shots, 4), seed=args.seed) if (
        args.split_json or args.data == "procedural") else None
    learner = create_learner(args.method, clip, train.classnames, **method_keys)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    config.save(Path(args.out) / "config.json")
    PromptTrainer(learner, config).fit(train, val, resume=args.resume)
    return 0


def _folder(args, clip, photos: bool = False):
    from ..data import ImageFolderDataset

    return _classes(args, ImageFolderDataset(args.data, transform=None if photos else clip.preprocess))


def _classes(args, dataset):
    from ..data import base_novel, select_classes

    if args.classes == "all":
        return dataset
    return select_classes(dataset, getattr(base_novel(dataset.classnames), args.classes))
