"""`promptkit data list` and `promptkit data check NAME --root DIR`."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    sub.add_parser("list", help="the dataset recipes, their folders and layouts")
    check = sub.add_parser("check", help="check a dataset folder against its recipe and say what to fix")
    check.add_argument("name", help="a dataset recipe, e.g. caltech101, imagenet_a (promptkit data list)")
    check.add_argument("--root", required=True, help="the data root that holds the dataset's folder (CoOp's $DATA)")
    check.add_argument("--quick", action="store_true", help="do not open every image (only check that it exists)")


def run(args: argparse.Namespace) -> int:
    from .benchmarks import RECIPES, check_benchmark, dataset_folder, layout

    if args.data_command == "list":
        for name, recipe in RECIPES.items():
            print(f"{name:16s} {recipe['title']:16s} {layout(name)}")
        return 0
    report = check_benchmark(args.name, args.root, verify_images=not args.quick)
    recipe = RECIPES[report.name]
    where = dataset_folder(report.name, args.root)
    counts = ", ".join(f"{split} {n}" for split, n in report.counts.items())
    print(f"{recipe['title']} at {where}: {report.n_classes if report.n_classes is not None else '?'} classes"
          + (f"; {counts}" if counts else ""))
    for note in report.notes:
        print(f"  note: {note}")
    for problem in report.problems:
        print(f"  problem: {problem}")
    if report.problems:
        print(f"  expected layout: {layout(report.name)}")
        if not any(recipe["source"] in problem for problem in report.problems):
            print(f"  source: {recipe['source']}")
        return 1
    print("  ok")
    return 0
