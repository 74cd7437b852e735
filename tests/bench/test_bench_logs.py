"""`anychip bench --log-dir DIR [--profile STEPS] --prices FILE`: each row's per-step metrics
written after the timed windows (JSON Lines and TensorBoard, read back with TensorBoard's own
reader), a profiler trace, and the row costed from the user's price file."""

from __future__ import annotations

import json

import pytest
from bench_support import run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow


def test_bench_logs_every_step_of_a_row_and_prices_it_from_the_file(tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"prices": [{"match": ".", "usd_per_device_hour": 0.5, "source": "our contract",
                                              "source_date": "2026-11-01"}]}))
    out, logs = tmp_path / "run.json", tmp_path / "logs"
    code, _, err = run_cli("bench", "--workload", "mlp", "--backends", "cpu", "--steps", "3", "--warmup", "1", "--repeat", "2",
                           "--log-dir", str(logs), "--profile", "2", "--prices", str(prices), "--json", str(out))
    assert code == 0, err
    row = json.loads(out.read_text())["rows"][0]
    assert row["status"] == "ok", row["error"]
    assert row["price"]["usd_per_device_hour"] == 0.5 and "2026-11-01" in row["price"]["source"]
    assert row["usd_per_million_tokens"] == pytest.approx(0.5 / 3600 / row["tokens_per_s"] * 1e6)

    run = logs / "cpu" / "version_0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 1 + 1 + 3 * 2))  # the warm-up step, then 2 windows of 3
    assert [r["loss"] for r in records] == pytest.approx(row["losses"], rel=1e-6)
    timed = [r["step_time_s"] for r in records[1:]]
    assert timed == pytest.approx([t for t in row["window_step_s"] for _ in range(3)])

    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(row["losses"], rel=1e-6)
    assert list(run.glob("*.pt.trace.json")), sorted(p.name for p in run.iterdir())
