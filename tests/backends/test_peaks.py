"""The peak FLOP/s table: every entry is reachable by some device name.

The lookup takes the first entry whose pattern matches, so an entry placed after a more
generic one (the plain H100 before H100 PCIe) never answers, and its device's MFU silently
uses another chip's peak. The names tried here are generated from each entry's own pattern,
so a new entry is covered without a list to keep in step with the table.
"""

from __future__ import annotations

import itertools
import re

import pytest

from anychip.backends.facts import peaks

try:  # the parser behind ``re``; Python 3.10 names it sre_parse (deprecated from 3.11)
    from re import _parser as sre_parse
except ImportError:
    import sre_parse

# What a wildcard stands for in a generated name: a separator keeps \b boundaries intact.
WILDCARD = " "


def _expand(tree) -> list[str]:
    """Strings a parsed pattern matches: every alternative, each optional part present or
    absent, a repetition of its minimum count and one more. Raises on syntax it does not know."""
    out = [""]
    for op, arg in tree:
        name = str(op)
        if name == "LITERAL":
            options = [chr(arg)]
        elif name == "ANY":
            options = [WILDCARD]
        elif name == "AT":  # \b, ^, $: zero width
            options = [""]
        elif name == "SUBPATTERN":
            options = _expand(arg[-1])
        elif name == "BRANCH":
            options = [s for alt in arg[1] for s in _expand(alt)]
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, sub = arg
            inner = _expand(sub)
            counts = sorted({low, min(low + 1, high)})
            options = ["".join(parts) for n in counts for parts in itertools.product(inner, repeat=n)]
        else:
            raise AssertionError(f"test_peaks cannot generate names for regex syntax {name}; extend _expand")
        out = [a + b for a, b in itertools.product(out, options)]
    return out


def alternatives(pattern: str) -> list[str]:
    """Device names for each top-level alternative of ``pattern``: [[names of "H200"], [of "GH200"]]."""
    tree = sre_parse.parse(pattern)
    branches = tree[0][1][1] if len(tree) == 1 and str(tree[0][0]) == "BRANCH" else [tree]
    return [sorted({s.strip() for s in _expand(b) if re.search(pattern, s.strip(), flags=re.IGNORECASE)}) for b in branches]


def unreachable() -> list[tuple[peaks.Peak, list[str]]]:
    """(entry, names of one of its alternatives) where no such name reaches that entry."""
    return [
        (peak, names)
        for peak in peaks.PEAKS
        for names in alternatives(peak.pattern)
        if not any(peaks.lookup(n) is peak for n in names)
    ]


def test_every_entry_is_reachable():
    missing = unreachable()
    assert not missing, "; ".join(
        f"{p.source} ({p.pattern!r}): {names[:1]} maps to {getattr(peaks.lookup(names[0]) if names else None, 'source', None)!r}"
        for p, names in missing
    )
    for peak in peaks.PEAKS:
        hit = next(n for names in alternatives(peak.pattern) for n in names if peaks.lookup(n) is peak)
        assert peaks.peak_flops(hit) == peak.bf16_tflops * 1e12
        assert peaks.memory_bandwidth(hit) == (peak.hbm_gbps * 1e9 if peak.hbm_gbps is not None else None)


def test_a_shadowed_entry_is_reported(monkeypatch):
    """The generic H100 moved first hides the PCIe and NVL entries; nothing else moves."""
    generic = next(p for p in peaks.PEAKS if p.pattern == "H100")
    monkeypatch.setattr(peaks, "PEAKS", (generic, *(p for p in peaks.PEAKS if p is not generic)))
    assert [p.pattern for p, _ in unreachable()] == [r"H100.*PCIe", r"H100.*NVL"]


# The devices whose peak FLOP/s and memory bandwidth the table must know, named as the probes and
# runtimes report them (PCI names from facts/tpu.py, torch's CUDA names, the Neuron kinds).
BOTH_FIGURES = {
    "TPU v5 lite": (197e12, 819e9), "TPU v5e": (197e12, 819e9), "TPU v5": (459e12, 2765e9), "TPU v5p": (459e12, 2765e9),
    "TPU v6 lite": (918e12, 1638e9), "TPU v6e": (918e12, 1638e9),
    # A TPU7x chip (2307 TFLOP/s, 7380 GB/s) is two TPU devices; "TPU v7" is torch-tpu's name for it.
    "TPU7x": (1153.5e12, 3690e9), "TPU v7": (1153.5e12, 3690e9),
    "trn1": (190e12, 820e9), "trn2": (667e12, 2900e9), "trn3": (671e12, 4900e9),
    "NVIDIA H100 80GB HBM3": (989.4e12, 3350e9), "NVIDIA H100 PCIe": (756e12, 2000e9), "NVIDIA H100 NVL": (835e12, 3900e9),
    "NVIDIA H200": (989.4e12, 4800e9), "NVIDIA B200": (2250e12, 8000e9),
}


@pytest.mark.parametrize("name", sorted(BOTH_FIGURES))
def test_the_current_accelerators_have_both_figures_and_a_source(name):
    flops, bandwidth = BOTH_FIGURES[name]
    assert peaks.peak_flops(name) == pytest.approx(flops)
    assert peaks.memory_bandwidth(name) == pytest.approx(bandwidth)
    assert peaks.lookup(name).source


@pytest.mark.parametrize("chip, cores", [("trn1", 2), ("trn2", 4), ("trn3", 4)])
def test_neuroncores_of_a_chip_add_up_to_the_chip(chip, cores):
    core = f"{chip} NeuronCore"
    assert peaks.peak_flops(core) * cores == pytest.approx(peaks.peak_flops(chip))
    assert peaks.memory_bandwidth(core) * cores == pytest.approx(peaks.memory_bandwidth(chip))


def test_names_covering_parts_with_different_memory_have_no_bandwidth():
    assert peaks.memory_bandwidth("NVIDIA A100-SXM4-80GB") is None and peaks.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peaks.memory_bandwidth("NVIDIA GH200 480GB") is None
    assert peaks.memory_bandwidth("some unknown chip") is None


def test_a_bandwidth_must_be_positive():
    with pytest.raises(ValueError, match="memory bandwidth"):
        peaks.Peak("X1", 1.0, "test", hbm_gbps=0.0)
