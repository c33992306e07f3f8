"""On a CUDA device (skipped without one): every registered method and test-time adapter under bf16 / fp16
autocast gives the fp32 predictions up to rounding, trains with finite losses through the one trainer, and
leaves the model frozen and hook-free. Run on a GPU machine with `python -m pytest -q tests/test_gpu.py`."""
import pytest
import torch

import promptkit
from promptkit.training import PromptTrainer, TrainConfig
from conftest import assert_unchanged, snapshot
from test_methods_matrix import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def cuda_clip():
    return promptkit.load_clip("test-vit", device="cuda")


def teacher_task(clip, names, n=64):
    torch.manual_seed(0)
    teacher = promptkit.CoOp(clip, names, n_ctx=4)
    with torch.no_grad():
        teacher.ctx.normal_(0, 1)
        images = torch.randn(n, 3, 32, 32, device="cuda")
        labels = teacher(images).argmax(-1)
    dataset = torch.utils.data.TensorDataset(images.cpu(), labels.cpu())
    dataset.classnames, dataset.targets = names, labels.tolist()
    return dataset


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", promptkit.list_methods())
def test_method_under_autocast(name, precision, cuda_clip, classnames):
    before = snapshot(cuda_clip)
    data = teacher_task(cuda_clip, classnames)
    learner = build(name, cuda_clip, classnames)
    images = data.tensors[0][:8].cuda()
    with torch.no_grad():
        exact = learner(images).float()
        with torch.autocast("cuda", dtype=DTYPES[precision]):
            rounded = learner(images).float()
    # Half precision keeps ~3 significant digits; logits are scaled cosines (|logit| <= logit_scale).
    assert (rounded - exact).abs().max() <= 2e-2 * exact.abs().max() + 1e-3
    if learner.prompt_parameters():
        state = {k: v.clone() for k, v in learner.prompt_state_dict().items()}
        metrics = PromptTrainer(learner, TrainConfig(epochs=2, batch_size=16, lr=0.01, warmup_epochs=0,
                                                     precision=precision, device="cuda", output_dir=None,
                                                     progress=False)).fit(data)
        assert torch.isfinite(torch.tensor(metrics["train_loss"]))
        after = learner.prompt_state_dict()
        assert any(not torch.equal(after[k], v) for k, v in state.items()), "no prompt moved"
        assert all(v.dtype == state[k].dtype for k, v in after.items()), "prompts changed dtype"
    assert_unchanged(cuda_clip, before)


@pytest.mark.parametrize("name", promptkit.list_adapters())
def test_adapter_autocast_agrees_with_fp32(name, cuda_clip, classnames):
    """Adapters run their encoders under bf16 autocast on CUDA by default (as TPT's AMP)."""
    before = snapshot(cuda_clip)
    learner = promptkit.CoOp(cuda_clip, classnames, ctx_init="a photo of a")
    views = torch.randn(4, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()

    def run(autocast):
        adapter = promptkit.create_adapter(name, learner, autocast=autocast)
        return torch.cat([adapter.adapt_views(views[i:i + 1]) for i in range(len(views))]).float()

    exact, rounded = run(False), run(True)
    assert torch.isfinite(rounded).all()
    # A tuning adapter's first AdamW step moves each prompt entry by about lr whatever its gradient's size, so an
    # entry whose gradient is near zero can step the other way under bf16: wider than the encoders' rounding.
    tolerance = 6e-2 if name in ("tpt", "ctpt") else 3e-2
    assert (rounded - exact).abs().max() <= tolerance * exact.abs().max() + 1e-3
    assert_unchanged(cuda_clip, before)
