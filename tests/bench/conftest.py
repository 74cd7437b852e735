from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FAKES = "anychip_bench_fakes"


@pytest.fixture
def fakes(monkeypatch):
    """The test-only backends of anychip_bench_fakes, registered here and in every bench child;
    unregistered afterwards so no other test sees them."""
    from anychip.backends import unregister

    monkeypatch.syspath_prepend(HERE)
    monkeypatch.setenv("ANYCHIP_PLUGINS", FAKES)
    sys.modules.pop(FAKES, None)
    import anychip_bench_fakes

    yield anychip_bench_fakes
    for name in anychip_bench_fakes.NAMES:
        unregister(name)
    sys.modules.pop(FAKES, None)
