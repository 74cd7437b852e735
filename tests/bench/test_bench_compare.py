"""``anychip bench compare A B``: the verdict per row is decided on the tokens/s intervals alone
(regression, faster, inconclusive, same); exit 1 for a regression only; runs of another workload,
batch shape or precision are refused unless --force; version-1 documents compare too."""

from __future__ import annotations

import pytest
from bench_support import as_version_1, finished_row, make_doc, one_line, run_cli

from anychip.bench import metrics, report
from anychip.bench.report.compare import Throughput, verdict

LOSSES = [3.0, 1.2]


def _doc(*rows, **config):
    return make_doc(list(rows), **config)


def _row(backend="cpu", windows=(1950.0, 2000.0, 2050.0), **kw):
    """A finished row whose windows ran at ``windows`` tokens/s (its median, p10 and p90 follow)."""
    return finished_row(backend, tokens_per_s=0.0, losses=kw.pop("losses", LOSSES), windows=list(windows), **kw)


def _files(tmp_path, a: dict, b: dict) -> tuple[str, str]:
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    report.write_json(a, str(pa))
    report.write_json(b, str(pb))
    return str(pa), str(pb)


def _only(result):
    (entry,) = result.rows
    return entry["verdict"]


# -- the rule, on numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("b, expected", [
    ((1000.0, (980.0, 1020.0)), "same"),
    ((1040.0, (940.0, 1080.0)), "same"),  # +4 %: within 0.05
    ((960.0, (800.0, 1000.0)), "same"),
    ((900.0, (860.0, 990.0)), "inconclusive"),  # -10 %, but B's best windows beat A's worst
    ((900.0, (880.0, 920.0)), "inconclusive"),  # B's p90 920 is above A's p10 x 0.95 = 902.5: less than 5 % apart
    ((850.0, (840.0, 860.0)), "regression"),  # 860 < 902.5
    ((1150.0, (1120.0, 1180.0)), "faster"),  # B's p10 1120 > A's p90 x 1.05 = 1102.5
    ((1150.0, None), "inconclusive"),  # no interval: a change is at most inconclusive
])
def test_the_verdict_is_decided_on_separated_intervals(b, expected):
    assert verdict(Throughput(1000.0, (950.0, 1050.0)), Throughput(*b), 0.05) == expected
    assert verdict(Throughput(1000.0, (950.0, 1050.0)), Throughput(1000.0, (950.0, 1050.0)), 0.0) == "same"


def test_overlapping_intervals_are_same_or_inconclusive_and_exit_0(tmp_path):
    a = _doc(_row(windows=(1900.0, 2000.0, 2100.0)))
    same = _doc(_row(windows=(1920.0, 1990.0, 2080.0)))
    assert _only(report.compare(a, same, 0.05)) == "same"
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, same))
    assert code == 0 and "no regression beyond 0.05" in out
    # the median is 10 % lower, but B's best windows overlap A's worst: the runs cannot tell
    wobbly = _doc(_row(windows=(1500.0, 1800.0, 2050.0)))
    result = report.compare(a, wobbly, 0.05)
    assert _only(result) == "inconclusive" and result.regressions == []
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, wobbly))
    text = " ".join(out.split())
    assert code == 0 and "cpu: inconclusive: tokens/s 1,800 [1,552-1,995] in B vs 2,000 [1,919-2,079] in A" in text
    assert "no regression beyond 0.05 (1 inconclusive)" in text


def test_separated_intervals_are_a_regression_and_exit_1(tmp_path):
    a = _doc(_row(windows=(1900.0, 2000.0, 2100.0)))
    slow = _doc(_row(windows=(1500.0, 1600.0, 1700.0)))  # B's p90 1,679 < A's p10 1,919 x 0.95 = 1,823
    result = report.compare(a, slow, 0.05)
    assert _only(result) == "regression" and len(result.regressions) == 1
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, slow))
    text = " ".join(out.split())
    assert code == 1 and "cpu: regression: tokens/s 1,600 [1,519-1,679] in B vs 2,000 [1,919-2,079] in A (median x0.800)" in text
    assert "B's p90 is below A's p10 x 0.95" in text and "1 regression(s) beyond 0.05" in text
    # a threshold wider than the gap: the same two runs no longer count as a regression
    code, _, _ = run_cli("bench", "compare", *_files(tmp_path, a, slow), "--max-regression", "0.25")
    assert code == 0
    assert _only(report.compare(a, slow, 0.25)) == "same"


def test_faster_is_reported_and_exits_0(tmp_path):
    a = _doc(_row(windows=(1900.0, 2000.0, 2100.0)))
    fast = _doc(_row(windows=(2500.0, 2600.0, 2700.0)))
    assert _only(report.compare(a, fast, 0.05)) == "faster"
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, fast))
    assert code == 0 and "cpu: faster:" in out and "no regression" in out


def test_memory_and_loss_are_shown_not_judged_and_a_row_missing_in_b_is_a_regression(tmp_path):
    a = _doc(_row(), _row("jax:cpu"))
    b = _doc(_row(peak_bytes=2 << 20, losses=[3.0, 1.5]), metrics.empty_row("jax:cpu", "crashed", "boom", "fp32"))
    result = report.compare(a, b, 0.05)
    cpu, jax = result.rows
    assert cpu["verdict"] == "same" and cpu["ratios"]["peak mem"] == pytest.approx(2.0) and cpu["ratios"]["loss"] == pytest.approx(1.25)
    assert jax["verdict"] == "regression" and result.regressions == ["jax:cpu: finished in A, crashed in B"]
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, b))
    assert code == 1 and "jax:cpu: finished in A, crashed in B" in out


def test_rows_are_matched_by_backend_and_process_count():
    a = _doc(_row(), _row(world_size=2, windows=(3900.0, 4000.0, 4100.0)), nproc=[1, 2], parallel="ddp")
    b = _doc(_row(), _row(world_size=2, windows=(2900.0, 3000.0, 3100.0)), nproc=[1, 2], parallel="ddp")
    result = report.compare(a, b, 0.05)
    assert [(e["backend"], e["verdict"]) for e in result.rows] == [("cpu", "same"), ("cpu (nproc 2)", "regression")]
    one = _doc(_row())
    result = report.compare(a, one, 0.05)
    assert [(e["backend"], e["b_status"]) for e in result.rows] == [("cpu", "ok"), ("cpu (nproc 2)", "missing")]
    assert result.regressions == ["cpu (nproc 2): finished in A, missing in B"]


# -- what may be compared ------------------------------------------------------------------------


def test_a_different_workload_batch_seq_or_precision_is_refused_unless_forced(tmp_path):
    a = _doc(_row())
    b = _doc(_row(windows=(1000.0, 1100.0, 1200.0)), workload="mlp", seq=64, precision="bf16")
    code, out, err = run_cli("bench", "compare", *_files(tmp_path, a, b))
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("anychip bench") and "measured different things" in line
    assert "workload: 'gpt-tiny' vs 'mlp'; seq: 500 vs 64; precision: 'fp32' vs 'bf16'" in line and "--force" in line
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, b), "--force")
    assert code == 1 and "note: configurations differ: workload: 'gpt-tiny' vs 'mlp'" in out
    # steps, warm-up, --repeat or seed change how long and how often, not what a step computes: a note
    c = _doc(_row(), steps=20, repeat=3)
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, a, c))
    assert code == 0 and "note: configurations differ: steps: 3 vs 20" in out and "repeat: 1 vs 3" in out


def test_a_version_1_document_compares_on_its_per_step_times(tmp_path):
    a = _doc(_row(windows=(1900.0, 2000.0, 2100.0)))
    old = as_version_1(a)  # its per-step times are the windows' seconds per step here
    assert report.load(_files(tmp_path, old, a)[0])["schema_version"] == 1
    result = report.compare(old, a, 0.05)
    assert _only(result) == "same"
    assert result.notes == ["A is a version-1 document (no timed windows): its tokens/s and interval are tokens per step / "
                            "the median, p90 and p10 of its per-step synchronised step times"]
    code, out, _ = run_cli("bench", "compare", *_files(tmp_path, old, _doc(_row(windows=(1400.0, 1500.0, 1600.0)))))
    assert code == 1 and "A is a version-1 document" in " ".join(out.split())
    # one per-step time: no interval, so at most inconclusive
    single = as_version_1(_doc(_row(windows=(2000.0,))))
    assert _only(report.compare(single, _doc(_row(windows=(1400.0, 1500.0, 1600.0))), 0.05)) == "inconclusive"


def test_bad_input_is_one_line_exit_2(tmp_path):
    a, b = _files(tmp_path, _doc(_row()), _doc(_row()))
    (tmp_path / "bad.json").write_text("{")
    for argv in ((a, str(tmp_path / "missing.json")), (a, str(tmp_path / "bad.json")), (a, b, "--max-regression", "-0.1"), (a,)):
        code, out, err = run_cli("bench", "compare", *argv)
        assert code == 2, argv
        assert one_line(err).startswith("anychip bench") and out == ""


# -- end to end: two real runs on this machine ---------------------------------------------------


@pytest.mark.slow
def test_two_runs_compare_same_and_a_twice_slower_backend_is_flagged(fakes, tmp_path, monkeypatch):
    """Exit codes only: the verdicts depend on this machine's timings. One torch thread per
    child, so another job on a second core does not halve a run. The two equal runs are compared
    with a 25 % margin: windows of 20 one-millisecond steps on a shared 2-core machine shift by
    more than the default 5 % between consecutive runs now and then, while the 2x slower run
    (a ~50 % drop) is flagged at the default margin."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["bench", "--workload", "mlp", "--steps", "20", "--warmup", "2", "--repeat", "5", "--backends", "fake-slow"]
    paths = {}
    for name, slow in (("a", False), ("a2", False), ("b", True)):
        if slow:
            monkeypatch.setenv(fakes.SLOW_ENV, "1")  # every update sleeps as long as it took: ~2x the step time
        paths[name] = str(tmp_path / f"{name}.json")
        code, _, err = run_cli(*argv, "--json", paths[name])
        assert code == 0, err
    assert run_cli("bench", "compare", paths["a"], paths["a2"], "--max-regression", "0.25")[0] == 0
    assert run_cli("bench", "compare", paths["a"], paths["b"])[0] == 1


def test_one_window_has_no_interval_so_a_change_is_at_most_inconclusive():
    """--repeat 1 gives a zero-width interval: a drop beyond --max-regression is inconclusive,
    never a regression decided on one window of each run."""
    from anychip.bench.report.compare import throughput, verdict

    a = {"tokens_per_s": 1000.0, "tokens_per_s_interval": [1000.0, 1000.0], "repeat": 1}
    b = {"tokens_per_s": 500.0, "tokens_per_s_interval": [500.0, 500.0], "repeat": 1}
    ta, tb = throughput(a, 2), throughput(b, 2)
    assert ta.interval is None and tb.interval is None
    assert verdict(ta, tb, 0.05) == "inconclusive"
