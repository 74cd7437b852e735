"""Which backend runs: the one selection policy, and the one name resolution.

1. an explicit name (``ac.backend("cuda")``) fails loudly when that backend is unavailable,
   with the reason and the install command;
2. ``ANYCHIP_BACKEND`` is treated exactly like an explicit name;
3. otherwise auto-detection walks the registrations with ``auto=True`` by priority and
   quietly skips the unavailable ones, logging why.

The facts live in :mod:`anychip.backends.registry`; probes never import torch, jax or a vendor
SDK, so listing backends is fast and never crashes on a broken install. The heavy import
happens when the chosen backend is first used. Selections are cached; :func:`reset` clears them.
"""

from __future__ import annotations

import difflib
import logging
import os
import re

from anychip.backends.registry import (
    ALIASES,
    REGISTRY,
    Availability,
    Registration,
    find,
    load_plugins,
    on_change,
    register,
    registrations,
    unregister,
)
from anychip.errors import BackendError, UnknownBackendError

log = logging.getLogger("anychip")

ENV_VAR = "ANYCHIP_BACKEND"

_cache: dict[str, object] = {}


def reset() -> None:
    """Forget cached selections and backend objects (tests, or after changing the environment)."""
    _cache.clear()


on_change(reset)


def _known_names() -> list[str]:
    return sorted(r.name for r in registrations()) + sorted(ALIASES)


def _device_word(name: str) -> str:
    """The last word of a backend name: the device it runs on ("tpu" of "jax:tpu")."""
    return re.split(r"[^a-z0-9]+", name)[-1]


def _meaning(name: str) -> str:
    if name in ALIASES:
        return f"{name!r} (alias: the first available of {', '.join(ALIASES[name])})"
    summary = getattr(find(name), "summary", "")
    return f"{name!r} ({summary})" if summary else repr(name)


def _did_you_mean(name: str) -> str:
    """The closest known name and the others on the same device, each with what it means: two
    backends on one device ("tpu" and "jax:tpu") are two different stacks, and a user who typed
    neither needs to know which is which."""
    names = [r.name for r in registrations()]
    close = difflib.get_close_matches(name, names + list(ALIASES), n=1)
    devices = {w for w in re.split(r"[^a-z0-9]+", name) if w} | {_device_word(c) for c in close}
    picks = (close + [k for k in names if k not in close and _device_word(k) in devices])[:3]
    if not picks:
        return ""
    named = [_meaning(p) for p in picks]
    return f" Did you mean {' or '.join(named) if len(named) < 3 else ', '.join(named[:-1]) + ' or ' + named[-1]}?"


def registration(name: str) -> Registration:
    """The registration called ``name``; an unknown name is an UnknownBackendError with a hint."""
    reg = find(name)
    if reg is not None:
        return reg
    raise UnknownBackendError(f"unknown backend {name!r}.{_did_you_mean(name)} Known backends: {', '.join(_known_names())}.")


def environment_problem(found: list[Availability] | None = None) -> str | None:
    """What is wrong with ``$ANYCHIP_BACKEND``, in one line, or None when it is unset or names an
    available backend (``found``: probes already made, to reuse). ``anychip devices`` warns with it;
    :func:`backend` refuses the same value."""
    raw = os.environ.get(ENV_VAR, "")
    name = raw.strip().lower()
    if not name:
        return None
    probes = {a.name: a for a in (found or ())}
    probe = lambda n: probes.get(n) or registration(n).probe()  # noqa: E731
    if name in ALIASES:
        if any(probe(n).available for n in ALIASES[name]):
            return None
        return f"${ENV_VAR}={raw!r}: no backend behind {name!r} ({', '.join(ALIASES[name])}) is available here"
    if find(name) is None:
        return (f"${ENV_VAR}={raw!r} names no backend.{_did_you_mean(name)} Valid names: {', '.join(_known_names())}; "
                "set one of them, or unset it to auto-detect")
    avail = probe(name)
    if not avail.available:
        return f"${ENV_VAR}={raw!r} names backend {name!r}, which is unavailable here: {avail.reason}"
    return None


def unavailable_error(avail: Availability, origin: str = "") -> BackendError:
    fix = f" Install: {avail.install}" if avail.install else ""
    by = f" (asked for by {origin})" if origin else ""
    return BackendError(f"backend {avail.name!r}{by} is unavailable: {avail.reason}.{fix}")


def list_backends() -> list[Availability]:
    """One :class:`Availability` per known backend, in auto-detect priority order."""
    return [r.probe() for r in registrations()]


backends = list_backends  # the original public name; ``list_backends`` does not shadow this package


def resolve(names, *, aliases: str = "first", available: bool = False) -> list[tuple[str, Availability]]:
    """``(name, Availability)`` for each backend named (a comma-separated string or a list), in
    the order given, probing only. The one name check bench, parity and the CLI share.

    aliases:   "first": an alias ("jax") becomes its first available member (else its first);
               "refuse": an alias is a ValueError asking for one member.
    available: raise BackendError for a backend that is not available.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip().lower() for n in names]
    if not names or any(not n for n in names):
        raise ValueError(f"empty backend name in {','.join(names)!r}")
    out: list[tuple[str, Availability]] = []
    for name in names:
        if name in ALIASES:
            if aliases == "refuse":
                raise ValueError(f"{name!r} is an alias of {', '.join(ALIASES[name])}; name the one to use")
            probes = [(n, registration(n).probe()) for n in ALIASES[name]]
            name, avail = next(((n, a) for n, a in probes if a.available), probes[0])
        else:
            avail = registration(name).probe()
        if name in (n for n, _ in out):
            raise ValueError(f"{name!r} is named twice")
        if available and not avail.available:
            raise unavailable_error(avail)
        out.append((name, avail))
    return out


def backend(name: str | None = None):
    """The backend to run on: explicit ``name`` > ``$ANYCHIP_BACKEND`` > auto-detect."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend name must be a string such as 'cpu' or 'jax:tpu', got {type(name).__name__}")
    origin = "backend()"
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or None
        origin = f"${ENV_VAR}"
    if name is None:
        return _auto()
    name = name.strip().lower()
    if name in ALIASES:
        return _first_available(name, ALIASES[name], origin)
    if origin == f"${ENV_VAR}" and find(name) is None:  # name the variable: the user may not know it is set
        raise UnknownBackendError(environment_problem())
    reg = registration(name)
    if name not in _cache:
        avail = reg.probe()
        if not avail.available:
            raise unavailable_error(avail, origin)
        _cache[name] = reg.create(avail)
    return _cache[name]


def _first_available(alias: str, names: tuple[str, ...], origin: str):
    reasons = []
    for n in names:
        avail = registration(n).probe()
        if avail.available:
            return backend(n)
        reasons.append(f"{n}: {avail.reason}")
    raise BackendError(f"no backend behind {alias!r} (asked for by {origin}) is available: " + "; ".join(reasons))


def _auto():
    if "<auto>" in _cache:
        return _cache["<auto>"]
    for reg in registrations():
        if not reg.auto:
            continue
        avail = reg.probe()
        if avail.available:
            log.info("anychip: auto-selected backend %r (%s)", reg.name, avail.reason)
            _cache["<auto>"] = chosen = backend(reg.name)
            return chosen
        log.info("anychip: skipping backend %r: %s", reg.name, avail.reason)
    raise BackendError("no backend is available, not even 'cpu': is torch installed? pip install torch")


__all__ = [
    "ALIASES",
    "Availability",
    "BackendError",
    "ENV_VAR",
    "REGISTRY",
    "Registration",
    "UnknownBackendError",
    "backend",
    "backends",
    "environment_problem",
    "list_backends",
    "load_plugins",
    "register",
    "registration",
    "registrations",
    "reset",
    "resolve",
    "unregister",
]
