from __future__ import annotations

import pytest

from anychip.backends import reset


@pytest.fixture(autouse=True)
def _fresh_selection(monkeypatch):
    """Every test starts with no cached backend and no ANYCHIP_BACKEND from the caller's shell."""
    monkeypatch.delenv("ANYCHIP_BACKEND", raising=False)
    reset()
    yield
    reset()
