"""The arguments of ``anychip bench``, ``bench compare`` and ``bench show``: their parsers and the value
types that turn a bad value into argparse's one-line error (exit status 2)."""

from __future__ import annotations

import argparse
import math

from anychip.bench.cli import cmd_bench
from anychip.bench.show import cmd_show
from anychip.parity import RTOL
from anychip.cliargs import add_debug_flag, check_batch_shape, finite_positive_float, nonnegative_float, positive_int, random_seed


def _price(text: str) -> tuple[str, float]:
    from anychip.bench.prices import parse_price

    try:
        return parse_price(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _nproc(text: str) -> list[int]:
    """``--nproc``: comma-separated process counts, each >= 1, none twice; ascending."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise argparse.ArgumentTypeError(f"empty count in {text!r}; expected counts such as 1,2,4")
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected whole numbers such as 1,2,4, got {part!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"process counts must be >= 1, got {n}")
        if n in counts:
            raise argparse.ArgumentTypeError(f"{n} is listed twice in {text!r}")
        counts.append(n)
    return sorted(counts)


def _peak(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if sep and not name.strip():
        raise argparse.ArgumentTypeError(f"expected X or NAME=X (TFLOP/s), got {text!r}")
    try:
        tflops = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X or NAME=X with X in TFLOP/s, got {text!r}") from None
    if not (tflops > 0 and math.isfinite(tflops)):
        raise argparse.ArgumentTypeError(f"peak must be a finite number > 0, got {value!r}")
    return (name.strip() if sep else "*"), tflops


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run one workload on several backends, side by side",
        description="Run the same training step on several backends (one process each) and compare "
        "throughput, MFU, memory, loss parity and cost. 'anychip bench compare A.json B.json' compares two runs.",
        epilog="Backends from other packages (or test fakes): ANYCHIP_PLUGINS=module[,module] names modules "
        "that call anychip.backends.register(...) when imported; they load in every backend process too.",
    )
    p.add_argument(
        "--workload", default="gpt-tiny",
        help="mlp, gpt-tiny, gpt-small, llama-tiny, llama-small, hf:<model_type> (llama, gpt2, qwen2, mistral, bert) or "
        "pkg.module:factory (default gpt-tiny)",
    )
    p.add_argument("--size", default=None, help="size of an hf:<model_type> workload: tiny (default; CI) or small (12 layers, hidden 768)")
    p.add_argument(
        "--backends",
        default="auto",
        help="auto (every available backend), all (every registered one; unavailable ones become failed rows) "
        "or a comma-separated list such as cpu,cuda,jax:gpu",
    )
    p.add_argument("--steps", type=positive_int, default=50, help="timed steps per window (default 50)")
    p.add_argument(
        "--repeat", type=positive_int, default=5, metavar="N",
        help="timed windows of --steps steps, back to back, one synchronisation at the end of each; step ms and tokens/s are "
        "the median over the windows, the spread their p10-p90 (default 5)",
    )
    p.add_argument("--warmup", type=positive_int, default=5, help="untimed warm-up steps, compilation included (default 5)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default: the workload's)")
    p.add_argument("--seq", type=positive_int, default=None, help="sequence length (default: the workload's)")
    p.add_argument("--precision", default=None, help="fp32, bf16 or bf16-pure (default: fp32 on CPU-only runs, else bf16)")
    p.add_argument(
        "--kernels",
        choices=("auto", "reference"),
        default="auto",
        help="custom kernels where available, or the plain-PyTorch reference ops",
    )
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument(
        "--timeout",
        type=finite_positive_float,
        default=900.0,
        metavar="S",
        help="seconds one backend may take, start-up and compilation included (default 900)",
    )
    p.add_argument(
        "--rtol",
        "--parity-tol",
        dest="rtol",
        type=finite_positive_float,
        default=None,
        metavar="REL",
        help="relative loss tolerance per step, as in 'anychip parity' (default: "
        + ", ".join(f"{v:g} {k}" for k, v in RTOL.items()) + ")",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="BACKEND",
        help="the backend every row's loss parity is measured against, at the same process count "
        "(default: cpu when it runs, else the first backend listed)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results (versioned schema)")
    p.add_argument("--csv", metavar="PATH", help="write one CSV line per backend")
    p.add_argument("--md", metavar="PATH", help="write a Markdown table")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: throughput, MFU, memory, cost, loss curves and loss differences")
    p.add_argument("--wide", action="store_true", help="every column (device, compile time, spreads, samples/s, final loss, versions)")
    p.add_argument("--log-dir", metavar="DIR", default=None,
                   help="per-step metrics of every row (metrics.jsonl + TensorBoard) in DIR/<backend>/version_N, written after timing")
    p.add_argument("--profile", type=positive_int, default=None, metavar="STEPS",
                   help="after the timed windows, trace STEPS more steps of every row into its --log-dir run")
    p.add_argument(
        "--price",
        type=_price,
        action="append",
        default=[],
        metavar="NAME=USD_PER_HOUR",
        help="USD per device-hour for a backend name or device kind (repeatable); overrides the price table",
    )
    p.add_argument("--prices", metavar="FILE", default=None,
                   help="a price table in the format of anychip/bench/prices.json, used instead of the dated default one")
    p.add_argument(
        "--peak-tflops",
        type=_peak,
        action="append",
        default=[],
        metavar="[NAME=]X",
        help="peak TFLOP/s of the devices one process uses, for MFU: for every row, or NAME=X for one backend / device kind (repeatable); "
        "an --nproc N row on N distinct devices counts N times it",
    )
    p.add_argument(
        "--nproc",
        type=_nproc,
        default=[1],
        metavar="N[,N...]",
        help="process counts to run every torch backend at (default 1: one plain process). "
        "N > 1 launches the row through torchrun with TrainStep(parallel=--parallel); "
        "weak scaling: each process keeps --batch, a step trains on N x batch samples. "
        "The table adds scaling efficiency = tokens/s at N / (N x tokens/s at 1). "
        "jax:* rows run at 1 only (JAX uses every local device in one process)",
    )
    p.add_argument(
        "--parallel",
        choices=("ddp", "fsdp"),
        default=None,
        help="how the --nproc N > 1 rows split the model: ddp (replicated, default) or fsdp (sharded)",
    )
    p.add_argument("--print-schema", action="store_true", help="print the JSON schema of --json and exit")
    add_debug_flag(p)
    sub = p.add_subparsers(dest="bench_command", metavar="{compare,show}")
    # add_subparsers builds with the parent's class: anychip.cliargs.Parser, whose errors are one line.
    c = sub.add_parser(
        "compare",
        help="compare two --json results per backend: a regression only where the tokens/s intervals separate",
        description="Per row (backend and process count): B is a regression when its tokens/s p90 is below A's p10 x "
        "(1 - --max-regression), faster when its p10 is above A's p90 x (1 + --max-regression); a median change beyond "
        "the threshold with overlapping intervals is inconclusive. Exit 1 for a regression (or a row that finished in A "
        "only), else 0.",
    )
    c.add_argument("a", metavar="A.json")
    c.add_argument("b", metavar="B.json")
    c.add_argument(
        "--max-regression",
        type=nonnegative_float,
        default=0.05,
        metavar="FRACTION",
        help="how far apart the tokens/s intervals must be to count as a change (default 0.05)",
    )
    c.add_argument("--force", action="store_true", help="compare runs of a different workload, batch, seq or precision anyway")
    add_debug_flag(c)
    # SUPPRESS: a flag given before "show" (anychip bench --wide show RUN.json) is not reset by the sub-command's default.
    s = sub.add_parser("show", help="print a saved --json result again and write its Markdown, CSV or plot; runs nothing")
    s.add_argument("run", metavar="RUN.json")
    s.add_argument("--md", metavar="PATH", default=argparse.SUPPRESS, help="write a Markdown table")
    s.add_argument("--csv", metavar="PATH", default=argparse.SUPPRESS, help="write one CSV line per row")
    s.add_argument("--plot", metavar="PATH", default=argparse.SUPPRESS, help="write the PNG --plot writes")
    s.add_argument("--wide", action="store_true", default=argparse.SUPPRESS, help="every column")
    add_debug_flag(s)
    s.set_defaults(func=cmd_show)
    p.set_defaults(func=_checked_bench)


def _checked_bench(args) -> int:
    """``cmd_bench``, once the batch is known to fit the workload: a --seq beyond the model's
    context or a batch larger than the host's memory is one line before anything runs, not a failed row per backend."""
    if args.bench_command is None and not args.print_schema:
        from anychip import workloads
        from anychip.backends import load_plugins

        load_plugins()
        args.workload = workloads.with_size(args.workload, args.size)  # hf:llama --size small -> hf:llama-small
        check_batch_shape(workloads.get(args.workload), args.batch, args.seq)
    return cmd_bench(args)
