"""User mistakes in the CLI: one line naming the value, the key and what is allowed, exit code 2, no traceback
(--debug shows it); run directories are never silently overwritten; flags for the Python-only options."""
import csv
import json
import zipfile

import open_clip
import pytest
import torch
from PIL import Image

import promptkit
from promptkit.cli import main

TRAIN = ["train", "--arch", "test-vit", "--data", "procedural", "--classes", "base", "--shots", "2"]


def run(capsys, argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, out, err, *expected):
    assert rc == 2 and "Traceback" not in out + err
    assert err.strip().count("\n") == 0 and err.startswith("promptkit "), err
    for text in expected:
        assert text in err, err


@pytest.fixture
def folder(tmp_path):
    """Two classes of three PNGs each."""
    root = tmp_path / "images"
    for c, colour in enumerate(["red", "blue"]):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("extra, expected", [
    (["epochs=abc"], ['"abc" for epochs', "an integer"]),
    (["epochs=1.5"], ["1.5 for epochs", "an integer"]),
    (["lr=fast"], ['"fast" for lr', "a number"]),
    (["progress=yes"], ['"yes" for progress', "true or false"]),
    (["grad_clip=big"], ['"big" for grad_clip', "a number or null"]),
    (["n_ctx=abc"], ['"abc" for n_ctx (coop)', "an integer"]),
    (["epochz=3"], ["unknown key 'epochz'", "did you mean 'epochs'", "n_ctx"]),
    (["seed=5"], ["seed=5", "--seed 5"]),
    (["device=cuda"], ["--device cuda"]),
    (["output_dir=x"], ["--out x"]),
    (["--pretrained", "x.bin"], ["'test-vit'", "pretrained (CLI: --pretrained)"]),
    (["--quick-gelu"], ["quick_gelu (CLI: --quick-gelu)"]),
    (["--device", "gpu0"], ["--device gpu0 is not a device name", "cpu"]),
    (["--skip-unreadable"], ["--skip-unreadable", "image files only"]),
    (["--shots", "all"], ["--shots all", "image files"]),
    (["--arch", "ViT-B-32", "--pretrained", "/missing.bin"], ["/missing.bin does not exist"]),
    (["--arch", "ViT-B-32", "--pretrained", "openia"], ["unknown pretrained tag 'openia'", "openai"]),
])
def test_train_mistakes_are_one_line(tmp_path, capsys, extra, expected):
    assert_one_line_error(*run(capsys, [*TRAIN, "--out", tmp_path / "run", *extra]), *expected)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_broken_config_files(tmp_path, capsys):
    cases = {"bad.yaml": ("epochs: [1,\n", "not valid YAML"), "bad.json": ('{"epochs": 1,', "not valid JSON"),
             "list.yaml": ("- 1\n", "a mapping"), "type.yaml": ("epochs: abc\n", '"abc" for epochs'),
             "key.json": ('{"epoch": 2}', "unknown key 'epoch'")}
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        assert_one_line_error(*run(capsys, [*TRAIN, "--out", tmp_path / "run", "--config", tmp_path / name]),
                              str(tmp_path / name), expected)
    assert_one_line_error(*run(capsys, [*TRAIN, "--out", tmp_path / "run", "--config", tmp_path / "none.yaml"]),
                          "does not exist")


def test_shots_must_be_positive_or_all(tmp_path, capsys):
    for shots in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main([*TRAIN, "--out", str(tmp_path), "--shots", shots])
        assert exit_info.value.code == 2
        assert "positive integer or 'all'" in capsys.readouterr().err


def test_cuda_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(*run(capsys, [*TRAIN, "--out", tmp_path / "run", "--device", "cuda"]),
                          "--device cuda is not available", "cpu")


def test_non_finite_loss(tmp_path, capsys):
    rc, out, err = run(capsys, [*TRAIN, "--out", tmp_path / "run", "epochs=2", "warmup_epochs=0", "lr=1e38",
                                "eval_every=0", "progress=false"])
    assert_one_line_error(rc, out, err.splitlines()[-1], "loss is nan", "nan_policy")


def test_debug_shows_the_traceback(tmp_path):
    for argv in (["--debug", *TRAIN], [*TRAIN, "--debug"]):
        with pytest.raises(ValueError, match="for epochs"):
            main([*argv, "--out", str(tmp_path / "run"), "epochs=abc"])


def test_dataloader_worker_error_is_its_own_message(folder, capsys):
    (folder / "class_0" / "broken.jpg").write_bytes(b"not a jpeg")
    tta = ["tta", "--arch", "test-vit", "--data", folder, "--method", "tda", "--workers", "1", "--batch-size", "7"]
    rc, out, err = run(capsys, tta)
    assert err.count("\n") == 2  # the progress bar, then the error on its own line
    assert_one_line_error(rc, out, err.splitlines()[-1], "cannot read image", "broken.jpg", "--skip-unreadable")
    with pytest.raises(ValueError, match="DataLoader worker"):
        main([str(a) for a in tta] + ["--debug"])
    rc, out, err = run(capsys, [*tta, "--skip-unreadable"])
    assert rc == 0 and json.loads(out.splitlines()[-1])["n"] == 6
    assert "warning: skipped 1 unreadable images" in err


def test_tta_keywords_are_checked(folder, capsys):
    tta = ["tta", "--arch", "test-vit", "--data", folder, "--method", "ctpt"]
    assert_one_line_error(*run(capsys, [*tta, "n_view=4"]), "unknown key 'n_view'", "n_views", "weight")
    assert_one_line_error(*run(capsys, [*tta, "steps=one"]), '"one" for steps (ctpt)', "an integer")


# -- run directories ------------------------------------------------------------------------------------
def epochs_in(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    train = [*TRAIN, "--out", out]  # key=value last: argparse takes them in one run
    assert run(capsys, [*train, "epochs=1", "progress=false"])[0] == 0
    config = (out / "config.json").read_text()
    assert_one_line_error(*run(capsys, [*train, "epochs=2"]), "already holds a run", "--resume", "--overwrite")
    assert epochs_in(out) == [1] and (out / "config.json").read_text() == config
    assert_one_line_error(*run(capsys, [*train, "--resume", "--overwrite"]), "pass one of them")
    # A run that fails before training starts leaves the old run as it was, --overwrite or not.
    broken = ["train", "--arch", "test-vit", "--data", tmp_path / "missing", "--out", out, "--overwrite"]
    assert_one_line_error(*run(capsys, broken), "does not exist")
    assert epochs_in(out) == [1] and (out / "config.json").read_text() == config
    assert run(capsys, [*train, "--resume", "epochs=2", "progress=false"])[0] == 0
    assert epochs_in(out) == [1, 2]
    assert run(capsys, [*train, "--overwrite", "epochs=1", "progress=false"])[0] == 0
    assert epochs_in(out) == [1] and json.loads((out / "config.json").read_text())["epochs"] == 1


def test_failed_start_writes_no_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert_one_line_error(*run(capsys, ["train", "--arch", "test-vit", "--data", tmp_path / "nope", "--out", out]),
                          "does not exist")
    assert not (out / "config.json").exists()
    (tmp_path / "file").write_text("")
    assert_one_line_error(*run(capsys, [*TRAIN, "--out", tmp_path / "file"]), "is a file")


# -- flags for the Python-only options ---------------------------------------------------------------------
def test_shots_all_and_allow_fewer(tmp_path, folder, capsys):
    (folder / "class_1" / "2.png").unlink()  # class_1 keeps 2 images
    train = ["train", "--arch", "test-vit", "--data", folder, "progress=false", "epochs=1", "n_ctx=2"]
    assert_one_line_error(*run(capsys, [*train, "--out", tmp_path / "a", "--shots", "3"]),
                          "fewer than 3 images", "--allow-fewer")
    assert run(capsys, [*train, "--out", tmp_path / "a", "--shots", "3", "--allow-fewer"])[0] == 0
    assert run(capsys, [*train, "--out", tmp_path / "b", "--shots", "all"])[0] == 0
    assert "5 images" in (tmp_path / "b" / "train.log").read_text()


def test_no_strict_loads_prompts_on_another_base_model(tmp_path, capsys, vit_clip):
    promptkit.CoOp(vit_clip, ["a", "b"], n_ctx=2).save_pretrained(tmp_path / "prompts")
    evaluate = ["eval", "--arch", "test-rn", "--data", "procedural", "--classes", "base", "--load", tmp_path / "prompts"]
    assert_one_line_error(*run(capsys, evaluate), "different base model", "--no-strict")
    rc, out, _ = run(capsys, [*evaluate, "--no-strict"])
    assert rc == 0 and json.loads(out.splitlines()[-1])["n"] > 0


# -- activation and open_clip options reach load_clip ------------------------------------------------------
@pytest.fixture
def open_clip_calls(monkeypatch):
    """open_clip.create_model_and_transforms recording its keywords and loading nothing."""
    calls = []

    def fake(arch, pretrained=None, **kwargs):
        calls.append(dict(kwargs, pretrained=pretrained))
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    return calls


def torchscript_zip(path):
    """The layout of OpenAI's TorchScript releases (entries only; nothing is unpickled)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("data.pkl", "constants.pkl", "version", "code/__torch__/model.py", "data/0"):
            archive.writestr(f"ViT-B-32/{name}", b"")
    return path


def test_local_openai_checkpoints_get_quick_gelu(tmp_path, open_clip_calls):
    cases = [(torchscript_zip(tmp_path / "mine.pt"), True, "TorchScript archive"),
             (tmp_path / "ViT-L-14-336px.pt", True, "its name"),
             (tmp_path / "ViT-B-32-openai.safetensors", True, "its name"),
             (tmp_path / "open_clip_model.bin", False, "with GELU")]
    for path, _, _ in cases[1:]:
        path.write_bytes(b"x")
    for path, quick, message in cases:
        with pytest.warns(UserWarning, match=message), pytest.raises(ValueError, match=path.name):
            promptkit.load_clip("ViT-B-32", str(path))
        assert open_clip_calls[-1]["force_quick_gelu"] is quick
    with pytest.raises(ValueError):  # an explicit choice wins, without a warning
        promptkit.load_clip("ViT-B-32", str(cases[0][0]), quick_gelu=False)
    assert open_clip_calls[-1]["force_quick_gelu"] is False


def test_model_flags_reach_load_clip(tmp_path, capsys, open_clip_calls):
    weights = torchscript_zip(tmp_path / "w.pt")
    evaluate = ["eval", "--arch", "ViT-B-32", "--pretrained", weights, "--data", "procedural"]
    rc, _, err = run(capsys, evaluate)
    assert_one_line_error(rc, "", err.splitlines()[-1], "TorchScript archive", "safetensors")
    assert "warning:" in err and "QuickGELU" in err and open_clip_calls[-1]["force_quick_gelu"] is True
    run(capsys, [*evaluate, "--no-quick-gelu", "--cache-dir", tmp_path / "cache"])
    assert open_clip_calls[-1]["force_quick_gelu"] is False and open_clip_calls[-1]["cache_dir"] == str(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="pass its path"):  # a download that failed: not a user mistake
        main(["eval", "--arch", "ViT-B-32", "--pretrained", "openai", "--data", "procedural", "--no-quick-gelu"])
    assert open_clip_calls[-1]["force_quick_gelu"] is False


def test_config_file_values_are_defaults_for_the_flags(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochs: 1\nseed: 3\nprogress: false\noutput_dir: elsewhere\n")
    rc, _, err = run(capsys, [*TRAIN, "--out", tmp_path / "run", "--config", tmp_path / "c.yaml", "lr=0.01"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert rc == 0 and (saved["seed"], saved["lr"], saved["output_dir"]) == (3, 0.01, str(tmp_path / "run"))
    assert "warning: --config's output_dir 'elsewhere' is replaced by --out" in err


def test_split_of_an_image_folder_is_refused(folder, capsys):
    for command in ("eval", "tta"):
        assert_one_line_error(*run(capsys, [command, "--arch", "test-vit", "--data", folder, "--split", "val"]),
                              "--split val", "--split-json")
