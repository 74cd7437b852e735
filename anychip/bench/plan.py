"""Which rows ``anychip bench`` runs: the backends (through the one name resolution of
:func:`anychip.backends.resolve`), each at which process counts, and the default precision.

Every fact used here comes from a backend's registration: ``launcher`` says whether torchrun
can start it, ``host_cpu`` whether it computes on the host CPU. No backend is named here.
"""

from __future__ import annotations

from anychip.backends import REGISTRY, registrations, resolve
from anychip.cliargs import UsageError
from anychip.errors import BackendError
from anychip.parity import check_reference


def plan_backends(selection: str) -> tuple[list[tuple[str, object]], str]:
    """``(name, Availability)`` per backend, in run order, and how they were chosen: ``auto``
    (every available backend of the built-in table, plus plug-ins registered with auto=True,
    by priority), ``all`` (every registered backend) or ``named`` (the names given, in the
    order given; an alias becomes its first available member)."""
    selection = selection.strip().lower()
    if selection in ("auto", "all"):
        chosen = [r for r in registrations() if selection == "all" or r in REGISTRY or r.auto]
        found = [(r.name, r.probe()) for r in chosen]
        if selection == "auto":
            found = [(n, a) for n, a in found if a.available]
            if not found:
                raise UsageError("no backend is available (is torch installed?); see 'anychip devices'")
        return found, selection
    names = [n.strip() for n in selection.split(",")]
    if any(not n for n in names):
        raise UsageError(f"--backends: empty name in {selection!r}")
    if any(n in ("auto", "all") for n in names):
        raise UsageError("--backends: 'auto' and 'all' cannot be combined with names")
    try:
        # An unavailable backend named here is planned all the same: it becomes a failed row.
        return resolve(names, aliases="first"), "named"
    except BackendError as exc:  # an unknown name, with a did-you-mean
        raise UsageError(f"--backends: {exc} Or auto / all.") from None
    except ValueError as exc:  # a backend named twice
        raise UsageError(f"--backends: {exc}") from None


def one_process_backends() -> frozenset[str]:
    """Backends that run in one process whatever --nproc says: those whose registration
    launches through jax.distributed drive every local device from one process (a
    jax.sharding.Mesh), which torchrun cannot start."""
    return frozenset(r.name for r in registrations() if r.launcher != "torchrun")


def plan_rows(planned: list[tuple[str, object]], nprocs: list[int], explicit: bool) -> tuple[list[tuple[str, object, int]], list[str]]:
    """``(name, Availability, nproc)`` per row, each backend at each count in turn (an
    unavailable one once, at the first count: it has nothing to scale), and the backends left
    at one process. A one-process backend named explicitly while --nproc has no 1 is bad input;
    picked by auto/all it is left out with a note."""
    single = one_process_backends()
    rows, left = [], []
    for name, avail in planned:
        counts = nprocs
        if name in single and nprocs != [1]:
            counts = [n for n in nprocs if n == 1]
            left.append(name)
            if not counts and explicit:
                raise UsageError(
                    f"--nproc {','.join(map(str, nprocs))}: {name} runs in one process (JAX drives every local device "
                    "itself; torchrun cannot launch it); add 1 to --nproc or leave it out of --backends"
                )
        rows += [(name, avail, n) for n in (counts if avail.available else counts[:1])]
    if not rows:
        raise UsageError(f"--nproc {','.join(map(str, nprocs))}: none of the selected backends runs under torchrun; add 1 to --nproc")
    return rows, left


def default_precision(planned: list[tuple[str, object]]) -> str:
    """fp32 when every runnable backend computes on the host CPU (bf16 autocast on a CPU is
    slower than fp32 and only adds rounding noise to the parity check), else bf16: what
    accelerators are measured at and what the MFU peaks refer to."""
    host_cpu = {r.name for r in registrations() if r.host_cpu}
    runnable = [n for n, a in planned if a.available]
    return "fp32" if runnable and all(n in host_cpu for n in runnable) else "bf16"


def parity_reference(planned: list[tuple[str, object]], requested: str | None) -> str:
    """The backend every row's loss parity is against: ``--reference`` when it is planned and
    available, else :func:`anychip.parity.default_reference` of the backends that run (of those
    planned when none does: nothing is compared then)."""
    names = [n for n, _ in planned]
    runnable = [n for n, a in planned if a.available]
    if requested is None:
        return check_reference(None, runnable or names)
    try:
        name = check_reference(requested, names)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    avail = dict(planned)[name]
    if not avail.available:
        raise UsageError(f"--reference {requested}: {name} is unavailable ({avail.reason}); name a backend that runs")
    return name
