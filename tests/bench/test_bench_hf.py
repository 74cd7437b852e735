"""`anychip bench` on Hugging Face architectures (``--workload hf:<model_type>``): real measuring
processes on cpu and jax:cpu, whose losses must agree within the fp32 parity tolerance."""

from __future__ import annotations

import json

import pytest
from bench_support import one_line, run_cli

from support import requires

pytestmark = [pytest.mark.slow, requires("jax", "torchax", "transformers")]


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_an_hf_architecture_benches_on_cpu_and_jax_with_parity(tmp_path, model_type):
    out = tmp_path / "run.json"
    code, _, err = run_cli("bench", "--workload", f"hf:{model_type}", "--size", "tiny", "--backends", "cpu,jax:cpu",
                           "--steps", "2", "--repeat", "1", "--warmup", "1", "--json", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["config"]["workload"] == f"hf:{model_type}-tiny"
    rows = {r["backend"]: r for r in doc["rows"]}
    assert rows["cpu"]["status"] == rows["jax:cpu"]["status"] == "ok", [r["error"] for r in doc["rows"]]
    parity = rows["jax:cpu"]["parity"]
    assert parity["reference"] == "cpu" and parity["first_step_over"] is None and parity["max_rel_diff"] < 1e-4, parity
    assert len(rows["cpu"]["losses"]) == 3 and all(loss > 0 for loss in rows["cpu"]["losses"])


@pytest.mark.parametrize("argv, needle", [
    (["--workload", "hf:nosuch"], "nosuch"),
    (["--workload", "hf:llama", "--size", "huge"], "huge"),
    (["--workload", "gpt-tiny", "--size", "small"], "--size"),
])
def test_bad_hf_workloads_are_one_line(argv, needle):
    code, _, err = run_cli("bench", *argv, "--backends", "cpu")
    assert code == 2
    assert needle in one_line(err)
