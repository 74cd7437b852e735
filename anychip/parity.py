"""``anychip parity``: train the same seeded model on several backends and compare the losses
step by step, so a move between chips can be gated in CI.

Each backend runs in its own subprocess (``python -m anychip.parity --worker ...``): the
backends never share a process, a global setting or an allocator, which is how a user runs
them too. The reference is ``--reference`` (default: ``cpu`` when it is compared, else the first
backend named); every other one must stay within ``--rtol`` of it at every step
(``|loss - ref| / |ref|``; a non-finite loss never matches). ``anychip bench`` judges its loss
parity by the same rule, reference and per-precision tolerances (:data:`RTOL`).

Exit status: 0 when every step of every backend matches, 1 on a mismatch (or a worker that
failed), 2 on bad input, reported before anything runs.

Plug-ins: ``ANYCHIP_PLUGINS=pkg.mod,other.mod`` names modules imported first, in the command
and in every worker; they may register extra backends with ``anychip.backends.register``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anychip.backends import load_plugins, registration, resolve  # stdlib-only: the parity CLI stays light
from anychip.cliargs import (
    Parser,
    add_debug_flag,
    check_batch_shape,
    finite_positive_float,
    positive_int,
    random_seed,
    run_command,
)
from anychip.errors import BackendError

# Default relative loss tolerance per precision, for `anychip parity` and `anychip bench` alike,
# with a margin over the largest per-step difference measured between backends (gpt-tiny,
# jax:cpu vs cpu, this command, over 20 / 255 steps: 255 is a default bench's 5 + 5 x 50).
# fp32 differs in reduction order only: 1.9e-7 / 2.8e-7 (tests/test_jax_parity.py: <= 2e-7 over
# 10 steps; the conformance suite bounds jax:cpu and neuron-xla at 1e-5); 1e-3 leaves room for GPU
# kernels that sum in other orders. bf16 autocast rounds every matmul input to 8 bits of
# mantissa: 2.9e-5 / 4.8e-4 (tests/test_precision_parity.py: 1.7e-5..9.3e-5 over 10 steps). bf16-pure keeps weights and
# optimizer state in bf16 too: 7.8e-5 / 2.3e-3, and within 2e-2 after 4 mlp steps (tests/test_jax_step.py).
RTOL = {"fp32": 1e-3, "bf16": 3e-2, "bf16-pure": 6e-2}


def default_rtol(precision: str) -> float:
    """The tolerance of a comparison at ``precision`` (a policy name) when none is given."""
    return RTOL.get(precision, RTOL["fp32"])


def default_reference(names: list[str]) -> str:
    """The backend every other one is compared with: ``cpu`` (plain PyTorch, the specification
    the other stacks are held to) when it is among ``names``, else the first of them."""
    if not names:
        raise ValueError("no backend to take as the parity reference")
    return "cpu" if "cpu" in names else names[0]


def check_reference(reference: str | None, names: list[str], flag: str = "--reference") -> str:
    """``reference`` (case-insensitive) when it is one of ``names``, :func:`default_reference`
    when it is None; ValueError (one line) otherwise."""
    if reference is None:
        return default_reference(names)
    name = reference.strip().lower()
    if name not in names:
        raise ValueError(f"{flag} {reference}: not among the backends compared ({', '.join(names)})")
    return name

# -- one backend (the worker) --------------------------------------------------------------------


def run_backend(backend: str, workload: str, *, steps: int, precision: str, batch: int | None, seq: int | None,
                seed: int, lr: float) -> dict:
    """Train ``workload`` on ``backend`` for ``steps`` updates; every loss, read each step."""
    from anychip import workloads
    from anychip.backends import backend as select
    from anychip.optim import AdamW, WarmupCosine
    from anychip.step import TrainStep

    w = workloads.get(workload)
    be = select(backend)
    # The recipe of `anychip train`: AdamW, warm-up + cosine, clipping; one fixed seed.
    schedule = WarmupCosine(warmup=max(1, steps // 10), total=steps)
    # on_nonfinite="ignore": a NaN loss is recorded (and reported as a mismatch) instead of
    # ending the worker, so the table still shows where the run went wrong.
    step = TrainStep(
        w.build(seed=seed), w.loss_fn, AdamW(lr=lr, weight_decay=0.1, schedule=schedule),
        backend=be, precision=precision, max_grad_norm=1.0, on_nonfinite="ignore",
    )
    batch, seq = batch or w.default_batch, seq or w.default_seq
    losses, grad_norms, started = [], [], time.perf_counter()
    for i in range(steps):
        out = step(w.batch(i, batch, seq, seed))
        losses.append(out.loss)
        grad_norms.append(out.grad_norm)
    return {
        "backend": be.name,
        "losses": losses,
        "grad_norms": grad_norms,
        "seconds": time.perf_counter() - started,
        "versions": dict(be.availability.versions),
    }


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m anychip.parity --worker")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--precision", required=True)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--result", required=True, help="file the JSON result is written to")
    a = p.parse_args(argv)
    load_plugins()
    result = run_backend(a.backend, a.workload, steps=a.steps, precision=a.precision, batch=a.batch, seq=a.seq,
                         seed=a.seed, lr=a.lr)
    Path(a.result).write_text(json.dumps(result))
    return 0


# -- comparison ------------------------------------------------------------------------------------


def rel_diff(value: float, reference: float) -> float:
    """``|value - reference| / |reference|``; inf when either is not finite."""
    if not (math.isfinite(value) and math.isfinite(reference)):
        return math.inf
    return abs(value - reference) / abs(reference) if reference else abs(value)


def compare(losses: dict[str, list[float]], reference: str, rtol: float) -> dict:
    """Per backend: relative differences to ``reference``, and the first step (1-based) beyond ``rtol``."""
    ref = losses[reference]
    out = {}
    for name, values in losses.items():
        if name == reference:
            continue
        diffs = [rel_diff(v, r) for v, r in zip(values, ref)]
        bad = [i + 1 for i, d in enumerate(diffs) if not d <= rtol]
        if len(values) != len(ref):
            bad.append(min(len(values), len(ref)) + 1)
        out[name] = {"rel_diff": diffs, "first_mismatch": min(bad) if bad else None, "mismatches": len(bad)}
    return out


def format_table(losses: dict[str, list[float]], reference: str, result: dict, rtol: float) -> str:
    others = [n for n in losses if n != reference]
    header = ["step", f"{reference} (ref)"] + [c for n in others for c in (n, "rel diff")]
    rows = []
    for i in range(len(losses[reference])):
        row = [str(i + 1), f"{losses[reference][i]:.7f}"]
        for n in others:
            d = result[n]["rel_diff"][i] if i < len(result[n]["rel_diff"]) else math.inf
            value = f"{losses[n][i]:.7f}" if i < len(losses[n]) else "-"
            row += [value, f"{d:.2e}{' !' if not d <= rtol else ''}"]
        rows.append(row)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# -- the command -----------------------------------------------------------------------------------


def _backend_names(text: str) -> list[str]:
    """The backends to compare, each known and available (probes only: no SDK is imported).
    An alias is refused: a comparison names exactly the stacks it compares."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if len(names) < 2:
        raise ValueError(f"--backends needs at least two comma-separated backends to compare, got {text!r}")
    try:
        return [name for name, _ in resolve(names, aliases="refuse", available=True)]
    except BackendError:  # unknown (with a did-you-mean) or unavailable (with the install command)
        raise
    except ValueError as exc:  # an alias, or a backend named twice
        raise ValueError(f"--backends: {exc}") from None


def cmd_parity(args) -> int:
    from anychip import workloads
    from anychip.precision import policy

    # Everything the user typed is checked before the first worker starts.
    load_plugins()
    names = _backend_names(args.backends)
    w = workloads.get(args.workload)
    precision = policy(args.precision).name
    reference = check_reference(args.reference, names)
    rtol = args.rtol if args.rtol is not None else default_rtol(precision)
    # The workers run one after the other; one on the host CPU keeps its activations in host memory.
    check_batch_shape(w, args.batch, args.seq, host_cpu=any(registration(n).host_cpu for n in names))
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise ValueError(f"--json {args.json}: directory {Path(args.json).absolute().parent} does not exist")
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json}: is a directory; name a file")

    losses, workers = {}, {}
    with tempfile.TemporaryDirectory(prefix="anychip-parity-") as tmp:
        for name in names:
            result_file = Path(tmp) / f"{len(workers)}.json"
            cmd = [
                sys.executable, "-m", "anychip.parity", "--worker", "--backend", name, "--workload", args.workload,
                "--steps", str(args.steps), "--precision", precision, "--seed", str(args.seed), "--lr", repr(args.lr),
                "--result", str(result_file),
            ]
            cmd += ["--batch", str(args.batch)] if args.batch else []
            cmd += ["--seq", str(args.seq)] if args.seq else []
            print(f"parity: running {w.name} on {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not result_file.is_file():
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"anychip parity: the {name} worker failed (exit {proc.returncode}): {tail}", file=sys.stderr)
                return 1
            workers[name] = json.loads(result_file.read_text())
            losses[name] = workers[name]["losses"]

    result = compare(losses, reference, rtol)
    print(format_table(losses, reference, result, rtol))
    ok = True
    for name, r in result.items():
        worst = max(r["rel_diff"], default=0.0)
        if r["first_mismatch"] is None:
            print(f"{name}: all {len(losses[name])} steps within rtol {rtol:g} of {reference} (max rel diff {worst:.2e})")
        else:
            ok = False
            first = r["first_mismatch"]
            d = r["rel_diff"][first - 1] if first - 1 < len(r["rel_diff"]) else math.inf
            print(f"{name}: first mismatch at step {first} (rel diff {d:.2e} > rtol {rtol:g}); "
                  f"{r['mismatches']} of {len(losses[reference])} steps outside the tolerance")
    print("parity: OK" if ok else "parity: MISMATCH")
    if args.json:
        report = {
            "workload": w.name, "backends": names, "reference": reference, "steps": args.steps,
            "precision": precision, "rtol": rtol, "seed": args.seed, "ok": ok,
            "losses": losses,
            "rel_diff": {n: [d if math.isfinite(d) else None for d in r["rel_diff"]] for n, r in result.items()},
            "first_mismatch": {n: r["first_mismatch"] for n, r in result.items()},
            "workers": {n: {k: v for k, v in workers[n].items() if k != "losses"} for n in names},
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


def register(subparsers) -> None:
    """Add ``anychip parity`` to the CLI (called by :func:`anychip.cli.build_parser`)."""
    p = subparsers.add_parser("parity", help="train on several backends and compare the loss step by step")
    p.add_argument("--workload", default="gpt-tiny",
                   help="mlp, gpt-tiny, gpt-small, llama-tiny, llama-small, hf:<model_type>[-small] or pkg.module:factory")
    p.add_argument("--backends", default="cpu,jax:cpu", help="comma-separated backends to compare (default: cpu,jax:cpu)")
    p.add_argument("--reference", default=None, metavar="BACKEND",
                   help="the backend the others are compared with (default: cpu when compared, else the first of --backends)")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or bf16-pure")
    p.add_argument("--rtol", type=finite_positive_float, default=None, metavar="REL",
                   help="largest relative loss difference per step (default: " + ", ".join(f"{v:g} {k}" for k, v in RTOL.items()) + ")")
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--seq", type=positive_int, default=None)
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--lr", type=finite_positive_float, default=1e-3)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the comparison as JSON")
    add_debug_flag(p)
    p.set_defaults(func=cmd_parity)


def main(argv: list[str] | None = None) -> int:
    """``python -m anychip.parity ARGS`` is ``anychip parity ARGS``."""
    parser = Parser(prog="anychip")
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["parity", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args, "parity")


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main())
