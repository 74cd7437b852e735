"""The one check of every public argument: ``TrainStep``, the optimizer specs and the schedules
call these at their boundary, so a bad value fails before any work, always as an
:class:`~anychip.errors.InvalidArgumentError` whose message is one line: which argument, what it
got, what it takes, and how to fix it.

Each check returns the value as a plain Python type (``np.float32(1e-3)`` -> ``0.001``, a list of
betas -> a tuple), so what a spec stores is hashable, JSON-writable and the same on every backend.
A ``bool`` is never a number (``lr=True`` is a slip, not ``1.0``), and a flag is only a bool
(``compile="no"`` is a true string). A leaf: it imports nothing of anychip but the errors, and
reads 0-d tensors and arrays by duck typing rather than importing torch.
"""

from __future__ import annotations

import difflib
import math
import numbers

from anychip.errors import InvalidArgumentError

_SHOWN = 60  # characters of repr(value) a message keeps


def shown(value) -> str:
    """``value`` as a message shows it: its repr on one line, shortened, and its type where the
    repr alone is ambiguous (the string '1' against the int 1, True against 1)."""
    text = " ".join(repr(value).split())
    if len(text) > _SHOWN:
        text = text[: _SHOWN - 3] + "..."
    kind = type(value)
    if kind in (int, float) or value is None:
        return text
    return f"{text} ({kind.__name__ if kind.__module__ == 'builtins' else f'{kind.__module__}.{kind.__name__}'})"


def fail(name: str, value, expected: str, fix: str = "", *, owner: str = "") -> InvalidArgumentError:
    """The error for ``name=value`` where ``expected`` was needed; ``fix`` says what to pass."""
    where = f"{owner}: {name}" if owner else name
    return InvalidArgumentError(f"{where} must be {expected}, got {shown(value)}" + (f"; {fix}" if fix else ""))


def _bounds(min=None, max=None, above=None, below=None) -> str:
    low = f"[{min}" if min is not None else f"({above}" if above is not None else None
    high = f"{max}]" if max is not None else f"{below})" if below is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if min is not None else '>'} {low[1:]}"
    if high:
        return f" {'<=' if max is not None else '<'} {high[:-1]}"
    return ""


def _inside(v, min=None, max=None, above=None, below=None) -> bool:
    return ((min is None or v >= min) and (max is None or v <= max) and (above is None or v > above)
            and (below is None or v < below))


def real(name: str, value, *, min=None, max=None, above=None, below=None, finite: bool = True, tensor: bool = False,
         allow_none: bool = False, fix: str = "", owner: str = "") -> float | None:
    """A real number (int, float, NumPy scalar; a 0-d tensor or array where ``tensor``), never a
    bool, finite unless ``finite=False``, in ``[min, max]`` and ``(above, below)``; as a float."""
    if value is None and allow_none:
        return None
    expected = ("a finite real number" if finite else "a real number") + _bounds(min, max, above, below)
    expected += " or None" if allow_none else ""
    number = value
    if getattr(value, "ndim", None) is not None and not isinstance(value, numbers.Number):
        if not (tensor and value.ndim == 0 and hasattr(value, "item")):  # a tensor where a number is needed
            raise fail(name, value, expected, fix or ("pass a 0-d tensor or a number" if tensor else "pass a number: float(t)"),
                       owner=owner)
        number = value.item()
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise fail(name, value, expected, fix, owner=owner)
    number = float(number)
    if math.isnan(number) or (finite and math.isinf(number)) or not _inside(number, min, max, above, below):
        raise fail(name, value, expected, fix, owner=owner)
    return number


def integer(name: str, value, *, min=None, max=None, allow_none: bool = False, fix: str = "", owner: str = "") -> int | None:
    """An integer (int or NumPy integer), never a bool nor a float such as 2.0; as an int."""
    if value is None and allow_none:
        return None
    expected = "an int" + _bounds(min, max) + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _inside(int(value), min, max):
        raise fail(name, value, expected, fix, owner=owner)
    return int(value)


def flag(name: str, value, *, allow_none: bool = False, owner: str = "") -> bool | None:
    """``True`` or ``False`` (or None where ``allow_none``): never a string such as "no", which
    Python reads as true, nor a number."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # NumPy's bool
        return bool(value)
    expected = "True, False or None" if allow_none else "True or False"
    raise fail(name, value, expected, f"pass {name}=True or {name}=False", owner=owner)


def choice(name: str, value, options, *, owner: str = ""):
    """One of ``options`` (strings, and None where listed): None by identity, strings by equality,
    so a value of another type never matches by accident (nor fails to hash)."""
    for option in options:
        if value is option or (isinstance(value, str) and isinstance(option, str) and value == option):
            return option
    names = [o for o in options if isinstance(o, str)]
    close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
    expected = "one of " + ", ".join(repr(o) for o in options)
    raise fail(name, value, expected, f"did you mean {close[0]!r}?" if close else "", owner=owner)


def pair(name: str, value, *, fix: str = "", owner: str = "", **bounds) -> tuple[float, float]:
    """Two real numbers as a tuple or list (``betas``), each checked by :func:`real` with
    ``bounds``; a string of two characters is not a pair."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise fail(name, value, "a tuple of two real numbers" + _bounds(**bounds), fix, owner=owner)
    return tuple(real(f"{name}[{i}]", v, fix=fix, owner=owner, **bounds) for i, v in enumerate(value))
