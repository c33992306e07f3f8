import json

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomHorizontalFlip

from promptkit.data import (CoOpSplitDataset, ImageFolderDataset, ProceduralBenchmark, Subset, base_novel,
                            check_labels, few_shot, few_shot_val, render, select_classes, train_transform)
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


class Labels:
    """A dataset stand-in: only `targets` and `classnames`, which is all sampling may depend on."""

    def __init__(self, targets, n_classes):
        self.targets, self.classnames = list(targets), [f"class {i}" for i in range(n_classes)]


def test_few_shot_is_balanced_and_a_pure_function_of_seed_and_targets():
    targets = torch.randint(6, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    for seed in range(5):
        shots = few_shot(Labels(targets, 6), 7, seed=seed)
        assert torch.bincount(torch.tensor(shots.targets)).tolist() == [7] * 6
        assert len(set(shots.indices)) == 42 and shots.indices == sorted(shots.indices)
        assert all(targets[i] == t for i, t in zip(shots.indices, shots.targets))
        assert few_shot(Labels(targets, 6), 7, seed=seed).indices == shots.indices  # a fresh object, same draw
    assert few_shot_val(Labels(targets, 6), 16, seed=1).indices == few_shot(Labels(targets, 6), 4, seed=1).indices
    assert len(few_shot_val(Labels(targets, 6), 2, seed=1)) == 12
    with pytest.raises(ValueError, match="positive integer"):
        few_shot(Labels(targets, 6), 0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        few_shot(Labels(targets, 5), 1)


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
    assert [data[i][0].size for i in range(2)] == [(8, 8)] * 2


def test_hidden_entries_are_not_classes_or_images(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 1, "b": 1, ".ipynb_checkpoints": 1})
    (root / "a" / "._0.png").write_bytes(b"macOS resource fork")
    data = ImageFolderDataset(root)
    assert data.classnames == ["a", "b"] and len(data) == 2


def test_transforms_give_model_sized_normalised_tensors(tmp_path, vit_clip):
    augment = train_transform(vit_clip)
    crop = augment.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert isinstance(augment.transforms[1], RandomHorizontalFlip)
    data = ImageFolderDataset(make_folder(tmp_path / "d", {"a": 1}), transform=augment)
    image, label = data[0]
    assert image.shape == (3, 32, 32) and label == 0
    # A black image normalised with CLIP's mean/std: the blue channel is -mean/std everywhere.
    assert torch.allclose(image[2], torch.full((32, 32), -0.40821073 / 0.27577711), atol=1e-5)
    data.transform = vit_clip.preprocess
    assert torch.allclose(data[0][0], image, atol=1e-5)  # a flat 8x8 image: crop and flip change nothing


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
    with pytest.raises(FileNotFoundError, match="relative to"):
        CoOpSplitDataset(tmp_path, tmp_path / "split.json", "train")
    for bad, message in ((["b/1.png", 3, "c"], "without gaps"), (["b/1.png", "1", "b"], "not \\[relpath")):
        (tmp_path / "bad.json").write_text(json.dumps({**split, "test": [bad]}))
        with pytest.raises(ValueError, match=message):
            CoOpSplitDataset(root, tmp_path / "bad.json", "train")


def test_base_novel_and_select_classes():
    split = base_novel(["a", "b", "c", "d", "e"])
    assert split.base == [0, 1, 2] and split.novel_classnames == ["d", "e"]
    data = ProceduralBenchmark(n_test=2).split("test")
    novel = select_classes(data, split.novel)
    assert novel.classnames == [data.classnames[3], data.classnames[4]] and novel.targets == [0, 0, 1, 1]
    assert [data.targets[i] for i in novel.indices] == [3, 3, 4, 4]
    assert torch.equal(novel[3][0], data[novel.indices[3]][0])
    swapped = select_classes(data, [4, 3])
    assert swapped.classnames == novel.classnames[::-1] and swapped.targets == [1, 1, 0, 0]
    for labels in ([3, 3], [48], []):
        with pytest.raises(ValueError, match="distinct labels"):
            select_classes(data, labels)


def test_check_labels():
    assert check_labels(Labels([0, 2, 1], 3), 3).tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="3 classes but the learner was built for 4"):
        check_labels(Labels([0, 1], 3), 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\).*\[-1, 2\]"):
        check_labels(Labels([-1, 2], 3), 3)
    with pytest.raises(ValueError, match="empty"):
        check_labels(Subset(Labels([0], 1), []), 1)


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



def test_split_file_class_names_read_underscores_as_spaces(tmp_path, vit_clip):
    """CoOp's split files keep `american_bulldog`; prompts must read "american bulldog", as the official learners
    and ImageFolderDataset do (the raw name changes the text features and the predictions)."""
    import promptkit

    root = make_folder(tmp_path / "img", {"american_bulldog": 1, "Apply_Eye_Makeup": 1})
    split = {"train": [["american_bulldog/0.png", 0, "american_bulldog"], ["Apply_Eye_Makeup/0.png", 1,
                                                                           "Apply_Eye_Makeup"]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    data = CoOpSplitDataset(root, tmp_path / "split.json", "train")
    assert data.classnames == ["american bulldog", "Apply Eye Makeup"]
    assert sorted(ImageFolderDataset(root).classnames) == sorted(data.classnames)
    spaced = promptkit.ZeroShotCLIP(vit_clip, data.classnames).text_features()
    for raw in (["american_bulldog", "Apply_Eye_Makeup"], ["american bulldog", "Apply Eye_Makeup "]):
        learner = promptkit.CoOp(vit_clip, raw, ctx_init="a photo of a")
        assert learner.classnames == data.classnames
        torch.testing.assert_close(learner.text_features(), spaced, atol=1e-5, rtol=0)
    underscored = vit_clip.encode_text(vit_clip.tokenize([f"a photo of a {c}." for c in split_names(split)]))
    assert not torch.allclose(underscored, spaced, atol=1e-3)  # what the raw names would have given


def split_names(split):
    return [item[2] for item in split["train"]]


@pytest.mark.parametrize("names, error, message", [
    ("cat dog", TypeError, "not the string 'cat dog'"),
    (["cat", "dog", "cat"], ValueError, "labels 0 and 2 have the same class name 'cat'"),
    (["apple_pie", "apple pie"], ValueError, "labels 0 and 1 have the same class name"),
    (["cat", " "], ValueError, r"labels \[1\] are empty"),
    ([], ValueError, "classnames is empty"),
])
def test_bad_class_names_are_refused(vit_clip, names, error, message):
    import promptkit

    for method in ("zeroshot", "coop", "vpt"):
        with pytest.raises(error, match=message):
            promptkit.create_learner(method, vit_clip, names)


def test_class_name_longer_than_the_context_is_refused_by_every_learner(vit_clip):
    import promptkit

    long_name = " ".join(["word"] * 80)
    for method in ("zeroshot", "coop", "kgcoop", "vpt", "maple"):
        with pytest.raises(ValueError, match="tokens, more than the model's context length 77"):
            promptkit.create_learner(method, vit_clip, ["cat", long_name])
