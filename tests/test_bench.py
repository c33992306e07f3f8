"""`promptkit bench` end to end on fake CoOp trees with the embedded tiny model: tables, resume, the feature
cache, base-to-novel harmonic means, cross-dataset / domain-generalisation cells, and refused requests."""
import copy
import csv
import os
import shutil

import pytest
import torch

import promptkit
from benchmark_trees import make_tree
from promptkit.bench import PUBLISHED, FeatureCache, harmonic_mean, model_digest, run_bench, summarize
from promptkit.cli import main
from promptkit.data import FEW_SHOT_DATASETS, SHIFTS, load_benchmark

QUICK = {"epochs": 1, "batch_size": 4, "cache_passes": 1}


@pytest.fixture(scope="module")
def clip():
    return promptkit.load_clip("promptkit-tiny")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("eurosat", "dtd"):
        make_tree(root, name, n_classes=4, per_split=(3, 2, 3))
    for name in ("imagenet", "imagenet_r"):
        make_tree(root, name)
    return root


def _rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_few_shot_sweep_tables_rerun_and_resume(clip, root, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["bench", "--protocol", "few-shot", "--methods", "zeroshot", "coop", "--datasets", "eurosat", "dtd",
            "--shots", "1", "2", "--seeds", "1", "2", "--root", str(root), "--out", str(out), "epochs=1",
            "cache_passes=1", "batch_size=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "10 cells: 0 already finished, 8 trained (0 resumed); evaluation features: 8 reused, 2 computed" in printed
    rows = _rows(out)
    assert len(rows) == 2 + 2 * 2 * 2 and {r["method"] for r in rows} == {"zeroshot", "coop"}
    # one feature file per test set, shared by every method and seed
    assert len(list((out / "features").glob("*.safetensors"))) == 2
    coop = [float(r["top1"]) for r in rows if r["method"] == "coop" and r["dataset"] == "dtd" and r["shots"] == "2"]
    mean = sum(coop) / 2
    std = (sum((v - mean) ** 2 for v in coop) / 1) ** 0.5
    summary = (out / "summary.md").read_text()
    assert f"{mean:.2f} ± {std:.2f}" in summary.split("## 2 shots")[1].split("##")[0]
    assert (out / "plots" / "average.png").is_file() and (out / "plots" / "dtd.png").is_file()
    # zero-shot equals a direct evaluation of zero-shot CLIP on the test split
    test = load_benchmark("dtd", root, "test", promptkit.load_clip("promptkit-tiny").preprocess)
    zs = promptkit.create_learner("zeroshot", clip, test.classnames, dataset="dtd")
    with torch.no_grad():
        images = torch.stack([test[i][0] for i in range(len(test))])
        direct = 100 * (zs(images).argmax(1) == torch.tensor(test.targets)).float().mean().item()
    assert float(next(r["top1"] for r in rows if r["method"] == "zeroshot" and r["dataset"] == "dtd")) == \
        pytest.approx(direct, abs=1e-3)

    # rerun: nothing to do, the same table
    assert main(argv) == 0
    assert "10 cells: 10 already finished, 0 trained" in capsys.readouterr().out
    assert _rows(out) == rows
    # an interrupted cell: its checkpoint is there, its prompts and evaluation are not -> resumed, same number
    cell = out / "cells/coop/eurosat/2shot/seed1"
    shutil.rmtree(cell / "prompts")
    (cell / "eval/eurosat-all.json").unlink()
    assert main(argv) == 0
    assert "1 trained (1 resumed)" in capsys.readouterr().out
    assert _rows(out) == rows

    # another sweep configuration into the same folder is refused, naming the setting; nothing is lost
    with pytest.raises(ValueError, match=r"holds a sweep with other settings \(overrides: \{'epochs': 1, "
                                         r"'cache_passes': 1, 'batch_size': 4\} there, \{'epochs': 2\} now\)"):
        run_bench(clip, "few-shot", ["coop"], root, out, datasets=["dtd"], shots=[1], seeds=[1],
                  overrides={"epochs": 2}, model={"arch": "promptkit-tiny", "pretrained": None})
    assert _rows(out) == rows


def test_base_to_novel_harmonic_mean(clip, root, tmp_path):
    out = tmp_path / "b2n"
    rows = run_bench(clip, "base2novel", ["coop"], root, out, datasets=["eurosat"], shots=[1], seeds=[1, 2],
                     overrides=QUICK, log=lambda _: None)
    assert {(r["classes"], r["n"]) for r in rows} == {("base", 7), ("novel", 7)}  # 2 + 2 classes, 3 + 4 test images
    # trained once per seed on the two base classes
    assert sorted(p.parent.name for p in (out / "cells/coop/eurosat-base/1shot").glob("*/prompts")) == \
        ["seed1", "seed2"]
    base = sum(r["top1"] for r in rows if r["classes"] == "base") / 2
    novel = sum(r["top1"] for r in rows if r["classes"] == "novel") / 2
    summary = (out / "summary.md").read_text()
    assert f"{base:.2f} / {novel:.2f} / {harmonic_mean(base, novel):.2f}" in summary
    assert "| coop | " in summary.split("published ViT-B/16")[1] and "82.69 / 63.22 / 71.66" in summary
    assert "needs all 11 datasets" in summary
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)


def test_cross_dataset_and_domain_generalization(clip, root, tmp_path):
    out = tmp_path / "xd"
    rows = run_bench(clip, "cross-dataset", ["coop"], root, out, datasets=["dtd"], seeds=[1], shots=[1],
                     source="eurosat", overrides=QUICK, log=lambda _: None)
    # one training on the source, evaluated on the source and the target with each one's classes
    assert [(r["train"], r["dataset"]) for r in rows] == [("eurosat", "eurosat"), ("eurosat", "dtd")]
    assert len(list((out / "cells/coop").rglob("prompts"))) == 1
    assert "eurosat (source) | dtd | target average" in (out / "summary.md").read_text()
    out = tmp_path / "dg"
    rows = run_bench(clip, "domain-generalization", ["zeroshot"], root, out, datasets=["imagenet_r"],
                     log=lambda _: None)
    # ImageNet-R is evaluated over its 200 classes (one fake image per class)
    assert [(r["dataset"], r["n"]) for r in rows] == [("imagenet", 1000), ("imagenet_r", 200)]


def test_procedural_quick(tmp_path, capsys):
    argv = ["bench", "--protocol", "few-shot", "--methods", "zeroshot", "coop", "--shots", "1", "--seeds", "1",
            "--datasets", "sketch", "--root", "procedural", "--out", str(tmp_path / "p"), "epochs=1"]
    assert main(argv) == 0
    assert "evaluation features" not in capsys.readouterr().out  # tensors: encoded once in memory
    rows = _rows(tmp_path / "p")
    assert [(r["method"], r["dataset"]) for r in rows] == [("zeroshot", "sketch"), ("coop", "sketch")]
    assert all(0 <= float(r["top1"]) <= 100 and int(r["n"]) == 48 * 8 for r in rows)


def test_feature_cache_key(clip, root, tmp_path):
    cache = FeatureCache(tmp_path, clip)
    test = load_benchmark("dtd", root, "test", clip.preprocess)
    key = cache.key(test)
    assert key == FeatureCache(tmp_path, clip).key(load_benchmark("dtd", root, "test", clip.preprocess))
    assert key != cache.key(load_benchmark("dtd", root, "test", promptkit.data.train_transform(clip)))
    assert key != cache.key(load_benchmark("dtd", root, "val", clip.preprocess))
    other = copy.deepcopy(clip)
    with torch.no_grad():
        next(other.model.parameters()).view(-1)[0] += 1
    assert model_digest(other) != model_digest(clip) and FeatureCache(tmp_path, other).key(test) != key
    path = test.samples[0][0]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file changed
    assert cache.key(test) != key


@pytest.mark.parametrize("kwargs, error, match", [
    ({"seeds": [1, 1]}, ValueError, "--seeds repeats 1: each value once"),
    ({"methods": ["cocoop"]}, ValueError, "method cocoop is unknown to the few-shot protocol: cocoop has no few-shot "
                                          "recipe"),
    ({"methods": ["nope"]}, ValueError, "unknown method 'nope'; methods:"),
    ({"datasets": ["ucf101"]}, FileNotFoundError, "the sweep cannot start: UCF101 folder .* does not exist"),
    ({"datasets": ["imagenet_a"]}, ValueError, "trains on each dataset; imagenet_a have only a test split"),
    ({"protocol": "domain-generalization", "datasets": ["dtd"]}, ValueError,
     "evaluates on imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r; not dtd"),
])
def test_refused_requests(clip, root, tmp_path, kwargs, error, match):
    request = {"protocol": "few-shot", "methods": ["coop"], "datasets": ["dtd"], "seeds": [1], "shots": [1], **kwargs}
    with pytest.raises(error, match=match):
        run_bench(clip, request.pop("protocol"), request.pop("methods"), root, tmp_path / "out", **request,
                  overrides=QUICK)
    assert not (tmp_path / "out" / "cells").exists()


def test_split_file_of_another_dataset_is_refused(clip, root, tmp_path):
    data = tmp_path / "data"
    make_tree(data, "dtd")
    make_tree(data, "eurosat")
    shutil.copy(data / "eurosat/split_zhou_EuroSAT.json", data / "dtd/split_zhou_DescribableTextures.json")
    with pytest.raises(ValueError, match="is not DTD's split file: its classes .* are EuroSAT's"):
        run_bench(clip, "few-shot", ["coop"], data, tmp_path / "out", datasets=["dtd"], seeds=[1], shots=[1])


def test_tta_protocol(clip, root, tmp_path):
    rows = run_bench(clip, "tta", ["zeroshot", "zero", "tpt"], root, tmp_path / "a", datasets=["dtd"], seeds=[1],
                     overrides={"n_views": 4}, log=lambda _: None)
    assert [(r["method"], r["dataset"], r["n"]) for r in rows] == [("zeroshot", "dtd", 14), ("zero", "dtd", 14),
                                                                   ("tpt", "dtd", 14)]
    again = run_bench(clip, "tta", ["zero", "tpt"], root, tmp_path / "b", datasets=["dtd"], seeds=[1],
                      overrides={"n_views": 4}, log=lambda _: None)
    assert [r["top1"] for r in again] == [r["top1"] for r in rows[1:]]  # a seed fixes the views
    assert "| tpt |" in (tmp_path / "a" / "summary.md").read_text()
    with pytest.raises(ValueError, match=r"method coop is unknown to the tta protocol: it runs test-time adapters"):
        run_bench(clip, "tta", ["coop"], root, tmp_path / "c", datasets=["dtd"])
    with pytest.raises(ValueError, match="the tta protocol trains nothing: leave out --shots"):
        run_bench(clip, "tta", ["tpt"], root, tmp_path / "c", datasets=["dtd"], shots=[16])


def test_published_numbers_are_consistent():
    """Every published number has a source, canonical dataset names and a known method; each base2novel HM is the
    harmonic mean of its base and novel and each average the mean of its datasets (catches transcription slips)."""
    canonical = set(FEW_SHOT_DATASETS) | set(SHIFTS)
    known = set(promptkit.list_methods()) | set(promptkit.list_adapters())
    groups = PUBLISHED["dataset_groups"]
    assert set(PUBLISHED) == {"_about", "dataset_groups", "few-shot", "base2novel", "cross-dataset",
                              "domain-generalization", "tta"}
    assert all(over and set(over) <= canonical for over in groups.values())
    harmonic_checked = averages_checked = 0
    for protocol, block in PUBLISHED.items():
        if protocol in ("_about", "dataset_groups"):
            continue
        for method, entries in block["methods"].items():
            assert method in known and entries, (protocol, method)
            for entry in entries:
                assert "@" in entry["source"] and ": " in entry["source"], entry  # repo@commit: file:line
                per_dataset = entry.get("per_dataset", {})
                assert set(per_dataset) <= canonical and (per_dataset or "average" in entry), entry
                assert ("average" in entry) == ("average_over" in entry), entry
                for value in [*per_dataset.values(), *([entry["average"]] if "average" in entry else [])]:
                    if isinstance(value, dict):
                        assert set(value) == {"base", "novel", "hm"}, entry
                        assert harmonic_mean(value["base"], value["novel"]) == pytest.approx(value["hm"], abs=0.01)
                        harmonic_checked += 1
                    else:
                        assert 0 < value < 100, entry
                assert ("shots" in entry) == (protocol == "few-shot"), entry
                over = groups[entry["average_over"]] if "average" in entry else []
                if over and set(over) <= set(per_dataset):
                    # numbers printed to 1 decimal average to within 0.05 of the printed average, to 2 within 0.005
                    decimals = max(len(repr(float(v)).split(".")[1]) for v in [*per_dataset.values(), entry["average"]])
                    mean = sum(per_dataset[d] for d in over) / len(over)
                    assert mean == pytest.approx(entry["average"], abs=0.5 * 10 ** -decimals + 0.005), entry
                    averages_checked += 1
    assert harmonic_checked and averages_checked


def _summary(protocol, cells, source=None, shots=None):
    """summarize() over synthetic rows: two seeds per (method, dataset), top-1 `value` -+ 1."""
    rows = [{"method": m, "dataset": d, "top1": v + delta, "shots": shots} for (m, d), v in cells.items()
            for delta in (-1, 1)]
    settings = {"protocol": protocol, "arch": "ViT-B-16", "pretrained": "openai", "seeds": [1, 2], "overrides": {},
                "source": source}
    return summarize(rows, settings)[0].split("published ViT-B/16")[1]


def test_summary_shows_published_numbers_and_differences():
    targets = [d for d in FEW_SHOT_DATASETS if d != "imagenet"]
    cells = {("cocoop", d): 50.0 + i for i, d in enumerate(targets)} | {("cocoop", "imagenet"): 90.0}
    mine = sum(50.0 + i for i in range(len(targets))) / len(targets)  # the source's 90 is not a target
    summary = _summary("cross-dataset", cells, "imagenet")
    source = "ThomasWangY/2024-AAAI-HPT@f3c3f98: README.md:50 (CoCoOp as reported by HPT)"
    assert f"| cocoop | average (10 targets) | {mine:.2f} | 65.74 | {mine - 65.74:+.2f} | {source} |" in summary
    assert "| cocoop | imagenet | 90.00 | 71.02 | +18.98 |" in summary  # the source is compared, not averaged
    assert f"| cocoop | dtd | {50 + targets.index('dtd'):.2f} | 45.73 | {50 + targets.index('dtd') - 45.73:+.2f} |" \
        in summary
    del cells[("cocoop", "dtd")]
    summary = _summary("cross-dataset", cells, "imagenet")
    assert "| cocoop | average (10 targets) | – | 65.74 | – (needs all 10 datasets) |" in summary
    assert "| cocoop | dtd |" not in summary

    shifts = {"imagenet_v2": 60.0, "imagenet_sketch": 45.0, "imagenet_a": 52.5, "imagenet_r": 80.0}
    cells = {("cocoop", d): v for d, v in shifts.items()} | {("cocoop", "imagenet"): 71.0}
    summary = _summary("domain-generalization", cells, "imagenet")
    assert "| cocoop | imagenet_a | 52.50 | 50.63 | +1.87 |" in summary
    assert "| cocoop | imagenet_r | 80.00 | 76.18 | +3.82 |" in summary
    assert f"| cocoop | average (4 shifts) | 59.38 | 59.91 | {59.375 - 59.91:+.2f} |" in summary
    assert "| cocoop | imagenet | 71.00 | 71.02 | -0.02 | ThomasWangY/2024-AAAI-HPT" in summary

    cells = {("tpt", d): v for d, v in shifts.items()} | {("zeroshot", d): v for d, v in shifts.items()
                                                          if d != "imagenet_r"}
    summary = _summary("tta", cells)
    assert "| tpt | imagenet_a | 52.50 | 54.77 | -2.27 | jameelhassan/PromptAlign" in summary
    assert "| tpt | imagenet_a | 52.50 | 52.60 | -0.10 | ashshaksharifdeen/O-TPT" in summary
    assert "| tpt | imagenet_v2 | 60.00 | 63.00 | -3.00 |" in summary and "64.35" not in summary
    assert "| tpt | average" not in summary  # none shipped for TPT
    assert "| zeroshot | imagenet_sketch | 45.00 | 46.06 | -1.06 |" in summary
    assert "| zeroshot | average (4 shifts) | – | 57.20 | – (needs all 4 datasets) |" in summary
    assert "| zeroshot | imagenet_r |" not in summary  # not in this sweep

    cells = {("coop", d): 70.0 for d in FEW_SHOT_DATASETS}
    summary = _summary("few-shot", cells, shots=16)
    assert "| coop (16 shots) | eurosat | 70.00 | 84.90 | -14.90 | MarcLafon/gallop" in summary
    assert "| coop (16 shots) | average (11 datasets) | 70.00 | 79.90 | -9.90 |" in summary
    assert "published ViT-B/16" not in summarize([{**r, "shots": 8} for r in [
        {"method": "coop", "dataset": "dtd", "top1": 1.0}]], {"protocol": "few-shot", "arch": "a", "pretrained": None,
                                                             "seeds": [1], "overrides": {}})[0]  # none at 8 shots

@pytest.mark.slow
def test_torchrun_sweep_equals_one_process(clip, root, tmp_path):
    """Two gloo processes share every cell (the trainer splits each batch, evaluation and the feature cache are
    sharded): the same prompts (up to float summation order), the same table and features, files written once
    by rank 0, and a finished cell in the folder is skipped by both ranks."""
    import subprocess
    import sys

    from promptkit.checkpoint import load_tensors

    sweep = ["bench", "--protocol", "few-shot", "--datasets", "eurosat", "--shots", "1", "--seeds", "1", "--root",
             str(root), "epochs=2", "batch_size=4", "cache_passes=1"]
    methods = ["zeroshot", "coop", "promptsrc", "tip-adapter"]
    assert main([*sweep, "--methods", *methods, "--out", str(tmp_path / "one")]) == 0
    assert main([*sweep, "--methods", "zeroshot", "--out", str(tmp_path / "two")]) == 0  # finished before torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29571", "-m", "promptkit.cli", *sweep, "--methods", *methods, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("4 cells: 1 already finished, 3 trained (0 resumed)") == 1, two.stdout  # rank 0 logs
    assert "2 processes" in two.stdout
    one_rows, two_rows = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [(r["method"], r["top1"], r["n"]) for r in two_rows] == [(r["method"], r["top1"], r["n"]) for r in one_rows]
    for method in ("coop", "promptsrc", "tip-adapter"):
        path = f"cells/{method}/eurosat/1shot/seed1/prompts/prompt_weights.safetensors"
        a, b = load_tensors(tmp_path / "one" / path), load_tensors(tmp_path / "two" / path)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    (a,), (b,) = ([load_tensors(p) for p in (tmp_path / d / "features").glob("*.safetensors")] for d in ("one", "two"))
    assert torch.equal(a["labels"], b["labels"])  # the shards are put back in dataset order
    torch.testing.assert_close(b["features"], a["features"], atol=1e-5, rtol=0)
    assert not list((tmp_path / "two").rglob("*.tmp*"))  # no half-written file left by a second writer


def test_stream_adapter_is_refused_under_torchrun(root):
    from promptkit.bench.sweep import check_request

    assert check_request("tta", ["tda", "tpt"], ["dtd"], [0], [1], str(root), "imagenet") == ["dtd"]
    with pytest.raises(ValueError, match="tda adapts as one stream .* 2 processes cannot split: run its cells "
                                         "without torchrun"):
        check_request("tta", ["tpt", "tda"], ["dtd"], [0], [1], str(root), "imagenet", world=2)
