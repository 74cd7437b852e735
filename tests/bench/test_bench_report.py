"""The bench document: schema validation, CSV/Markdown and the plot (`anychip bench compare`: test_bench_compare.py)."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
from bench_support import finished_row, make_doc, run_cli
from support import requires

from anychip.bench import metrics, report, schema


def _doc():
    rows = [
        finished_row("cpu", tokens_per_s=2000.0, losses=[3.0, 2.0, 1.5, 1.2], mfu_peak_tflops=0.008),
        finished_row("jax:cpu", tokens_per_s=1000.0, losses=[3.0, 2.0, 1.5, 1.3]),
        metrics.empty_row("fake-crash", "crashed", "exited with status 3", "fp32"),
    ]
    return make_doc(rows)


# -- schema ---------------------------------------------------------------------------------


def test_a_built_document_is_valid_and_json_clean():
    doc = _doc()
    assert schema.validate(doc) == []
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["schema_version"] == schema.SCHEMA_VERSION and doc["kind"] == "anychip-bench"
    assert set(doc["machine"]) == {"hostname", "cpu", "cpu_count", "os", "python"}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.pop("machine"), "$: missing required field 'machine'"),
        (lambda d: d["rows"][0].pop("tokens_per_s"), "$.rows[0]: missing required field 'tokens_per_s'"),
        (lambda d: d["rows"][0].update(tokens_per_s="fast"), "$.rows[0].tokens_per_s: expected number or null, got str"),
        (lambda d: d["rows"][0].update(tokens_per_s=-1.0), "$.rows[0].tokens_per_s: -1.0 is below the minimum 0"),
        (lambda d: d["rows"][1].update(final_loss=math.nan), "$.rows[1].final_loss: expected number or null, got non-finite number nan"),
        (lambda d: d["rows"][2].update(status="weird"), "$.rows[2].status: 'weird' is not one of"),
        (lambda d: d["rows"][0].update(colour="red"), "$.rows[0]: unexpected field 'colour'"),
        (lambda d: d["rows"][0]["step_time_s"].pop("p90"), "$.rows[0].step_time_s: missing required field 'p90'"),
        (lambda d: d["rows"][0]["losses"].append("x"), "$.rows[0].losses[4]: expected number or null, got str"),
        (lambda d: d["rows"][0]["versions"].update(torch=2), "$.rows[0].versions.torch: expected string, got int"),
        (lambda d: d.update(schema_version=3), "$.schema_version: expected 2, got 3"),
        (lambda d: d["rows"][0].update(tokens_per_s_interval=[1.0]), "$.rows[0].tokens_per_s_interval: 1 item(s), fewer than 2"),
        (lambda d: d["rows"][0].pop("window_step_s"), "$.rows[0]: missing required field 'window_step_s'"),
        (lambda d: d["config"].update(steps=0), "$.config.steps: 0 is below the minimum 1"),
        (lambda d: d.update(started_at="yesterday"), "$.started_at: 'yesterday' does not match"),
        (lambda d: d["rows"][0].update(backend="two words"), "$.rows[0].backend: 'two words' does not match"),
    ],
)
def test_schema_catches(mutate, expected):
    doc = copy.deepcopy(_doc())
    mutate(doc)
    errors = schema.validate(doc)
    assert any(e.startswith(expected) for e in errors), errors


def test_validator_refuses_keywords_it_does_not_implement():
    with pytest.raises(ValueError, match="oneOf"):
        schema.validate(1, {"oneOf": [{"type": "integer"}]})
    json.dumps(schema.SCHEMA)  # the schema itself is plain JSON


def test_load_rejects_what_is_not_a_result(tmp_path):
    good = tmp_path / "good.json"
    report.write_json(_doc(), str(good))
    assert report.load(str(good))["rows"][0]["backend"] == "cpu"
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match="is not JSON"):
        report.load(str(tmp_path / "text.json"))
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not an anychip bench result: .*missing required field"):
        report.load(str(tmp_path / "other.json"))
    future = _doc()
    future["schema_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(future))
    with pytest.raises(ValueError, match="schema_version 99"):
        report.load(str(tmp_path / "future.json"))


# -- CSV / Markdown / table ---------------------------------------------------------------------


def test_csv_and_markdown(tmp_path):
    doc = _doc()
    report.write_csv(doc, str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv") as fh:
        records = list(csv.DictReader(fh))
    assert [r["backend"] for r in records] == ["cpu", "jax:cpu", "fake-crash"]
    assert float(records[0]["tokens_per_s"]) == pytest.approx(2000.0)
    assert float(records[0]["mfu"]) == pytest.approx(2000 * 1e6 / 8e9)
    assert records[1]["parity_first_step_over"] == "4" and records[2]["status"] == "crashed"
    md = report.markdown(doc)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3  # header, rule, one line per row
    assert "| fake-crash | crashed |" in md and "exited with status 3" in md
    assert "25.0%" in table[2]  # cpu MFU


def test_terminal_table_lists_every_row_and_failure_reasons():
    from rich.console import Console

    console = Console(record=True, width=250)
    report.print_table(_doc(), console)
    text = console.export_text()
    for expected in ("cpu", "jax:cpu", "fake-crash", "crashed", "2,000", "25.0%", "reference", "fake-crash: crashed: exited with status 3"):
        assert expected in text


# -- plot -----------------------------------------------------------------------------------


@requires("matplotlib")
def test_plot_has_one_bar_and_one_loss_line_per_backend(tmp_path):
    doc = _doc()
    fig = report.figure(doc)
    bars_ax, loss_ax = fig.axes[0], fig.axes[4]  # throughput and loss; tests/bench/test_bench_plot.py checks every panel
    assert [round(b.get_height(), 6) for b in bars_ax.patches] == [2000.0, 1000.0, 0.0]
    assert [t.get_text() for t in bars_ax.get_xticklabels()] == ["cpu", "jax:cpu", "fake-crash"]
    assert [t.get_text() for t in bars_ax.texts] == ["2,000", "1,000", "crashed"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["25.0%", "n/a: no peak", "crashed"]  # MFU
    lines = [line for line in loss_ax.get_lines()]
    assert [line.get_label() for line in lines] == ["cpu (reference)", "jax:cpu"]  # the crashed row recorded no loss
    assert list(lines[0].get_ydata()) == [3.0, 2.0, 1.5, 1.2]
    assert list(lines[1].get_xdata()) == [1, 2, 3, 4]

    path = tmp_path / "bench.png"
    report.write_plot(doc, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes the whole file
        assert img.size == (1600, 900)  # figsize 16 x 9 in at 100 dpi


# -- several processes (--nproc) --------------------------------------------------------------


def _scaling_doc(cpu2_tokens=3000.0):
    rows = [
        finished_row("cpu", tokens_per_s=2000.0, losses=[3.0, 2.0]),
        finished_row("cpu", tokens_per_s=cpu2_tokens, losses=[3.0, 1.8], world_size=2),
        finished_row("fake-accel", tokens_per_s=2000.0, losses=[3.0, 2.0]),
        metrics.empty_row("fake-accel", "crashed", "exited with status 1", "fp32", world_size=2, parallel="ddp"),
    ]
    return make_doc(rows, nproc=[1, 2], parallel="ddp", one_process_backends=["jax:cpu"])


def test_scaling_rows_in_the_table_csv_and_markdown(tmp_path):
    from rich.console import Console

    doc = _scaling_doc()
    assert schema.validate(doc) == []
    cpu2 = doc["rows"][1]
    assert cpu2["scaling_efficiency"] == pytest.approx(3000 / (2 * 2000))
    assert cpu2["parity"]["reference"] == "cpu (nproc 2)"  # not compared with the 1-process rows
    console = Console(record=True, width=300)
    report.print_table(doc, console, wide=True)  # the process count and scaling efficiency are --wide columns
    text = console.export_text()
    header = next(line for line in text.splitlines() if "backend" in line)
    assert "procs" in header and "scaling eff." in header
    assert (
        "cpu (nproc 2): torchrun, 1 node(s) x 2 process(es), rendezvous localhost:29500; "
        "world size 2, parallel=ddp; global batch 2 x 2 = 4 samples per step"
    ) in text
    assert "fake-accel (nproc 2): crashed: exited with status 1" in text
    assert "jax:cpu: one process only: --nproc launches torch backends through torchrun" in text
    assert "batch per process 2 x seq 500, 1,2 process(es) (ddp)" in text
    cells = next(line for line in text.splitlines() if "2 ddp" in line).split()
    assert "75.0%" in cells and "reference" in cells

    report.write_csv(doc, str(tmp_path / "r.csv"))
    with open(tmp_path / "r.csv") as fh:
        records = list(csv.DictReader(fh))
    assert [(r["backend"], r["world_size"], r["parallel"], r["nodes"]) for r in records] == [
        ("cpu", "1", "", ""), ("cpu", "2", "ddp", "1"), ("fake-accel", "1", "", ""), ("fake-accel", "2", "ddp", "")]
    assert float(records[1]["scaling_efficiency"]) == pytest.approx(0.75) and records[0]["scaling_efficiency"] == ""
    md = report.markdown(doc)
    assert "| backend | status | step ms |" in md and "| cpu (nproc 2) | ok | 666.67 |" in md
    wide = report.markdown(doc, wide=True)
    assert "| backend | procs | status |" in wide and "| cpu (nproc 2) | 2 ddp | ok |" in wide and "| 75.0% |" in wide


def test_a_one_process_run_keeps_its_table():
    from rich.console import Console

    console = Console(record=True, width=300)
    report.print_table(_doc(), console)
    text = console.export_text()
    assert "procs" not in text and "scaling" not in text
    assert "| backend | status | step ms |" in report.markdown(_doc())
    assert "| backend | status | device |" in report.markdown(_doc(), wide=True)


def test_documents_from_before_nproc_still_load_and_compare(tmp_path):
    old = _doc()
    for row in old["rows"]:
        for key in schema.SCALING_FIELDS:
            del row[key]
    assert schema.validate(old) == []
    path = tmp_path / "old.json"
    report.write_json(old, str(path))
    new = tmp_path / "new.json"
    report.write_json(_doc(), str(new))
    code, out, _ = run_cli("bench", "compare", str(path), str(new))
    assert code == 0 and "no regression" in out
