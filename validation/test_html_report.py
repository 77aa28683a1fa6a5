"""The run's index.html, rendered from a real run with a deliberate failure: verdict and failures (with their reasons)
first, a row per stage, per stage its gates (failing rows highlighted, margins), sensitivity variants as caught, full
informative values, the trainability curve and the mismatch |Δ log-prob| histogram, provenance and links to the run's
files; self-contained; report files readable by others."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4_support.reports.files import new_run_dir, write_atomic
from gemma4_support.reports.html import HISTOGRAM_KEY, failure_reason, log10_histogram, render_run
from validation.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
LONG_TENSOR = "model.layers.3.self_attn.q_proj.weight" + ".shard" * 40  # a value far longer than 120 characters
# A deliberately failing run's own tests: real pytest, the real plugin and its StageReport; the values are planted.
PLANTED = f'''
import pytest
from gemma4_support.metrics import Gate
from gemma4_support.reports.html import HISTOGRAM_KEY, log10_histogram


@pytest.mark.stage_hf_parity
def test_broken_tensor(stage_report):
    stage_report.check("planted/backward_fp32", {{"loss_rel_diff": 2e-6, "worst": "{LONG_TENSOR}",
                       "per_tensor_rel_l2": {{"embed.weight": 3e-7, "layers.0.mlp.down_proj.weight": 9e-6}}}},
                       [Gate("loss_rel_diff", "<=", 1e-5)])
    stage_report.check("planted/forward_fp32", {{"max_abs": 0.25, "kl_mean": 3e-9}},
                       [Gate("max_abs", "<=", 1e-4), Gate("kl_mean", "<=", 1e-7)])


@pytest.mark.stage_hf_parity
def test_broken_variant_is_caught(stage_report):
    stage_report.expect_caught("sensitivity/window-off-by-one", {{"max_abs": 0.5}}, [Gate("max_abs", "<=", 1e-4)])


@pytest.mark.stage_cp_masks
def test_planted_assertion():
    assert 1 + 1 == 3, "planted assertion: packing moved a token"


@pytest.mark.stage_trainability
def test_curve(stage_report):
    steps = [{{"step": i, "mean_error": 19.6 / (1 + i)}} for i in range(12)]
    stage_report.check("length task", {{"best_error": 1.5}}, [Gate("best_error", "<=", 3.0)], steps=steps)


@pytest.mark.stage_mismatch
def test_histogram(stage_report):
    deltas = [0.0] * 5 + [10.0 ** (-7 + i % 4) * 1.5 for i in range(60)]
    stage_report.check("dense-float32-native", {{"mean_abs_pct": 1.3e-4}}, [Gate("mean_abs_pct", "<=", 0.01)],
                       **{{HISTOGRAM_KEY: log10_histogram(deltas)}})
'''
_DISCOVERY = ["validation/test_discovery.py::test_fixture_discovery",
              "validation/test_discovery.py::test_sensitivity_periodic_assumption_is_caught"]


def make_failing_run(root: Path) -> Path:
    """A real run folder under `root`: discovery's real tests and the planted failing tests above."""
    (root / "test_planted.py").write_text(PLANTED)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", *_DISCOVERY,
                          str(root / "test_planted.py"), "--report-dir", str(root / "reports"), "--tb=short"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-2000:]
    (run,) = [p for p in (root / "reports").iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The failing run, made once per test session (xdist workers share it through a lock on their common temp dir)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = shared / "gemma4-report-run"
    with FileLock(str(shared / "gemma4-report-run.lock")):
        if not (root / "made").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            run = make_failing_run(root)
            (root / "made").write_text(run.name)
    return root / "reports" / (root / "made").read_text()


def run_copy(run: Path, dest: Path) -> Path:
    """A copy of a run folder (same name) under `dest`, to plant changes in."""
    return Path(shutil.copytree(run, dest / run.name))


def rerender(run: Path, **summary_changes: object) -> str:
    """The page of a run folder rendered again from its JSON files, with `summary_changes` applied."""
    summary = {**json.loads((run / "summary.json").read_text()), "run_dir": str(run), **summary_changes}
    docs = [json.loads((run / f"{s}.json").read_text()) for s in STAGE_NAMES if (run / f"{s}.json").exists()]
    tests = [t for doc in docs for t in doc["tests"]]
    return render_run(summary, tests)


def _section(page: str, stage: str) -> str:
    start = page.index(f"<section id='stage-{stage}'")
    return page[start:page.index("</section>", start)]


def test_page_opens_with_the_verdict_and_every_failure_with_its_reason(report_run):
    page = (report_run / "index.html").read_text()
    verdict, failures, stages = page.index("verdict: failed"), page.index("id='failures'"), page.index("id='stages'")
    assert verdict < failures < stages < page.index("<section id='stage-discovery'")
    listed = page[failures:stages]
    assert "max_abs = 0.25 (must be &lt;= 0.0001)" in listed and "kl_mean" not in listed  # the failing gate only
    assert "planted assertion: packing moved a token" in listed  # the assertion line from the longrepr
    assert "test_broken_variant_is_caught" not in listed and "test_curve" not in listed


def test_each_stage_has_a_row_and_a_section_with_its_gates(report_run):
    page = (report_run / "index.html").read_text()
    rows = page[page.index("id='stages'"):page.index("</table>", page.index("id='stages'"))]
    for stage in STAGE_NAMES:
        assert f"href='#stage-{stage}'" in rows and f"href='{stage}.json'" in rows and f"id='stage-{stage}'" in page
    hf_row = re.search(r"<tr class='failed'><td><a href='#stage-hf_parity'>.*?</tr>", rows).group(0)
    assert "<td>2</td><td class='failed'>1</td><td>1/1</td>" in hf_row  # gates passed, failed; sensitivity caught
    hf = _section(page, "hf_parity")
    gates = hf[hf.index("class='gates'"):hf.index("</table>", hf.index("class='gates'"))]
    first_row = gates[gates.index("<tr class="):]
    assert first_row.startswith("<tr class='failed fail-row'>") and "max_abs" in first_row.split("</tr>")[0]
    assert gates.count("fail-row") == 1 and "+80.0%" in gates  # loss_rel_diff 2e-6 against 1e-5: 80 % headroom
    assert "-2499×" in gates  # max_abs 0.25 against 1e-4: 2499 thresholds past the gate
    disc = _section(page, "discovery")
    assert "fail-row" not in disc and disc.count("<tr class='passed'>") >= 8


def test_sensitivity_variants_are_caught_not_red_and_informative_values_are_whole(report_run):
    page = (report_run / "index.html").read_text()
    hf = _section(page, "hf_parity")
    sens = hf[hf.index("class='sensitivity'"):]
    sens = sens[:sens.index("</table>")]
    assert "<tr class='caught'>" in sens and "fail-row" not in sens and "failed" not in sens
    assert "window-off-by-one" in sens and "max_abs = 0.5 (gate &lt;= 0.0001)" in sens
    assert LONG_TENSOR in hf  # the worst tensor, not gated, in full
    assert "per_tensor_rel_l2.layers.0.mlp.down_proj.weight" in hf and "9e-06" in hf
    assert "sensitivity/periodic-assumption" in _section(page, "discovery")


def test_figures_and_footer_links_and_no_external_resources(report_run, tmp_path):
    run = run_copy(report_run, tmp_path)
    (run / "vllm-8000-1-2.log").write_text("INFO engine started\n")
    page = rerender(run)
    assert "<svg" in _section(page, "trainability") and "<polyline" in _section(page, "trainability")
    mismatch = _section(page, "mismatch")
    assert "|Δ log-prob| per token" in mismatch and mismatch.count("<rect x=") == 12  # zeros + 11 decades
    assert "1e-7: 15" in mismatch and "0: 5" in mismatch
    footer = page[page.index("<footer>"):]
    assert "href='vllm-8000-1-2.log'" in footer and "href='summary.json'" in footer and "href='hf_parity.json'" in footer
    assert "provenance" in footer and json.loads((run / "summary.json").read_text())["provenance"]["git"]["commit"] in footer
    assert not re.search(r"<script|<link|@import|url\(|<img|<iframe", page, re.I)
    assert not re.findall(r"(?:src|href)\s*=\s*['\"]?(?:https?:)?//", page, re.I)
    # the check can fail: an external reference is found
    assert re.findall(r"(?:src|href)\s*=\s*['\"]?(?:https?:)?//", "<a href='https://x.org/a'>", re.I)


def test_blocked_stages_and_a_passing_run(report_run):
    run = report_run
    summary = json.loads((run / "summary.json").read_text())
    stages = {**summary["stages"], "mismatch": {"status": "blocked", "blocked_by": "hf_parity", "counts": {}},
              "throughput": {"status": "error", "reason": "vLLM engine start timed out", "counts": {},
                             "attempts": [{"rc": 1}, {"rc": 1}], "junit": "junit/throughput.xml"}}
    page = rerender(run, stages=stages)
    failures = page[page.index("id='failures'"):page.index("id='stages'")]
    assert "mismatch</a> — <b>blocked</b> by hf_parity" in failures
    assert "throughput</a> — <b>error</b>: <span class='reason'>vLLM engine start timed out" in failures
    assert "blocked (by hf_parity)" in page and "blocked by hf_parity: not run" in _section(page, "mismatch")
    rows = page[page.index("id='stages'"):page.index("</table>", page.index("id='stages'"))]
    assert "href='junit/throughput.xml'" in rows and "vLLM engine start timed out; 2 attempts" in rows
    green = render_run({**summary, "verdict": "passed", "stages": {"discovery": summary["stages"]["discovery"]}}, [])
    assert "<h2>failures</h2><p class='passed'>none</p>" in green


def test_failure_reason_falls_back_to_the_assertion_line():
    longrepr = "def test_x():\n>       assert a == b\nE       AssertionError: packing moved\nE       assert 1 == 2\n"
    assert failure_reason({"records": [], "longrepr": longrepr, "outcome": "failed"}) == \
        "AssertionError: packing moved assert 1 == 2"
    assert failure_reason({"records": [], "longrepr": "worker crashed\n", "outcome": "error"}) == "worker crashed"


def test_report_files_and_folders_are_readable_by_others(report_run, tmp_path):
    run = report_run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(run.stat().st_mode) == 0o755
    old = os.umask(0o077)  # even a private umask: reports are shared by design (CI artifacts, a web server)
    try:
        fresh = new_run_dir(tmp_path)
        path = write_atomic(fresh / "x.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and stat.S_IMODE(fresh.stat().st_mode) == 0o755


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)),
                max_size=50))
def test_log10_histogram_counts_every_value_in_its_decade(values):
    hist = log10_histogram(values)
    low, counts = hist["low_decade"], hist["counts"]
    assert hist["zeros"] + sum(counts) == len(values) and hist["zeros"] == values.count(0.0)
    for v in (v for v in values if v > 0):
        k = min(max(math.floor(math.log10(v)), low), low + len(counts) - 1)
        alone = log10_histogram([v])["counts"]
        assert alone[k - low] == 1, (v, alone)


def test_the_mismatch_stage_records_the_histogram_the_page_draws():
    source = (REPO / "validation" / "test_mismatch.py").read_text()  # importing it would start vLLM-side imports
    assert "info[HISTOGRAM_KEY] = log10_histogram(" in source and "import HISTOGRAM_KEY, log10_histogram" in source
