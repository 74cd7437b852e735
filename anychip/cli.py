"""The ``anychip`` command: ``devices``, ``train`` (and the commands other modules add).

Bad input exits with status 2 and one line on stderr, before any work starts; a bug exits with
status 1 and one line naming it (``--debug`` or ``$ANYCHIP_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from anychip.bench.args import register as register_bench
from anychip.cliargs import (
    Parser,
    UsageError,
    add_debug_flag,
    check_batch_shape,
    finite_positive_float,
    one_line,
    out_of_memory,
    positive_float,
    positive_int,
    random_seed,
    run_command,
)
from anychip.parity import register as register_parity
from anychip.version import __version__

__all__ = ["Parser", "UsageError", "build_parser", "main", "positive_float", "positive_int"]


# -- devices ---------------------------------------------------------------------------------------


def launch_layout() -> tuple[str, dict]:
    """This process's place in a multi-process run, as a line and as data: "single process",
    or torchrun's / jax.distributed's world size and ranks, read from the launcher's
    environment (anychip.distributed.layout(); imports neither torch nor jax)."""
    from anychip.distributed import DistributedError, layout

    try:
        lay = layout()
    except DistributedError as exc:  # a launcher variable that is not a number: say so, do not crash
        return f"cannot tell: {exc}", {"error": str(exc)}
    return lay.describe(), lay.as_dict()


def devices_table(found):
    """The backends as a table of short cells that never wrap: name, available, device count
    and kind (the kind alone may fold, at word boundaries)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="anychip backends (auto-detect order)", title_justify="left")
    for col in ("backend", "available", "devices"):
        table.add_column(col, no_wrap=True)
    table.add_column("device kind", overflow="fold")
    for a in found:
        available = Text("yes", style="green") if a.available else Text("no", style="red")
        table.add_row(Text(a.name), available, Text(str(a.devices or "")), Text(a.device_kind or ""))
    return table


def devices_notes(found) -> list[str]:
    """One line per backend (why it is or is not available, and the install command), then the
    library versions, each distinct set once."""
    lines = []
    for a in found:
        fix = f" - install: {a.install}" if a.install and not a.available else ""
        lines.append(f"{a.name}: {a.reason}{fix}")
    seen = []
    for a in found:
        versions = ", ".join(f"{k} {v}" for k, v in a.versions.items())
        if versions and versions not in seen:
            seen.append(versions)
    lines += [f"versions: {v}" for v in seen]
    return lines


def auto_detect_line(found) -> str:
    """Which backend auto-detect picks from these probes (the first available one with auto-detect
    on, in priority order, as ``ac.backend()`` does), and which others are available but used only
    when named: two backends on one machine (a TPU reached through JAX or natively) must not leave
    the user guessing which one a plain ``ac.backend()`` runs."""
    from anychip.backends import ENV_VAR, find

    available = [a.name for a in found if a.available]
    autos = [n for n in available if getattr(find(n), "auto", False)]
    line = f"auto-detect picks {autos[0]!r}" if autos else "auto-detect finds no backend"
    others = [n for n in available if n not in autos[:1]]
    if others:
        line += f"; also available, used only when named: {', '.join(map(repr, others))}"
    if os.environ.get(ENV_VAR, "").strip():
        line += f" (${ENV_VAR} is set: it names the backend instead)"
    return line


def cmd_devices(args) -> int:
    from anychip.backends import environment_problem, find, list_backends

    found = list_backends()  # built-in and plug-in backends ($ANYCHIP_PLUGINS loads on this first look-up)
    # Every backend is still listed; the variable that `train` would refuse is pointed out.
    problem = environment_problem(found)
    if problem:
        print(f"anychip devices: warning: {problem}", file=sys.stderr)
    line, layout = launch_layout()
    if args.json:
        autos = [a.name for a in found if a.available and getattr(find(a.name), "auto", False)]
        print(json.dumps({"layout": layout, "backends": [a.as_dict() for a in found], "auto": autos[0] if autos else None}, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(devices_table(found))
    # Reasons and install commands are prose with URLs: printed whole, as plain text (no rich
    # markup, so "jax[cuda12]" stays itself), and wrapped by the terminal rather than folded
    # into a narrow column.
    for text in devices_notes(found):
        console.print(text, highlight=False, markup=False, soft_wrap=True)
    console.print(auto_detect_line(found), highlight=False, markup=False, soft_wrap=True)
    console.print(f"launch: {line}", highlight=False, markup=False, soft_wrap=True)
    return 0


# -- train -------------------------------------------------------------------------------------------

PROFILE_WARMUP = 2  # steps before a --profile trace starts: the first ones compile and allocate


def run_logger(log_dir: str):
    """``--log-dir``: a MetricsLogger writing TensorBoard files too where tensorboard is installed."""
    from anychip.metrics_log import INSTALL, MetricsLogger, tensorboard_available

    tensorboard = tensorboard_available()
    if not tensorboard:
        print(f"anychip train: note: tensorboard is not installed, writing metrics.jsonl only ({INSTALL} adds TensorBoard files)",
              file=sys.stderr)
    return MetricsLogger(log_dir, tensorboard=tensorboard)


def cmd_train(args) -> int:
    from anychip import workloads
    from anychip.backends import backend, load_plugins, registration
    from anychip.precision import policy

    # Everything the user typed (and the environment) is checked before anything is built.
    load_plugins()
    precision = policy(args.precision).name
    workload = workloads.get(workloads.with_size(args.workload, args.size))
    be = backend(args.backend)
    batch, seq = check_batch_shape(workload, args.batch, args.seq, host_cpu=registration(be.name).host_cpu)
    if args.profile is not None and args.log_dir is None:
        raise UsageError(f"--profile {args.profile} needs --log-dir DIR, where the trace is written")
    if args.profile is not None and args.steps < args.profile + PROFILE_WARMUP:
        raise UsageError(f"--profile {args.profile} traces {args.profile} steps after {PROFILE_WARMUP} warm-up steps; "
                         f"use --steps {args.profile + PROFILE_WARMUP} or more")
    logger = run_logger(args.log_dir) if args.log_dir is not None else None  # the last check: it creates the run directory
    try:
        return _train(args, workload, be, precision, batch, seq, logger)
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise UsageError(f"--batch {batch} x --seq {seq}: batch too large, out of memory ({one_line(exc)[:200]}); "
                         "use a smaller --batch or --seq") from exc
    finally:
        if logger is not None:
            logger.close()


def _train(args, workload, be, precision: str, batch_size: int, seq: int, logger=None) -> int:
    from anychip.metrics_log import StepProfiler
    from anychip.optim import AdamW, WarmupCosine
    from anychip.step import TrainStep

    model = workload.build(seed=args.seed)
    schedule = WarmupCosine(warmup=max(1, args.steps // 10), total=args.steps)
    step = TrainStep(
        model,
        workload.loss_fn,
        AdamW(lr=args.lr, weight_decay=0.1, schedule=schedule),
        backend=be,
        precision=precision,
        max_grad_norm=1.0,
        compile=args.compile,
        logger=logger,
    )
    data = workload.batches(batch_size, seq, seed=args.seed)
    profiler = None
    if args.profile is not None and logger.run_dir is not None:  # None on the processes that do not write (rank > 0)
        jax_like = getattr(be.registration, "engine", None) == "jax"  # jax.profiler sees the jitted step; torch.profiler would not
        profiler = StepProfiler(logger.run_dir, args.profile, warmup=PROFILE_WARMUP, jax=jax_like, synchronize=step.engine.synchronize)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    losses, tokens, started = [], 0, time.perf_counter()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(f"{workload.name} on {be.name}", total=args.steps, info="")
        try:
            for i in range(args.steps):
                out = step(next(data))
                if profiler is not None:
                    profiler.step()
                tokens += out.tokens
                # Reading the loss synchronises; do it only as often as it is shown.
                if i == 0 or (i + 1) % args.log_every == 0 or i + 1 == args.steps:
                    losses.append((out.step, out.loss))
                    bar.update(task, info=f"loss {out.loss:.4f}  lr {out.lr:.2e}")
                bar.advance(task)
        finally:
            if profiler is not None:
                profiler.close()
    step.synchronize()
    elapsed = time.perf_counter() - started
    print(f"{workload.name} on {be.name}: loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f} in {args.steps} steps, "
          f"{tokens / elapsed:,.0f} tokens/s (including compilation)")
    if logger is not None:
        traced = f" (trace of steps {PROFILE_WARMUP + 1}-{PROFILE_WARMUP + args.profile})" if profiler else ""
        print(f"run logs: {logger.run_dir}{traced}")
    return 0


# -- entry point -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="anychip", description="One PyTorch training step on any accelerator.")
    parser.add_argument("--version", action="version", version=f"anychip {__version__}")
    add_debug_flag(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{devices,train,bench,parity}", parser_class=Parser)

    p = sub.add_parser("devices", help="list every backend: available or not, why, and how to fix it; and this process's launch layout")
    p.add_argument("--json", action="store_true", help='machine-readable output: {"layout": {...}, "backends": [...]}')
    add_debug_flag(p)
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("train", help="train a built-in workload and show the loss")
    p.add_argument("--workload", default="gpt-tiny",
                   help="mlp, gpt-tiny, gpt-small, llama-tiny, llama-small, hf:<model_type> (llama, gpt2, qwen2, mistral, bert) or "
                   "pkg.module:factory")
    p.add_argument("--size", default=None, help="size of an hf:<model_type> workload: tiny (default) or small")
    p.add_argument("--backend", default=None, help="backend name (default: $ANYCHIP_BACKEND, else auto-detect)")
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default: the workload's)")
    p.add_argument("--seq", type=positive_int, default=None, help="sequence length, at most the model's context (default: the workload's)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or bf16-pure")
    p.add_argument("--lr", type=finite_positive_float, default=1e-3)
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--log-dir", default=None, metavar="DIR",
                   help="write every step's metrics to DIR/version_N/ (metrics.jsonl, TensorBoard files); a new version per run")
    p.add_argument("--profile", type=positive_int, default=None, metavar="STEPS",
                   help=f"trace STEPS steps after {PROFILE_WARMUP} warm-ups into the --log-dir run (torch.profiler; jax.profiler on jax:*)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the step (default: the backend's choice)"
    )
    add_debug_flag(p)
    p.set_defaults(func=cmd_train)

    register_bench(sub)  # sub-commands defined next to the code they drive
    register_parity(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(c for c in (args.command, getattr(args, "bench_command", None)) if c)
    return run_command(args, command)


if __name__ == "__main__":
    sys.exit(main())
