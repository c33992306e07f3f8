"""Every registered test-time adapter x every registered learner, the same contract. New adapters and methods
join automatically via `list_adapters()` / `list_methods()`; keywords that keep the matrix fast live in FAST."""
import re

import pytest
import torch

import promptkit
from conftest import assert_unchanged, snapshot
from test_methods_matrix import build  # the method matrix's small learners

FAST = {"tpt": dict(n_views=4, steps=1), "ctpt": dict(n_views=4, steps=1)}


def make(name, learner):
    return promptkit.create_adapter(name, learner, **FAST.get(name, dict(n_views=4)))


def accepts(name, learner) -> bool:
    try:
        make(name, learner)
    except (TypeError, ValueError):
        return False
    return True


@pytest.fixture
def views():
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method", promptkit.list_methods())
@pytest.mark.parametrize("name", promptkit.list_adapters())
def test_adapter_contract(name, method, vit_clip, classnames, views):
    """Either a refusal that names the learner and an adapter that takes it, or: logits [B, C], the learner and
    the frozen CLIP bitwise unchanged with no hook or gradient left, batched = one image at a time (a fresh
    stream fed image by image, in order, for stream adapters), episodic adapters carry nothing over, and a stream
    resumed from its `stream_state()` continues as the uninterrupted one."""
    torch.manual_seed(0)
    learner = build(method, vit_clip, classnames)
    try:
        adapter = make(name, learner)
    except (TypeError, ValueError) as refusal:
        message = str(refusal)
        assert type(learner).__name__ in message, message
        others = [type(make(other, learner)).__name__ for other in promptkit.list_adapters()
                  if other != name and accepts(other, learner)]
        # A learner no adapter takes (DPL: its prediction depends on the batch) is refused by all, saying why.
        assert any(re.search(rf"\b{other}\b", message) for other in others) or (
            not others and learner.batch_dependent), (message, others)
        return
    before_clip = snapshot(vit_clip)
    before = {k: v.clone() for k, v in learner.prompt_state_dict().items()}
    batched = adapter.adapt_views(views)
    assert batched.shape == (len(views), len(classnames)) and batched.isfinite().all()
    alone = make(name, learner)
    sequential = torch.cat([alone.adapt_views(views[i:i + 1]) for i in range(len(views))])
    torch.testing.assert_close(batched, sequential, atol=1e-4, rtol=0)
    if adapter.episodic:
        torch.testing.assert_close(adapter.adapt_views(views), batched, atol=1e-6, rtol=0)
    else:  # a stream continues from its saved state as if never stopped (what `adapt_dataset` resumes from)
        first, resumed = make(name, learner), make(name, learner)
        first.adapt_views(views[:1])
        resumed.load_stream_state({k: v.clone() for k, v in first.stream_state().items()})
        torch.testing.assert_close(resumed.adapt_views(views[1:]), batched[1:], atol=1e-4, rtol=0)
    after = learner.prompt_state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in learner.prompt_parameters())
    assert_unchanged(vit_clip, before_clip)


@pytest.mark.parametrize("name", promptkit.list_adapters())
def test_every_adapter_takes_some_learner(name, vit_clip, classnames):
    assert any(accepts(name, build(method, vit_clip, classnames)) for method in promptkit.list_methods())
