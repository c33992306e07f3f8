"""Test-time adaptation over a dataset (`adapt_dataset`, `promptkit tta`): stored predictions score like the full
logits, a resumed run equals an uninterrupted one (also after SIGKILL, also for TDA's stream), two torchrun
processes equal one, and a resume of another run is refused, naming the setting."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import promptkit
from promptkit.checkpoint import load_tensors
from promptkit.data import ProceduralBenchmark
from promptkit.tta.runner import FIELDS, logits_from_predictions, predictions_of

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("tta_script.py")
INDICES = list(range(0, 30, 3))  # 10 images: batches of 3, the last one short


@pytest.fixture(scope="module")
def shifted():
    return ProceduralBenchmark().split("shifted")


def _tpt(clip, data, **kw):
    learner = promptkit.CoOp(clip, data.classnames, ctx_init="a photo of a")
    return promptkit.TPT(learner, n_views=4, augment="crop", **kw)


def _tda(clip, data):
    return promptkit.TDA(promptkit.ZeroShotCLIP(clip, data.classnames), neg_entropy=(0.0, 1.0))


def _crash_after(adapter, calls):
    """Makes the adapter raise on its `calls + 1`-th batch, as a run killed there."""
    adapt, count = adapter.adapt_views, [0]

    def crashing(views):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return adapt(views)

    adapter.adapt_views = crashing


def test_stored_predictions_give_the_metrics_of_the_full_logits():
    """Top-k logits, log-sum-exp and the true class's logit: top-1, top-5, ECE, NLL and macro-F1 as from all C."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 40, generator=g) * torch.rand(300, 1, generator=g) * 6
    labels = torch.randint(0, 40, (300,), generator=g)
    labels[:100] = logits[:100].argmax(1)                        # some right, some in the top-5, most outside
    stored = predictions_of(logits, labels, torch.arange(300), top_k=5)
    rebuilt = logits_from_predictions(stored, 40)
    full, kept = promptkit.classification_metrics(logits, labels), promptkit.classification_metrics(rebuilt, labels)
    assert 30 < full["top1"] < 60 and (stored["topk_classes"] != labels[:, None]).all(1).sum() > 100
    for key in ("top1", "top5", "macro_f1", "n"):
        assert kept[key] == full[key], key
    for key in ("ece", "nll"):
        assert kept[key] == pytest.approx(full[key], rel=1e-5, abs=1e-5), key
    torch.testing.assert_close(rebuilt.logsumexp(1), logits.logsumexp(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [_tpt, _tda], ids=["tpt", "tda"])
def test_resumed_run_equals_uninterrupted(vit_clip, shifted, tmp_path, make):
    """A run stopped after 2 of 4 batches and resumed gives bitwise the predictions of one uninterrupted run:
    an episodic adapter's batch depends on that batch only; TDA's stream continues from the saved caches."""
    full = promptkit.adapt_dataset(make(vit_clip, shifted), shifted, batch_size=3, indices=INDICES, progress=False)
    crashed = make(vit_clip, shifted)
    _crash_after(crashed, 2)
    with pytest.raises(KeyboardInterrupt):
        promptkit.adapt_dataset(crashed, shifted, batch_size=3, indices=INDICES, out=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == ["00000000.safetensors", "00000001.safetensors"]
    resumed = promptkit.adapt_dataset(make(vit_clip, shifted), shifted, batch_size=3, indices=INDICES, out=tmp_path,
                                      resume=True, progress=False)
    assert (resumed["adapted"], resumed["resumed"], full["adapted"]) == (4, 6, 10)
    for name in FIELDS:
        assert torch.equal(resumed["predictions"][name], full["predictions"][name]), name
    assert resumed["predictions"]["index"].tolist() == INDICES
    assert resumed["top1"] == full["top1"] and resumed["ece"] == full["ece"]
    if make is _tda:  # only the newest stream state is kept
        assert [p.name for p in (tmp_path / "streams").iterdir()] == ["00000003.safetensors"]
        # without the saved caches the stream would differ: the state matters
        fresh = promptkit.adapt_dataset(make(vit_clip, shifted), shifted, batch_size=3, indices=INDICES[6:],
                                        progress=False)
        assert not torch.equal(fresh["predictions"]["topk_logits"], full["predictions"]["topk_logits"][6:])


def test_resume_refuses_another_run_naming_the_setting(vit_clip, shifted, tmp_path):
    promptkit.adapt_dataset(_tpt(vit_clip, shifted), shifted, batch_size=3, indices=INDICES[:6], out=tmp_path,
                            progress=False)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "batches").iterdir())
    with pytest.raises(FileExistsError, match="already holds a TTA run; pass --resume"):
        promptkit.adapt_dataset(_tpt(vit_clip, shifted), shifted, batch_size=3, indices=INDICES[:6], out=tmp_path)
    changed_prompt = _tpt(vit_clip, shifted)
    with torch.no_grad():
        changed_prompt.learner.ctx.add_(0.01)
    cases = [(dict(adapter=_tpt(vit_clip, shifted, lr=0.01)), "settings.lr: saved 0.005, now 0.01"),
             (dict(adapter=changed_prompt), "prompts: saved"),
             (dict(batch_size=2), "batch_size: saved 3, now 2"),
             (dict(indices=INDICES[1:7]), "images.fingerprint: saved"),
             (dict(adapter=promptkit.Zero(changed_prompt.learner)), "adapter: saved 'tpt', now 'zero'")]
    for changes, message in cases:
        kw = {"adapter": _tpt(vit_clip, shifted), "batch_size": 3, "indices": INDICES[:6], **changes}
        with pytest.raises(ValueError, match=f"cannot resume the run in .*{message}"):
            promptkit.adapt_dataset(kw.pop("adapter"), shifted, out=tmp_path, resume=True, **kw)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "batches").iterdir()) == before
    with pytest.raises(ValueError, match="indices repeat images"):
        promptkit.adapt_dataset(_tpt(vit_clip, shifted), shifted, indices=[1, 2, 1])


def _run(args):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _run([str(SCRIPT), str(full)])
    victim = _run([str(SCRIPT), str(killed), "--sleep", "1.0"])
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "batches").glob("*.safetensors"))) < 2:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    done = len(list((killed / "batches").glob("*.safetensors")))
    assert 2 <= done < 8
    resumed = _run([str(SCRIPT), str(killed), "--resume"])
    outputs = [p.communicate()[0].decode() for p in (reference, resumed)]
    assert reference.returncode == 0 and resumed.returncode == 0, outputs
    a, b = (json.loads(o.strip().splitlines()[-1]) for o in outputs)
    assert (b["resumed"], b["adapted"]) == (3 * done, 24 - 3 * done)
    for key in ("top1", "top5", "ece", "nll", "macro_f1", "n"):
        assert a[key] == b[key], key
    for batch in range(8):
        x, y = (load_tensors(d / "batches" / f"{batch:08d}.safetensors") for d in (full, killed))
        assert all(torch.equal(x[k], y[k]) for k in FIELDS)


@pytest.mark.slow
def test_two_torchrun_processes_equal_one(tmp_path, vit_clip, shifted):
    """`promptkit tta` under torchrun (2 CPU processes, gloo): the batches are split over the ranks and the
    metrics and stored predictions equal one process's. TDA with --independent-streams: rank r is a stream of
    its own over batches r, r + 2, ..., the same as one process over those batches alone."""
    cli = ["--arch", "test-vit", "--data", "procedural", "--limit", "14", "--batch-size", "3", "--workers", "0"]
    tpt = ["tta", "--method", "tpt", *cli, "n_views=4", "augment=crop"]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    one = _run(["-m", "promptkit.cli", *tpt, "--out", str(tmp_path / "one")])
    two = _run([*torchrun, "29561", "-m", "promptkit.cli", *tpt, "--out", str(tmp_path / "two")])
    tda = _run([*torchrun, "29562", "-m", "promptkit.cli", "tta", "--method", "tda", *cli, "--independent-streams",
                "--out", str(tmp_path / "tda")])
    outputs = [p.communicate()[0].decode() for p in (one, two, tda)]
    assert one.returncode == 0 and two.returncode == 0 and tda.returncode == 0, outputs
    a, b, _ = (json.loads([line for line in o.splitlines() if line.startswith("{")][-1]) for o in outputs)
    assert (a["ranks"], b["ranks"], b["n"]) == (1, 2, 14)
    assert {k: a[k] for k in ("top1", "top5", "ece", "n")} == {k: b[k] for k in ("top1", "top5", "ece", "n")}
    for batch in range(5):
        x, y = (load_tensors(tmp_path / d / "batches" / f"{batch:08d}.safetensors") for d in ("one", "two"))
        assert all(torch.equal(x[k], y[k]) for k in FIELDS)
    order = torch.randperm(len(shifted), generator=torch.Generator().manual_seed(0))[:14].tolist()
    batches = [order[i:i + 3] for i in range(0, 14, 3)]
    for rank in (0, 1):
        learner = promptkit.ZeroShotCLIP(vit_clip, shifted.classnames, templates=("a photo of a {}.",))
        alone = promptkit.adapt_dataset(promptkit.TDA(learner), shifted, batch_size=3, progress=False,
                                        indices=[i for b in batches[rank::2] for i in b])["predictions"]
        stored = [load_tensors(tmp_path / "tda" / "batches" / f"{b:08d}.safetensors") for b in range(rank, 5, 2)]
        torch.testing.assert_close(torch.cat([s["topk_logits"] for s in stored]), alone["topk_logits"],
                                   rtol=0, atol=1e-5)


def test_cli_refuses_a_stream_over_several_processes(monkeypatch, capsys):
    """TDA under torchrun without --independent-streams: one line saying why and what to do, before the model loads."""
    from promptkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tta", "--method", "tda", "--arch", "test-vit", "--data", "procedural"]) == 2
    err = capsys.readouterr().err
    assert "TDA is a stream" in err and "--independent-streams" in err and err.count("\n") == 1
    assert main(["tta", "--method", "tpt", "--arch", "test-vit", "--data", "procedural", "--resume"]) == 2
    assert "--resume continues the run in --out DIR" in capsys.readouterr().err
