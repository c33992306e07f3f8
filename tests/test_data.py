import json

import pytest
import torch
from PIL import Image

from promptkit.data import (CoOpSplitDataset, ImageFolderDataset, ProceduralBenchmark, base_novel, few_shot,
                            render, select_classes)
from promptkit.data.procedural import CLASSNAMES, DOMAINS


def make_folder(root, counts):
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_image_folder_and_few_shot(tmp_path):
    root = make_folder(tmp_path / "d", {"golden_retriever": 5, "cat": 3})
    data = ImageFolderDataset(root)
    assert data.classnames == ["cat", "golden retriever"] and data.targets == [0] * 3 + [1] * 5
    shots = few_shot(data, 2, seed=3)
    assert sorted(shots.targets) == [0, 0, 1, 1]
    assert few_shot(data, 2, seed=3).indices == shots.indices
    assert any(few_shot(data, 2, seed=s).indices != shots.indices for s in range(4, 10))
    with pytest.raises(ValueError, match=r"'cat' \(3\)"):
        few_shot(data, 4)
    with pytest.warns(UserWarning, match="fewer than 4"):
        assert len(few_shot(data, 4, allow_fewer=True)) == 7


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        ImageFolderDataset(tmp_path / "empty")
    root = make_folder(tmp_path / "d", {"a": 2})
    (root / "a" / "broken.png").write_bytes(b"not an image")
    data = ImageFolderDataset(root)
    broken = next(i for i, (path, _) in enumerate(data.samples) if path.name == "broken.png")
    with pytest.raises(ValueError, match="broken.png"):
        data[broken]
    with pytest.warns(UserWarning, match="skipped 1"):
        data = ImageFolderDataset(root, skip_unreadable=True)
    assert len(data) == 2 and data.skipped[0].endswith("broken.png")


def test_coop_split_json(tmp_path):
    root = make_folder(tmp_path / "img", {"a": 2, "b": 2})
    split = {"train": [["a/0.png", 0, "a"], ["b/0.png", 1, "b"]], "val": [["a/1.png", 0, "a"]],
             "test": [["b/1.png", 1, "b"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    data = CoOpSplitDataset(root, tmp_path / "split.json", "train")
    assert data.classnames == ["a", "b"] and data.targets == [0, 1]
    image, label = data[1]
    assert image.size == (8, 8) and label == 1
    split["test"][0][2] = "c"
    (tmp_path / "bad.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="label 1 is both"):
        CoOpSplitDataset(root, tmp_path / "bad.json", "test")
    with pytest.raises(ValueError, match="no split 'dev'"):
        CoOpSplitDataset(root, tmp_path / "split.json", "dev")


def test_base_novel_and_select_classes():
    split = base_novel(["a", "b", "c", "d", "e"])
    assert split.base == [0, 1, 2] and split.novel_classnames == ["d", "e"]
    data = ProceduralBenchmark(n_test=2).split("test")
    novel = select_classes(data, split.novel)
    assert novel.classnames == [data.classnames[3], data.classnames[4]] and novel.targets == [0, 0, 1, 1]


def test_procedural_is_deterministic_balanced_and_domains_differ():
    bench = ProceduralBenchmark()
    assert len(bench.classnames) == len(set(bench.classnames)) == 48
    a, b = bench.split("train", shots=4, seed=1), bench.split("train", shots=4, seed=1)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, bench.split("train", shots=4, seed=2).images)
    assert torch.bincount(torch.tensor(a.targets)).tolist() == [4] * 48
    assert not torch.equal(a.images[:48], bench.split("test").images[:48])  # train and test images differ
    labels = torch.arange(48).repeat(4)
    means = {d: render(labels, d, seed=0).mean().item() for d in DOMAINS}
    assert means["sketch"] > means["photo"] + 0.2
    stds = {d: render(labels, d, seed=0).std(dim=(2, 3)).mean().item() for d in DOMAINS}
    assert stds["noisy"] > stds["photo"]


def test_procedural_base_novel_cover_every_word():
    bench = ProceduralBenchmark(n_test=1)
    base = bench.split("test", classes="base")
    assert base.classnames == list(CLASSNAMES[:24]) and base.targets == list(range(24))
    for words in (set(n.split()[0] for n in bench.novel_classnames), set(n.split()[1] for n in bench.novel_classnames)):
        assert words <= set(w for n in bench.base_classnames for w in n.split())
    shifted = bench.split("shifted")
    assert len(shifted) == 48 and not torch.equal(shifted.images, bench.split("test").images)


def test_plots_write_pngs(tmp_path):
    from promptkit.plots import plot_accuracy_vs_shots, plot_reliability

    curve = plot_accuracy_vs_shots({"coop": {1: 40.0, 4: 55.0, 16: 70.0}, "zero-shot": {1: 50.0, 16: 50.0}},
                                   tmp_path / "shots.png")
    logits, labels = torch.randn(50, 5), torch.randint(5, (50,))
    diagram = plot_reliability(logits, labels, tmp_path / "rel.png")
    for path in (curve, diagram):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
