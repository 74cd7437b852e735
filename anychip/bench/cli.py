"""``anychip bench`` and ``anychip bench compare``.

Every argument is checked before the first backend starts: a bad value ends the command with
one line on stderr and exit status 2. After the run: status 0 when every requested backend
finished, 1 when one failed (crash, error, timeout, a malformed event; or unavailable although
named), 128 + the signal after a stop request: 130 after Ctrl-C (SIGINT), 143 after SIGTERM,
129 after SIGHUP. A stop request stops the row in flight and every process it started, marks it
and the rows never started "interrupted", and still prints and writes the rows that finished;
further signals during that clean-up are recorded, not obeyed (:mod:`anychip.bench.interrupts`).

Defaults, chosen so that ``anychip bench`` with no arguments is a one-minute smoke run on a
laptop and a real comparison on an accelerator machine:

- ``--workload gpt-tiny``, 5 warm-up steps, then ``--repeat 5`` timed windows of 50 steps (step
  ms and tokens/s: the median over the windows, the spread their p10-p90), the workload's batch
  and sequence;
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
- ``--reference``: ``cpu`` when it runs, else the first backend listed: every row's loss parity
  is against that backend's row of the same process count, within ``--rtol`` (default per
  precision, :data:`anychip.parity.RTOL`): the rule of ``anychip parity``.

The machine's 1-minute load average is read before and after every row; a load above the CPU
count, and a row whose windows spread over more than 10 % of its median, are warnings (stderr,
the footer and ``doc["warnings"]``): figures measured so are not worth comparing.
"""

from __future__ import annotations

import json
import os
import sys

from anychip.bench import interrupts, plan
from anychip.bench.report.outputs import check_outputs, write_outputs
from anychip.cliargs import UsageError
from anychip.parity import default_rtol


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
    reference = plan.parity_reference(planned, args.reference)
    check_outputs(_outputs(args))
    if args.profile is not None and args.log_dir is None:
        raise UsageError(f"--profile {args.profile} needs --log-dir DIR, where each row's trace is written")
    if args.log_dir is not None:
        from anychip.metrics_log import check_log_dir

        check_log_dir(args.log_dir, flag="--log-dir", owner=None)  # a file, or a directory that cannot be made: one line now
    price_overrides = dict(args.price)
    price_table = prices.load(args.prices) if args.prices else prices.DEFAULT  # a bad file: one line, before any row runs
    peak_tflops = dict(args.peak_tflops)
    tolerance = args.rtol if args.rtol is not None else default_rtol(precision)

    config = {
        "workload": args.workload,
        "backends": [n for n, _ in planned],
        "selection": args.backends,
        "steps": args.steps,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "batch": args.batch or workload.default_batch,
        "seq": args.seq or workload.default_seq,
        "precision": precision,
        "kernels": args.kernels,
        "seed": args.seed,
        "timeout_s": args.timeout,
        "parity_tolerance": tolerance,
        "reference": reference,
        "prices_as_of": price_table.as_of,
        "price_overrides": price_overrides,
        "peak_tflops": peak_tflops,
        "nproc": list(args.nproc),
        "parallel": parallel,
        "one_process_backends": one_process,
    }
    rows = _planned_rows(row_plan, precision, config["parallel"])
    loads: list[float] = []
    with interrupts.Interrupts() as stop:
        interrupted = False
        try:
            _run_rows(args, rows, config, price_overrides, peak_tflops, loads, price_table)
            stop.hold()  # every row is done: a stop request now changes the exit status only
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: the handlers record any further one
            interrupted = True
            _mark_interrupted(rows, stop.reason())
        warnings = metrics.add_parity(rows, tolerance, reference)
        metrics.add_scaling(rows)
        doc = report.document(command=_command(args, config), started_at=started_at, config=config, rows=rows, interrupted=interrupted)
        load = {"cores": os.cpu_count() or 1, "max_1min": max(loads)} if loads else None
        if load:
            doc["machine"]["load"] = load
        doc["warnings"] = warnings + metrics.run_warnings(rows, load)
        for line in doc["warnings"]:
            print(f"anychip bench: warning: {line}", file=sys.stderr)
        invalid = schema.validate(doc)
        if invalid:  # a bug in anychip, not in the input: still write what was measured
            print(f"anychip bench: warning: the results do not match schema {schema.SCHEMA_VERSION}: {invalid[0]}", file=sys.stderr)
        try:
            report.print_table(doc, wide=getattr(args, "wide", False))
        except OSError as exc:  # stdout closed (a pipe whose reader left): the files still get written
            print(f"anychip bench: warning: cannot print the table: {exc.strerror or exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a rendering bug must never cost the measured rows their files
            print(f"anychip bench: warning: cannot print the table ({type(exc).__name__}: {exc}); writing the files", file=sys.stderr)
        failed_writes = write_outputs(doc, _outputs(args), wide=getattr(args, "wide", False))
    if interrupted or stop.received:
        return stop.exit_code()  # 130 (SIGINT), 143 (SIGTERM), 129 (SIGHUP)
    tolerated = {"unavailable"} if chosen_by == "all" else set()
    bad = [r for r in rows if r["status"] != "ok" and r["status"] not in tolerated]
    return 1 if bad or failed_writes or invalid else 0


def _outputs(args) -> dict[str, str | None]:
    return {"--json": args.json, "--csv": args.csv, "--md": args.md, "--plot": args.plot}


def _command(args, config) -> list[str]:
    """The command that reproduces this run, every default spelt out but one process per row."""
    cmd = ["anychip", "bench", "--workload", args.workload, "--backends", args.backends, "--steps", str(args.steps),
           "--repeat", str(config["repeat"]), "--warmup", str(args.warmup), "--batch", str(config["batch"]), "--seq", str(config["seq"]),
           "--precision", config["precision"], "--kernels", args.kernels, "--seed", str(args.seed),
           "--timeout", f"{args.timeout:g}", "--reference", config["reference"], "--rtol", f"{config['parity_tolerance']:g}"]
    for name, usd in args.price:
        cmd += ["--price", f"{name}={usd:g}"]
    if args.prices:
        cmd += ["--prices", args.prices]
    if args.log_dir:
        cmd += ["--log-dir", args.log_dir] + (["--profile", str(args.profile)] if args.profile else [])
    for name, tflops in args.peak_tflops:
        cmd += ["--peak-tflops", f"{tflops:g}" if name == "*" else f"{name}={tflops:g}"]
    if config["nproc"] != [1]:  # config["parallel"] is set exactly then
        cmd += ["--nproc", ",".join(map(str, config["nproc"])), "--parallel", config["parallel"]]
    for flag in ("json", "csv", "md", "plot"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    return cmd


def _planned_rows(row_plan, precision: str, parallel: str | None) -> list[dict]:
    """One row per planned (backend, process count): "skipped" until it runs, or "unavailable"."""
    from anychip.bench import metrics

    rows = []
    for name, avail, nproc in row_plan:
        shape = {"world_size": nproc, "parallel": parallel if nproc > 1 else None}
        if avail.available:
            rows.append(metrics.empty_row(name, "skipped", "not run", precision, **shape))
        else:
            fix = f" (install: {avail.install})" if avail.install else ""
            rows.append(metrics.empty_row(name, "unavailable", f"{avail.reason}{fix}", precision, **shape))
    return rows


def _mark_interrupted(rows: list[dict], reason: str) -> None:
    """After a stop request: the row in flight (its child already stopped) and the rows never
    started say so; every finished row stays as it is."""
    from anychip.bench import metrics

    for row in rows:
        if row["status"] == "running":
            row.update(metrics.empty_row(row["backend"], "interrupted", f"interrupted ({reason}); the backend was stopped",
                                         row["precision"], world_size=row["world_size"], parallel=row["parallel"]))
        elif row["status"] == "skipped":
            row["error"] = f"not run: interrupted ({reason})"


def _note_load(loads: list[float]) -> None:
    """Append the 1-minute load average (nothing where the OS keeps none)."""
    try:
        loads.append(os.getloadavg()[0])
    except (AttributeError, OSError):
        pass


def _run_rows(args, rows, config, price_overrides, peak_tflops, loads: list[float], price_table=None) -> None:
    """Run every planned row (a backend at a process count) in turn under a live progress
    display, filling ``rows`` in place: a KeyboardInterrupt leaves the finished ones filled and
    the one in flight with status "running". The load average before and after each row is
    appended to ``loads``."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from anychip.bench import metrics, processes, supervise
    from anychip.bench.measure import RunSpec

    precision = config["precision"]
    total = args.warmup + args.steps * args.repeat
    columns = (
        TextColumn("[bold]{task.fields[backend]:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[phase]}"),
        TimeElapsedColumn(),
    )
    # Subreaper: whatever a row starts stays this process's descendant, so the sweep after each
    # row, and the one here after the last (or after an interrupt that came between two steps of
    # supervise's own clean-up), leaves nothing of the run behind.
    with processes.subreaper(), Progress(*columns, console=Console(stderr=True), transient=False, refresh_per_second=4) as progress:
        before = processes.children()
        try:
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
            for row, task in zip(rows, tasks):
                if row["status"] != "skipped":
                    continue
                row["status"] = "running"
                _note_load(loads)
                progress.start_task(task)
                progress.update(task, phase="starting")

                def on_event(event, task=task):  # only events that passed events.parse
                    kind = event["event"]
                    if kind == "ready":
                        progress.update(task, phase=f"warm-up on {escape(event['device_kind'] or '?')} (compiling)")
                    elif kind == "step" and event["phase"] == "warmup":
                        progress.update(task, completed=event["done"], phase=f"warm-up {event['done']}/{event['total']}")
                    elif kind == "step":
                        progress.update(task, completed=args.warmup + event["done"], phase=f"timing ({args.repeat} windows)")

                spec = RunSpec(
                    backend=row["backend"], workload=args.workload, steps=args.steps, warmup=args.warmup,
                    batch=config["batch"], seq=config["seq"], precision=precision, kernels=args.kernels, seed=args.seed,
                    nproc=row["world_size"], parallel=row["parallel"], repeat=args.repeat,
                    log_dir=os.path.abspath(args.log_dir) if args.log_dir else None, profile=args.profile or 0,
                )
                outcome = supervise.run_backend(spec, args.timeout, on_event)
                _note_load(loads)
                row.update(status=outcome.status, error=outcome.error, startup_s=outcome.startup_s, wall_s=outcome.wall_s)
                if outcome.ready:
                    row.update(device_kind=outcome.ready["device_kind"] or "", devices=outcome.ready["devices"],
                               versions=dict(outcome.ready["versions"]), layout=outcome.ready["layout"])
                if outcome.status == "ok":
                    metrics.finish_row(row, outcome.measured, warmup=args.warmup, price_overrides=price_overrides, peak_tflops=peak_tflops,
                                       price_table=price_table)
                    progress.update(task, completed=total, phase=f"[green]done[/] {row['tokens_per_s']:,.0f} tokens/s")
                else:
                    row["log_tail"] = outcome.log_tail
                    progress.update(task, phase=f"[red]{outcome.status}")
                progress.stop_task(task)
        finally:
            processes.sweep(before)


def cmd_compare(args) -> int:
    """0 unless a row regressed (its tokens/s intervals separate: :mod:`anychip.bench.report.compare`),
    then 1; runs of another workload, batch shape or precision are refused (exit 2) unless --force."""
    from anychip.bench import report
    from anychip.bench.report.compare import MUST_MATCH, NOTED

    a, b = report.load(args.a), report.load(args.b)  # ValueError -> one line, exit 2
    refused = report.config_differences(a, b, MUST_MATCH)
    if refused and not args.force:
        raise UsageError(f"{args.a} and {args.b} measured different things ({'; '.join(refused)}); --force compares them anyway")
    result = report.compare(a, b, args.max_regression)
    report.print_comparison(result, refused + report.config_differences(a, b, NOTED), args.a, args.b, args.max_regression)
    return 1 if result.regressions else 0
