"""`promptkit bench --protocol P --methods ... --root DATA --out DIR [key=value ...]`."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    from .sweep import PROTOCOLS

    parser.add_argument("--protocol", required=True, choices=list(PROTOCOLS),
                        help="few-shot, base2novel, cross-dataset, domain-generalization or tta")
    parser.add_argument("--methods", nargs="+", required=True, help="registered methods (promptkit list-methods)")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="dataset recipes (promptkit data list); for cross-dataset and domain-generalization "
                             "the targets (default: the protocol's datasets)")
    parser.add_argument("--shots", nargs="+", type=int, default=None,
                        help="shots per class (default: 1 2 4 8 16 for few-shot, else 16)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--source", default=None, help="training set of cross-dataset / domain-generalization "
                                                       "(default imagenet; photo with --root procedural)")
    parser.add_argument("--root", required=True, help="data root holding the datasets' folders (CoOp's $DATA), "
                                                      "or 'procedural' (the embedded benchmark's domains)")
    parser.add_argument("--out", required=True, help="the sweep's folder; rerunning skips finished cells")
    parser.add_argument("--arch", default="promptkit-tiny", help="open_clip architecture (default: promptkit-tiny)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--cache-dir", default=None, help="open_clip's download cache")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="TrainConfig values over every recipe, e.g. epochs=1; with --protocol tta the "
                             "adapters' keywords, e.g. n_views=8 (part of the sweep's settings)")


def run(args: argparse.Namespace) -> int:
    import typing

    from ..training.cli import FLAG_FIELDS, check_value, load_model
    from ..training.config import TrainConfig, parse_overrides
    from .sweep import run_bench

    overrides = parse_overrides(args.overrides)
    if args.protocol == "tta":  # adapter keywords, e.g. n_views=8 steps=1
        from ..registry import ADAPTERS
        from ..tta import TDA  # noqa: F401  (registers the adapters)
        from ..training.cli import keyword_types

        for method in args.methods:
            if method in ADAPTERS.names():
                keywords = keyword_types(ADAPTERS.get(method))
                for key, value in overrides.items():
                    if key not in keywords:
                        raise ValueError(f"unknown key {key!r} for {method}; its keywords: {', '.join(keywords)}")
                    check_value(key, value, keywords[key], method)
    hints = {} if args.protocol == "tta" else typing.get_type_hints(TrainConfig)
    for key, value in (overrides.items() if hints else ()):
        if key in FLAG_FIELDS or key not in hints:
            raise ValueError(f"{key}={value}: bench overrides are TrainConfig fields other than "
                             f"{', '.join(FLAG_FIELDS)}: {', '.join(k for k in hints if k not in FLAG_FIELDS)}")
        check_value(key, value, hints[key], "TrainConfig")
    clip = load_model(args)
    run_bench(clip, args.protocol, args.methods, args.root, args.out, datasets=args.datasets, shots=args.shots,
              seeds=args.seeds, source=args.source, overrides=overrides,
              model={"arch": args.arch, "pretrained": args.pretrained, "precision": args.precision,
                     "quick_gelu": args.quick_gelu})
    return 0
