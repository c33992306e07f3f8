"""`summary.md` of a sweep: mean +- std over seeds per method and dataset, the protocol's averages (the
harmonic mean for base-to-novel), the published numbers beside them with the difference, and plots."""
from __future__ import annotations

import json
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Sequence

from .sweep import harmonic_mean, mean_std

PUBLISHED = json.loads(resources.files(__package__).joinpath("published.json").read_text())


def _cell(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _by(rows, *keys) -> dict:
    out = defaultdict(list)
    for row in rows:
        out[tuple(row[k] for k in keys)].append(float(row["top1"]))
    return out


def summarize(rows: Sequence[dict], settings: dict) -> tuple[str, dict]:
    """The markdown summary and the points of the accuracy-vs-shots plots ({dataset: {method: {shots: top1}}})."""
    protocol = settings["protocol"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    model = settings["arch"] + (f" ({settings['pretrained']})" if settings["pretrained"] else "")
    lines = [f"# promptkit bench: {protocol}", "",
             f"Model {model}; seeds {' '.join(map(str, settings['seeds']))}; mean ± std over seeds (top-1 %); "
             f"overrides: {settings['overrides'] or 'none'}.", ""]
    plots: dict = {}
    if protocol == "few-shot":
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        acc = _by(rows, "method", "dataset", "shots")
        shots_list = sorted({r["shots"] for r in rows})
        for k in shots_list:
            table = []
            for m in methods:
                if not any((m, d, k) in acc for d in datasets):
                    continue
                cells = [_cell(acc[(m, d, k)]) if (m, d, k) in acc else "–" for d in datasets]
                means = [mean_std(acc[(m, d, k)])[0] for d in datasets if (m, d, k) in acc]
                complete = len(means) == len(datasets)
                table.append([m, *cells, f"{sum(means) / len(means):.2f}" if complete else "–"])
            title = "zero-shot" if k == 0 else f"{k} shots"
            lines += [f"## {title}", "", *_table(["method", *datasets, "average"], table), ""]
        for d in datasets + ["average"]:
            curves = {}
            for m in methods:
                points = {}
                for k in shots_list:
                    if k == 0:
                        continue
                    if d == "average":
                        if all((m, x, k) in acc for x in datasets):
                            points[k] = sum(mean_std(acc[(m, x, k)])[0] for x in datasets) / len(datasets)
                    elif (m, d, k) in acc:
                        points[k] = mean_std(acc[(m, d, k)])[0]
                if points:
                    curves[m] = points
            if curves:
                plots[d] = curves
        lines += _published_section([row for k in shots_list for row in _published_rows(
            protocol, {m: {d: mean_std(acc[(m, d, k)])[0] for d in datasets if (m, d, k) in acc} for m in methods},
            shots=k)])
    elif protocol == "base2novel":
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        acc = _by(rows, "method", "dataset", "classes")
        table, measured = [], defaultdict(dict)
        for m in methods:
            row = [m]
            for d in datasets:
                if (m, d, "base") in acc and (m, d, "novel") in acc:
                    base, novel = mean_std(acc[(m, d, "base")])[0], mean_std(acc[(m, d, "novel")])[0]
                    measured[m][d] = (base, novel, harmonic_mean(base, novel))
                    row.append(f"{_cell(acc[(m, d, 'base')])} / {_cell(acc[(m, d, 'novel')])} / "
                               f"{measured[m][d][2]:.2f}")
                else:
                    row.append("–")
            row.append(_format(_average(list(measured[m].values())))
                       if len(measured[m]) == len(datasets) else "–")
            table.append(row)
        lines += ["## Base / novel / harmonic mean", "",
                  "Per dataset: base ± std / novel ± std / HM of the two means. Average: the mean base and novel "
                  "accuracy over the datasets and their HM (as CoCoOp's tables).", "",
                  *_table(["method", *datasets, "average"], table), ""]
        lines += _published_section(_published_rows(protocol, measured))
    elif protocol == "tta":
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        acc = _by(rows, "method", "dataset")
        table = []
        for m in methods:
            means = [mean_std(acc[(m, d)])[0] for d in datasets if (m, d) in acc]
            table.append([m, *(_cell(acc[(m, d)]) if (m, d) in acc else "–" for d in datasets),
                          f"{sum(means) / len(means):.2f}" if len(means) == len(datasets) else "–"])
        lines += ["## Test-time adaptation (top-1 on each test set)", "",
                  *_table(["method", *datasets, "average"], table), ""]
        lines += _published_section(_published_rows(protocol, _means(acc)))
    else:
        source = settings["source"]
        datasets = [source] + [d for d in dict.fromkeys(r["dataset"] for r in rows) if d != source]
        acc = _by(rows, "method", "dataset")
        table = []
        for m in methods:
            targets = [mean_std(acc[(m, d)])[0] for d in datasets[1:] if (m, d) in acc]
            complete = len(targets) == len(datasets) - 1
            table.append([m, *(_cell(acc[(m, d)]) if (m, d) in acc else "–" for d in datasets),
                          f"{sum(targets) / len(targets):.2f}" if complete and targets else "–"])
        lines += [f"## Trained on {source}, evaluated on the targets", "",
                  *_table(["method", f"{source} (source)", *datasets[1:], "target average"], table), ""]
        lines += _published_section(_published_rows(protocol, _means(acc)))
    return "\n".join(lines), plots


def _means(acc: dict) -> dict:
    """{method: {dataset: mean top-1 over seeds}} from `_by(rows, "method", "dataset")`."""
    out = defaultdict(dict)
    for (m, d), values in acc.items():
        out[m][d] = mean_std(values)[0]
    return out


def _average(values: list):
    """The mean of top-1 values, or of (base, novel, hm) triples: the mean base and novel and their HM."""
    if isinstance(values[0], tuple):
        base, novel = (sum(v[i] for v in values) / len(values) for i in (0, 1))
        return base, novel, harmonic_mean(base, novel)
    return sum(values) / len(values)


def _format(value, signed: bool = False) -> str:
    spec = "+.2f" if signed else ".2f"
    return " / ".join(format(v, spec) for v in value) if isinstance(value, tuple) else format(value, spec)


def _published_value(value):
    """A published.json number as the sweep holds it: a top-1, or a base2novel {base, novel, hm} as a triple."""
    return (value["base"], value["novel"], value["hm"]) if isinstance(value, dict) else value


def _published_rows(protocol: str, measured: dict, shots: int | None = None) -> list[list[str]]:
    """The published ViT-B/16 numbers of `protocol` (published.json; few-shot ones at `shots`) beside the sweep's
    `measured` ({method: {dataset: top-1 or (base, novel, hm)}}): each dataset a source prints and the sweep ran,
    and a source's average, compared only when the sweep ran all the datasets that average is over."""
    rows = []
    for method, entries in PUBLISHED.get(protocol, {}).get("methods", {}).items():
        if method not in measured:
            continue
        ours = measured[method]
        label = f"{method} ({shots} shots)" if shots else method
        for entry in entries:
            if entry.get("shots") != shots:
                continue
            cells = [(d, ours.get(d), v) for d, v in entry.get("per_dataset", {}).items() if d in ours]
            if "average" in entry:
                over = PUBLISHED["dataset_groups"][entry["average_over"]]
                mine = _average([ours[d] for d in over]) if all(d in ours for d in over) else None
                cells.append((f"average ({entry['average_over']})", mine, entry["average"]))
            for dataset, mine, value in cells:
                value = _published_value(value)
                if mine is None:
                    difference = f"– (needs all {len(over)} datasets)"
                else:
                    difference = _format(tuple(a - b for a, b in zip(mine, value)) if isinstance(value, tuple)
                                         else mine - value, signed=True)
                rows.append([label, dataset, "–" if mine is None else _format(mine), _format(value), difference,
                             entry["source"]])
    return rows


def _published_section(rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["Published numbers: none are shipped for these methods under this protocol (promptkit/bench/"
                "published.json says which are).", ""]
    return ["## Against the published ViT-B/16 numbers", "",
            "Difference: this sweep minus the published number; an average is over the datasets named "
            "(promptkit/bench/published.json lists them).", "",
            *_table(["method", "dataset", "this sweep", "published", "difference", "source"], rows), ""]


def write_summary(rows: Sequence[dict], settings: dict, out: Path) -> Path:
    text, plots = summarize(rows, settings)
    made = []
    if plots:
        try:
            from ..plots import plot_accuracy_vs_shots

            for dataset, curves in plots.items():
                made.append(plot_accuracy_vs_shots(curves, out / "plots" / f"{dataset}.png",
                                                   title=f"{dataset}: top-1 vs shots"))
        except ImportError:  # matplotlib is optional: the tables are the result
            text += "\n(plots need matplotlib: pip install 'clip-promptkit[plots]')\n"
    if made:
        text += "\n## Accuracy vs shots\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in made) + "\n"
    path = out / "summary.md"
    path.write_text(text)
    return path
