"""`gemma4-validate compare RUN_A RUN_B`: each gate metric's drift between two real run folders; a planted regression
(a metric moved toward its threshold past the tolerance, a gate that passed and now fails) is flagged with exit 1; the
run page shows the comparison when its summary names a baseline."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4_support.reports.compare import compare_runs, judge, margin
from validation.test_html_report import REPO, report_run, rerender, run_copy  # noqa: F401 (report_run: fixture)

def _compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "validation.cli", "compare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def _plant(run: Path, stage: str, case: str, metric: str, value: float, passed: bool | None = None) -> None:
    """Change one gate's measured value (and verdict) in a copied run's stage JSON."""
    path = run / f"{stage}.json"
    doc = json.loads(path.read_text())
    hits = [g for t in doc["tests"] for r in t["records"] if r["case"] == case for g in r["gates"] if g["metric"] == metric]
    assert len(hits) == 1, (case, metric)
    hits[0]["value"] = value
    if passed is not None:
        hits[0]["passed"] = passed
    path.write_text(json.dumps(doc))


def test_a_run_against_itself_has_no_regression(report_run):
    out = _compare(str(report_run), str(report_run))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    assert "[hf_parity] ::test_broken_tensor :: planted/backward_fp32" in out.stdout
    assert "0 regressions" in out.stdout.splitlines()[-1] and "13 gate metrics compared" in out.stdout
    assert "fixture/moe" in out.stdout and "window_errors" in out.stdout


def test_a_planted_regression_is_flagged(report_run, tmp_path):
    run_b = run_copy(report_run, tmp_path)
    # still passing, but 2e-6 -> 5e-6 against <= 1e-5 uses 30 % of the threshold: past a 10 % tolerance
    _plant(run_b, "hf_parity", "planted/backward_fp32", "loss_rel_diff", 5e-6)
    out = _compare(str(report_run), str(run_b))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr
    flagged = [ln for ln in out.stdout.splitlines() if "REGRESSION" in ln]
    assert len(flagged) == 1 and "loss_rel_diff" in flagged[0] and "+150.0%" in flagged[0], flagged
    assert "1 regression: hf_parity/planted/backward_fp32/loss_rel_diff" in out.stdout
    lenient = _compare(str(report_run), str(run_b), "--tolerance", "0.5")
    assert lenient.returncode == 0 and "REGRESSION" not in lenient.stdout, lenient.stdout[-2000:]
    # a move away from the threshold is never a regression
    _plant(run_b, "hf_parity", "planted/backward_fp32", "loss_rel_diff", 1e-7)
    assert _compare(str(report_run), str(run_b)).returncode == 0


def test_a_gate_that_passed_and_now_fails_is_flagged_at_any_tolerance(report_run, tmp_path):
    run_b = run_copy(report_run, tmp_path)
    _plant(run_b, "discovery", "fixture/dense", "window_errors", 1.0, passed=False)
    result = compare_runs(report_run, run_b, tolerance=1e9)
    (flag,) = result.regressions
    assert (flag.stage, flag.case, flag.metric, flag.value_a, flag.value_b) == ("discovery", "fixture/dense",
                                                                                "window_errors", 0.0, 1.0)
    assert flag.regression == "passed in A, fails in B" and flag.drift == math.inf
    assert "fails" in {d.status for d in result.drifts}  # the gate failing in both runs is shown, not flagged


def test_the_report_folder_resolves_through_latest_and_bad_input_is_one_line(report_run, tmp_path):
    base = report_run.parent
    assert compare_runs(base, report_run).run_a == report_run  # a report folder means its LATEST run
    for args, problem in ((["/nonexistent/run", str(report_run)], "does not exist"),
                          ([str(tmp_path), str(report_run)], "is not a run folder"),
                          ([str(report_run), str(report_run), "--tolerance", "abc"], "is not a number"),
                          ([str(report_run), str(report_run), "--tolerance", "-1"], "non-negative")):
        out = _compare(*args)
        assert out.returncode == 2 and out.stdout == "", (args, out.stdout)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and problem in lines[0] and "fix:" in lines[0], lines


def test_the_page_shows_the_comparison_with_a_baseline(report_run, tmp_path):
    run_b = run_copy(report_run, tmp_path)
    _plant(run_b, "hf_parity", "planted/backward_fp32", "loss_rel_diff", 5e-6)
    page = rerender(run_b, baseline=str(report_run))
    section = page[page.index("<section id='comparison'>"):]
    section = section[:section.index("</section>")]
    assert "<b>1 regression</b>" in section and "loss_rel_diff" in section and "fail-row" in section
    assert page.index("id='stages'") < page.index("id='comparison'") < page.index("id='stage-discovery'")
    assert "no comparison with the baseline" in rerender(run_b, baseline=str(tmp_path / "missing"))
    assert "id='comparison'" not in rerender(run_b)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["<=", "<", ">=", ">"]), st.floats(min_value=1e-9, max_value=1e6), finite, finite,
       st.floats(min_value=0.0, max_value=2.0))
def test_judge_flags_exactly_moves_toward_the_threshold_past_the_tolerance(op, threshold, a, b, tolerance):
    toward, why = judge(op, threshold, a, b, True, True, tolerance)
    worse = (b - a) if op in ("<=", "<") else (a - b)  # the direction that uses up headroom
    assert toward == pytest.approx(worse / threshold, rel=1e-9, abs=1e-12)
    assert (why is not None) == (toward > tolerance)
    assert margin(op, a, threshold) - margin(op, b, threshold) == pytest.approx(toward, rel=1e-9, abs=1e-12)
    assert judge(op, threshold, a, b, True, False, tolerance)[1] == "passed in A, fails in B"
    assert judge(op, threshold, a, None, True, None, tolerance) == (None, None)  # a gate missing from B: shown only


def test_stages_that_did_not_run_need_no_json_but_a_lost_one_is_noted(report_run, tmp_path):
    run_b = run_copy(report_run, tmp_path)
    summary = json.loads((run_b / "summary.json").read_text())
    summary["stages"]["throughput"]["status"] = "not_selected"
    (run_b / "summary.json").write_text(json.dumps(summary))
    (run_b / "throughput.json").unlink()
    assert compare_runs(report_run, run_b).notes == []
    page = rerender(run_b)
    assert "not selected for this run" in page and "href='throughput.json'" not in page
    (run_b / "hf_parity.json").unlink()  # a stage that ran: its JSON missing is said, its gates shown as missing
    result = compare_runs(report_run, run_b)
    assert any("hf_parity.json is missing or unreadable" in n for n in result.notes), result.notes
    assert {d.status for d in result.drifts if d.stage == "hf_parity"} == {"missing"}
