"""Helpers shared by the bench tests (a uniquely named module: tests/ has no packages)."""

from __future__ import annotations

import contextlib
import io


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``anychip ARGV`` in this process: (exit status, stdout, stderr)."""
    from anychip.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def one_line(text: str) -> str:
    """The text, asserted to be exactly one non-empty line."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    return lines[0]


def finished_row(backend: str, *, tokens_per_s: float, losses, peak_bytes: int = 1 << 20, mfu_peak_tflops=None, device_kind="AMD EPYC",
                 world_size: int = 1, windows=None):
    """A finished row as the bench builds it, with a chosen throughput: one timed window of one
    step, or one window per value of ``windows`` (tokens/s; the row's is then their median); ``world_size``
    processes train on world_size x 2 samples of 500 tokens per step."""
    from anychip.bench import metrics

    tokens = 1000 * world_size
    measured = {
        "device_kind": device_kind, "devices": 1, "devices_used": 1, "versions": {"torch": "2.13.0"},
        "setup_s": 0.5, "first_step_s": 1.0, "warmup_s": 1.0,
        "window_step_s": [tokens / t for t in (windows or [tokens_per_s])], "window_steps": 1,
        "tokens_per_step": tokens, "samples_per_step": 2 * world_size, "batch": 2, "seq": 500, "flops_per_token": 1e6,
        "peak_flops": None, "memory": {"peak_bytes": peak_bytes, "current_bytes": peak_bytes // 2, "source": "process RSS"},
        "losses": list(losses),
    }
    if world_size > 1:
        measured["layout"] = {"engine": "torchrun", "world_size": world_size, "rank": 0, "local_rank": 0,
                              "local_world_size": world_size, "coordinator": "localhost:29500", "nodes": 1}
    peak = {backend: mfu_peak_tflops} if mfu_peak_tflops else None
    row = metrics.empty_row(backend, "ok", None, "fp32", world_size=world_size, parallel="ddp" if world_size > 1 else None)
    return metrics.finish_row(row, measured, warmup=1, peak_tflops=peak)


def make_doc(rows, **config_over):
    from anychip.bench import metrics, prices, report

    config = {
        "workload": "gpt-tiny", "backends": [r["backend"] for r in rows], "selection": "auto", "steps": 3, "repeat": 1, "warmup": 1,
        "batch": 2, "seq": 500, "precision": "fp32", "kernels": "auto", "seed": 0, "timeout_s": 60.0,
        "parity_tolerance": 1e-3, "prices_as_of": prices.PRICES_AS_OF, "price_overrides": {}, "peak_tflops": {},
    }
    config.update(config_over)
    metrics.add_parity(rows, config["parity_tolerance"], config.get("reference"))
    metrics.add_scaling(rows)
    return report.document(command=["anychip", "bench"], started_at=report.now_iso(), config=config, rows=rows, interrupted=False)


def as_version_1(doc: dict) -> dict:
    """``doc`` as a version-1 bench wrote it: no timed windows (per-step times in step_times_s
    instead), no load, warnings, --reference or --repeat."""
    import copy

    old = copy.deepcopy(doc)
    old["schema_version"] = 1
    old.pop("warnings", None)
    old["machine"].pop("load", None)
    for key in ("reference", "repeat"):
        old["config"].pop(key, None)
    for row in old["rows"]:
        row["step_times_s"] = row.pop("window_step_s")
        for key in ("repeat", "tokens_per_s_interval", "samples_per_s_interval"):
            del row[key]
    return old
