"""``anychip bench`` and ``anychip bench compare``.

Every argument is checked before the first backend starts: a bad value ends the command with
one line on stderr and exit status 2. After the run: status 0 when every requested backend
finished, 1 when one failed (crash, error, timeout; or unavailable although named), 130 after
Ctrl-C (the finished rows are still printed and written).

Defaults, chosen so that ``anychip bench`` with no arguments is a one-minute smoke run on a
laptop and a real comparison on an accelerator machine:

- ``--workload gpt-tiny``, 5 warm-up + 50 timed steps, the workload's batch and sequence;
- ``--backends auto``: every available backend of the built-in table, each in its own process
  (``jax:cpu`` included: bench compares stacks, it does not pick one);
- ``--precision``: fp32 when every selected backend runs on the host CPU (its registration
  says ``host_cpu``, as ``cpu`` and ``jax:cpu`` do: bf16 autocast on a CPU is slower than fp32
  and would only add rounding noise to the parity check), otherwise bf16 (fp32 master
  weights, what accelerators are measured at and what the MFU peaks in
  :mod:`anychip.backends.facts.peaks` refer to). Every row uses the same precision, so the
  loss trajectories stay comparable.
- ``--nproc 1``: one process per row, as a training script runs without a launcher.
  ``--nproc 1,2,4`` runs every torch backend once per count; a count N > 1 launches the row
  through torchrun (``python -m torch.distributed.run --standalone``) with
  ``TrainStep(parallel=--parallel)``, ``ddp`` by default. Weak scaling: each process keeps
  ``--batch``, so a step trains on N x batch samples, and tokens/s counts all of them. The N = 1
  row is the plain single-process step (no launcher, ``parallel=None``): the baseline that
  scaling efficiency (tokens/s at N / (N x tokens/s at 1)) divides by. ``jax:*`` rows run at
  N = 1 only: JAX drives every local device from one process (its own data/fsdp sharding).
"""

from __future__ import annotations

import json
import os
import sys

from anychip.bench import plan
from anychip.cliargs import UsageError


# -- checking and running ------------------------------------------------------------------


def _check_output(flag: str, path: str | None) -> None:
    if path is None:
        return
    if not path.strip():
        raise UsageError(f"{flag}: empty path")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def cmd_bench(args) -> int:
    if args.bench_command == "compare":
        return cmd_compare(args)
    from anychip.bench import schema

    if args.print_schema:
        print(json.dumps(schema.SCHEMA, indent=2))
        return 0

    from anychip import workloads
    from anychip.backends import load_plugins
    from anychip.bench import metrics, prices, report
    from anychip.distributed import DistributedError, world_size
    from anychip.precision import policy

    started_at = report.now_iso()
    try:
        launched = world_size() > 1  # WORLD_SIZE or JAX_NUM_PROCESSES > 1 in the environment
    except DistributedError as exc:
        raise UsageError(str(exc)) from None
    if launched:
        raise UsageError(
            "anychip bench starts its own processes: run it once, without torchrun or jax.distributed (--nproc N launches torchrun per row)"
        )
    if args.parallel is not None and max(args.nproc) == 1:
        raise UsageError(f"--parallel {args.parallel} applies to --nproc counts > 1 (e.g. --nproc 1,2)")
    parallel = (args.parallel or "ddp") if max(args.nproc) > 1 else None
    load_plugins()  # a plug-in that cannot be imported: ValueError, exit 2
    try:
        workload = workloads.get(args.workload)
    except (TypeError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    planned, chosen_by = plan.plan_backends(args.backends)
    row_plan, one_process = plan.plan_rows(planned, args.nproc, explicit=chosen_by == "named")
    precision = policy(args.precision).name if args.precision is not None else plan.default_precision(planned)
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--md", args.md), ("--plot", args.plot)):
        _check_output(flag, path)
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'anychip[bench]'")
    price_overrides = dict(args.price)
    peak_tflops = dict(args.peak_tflops)
    tolerance = args.parity_tol or metrics.PARITY_TOLERANCE.get(precision, 1e-3)

    config = {
        "workload": args.workload,
        "backends": [n for n, _ in planned],
        "selection": args.backends,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch or workload.default_batch,
        "seq": args.seq or workload.default_seq,
        "precision": precision,
        "kernels": args.kernels,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "parity_tolerance": tolerance,
        "prices_as_of": prices.PRICES_AS_OF,
        "price_overrides": price_overrides,
        "peak_tflops": peak_tflops,
        "nproc": list(args.nproc),
        "parallel": parallel,
        "one_process_backends": one_process,
    }
    rows, interrupted = _run_rows(args, row_plan, config, price_overrides, peak_tflops)
    metrics.add_parity(rows, tolerance)
    metrics.add_scaling(rows)
    doc = report.document(command=_command(args, config), started_at=started_at, config=config, rows=rows, interrupted=interrupted)
    invalid = schema.validate(doc)
    if invalid:  # a bug in anychip, not in the input: still write what was measured
        print(f"anychip bench: warning: the results do not match schema {schema.SCHEMA_VERSION}: {invalid[0]}", file=sys.stderr)

    report.print_table(doc)
    failed_writes = 0
    for flag, path, write in (
        ("--json", args.json, report.write_json),
        ("--csv", args.csv, report.write_csv),
        ("--md", args.md, report.write_markdown),
        ("--plot", args.plot, report.write_plot),
    ):
        if path:
            try:
                write(doc, path)
                print(f"wrote {path}", file=sys.stderr)
            except OSError as exc:
                failed_writes += 1
                print(f"anychip bench: error: {flag} {path}: {exc.strerror or exc}", file=sys.stderr)
    if interrupted:
        return 130
    tolerated = {"unavailable"} if chosen_by == "all" else set()
    bad = [r for r in rows if r["status"] != "ok" and r["status"] not in tolerated]
    return 1 if bad or failed_writes or invalid else 0


def _command(args, config) -> list[str]:
    """The command that reproduces this run, every default spelt out but one process per row."""
    cmd = ["anychip", "bench", "--workload", args.workload, "--backends", args.backends, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(config["batch"]), "--seq", str(config["seq"]),
           "--precision", config["precision"], "--kernels", args.kernels, "--seed", str(args.seed),
           "--timeout", f"{args.timeout:g}", "--parity-tol", f"{config['parity_tolerance']:g}"]
    for name, usd in args.price:
        cmd += ["--price", f"{name}={usd:g}"]
    for name, tflops in args.peak_tflops:
        cmd += ["--peak-tflops", f"{tflops:g}" if name == "*" else f"{name}={tflops:g}"]
    if config["nproc"] != [1]:  # config["parallel"] is set exactly then
        cmd += ["--nproc", ",".join(map(str, config["nproc"])), "--parallel", config["parallel"]]
    for flag in ("json", "csv", "md", "plot"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    return cmd


def _run_rows(args, row_plan, config, price_overrides, peak_tflops) -> tuple[list[dict], bool]:
    """Run every planned row (a backend at a process count) in turn under a live progress display."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from anychip.bench import metrics, supervise
    from anychip.bench.measure import RunSpec

    precision = config["precision"]
    rows = []
    for name, avail, nproc in row_plan:
        shape = {"world_size": nproc, "parallel": config["parallel"] if nproc > 1 else None}
        if avail.available:
            rows.append(metrics.empty_row(name, "skipped", "not run", precision, **shape))
        else:
            fix = f" (install: {avail.install})" if avail.install else ""
            rows.append(metrics.empty_row(name, "unavailable", f"{avail.reason}{fix}", precision, **shape))
    total = args.warmup + args.steps
    columns = (
        TextColumn("[bold]{task.fields[backend]:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False, refresh_per_second=4) as progress:
        tasks = [
            progress.add_task(
                "",
                total=total,
                start=False,
                backend=metrics.row_label(row),
                phase="waiting" if row["status"] == "skipped" else "unavailable",
            )
            for row in rows
        ]
        current = None
        try:
            for row, task in zip(rows, tasks):
                if row["status"] != "skipped":
                    continue
                current = row
                progress.start_task(task)
                progress.update(task, phase="starting")

                def on_event(event, task=task):
                    kind = event.get("event")
                    if kind == "ready":
                        progress.update(task, phase=f"warm-up on {event.get('device_kind') or '?'} (compiling)")
                    elif kind == "step" and event["phase"] == "warmup":
                        progress.update(task, completed=event["done"], phase=f"warm-up {event['done']}/{event['total']}")
                    elif kind == "step":
                        progress.update(task, completed=args.warmup + event["done"], phase="timing")

                spec = RunSpec(
                    backend=row["backend"], workload=args.workload, steps=args.steps, warmup=args.warmup,
                    batch=config["batch"], seq=config["seq"], precision=precision, kernels=args.kernels, seed=args.seed,
                    nproc=row["world_size"], parallel=row["parallel"],
                )
                outcome = supervise.run_backend(spec, args.timeout, on_event)
                row.update(status=outcome.status, error=outcome.error, startup_s=outcome.startup_s, wall_s=outcome.wall_s)
                if outcome.ready:
                    row.update(device_kind=outcome.ready.get("device_kind") or "", devices=outcome.ready.get("devices"),
                               versions={k: str(v) for k, v in (outcome.ready.get("versions") or {}).items()},
                               layout=outcome.ready.get("layout"))
                if outcome.status == "ok":
                    metrics.finish_row(row, outcome.measured, warmup=args.warmup, price_overrides=price_overrides, peak_tflops=peak_tflops)
                    progress.update(task, completed=total, phase=f"[green]done[/] {row['tokens_per_s']:,.0f} tokens/s")
                else:
                    row["log_tail"] = outcome.log_tail
                    progress.update(task, phase=f"[red]{outcome.status}")
                progress.stop_task(task)
                current = None
        except KeyboardInterrupt:
            # Ctrl-C: run_backend has already killed the child. Keep every finished row, mark the
            # one in flight and the ones never started, and let the caller write the outputs.
            if current is not None:
                current.update(
                    metrics.empty_row(
                        current["backend"],
                        "interrupted",
                        "interrupted (Ctrl-C); the backend was stopped",
                        precision,
                        world_size=current["world_size"],
                        parallel=current["parallel"],
                    )
                )
            for row in rows:
                if row["status"] == "skipped":
                    row["error"] = "not run: interrupted (Ctrl-C)"
            return rows, True
    return rows, False


def cmd_compare(args) -> int:
    from anychip.bench import report

    a, b = report.load(args.a), report.load(args.b)  # ValueError -> one line, exit 2
    rows, regressions = report.compare(a, b, args.max_regression)
    report.print_comparison(rows, regressions, report.config_differences(a, b), args.a, args.b, args.max_regression)
    return 1 if regressions else 0
