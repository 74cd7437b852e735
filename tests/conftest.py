from __future__ import annotations

import pytest

from anychip.backends import reset

BEFORE_TORCHAX = "before_torchax"


def pytest_collection_modifyitems(config, items):
    """Tests marked before_torchax run first. Importing torchax (any jax:* step) registers its
    ``jax`` device as torch's PrivateUse1 backend for the rest of the process, and from then on
    torch.compile's fake-tensor and RNG handling of custom ops fails ("PyTorch is not linked with
    support for jax devices"); the compiled-op tests therefore run before the first jax test."""
    items.sort(key=lambda item: item.get_closest_marker(BEFORE_TORCHAX) is None)


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch):
    """Every test starts with no cached backend and no ANYCHIP_BACKEND from the caller's shell."""
    monkeypatch.delenv("ANYCHIP_BACKEND", raising=False)
    reset()
    yield
    reset()
