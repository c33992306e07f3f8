"""Dataset recipes on fake trees in CoOp's exact layouts: classes, names, split sizes, A/R subsets, CoOp's
few-shot draw, base/novel, `promptkit data check` and its errors."""
import json
import math
import random
import shutil
from collections import defaultdict

import pytest

from benchmark_trees import make_tree
from promptkit.cli import main
from promptkit.data import check_benchmark, load_benchmark
from promptkit.data.benchmarks import (CLASSES, IMAGENET_NAMES, IMAGENET_WNIDS, RECIPES, _val_is_test, benchmark_name,
                                       class_indices, splits_of)
from promptkit.data.folders import VAL_SHOTS

SPLIT_FILE_DATASETS = [n for n, r in RECIPES.items() if r["kind"] == "split_json"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in RECIPES:
        make_tree(root, name)
    return root


@pytest.mark.parametrize("name", [n for n in RECIPES if RECIPES[n]["kind"] in ("split_json", "fgvc")])
def test_split_datasets_classes_and_sizes(data_root, name):
    recipe = RECIPES[name]
    shipped = CLASSES[recipe["classes"]][:4]
    extra = 0 if recipe["kind"] == "fgvc" else 2  # make_tree gives every odd label one more image per split
    for split, per_class in zip(("train", "val", "test"), (5, 2, 3)):
        dataset = load_benchmark(name, data_root, split)
        assert dataset.classnames == [c.replace("_", " ") for c in shipped]
        assert len(dataset) == 4 * per_class + extra
        assert sorted(set(dataset.targets)) == [0, 1, 2, 3]
    report = check_benchmark(name, data_root)
    assert report.ok and report.n_classes == 4 and report.counts["train"] == 20 + extra


def test_renamed_class_names_are_coops():
    # EuroSAT's and Caltech101's split files carry CoOp's renamed classes; the shipped lists are those names.
    assert all(new in CLASSES["eurosat"] for new in RECIPES["eurosat"]["renamed"].values())
    assert "AnnualCrop" not in CLASSES["eurosat"]
    assert {"airplane", "face", "leopard", "motorbike"} <= set(CLASSES["caltech101"])
    assert not set(RECIPES["caltech101"]["ignored"]) & set(CLASSES["caltech101"])
    counts = {n: len(CLASSES[RECIPES[n]["classes"]]) for n in SPLIT_FILE_DATASETS + ["fgvc_aircraft"]}
    assert counts == {"caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
                      "food101": 101, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101, "fgvc_aircraft": 100}


@pytest.mark.parametrize("name", list(RECIPES))
def test_published_sizes_are_consistent(name):
    # The shipped sizes against the shipped class lists and CoOp's protocol, not against a second copy of the
    # numbers: `data check` has a published size for every split it compares, every class fits in every split
    # (CoOp's splits hold each class in each split), a few-shot train split has room for CoOp's largest draw
    # (16 per class) and its val split for the min(16, 4) val images per class; each recipe names its source.
    recipe = RECIPES[name]
    sizes = recipe["sizes"]
    assert set(sizes) == {"test" if split == "val" and _val_is_test(name) else split for split in splits_of(name)}
    n_classes = len(CLASSES[recipe["classes"]]) if recipe["kind"] in ("split_json", "fgvc") else len(
        class_indices(name))
    assert all(type(n) is int and n >= n_classes for n in sizes.values()), sizes
    if "train" in sizes:
        assert sizes["train"] >= 16 * n_classes
    if "val" in sizes:
        assert sizes["val"] >= VAL_SHOTS * n_classes
    assert recipe["sizes_source"].strip()


def test_imagenet_family(data_root):
    assert len(IMAGENET_WNIDS) == len(set(IMAGENET_WNIDS)) == 1000 and IMAGENET_WNIDS == sorted(IMAGENET_WNIDS)
    train = load_benchmark("imagenet", data_root, "train")
    # CLIP's names (CoOp's classnames.txt), with the two it gives twice named by their WordNet lemmas
    names = list(IMAGENET_NAMES)
    assert names[657] == names[744] == "missile" and names[836] == names[837] == "sunglasses"
    names[744], names[836] = "projectile", "sunglass"
    assert train.classnames == names and len(set(names)) == 1000 and len(train) == 2000
    # CoOp evaluates (and validates) ImageNet on its val folder
    assert [str(p) for p, _ in load_benchmark("imagenet", data_root, "val").samples] == \
        [str(p) for p, _ in load_benchmark("imagenet", data_root, "test").samples]
    for name in ("imagenet_v2", "imagenet_sketch"):
        test = load_benchmark(name, data_root, "test")
        assert test.classnames == names and sorted(set(test.targets)) == list(range(1000))
        assert splits_of(name) == ("test",)
    a, r = (load_benchmark(n, data_root, "test") for n in ("imagenet_a", "imagenet_r"))
    for subset, dataset in ((CLASSES["imagenet_a"], a), (CLASSES["imagenet_r"], r)):
        assert len(subset) == len(set(subset)) == 200 and subset == sorted(subset) and 0 <= min(subset)
        assert dataset.classnames == [names[i] for i in subset]
        assert sorted(set(dataset.targets)) == list(range(200))
        # label i is the folder of the i-th class's WordNet id
        assert all(p.parent.name == IMAGENET_WNIDS[subset[t]] for p, t in dataset.samples)
    assert a.classnames[:3] == ["stingray", "goldfinch", "junco"] and r.classnames[:2] == ["goldfish",
                                                                                          "great white shark"]
    assert len(set(CLASSES["imagenet_a"]) & set(CLASSES["imagenet_r"])) < 200


def _dassl_draw(items, labels, shots, seed, val=None):
    """Dassl's generate_fewshot_dataset as CoOp calls it, transcribed: global `random`, seeded once."""
    random.seed(seed)
    out = []
    for source, k in ((items, shots), *(((val, min(shots, 4)),) if val else ())):
        tracker = defaultdict(list)
        for item in source:
            tracker[labels[item]].append(item)
        drawn = []
        for members in tracker.values():
            drawn.extend(random.sample(members, k) if len(members) >= k else members)
        out.append(drawn)
    return out


def test_few_shot_draw_is_coops(data_root):
    name = "dtd"
    make_tree(data_root / "big", name, n_classes=6, per_split=(20, 9, 2))
    root = data_root / "big"
    split = json.loads((root / "dtd" / RECIPES[name]["split_file"]).read_text())
    labels = {rel: label for s in split.values() for rel, label, _ in s}
    for shots, seed in ((1, 1), (4, 2), (16, 3)):
        train_ref, val_ref = _dassl_draw([r for r, _, _ in split["train"]], labels, shots, seed,
                                         [r for r, _, _ in split["val"]])
        train = load_benchmark(name, root, "train", shots=shots, seed=seed)
        val = load_benchmark(name, root, "val", shots=shots, seed=seed)
        rel = [str(train.dataset.samples[i][0].relative_to(root / "dtd" / "images")) for i in train.indices]
        assert rel == train_ref
        assert [str(val.dataset.samples[i][0].relative_to(root / "dtd" / "images")) for i in val.indices] == val_ref
        # classes with fewer images than the shots are kept whole, as Dassl
        assert len(train) == sum(min(shots, 20 + label % 2) for label in range(6))
    first, again = (load_benchmark(name, root, "train", shots=4, seed=1).indices for _ in range(2))
    assert first == again != load_benchmark(name, root, "train", shots=4, seed=2).indices


def test_base_novel_halves(data_root):
    make_tree(data_root / "odd", "ucf101", n_classes=5)
    root = data_root / "odd"
    full = load_benchmark("ucf101", root, "test")
    base = load_benchmark("ucf101", root, "test", classes="base")
    novel = load_benchmark("ucf101", root, "test", classes="novel")
    assert base.classnames == full.classnames[:math.ceil(5 / 2)] and novel.classnames == full.classnames[3:]
    assert sorted(set(novel.targets)) == [0, 1] and len(base) + len(novel) == len(full)
    few = load_benchmark("ucf101", root, "train", shots=2, seed=1, classes="base")
    assert len(few) == 6 and sorted(set(few.targets)) == [0, 1, 2]


def test_names_in_any_spelling():
    assert [benchmark_name(n) for n in ("ImageNet-A", "imagenet-rendition", "caltech-101", "DescribableTextures",
                                        "OxfordFlowers", "Flowers102", "imagenetv2")] == \
        ["imagenet_a", "imagenet_r", "caltech101", "dtd", "oxford_flowers", "oxford_flowers", "imagenet_v2"]
    with pytest.raises(ValueError, match="no dataset recipe 'cifar10'; recipes: imagenet, caltech101"):
        benchmark_name("cifar10")


def test_errors_say_what_to_fix(tmp_path, data_root):
    with pytest.raises(FileNotFoundError, match=r"EuroSAT folder .*eurosat does not exist; put the dataset there"):
        load_benchmark("eurosat", tmp_path, "train")
    # a split file of another dataset under this dataset's name
    make_tree(tmp_path, "caltech101")
    make_tree(tmp_path / "other", "oxford_pets")
    shutil.copy(tmp_path / "other/oxford_pets/split_zhou_OxfordPets.json",
                tmp_path / "caltech-101/split_zhou_Caltech101.json")
    with pytest.raises(ValueError, match="is not Caltech101's split file: its classes .* are OxfordPets's"):
        load_benchmark("caltech101", tmp_path, "train")
    # another dataset's split file beside a missing one
    make_tree(tmp_path, "dtd")
    (tmp_path / "dtd/split_zhou_DescribableTextures.json").rename(tmp_path / "dtd/split_zhou_OxfordPets.json")
    with pytest.raises(FileNotFoundError, match="has split_zhou_OxfordPets.json, the split file of another"):
        load_benchmark("dtd", tmp_path, "test")
    with pytest.raises(ValueError, match="imagenet_a has no split 'train'; its splits: test"):
        load_benchmark("imagenet_a", data_root, "train")
    # ImageNet-R's folders given as ImageNet-A
    (tmp_path / "imagenet-adversarial").mkdir()
    shutil.copytree(data_root / "imagenet-rendition/imagenet-r", tmp_path / "imagenet-adversarial/imagenet-a")
    with pytest.raises(ValueError, match=r"must hold one folder per class, 200 in all; missing .* not of this "
                                         r"dataset .*the folders are those of ImageNet-R"):
        load_benchmark("imagenet_a", tmp_path, "test")


def test_data_check_cli(tmp_path, capsys):
    folder = make_tree(tmp_path, "eurosat", n_classes=10)
    assert main(["data", "check", "EuroSAT", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "EuroSAT at" in out and "10 classes; train 55, val 25, test 35" in out and "ok" in out
    assert "note: train: 55 images, published 13500" in out
    split = json.loads((folder / "split_zhou_EuroSAT.json").read_text())
    (folder / "2750" / split["test"][0][0]).unlink()
    (folder / "2750" / split["train"][1][0]).write_bytes(b"not an image")
    assert main(["data", "check", "eurosat", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "problem: test: 1 of 35 listed images do not exist" in out
    assert "problem: train: 1 images cannot be read" in out and "expected layout: eurosat/2750/" in out
    assert main(["data", "check", "eurosat", "--root", str(tmp_path), "--quick"]) == 1
    assert "cannot be read" not in capsys.readouterr().out
    assert main(["data", "check", "imagenet_r", "--root", str(tmp_path)]) == 1
    assert "ImageNet-R folder" in capsys.readouterr().out
