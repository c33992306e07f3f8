"""Shared fixtures: tiny random open_clip models built in-process (no download, ~0.1 s)."""
import pytest
import torch

import promptkit

torch.set_num_threads(min(2, torch.get_num_threads()))

CLASSNAMES = ["cat", "dog", "golden retriever puppy playing in the snow", "car", "a", "traffic light"]


def snapshot(clip):
    """Bitwise copy of every open_clip parameter and buffer."""
    return {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


def assert_unchanged(clip, before):
    after = clip.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"frozen tensor {k} changed"
    assert all(not p.requires_grad for p in clip.model.parameters())
    assert promptkit.hooks.count_hooks(clip.model) == 0, "a hook was left on the model"


@pytest.fixture(scope="session")
def vit_clip():
    return promptkit.load_clip("test-vit")


@pytest.fixture(scope="session")
def rn_clip():
    return promptkit.load_clip("test-rn")


@pytest.fixture
def classnames():
    return list(CLASSNAMES)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
