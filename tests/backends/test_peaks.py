"""The peak FLOP/s table: every entry is reachable by some device name.

The lookup takes the first entry whose pattern matches, so an entry placed after a more
generic one (the plain H100 before H100 PCIe) never answers, and its device's MFU silently
uses another chip's peak. The names tried here are generated from each entry's own pattern,
so a new entry is covered without a list to keep in step with the table.
"""

from __future__ import annotations

import itertools
import re

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


def test_a_shadowed_entry_is_reported(monkeypatch):
    """The generic H100 moved first hides the PCIe and NVL entries; nothing else moves."""
    generic = next(p for p in peaks.PEAKS if p.pattern == "H100")
    monkeypatch.setattr(peaks, "PEAKS", (generic, *(p for p in peaks.PEAKS if p is not generic)))
    assert [p.pattern for p, _ in unreachable()] == [r"H100.*PCIe", r"H100.*NVL"]
