"""gemma4-validate's workflow, through the real CLI over generated tiny stage tests (one real pytest session per
stage): stages run in workflow order whatever order --stages names them; a failed stage blocks the later ones (named)
unless --keep-going; a non-transient failure is never retried; a transient start-up failure (here: the real vLLM
server fixture attaching to a port nothing listens on, which starts listening only after the first attempt) is retried
with both attempts recorded; a stage past its time limit is stopped, recorded timed_out and blocks the rest; SIGTERM
stops the running stage and starts no later one; the merged JUnit XML has one testsuite per stage. The rules
themselves (exit codes, verdicts, time limits, what is transient) on generated inputs. The acceptance run on a
checkpoint with a deliberately broken tensor is in the main job (two real runs of hf_parity: ~40 s)."""
from __future__ import annotations

import errno
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma4_support.errors import Gemma4Error, ServerError
from gemma4_support.ports import free_port
from gemma4_support.reports.files import INCOMPLETE, LATEST
from validation.cli import main
from validation.stages import STAGE_NAMES, transient_start_failure
from validation.test_run_outcome import tagged
from validation.test_server_lifecycle import _Loading
from validation.workflow import (DEFAULT_STAGE_TIMEOUT_S, FAILING, exit_code, in_workflow_order, parse_stage_timeouts,
                                 run_verdict, transient_reasons)

REPO = Path(__file__).resolve().parents[1]
# plugins the tiny runs do not use (1.2 s of imports per session), and the suite's own test files left out
_LEAN = ("-p", "no:hypothesispytest", "-p", "no:html", "-p", "no:json-report", "-p", "no:metadata",
         "--ignore-glob", str(REPO / "validation" / "*.py"))
_TAG = "GEMMA4_TEST_RUN_TAG"

_TESTS = '''
import os, time
import pytest

LOG = os.environ["TINY_LOG"]


def _step(stage):
    with open(LOG, "a") as log:
        log.write(stage + "\\n")
    if os.environ.get("TINY_SLEEP") == stage:
        time.sleep(120)
    assert os.environ.get("TINY_FAIL") != stage, f"{stage} fails on purpose"


@pytest.mark.stage_discovery
def test_discovery():
    _step("discovery")


@pytest.mark.stage_hf_parity
def test_hf_parity():
    _step("hf_parity")


@pytest.mark.stage_cp_masks
def test_cp_masks():
    _step("cp_masks")


@pytest.mark.stage_tokenization
def test_tokenization(vllm_server):
    _step("tokenization")
    assert vllm_server.model == "loading-model"
'''


class Tiny:
    """Generated tiny stage tests in `root`, and gemma4-validate runs over them."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root, self.reports, self.log = root, root / "reports", root / "order.log"
        (root / "test_tiny.py").write_text(_TESTS)
        self.tag = os.urandom(8).hex()
        self.env = {**os.environ, "TINY_LOG": str(self.log), "PYTHONWARNINGS": "ignore", _TAG: self.tag, **env,
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.env.pop("GEMMA4_VLLM_URL", None)

    def start(self, *options: str, pytest_args: tuple[str, ...] = ()) -> subprocess.Popen:
        """gemma4-validate run OPTIONS over the tiny tests, in one process (no xdist workers)."""
        self.log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "validation.cli", "run", "--workers", "0", "--report-dir", str(self.reports),
               *options, "--", *_LEAN, *pytest_args, str(self.root / "test_tiny.py")]
        return subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def run(self, *options: str, pytest_args: tuple[str, ...] = ()) -> tuple[int, str, Path, dict]:
        """Run to its end: exit code, output, the new run folder and its summary."""
        before = set(self.reports.glob("run-*"))
        proc = self.start(*options, pytest_args=pytest_args)
        out, _ = proc.communicate(timeout=240)
        (run,) = set(self.reports.glob("run-*")) - before
        return proc.returncode, out, run, json.loads((run / "summary.json").read_text())

    def order(self) -> list[str]:
        """The stages whose test ran, in the order they ran."""
        return self.log.read_text().split() if self.log.is_file() else []


def _statuses(summary: dict) -> dict[str, str]:
    return {name: s["status"] for name, s in summary["stages"].items() if s["status"] != "not_selected"}


def test_failed_stage_blocks_the_later_ones_unless_keep_going(tmp_path: Path, stage_report) -> None:
    tiny = Tiny(tmp_path, TINY_FAIL="hf_parity")
    rc, out, run, summary = tiny.run("--stages", "cp_masks,hf_parity,discovery")
    assert rc == 1, out[-3000:]
    assert tiny.order() == ["discovery", "hf_parity"] and summary["selection"] == ["discovery", "hf_parity", "cp_masks"]
    assert _statuses(summary) == {"discovery": "passed", "hf_parity": "failed", "cp_masks": "blocked"}, summary
    blocked = summary["stages"]["cp_masks"]
    assert blocked["blocked_by"] == "hf_parity" and "blocked by hf_parity" in blocked["reason"] and not blocked["attempts"]
    assert len(summary["stages"]["hf_parity"]["attempts"]) == 1  # a real failure is never retried (--retries 1)
    assert summary["complete"] is True and summary["verdict"] == "failed" and summary["blocked"] == ["cp_masks"]
    assert json.loads((run / "cp_masks.json").read_text())["status"] == "blocked"
    assert (tiny.reports / LATEST).read_text().strip() == run.name and not (run / INCOMPLETE).exists()
    assert "cp_masks: blocked: blocked by hf_parity" in out
    suites = {s.get("name"): s for s in ET.parse(run / summary["junit"]).getroot().iter("testsuite")}
    assert list(suites) == ["discovery", "hf_parity", "cp_masks"], list(suites)
    assert suites["hf_parity"].get("failures") == "1" and suites["cp_masks"].find("testcase/skipped") is not None
    assert all((run / summary["stages"][s]["junit"]).is_file() for s in ("discovery", "hf_parity"))

    first = run
    rc, out, run, summary = tiny.run("--stages", "hf_parity,cp_masks", "--keep-going", "--baseline", str(first))
    assert rc == 1 and tiny.order() == ["hf_parity", "cp_masks"], out[-3000:]
    assert _statuses(summary) == {"hf_parity": "failed", "cp_masks": "passed"} and summary["blocked"] == []
    assert summary["baseline"] == str(first)  # index.html compares this run's gates with it
    stage_report.record("blocked_then_keep_going", durations={s: v["duration_s"] for s, v in summary["stages"].items()
                                                              if v["status"] != "not_selected"})


def test_transient_server_start_failure_is_retried(tmp_path: Path, stage_report) -> None:
    """The tokenization test needs the session's vLLM server (the real fixture) at --vllm-url, where nothing listens
    during the first attempt (refused: transient); a server starts listening there once the first attempt ended."""
    tiny, port = Tiny(tmp_path), free_port()
    httpd = http.server.HTTPServer(("127.0.0.1", port), _Loading, bind_and_activate=False)
    httpd.ready_at = 0.0  # type: ignore[attr-defined]  # healthy as soon as it listens
    proc = tiny.start("--stages", "tokenization", "--retries", "1",
                      pytest_args=("--vllm-url", f"http://127.0.0.1:{port}"))
    serving = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tiny.reports.glob("run-*/tokenization.attempt1.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        httpd.server_bind()
        httpd.server_activate()
        serving.start()
        out, _ = proc.communicate(timeout=120)
    finally:
        if serving.is_alive():
            httpd.shutdown()
        httpd.server_close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    (run,) = tiny.reports.glob("run-*")
    stage = json.loads((run / "summary.json").read_text())["stages"]["tokenization"]
    first, second = stage["attempts"]
    assert stage["status"] == "passed" and first["status"] in ("failed", "error") and second["status"] == "passed"
    assert len(first["transient"]) == 1 and first["transient"][0].startswith("connection refused: nothing is listening")
    kept = json.loads((run / first["report"]).read_text())
    assert first["report"] == "tokenization.attempt1.json" and kept["tests"][0]["transient"] == first["transient"][0]
    assert (run / first["junit"]).is_file() and second["report"] == "tokenization.json" and tiny.order() == ["tokenization"]
    stage_report.record("transient_retry", attempts=[{k: a[k] for k in ("status", "transient", "duration_s")}
                                                     for a in stage["attempts"]])


def test_stage_past_its_time_limit_is_stopped_and_blocks(tmp_path: Path, stage_report) -> None:
    tiny = Tiny(tmp_path, TINY_SLEEP="discovery")
    t0 = time.monotonic()
    rc, out, run, summary = tiny.run("--stages", "discovery,hf_parity", "--stage-timeout", "300",
                                     "--stage-timeout", "discovery=3")
    took = time.monotonic() - t0
    assert rc == 1 and took < 60, (took, out[-3000:])
    assert _statuses(summary) == {"discovery": "timed_out", "hf_parity": "blocked"}, summary
    stage = summary["stages"]["discovery"]
    assert stage["timeout_s"] == 3 and "time limit of 3 s" in stage["reason"] and stage["attempts"][0]["timed_out"]
    assert summary["stages"]["hf_parity"]["timeout_s"] == 300 and summary["stages"]["hf_parity"]["blocked_by"] == "discovery"
    outcomes = [t["outcome"] for t in json.loads((run / "discovery.json").read_text())["tests"]]
    assert set(outcomes) <= {"interrupted"}, outcomes  # stopped in its test (or, on a loaded machine, before it)
    errors = [c for c in ET.parse(run / "junit.xml").getroot().iter("testcase") if c.find("error") is not None]
    assert [c.get("name") for c in errors] == ["stage timed_out"]
    stage_report.record("stage_timeout", took_s=round(took, 1), stage_s=stage["duration_s"])


def test_sigterm_stops_the_running_stage_and_starts_no_later_one(tmp_path: Path) -> None:
    tiny = Tiny(tmp_path, TINY_SLEEP="discovery")
    (tiny.reports / "run-previous").mkdir(parents=True)
    (tiny.reports / LATEST).write_text("run-previous\n")
    proc = tiny.start("--stages", "discovery,hf_parity")
    deadline = time.monotonic() + 60
    while tiny.order() != ["discovery"]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in out, out[-3000:]
    (run,) = [p for p in tiny.reports.glob("run-*") if p.name != "run-previous"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] is False and summary["verdict"] == "interrupted" and "SIGTERM" in summary["reason"]
    assert _statuses(summary) == {"discovery": "interrupted", "hf_parity": "interrupted"}
    assert summary["stages"]["hf_parity"]["attempts"] == [] and tiny.order() == ["discovery"]
    assert (run / INCOMPLETE).is_file() and (tiny.reports / LATEST).read_text().strip() == "run-previous"
    deadline = time.monotonic() + 15
    while tagged(tiny.tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tagged(tiny.tag) == []


# ---------------------------------------------------------------------------------------------------
# usage errors: one line, exit 2, nothing started


@pytest.mark.parametrize(("options", "says"), [
    (["--stage-timeout", "soon"], "is not a number of seconds"),
    (["--stage-timeout", "hf_parity=0"], "is not a positive, finite number"),
    (["--stage-timeout", "hf_parity=inf"], "is not a positive, finite number"),
    (["--stage-timeout", "parity=60"], "unknown stage 'parity'"),
    (["--retries", "-1"], "--retries -1 is negative"),
    (["--baseline", "/nonexistent/run"], "--baseline /nonexistent/run is not a folder"),
])
def test_bad_workflow_options_are_one_line(options: list[str], says: str, tmp_path: Path, capsys) -> None:
    assert main(["run", "--stages", "discovery", "--report-dir", str(tmp_path), *options]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and "fix:" in lines[0], lines
    assert not list(tmp_path.iterdir())


def test_pytest_usage_error_stops_the_workflow_with_exit_2(tmp_path: Path) -> None:
    """An argument pytest refuses fails the first stage's session as a usage error: exit 2, no later stage started."""
    tiny = Tiny(tmp_path)
    rc, out, run, summary = tiny.run("--stages", "discovery,hf_parity", pytest_args=("--no-such-option",))
    assert rc == 2 and "--no-such-option" in out, out[-3000:]
    assert _statuses(summary) == {"discovery": "error", "hf_parity": "not_run"} and tiny.order() == []
    assert summary["complete"] is False and (run / INCOMPLETE).is_file()


# ---------------------------------------------------------------------------------------------------
# the rules


_STAGE_SETS = st.lists(st.sampled_from(STAGE_NAMES), unique=True)
_LIMIT = st.floats(min_value=0.5, max_value=1e6, allow_nan=False)


@given(_STAGE_SETS)
def test_workflow_order_whatever_the_order_given(stages: list[str]) -> None:
    ordered = in_workflow_order(stages)
    assert sorted(ordered) == sorted(stages) and [STAGE_NAMES.index(s) for s in ordered] == sorted(
        STAGE_NAMES.index(s) for s in stages)


@given(st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(STAGE_NAMES)), _LIMIT), max_size=6))
def test_stage_timeouts_later_values_win(items: list[tuple[str | None, float]]) -> None:
    values = [f"{s}={v!r}" if s else repr(v) for s, v in items]
    limits = parse_stage_timeouts(values)
    for name in STAGE_NAMES:
        last = [v for s, v in items if s in (None, name)]
        assert limits[name] == (last[-1] if last else DEFAULT_STAGE_TIMEOUT_S)
    assert parse_stage_timeouts([",".join(values)] if values else []) == limits


_STATUS = st.sampled_from(["passed", "failed", "error", "timed_out", "interrupted", "blocked", "not_run", "skipped"])


@given(st.dictionaries(st.sampled_from(STAGE_NAMES), _STATUS, min_size=1),
       st.one_of(st.none(), st.sampled_from([signal.SIGINT, signal.SIGTERM])), st.booleans(), st.booleans())
def test_exit_code_and_verdict(statuses: dict[str, str], received: int | None, usage: bool, allow: bool) -> None:
    code = exit_code(statuses, received, usage, allow)
    complete, verdict, _ = run_verdict(statuses, received)
    values = set(statuses.values())
    if received is not None:
        assert code == 128 + received and not complete and verdict == "interrupted"
    elif usage:
        assert code == 2
    elif values & set(FAILING):
        assert code == 1 and verdict in ("failed", "error", "interrupted")
    elif "blocked" in values or ("not_run" in values and not allow):
        assert code == 3
    else:
        assert code == 0 and verdict in ("passed", "not_run")
    assert complete == (received is None and not values & {"error", "interrupted"})
    assert verdict != "passed" or values <= {"passed", "skipped", "not_run"}


def _raised_in_fixture(err: BaseException) -> BaseException:
    """`err` as the vLLM fixture reports it: pytest.fail(str(err)) raised `from None` while handling it."""
    try:
        try:
            raise err
        except BaseException as inner:
            raise pytest.fail.Exception(str(inner), pytrace=False) from None
    except BaseException as outer:  # noqa: BLE001 - whatever pytest.fail raises
        return outer


@pytest.mark.parametrize(("err", "when", "kind"), [
    (ServerError("nothing is listening at http://127.0.0.1:9 (no connection for 3 s)", "start it"), "setup",
     "connection refused"),
    (ServerError("vLLM server on http://127.0.0.1:9 was not healthy after 600 s (last error line: ?)"), "call",
     "vLLM engine start timeout"),
    (ServerError("vLLM server exited with code 1 before it was healthy: OSError: [Errno 98] Address already in use"),
     "setup", "port in use"),
    (ServerError("vLLM server exited with code 1 before it was healthy: ValueError: bad weight"), "setup", None),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "setup", "connection refused"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "call", None),  # the comparison had begun
    (AssertionError("max_abs_logprob=0.3 <= 1e-4: FAIL"), "call", None),
])
def test_what_is_transient(err: BaseException, when: str, kind: str | None) -> None:
    reason = transient_start_failure(_raised_in_fixture(err), when)
    assert (reason.split(":")[0] if reason else None) == kind, reason


def test_retried_only_when_every_failure_is_transient() -> None:
    ok, refused = {"outcome": "passed"}, {"outcome": "error", "transient": "connection refused: x"}
    real = {"outcome": "failed", "transient": None}
    assert transient_reasons({"tests": [ok, refused]}) == ["connection refused: x"]
    assert transient_reasons({"tests": [ok, refused, real]}) == []
    assert transient_reasons({"tests": [refused], "session": {"collection": {"errors": [{"nodeid": "x"}]}}}) == []
    assert transient_reasons({"tests": [ok]}) == [] and transient_reasons(None) == []


def test_bad_stage_timeout_is_one_error() -> None:
    with pytest.raises(Gemma4Error, match="unknown stage 'nope'"):
        parse_stage_timeouts(["nope=5"])


# ---------------------------------------------------------------------------------------------------
# acceptance: a checkpoint with a deliberately broken tensor (main job: two real hf_parity runs)


def _broken_checkpoint(out: Path) -> Path:
    """The tiny MoE fixture with one element of the final norm's weight set to NaN (names, shapes and dtypes intact, so
    the door lets it through)."""
    from safetensors.torch import load_file, save_file

    from fixtures.factory import write_fixture

    model = write_fixture("moe", out)
    tensors = load_file(model / "model.safetensors")
    weight = tensors["model.norm.weight"].clone()
    weight[0] = float("nan")
    tensors["model.norm.weight"] = weight
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


_ACCEPTANCE_K = "test_model_under_test or (model and parity and not fixture and not bf16) or test_mask_window_off_by_one"


@pytest.mark.main_job
@pytest.mark.stage_hf_parity
def test_broken_tensor_fails_hf_parity_and_blocks_cp_masks(tmp_path: Path, stage_report) -> None:
    model, reports = _broken_checkpoint(tmp_path / "broken"), tmp_path / "reports"
    base = [sys.executable, "-m", "validation.cli", "run", "--model", str(model), "--workers", "0",
            "--report-dir", str(reports)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    runs = {}
    for keep_going in (False, True):
        before = set(reports.glob("run-*"))
        out = subprocess.run([*base, "--stages", "discovery,hf_parity,cp_masks", *(["--keep-going"] * keep_going),
                              "--", "-k", _ACCEPTANCE_K], capture_output=True, text=True, timeout=600, env=env)
        (run,) = set(reports.glob("run-*")) - before
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-2000:]
        runs[keep_going] = run, json.loads((run / "summary.json").read_text())
    run, summary = runs[False]
    assert _statuses(summary) == {"discovery": "passed", "hf_parity": "failed", "cp_masks": "blocked"}, summary
    assert summary["stages"]["cp_masks"]["blocked_by"] == "hf_parity" and summary["complete"] is True
    parity = json.loads((run / "hf_parity.json").read_text())
    failing = [g for t in parity["tests"] for r in t["records"] if r["kind"] == "gate" for g in r["gates"]
               if not g["passed"]]
    assert failing and {str(g["value"]) for g in failing} == {"nan"}, failing  # measured: the NaN reached both sides
    page = (run / "index.html").read_text()
    assert all(g["metric"] in page for g in failing)
    assert _statuses(runs[True][1]) == {"discovery": "passed", "hf_parity": "failed", "cp_masks": "passed"}
    stage_report.record("broken_tensor", failing_gates=sorted({g["metric"] for g in failing}),
                        statuses=[_statuses(s) for _, s in runs.values()])
