"""``anychip bench show RUN.json``: a saved run printed and written again without running
anything; bad input is one line and exit status 2."""

from __future__ import annotations

import copy
import csv
import json

import pytest
from bench_support import as_version_1, finished_row, make_doc, one_line, run_cli
from support import requires

from anychip.bench import metrics, report, schema


def _saved(tmp_path, name="run.json"):
    rows = [
        finished_row("cpu", tokens_per_s=57683.2, losses=[3.0, 2.0, 1.5], device_kind="Intel(R) Xeon(R) Processor"),
        finished_row("jax:cpu", tokens_per_s=1000.0, losses=[3.0, 2.0 + 2.2e-7, 1.5]),
        metrics.empty_row("fake-crash", "crashed", "exited with status 3 [red]", "fp32"),
    ]
    path = tmp_path / name
    report.write_json(make_doc(rows), str(path))
    return path


@requires("matplotlib")
def test_show_prints_the_table_and_writes_md_csv_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    run = _saved(tmp_path)
    md, table, png = tmp_path / "r.md", tmp_path / "r.csv", tmp_path / "r.png"
    code, out, err = run_cli("bench", "show", str(run), "--md", str(md), "--csv", str(table), "--plot", str(png))
    assert code == 0, err
    assert out.startswith("anychip bench: gpt-tiny, batch 2 x seq 500, fp32")
    row = next(line for line in out.splitlines() if line.startswith("cpu "))
    assert row.split()[:4] == ["cpu", "ok", "17.34", "57,683"]
    assert "fake-crash: crashed: exited with status 3 [red]" in out and "1.1e-07" in out
    assert "| cpu | ok | 17.34 | 57,683 |" in md.read_text()
    with open(table) as fh:
        assert [r["backend"] for r in csv.DictReader(fh)] == ["cpu", "jax:cpu", "fake-crash"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert err.splitlines() == [f"wrote {md}", f"wrote {table}", f"wrote {png}"]


def test_show_wide_and_narrow(tmp_path, monkeypatch):
    run = _saved(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli("bench", "show", str(run), "--wide")
    header = next(line for line in out.splitlines() if line.startswith("backend"))
    assert code == 0 and "compile+warm-up s" in header and "Intel(R) Xeon(R) Processor x1" in out
    code, before, _ = run_cli("bench", "--wide", "show", str(run))  # the flag before the sub-command counts too
    assert code == 0 and before == out
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli("bench", "show", str(run))
    assert code == 0 and "cpu  ok  Xeon" in out and max(len(line) for line in out.splitlines()) <= 80


def test_bad_input_is_one_line_exit_2(tmp_path):
    run = _saved(tmp_path)
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "text.json").write_text("not json")
    future = json.loads(run.read_text())
    future["schema_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(future))
    cases = [
        ((str(tmp_path / "missing.json"),), "cannot read"),
        ((str(tmp_path),), "is a directory"),
        ((str(tmp_path / "other.json"),), "not an anychip bench result"),
        ((str(tmp_path / "text.json"),), "is not JSON"),
        ((str(tmp_path / "future.json"),), "schema_version 99"),
        ((str(run), "--md", str(tmp_path / "no" / "r.md")), "does not exist"),
        ((str(run), "--csv", str(tmp_path)), "is a directory"),
        ((str(run), "--md", str(run)), "would overwrite the run"),
        ((), "required: RUN.json"),
    ]
    for argv, expected in cases:
        code, out, err = run_cli("bench", "show", *argv)
        assert code == 2, argv
        assert out == "" and expected in one_line(err) and one_line(err).startswith("anychip bench"), (argv, err)


def test_version_1_and_the_current_version_both_load(tmp_path):
    v2 = _saved(tmp_path, "v2.json")
    doc = json.loads(v2.read_text())
    assert report.load(str(v2))["schema_version"] == schema.SCHEMA_VERSION == 2
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(as_version_1(doc)))
    assert report.load(str(v1))["schema_version"] == 1  # lacks "repeat" and the rest version 1 did not have
    code, out, _ = run_cli("bench", "show", str(v1))
    assert code == 0 and "step ms: median of the timed steps, each synchronised" in " ".join(out.split())
    broken = copy.deepcopy(doc)
    del broken["rows"][0]["repeat"]  # a version-2 document must have it
    (tmp_path / "v2-broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="missing required field 'repeat'"):
        report.load(str(tmp_path / "v2-broken.json"))
    broken = as_version_1(doc)
    del broken["rows"][0]["tokens_per_s"]  # a field version 1 had: still required
    (tmp_path / "v1-broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="missing required field 'tokens_per_s'"):
        report.load(str(tmp_path / "v1-broken.json"))
    doc["schema_version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="schema_version 3; this anychip reads version.s. 1, 2"):
        report.load(str(tmp_path / "v3.json"))
