"""pytest plugin of the suite: stage markers, options, the `stage_report` fixture, and the run's reports.

Tests hand measured metrics to `stage_report`; records travel to the controlling process on the test
report (`user_properties`, so they survive pytest-xdist), and at the end of the session the controller
writes one JSON per stage, a summary and an HTML page into a fresh run folder under `--report-dir`.

A run's verdict is its real outcome: SIGTERM interrupts the controller and every xdist worker as SIGINT does
(KeyboardInterrupt, so fixtures tear down and vLLM servers stop), a test that did not run to its end is
`interrupted`, never passed, and a run that was interrupted, stopped early or hit a collection or internal error
leaves its folder marked INCOMPLETE with every affected stage `interrupted` / `error`; `LATEST` moves only to a
complete run. Signals that arrive while the reports are written are held until they are written (as interrupted).
With `--gemma4-stage-run DIR` (gemma4-validate's workflow: one session per stage) the session writes its stages' JSONs
into that run folder (with what the workflow's summary needs, and each failing test's transient start-up failure, if
it was one) and leaves the summary, page, INCOMPLETE marker and LATEST to the workflow.

`SUITE_OPTION_VALUES` (entry point `pytest11: gemma4-suite-options`) lets the suite's path options take their value
as a separate argument outside the repository. PYTEST_DONT_REWRITE: that entry point imports this module before
conftest.py names it as a plugin, too late for pytest to rewrite its asserts (it has none), which it would warn about.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gemma4_support.errors import Gemma4Error
from gemma4_support.reports.files import finish_run, jsonable, mark_incomplete, new_run_dir, write_atomic, write_json
from gemma4_support.reports.html import render_run
from gemma4_support.runtime import RuntimeConfig, set_runtime
from validation.stages import (EXTRA_MARKERS, STAGES, count_outcomes, outcome_of, selected_stages, stage_of,
                               stage_status, transient_start_failure)

if TYPE_CHECKING:
    from gemma4_support.metrics import Gate, GateResult

REPO = Path(__file__).resolve().parents[1]
_RECORD_KEY = "gemma4"
_RUN_DIR = pytest.StashKey[Path]()
_HANDLERS = pytest.StashKey[dict]()
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
_RECEIVED: list[tuple[str, float]] = []  # the signals that interrupted this process: name, monotonic time
_DUPLICATE_S = 2.0
_RESTARTED = "GEMMA4_SUITE_OPTIONS_JOINED"  # set for the one re-execution with joined option values
# Warnings raised by dependencies, by design, that no test of ours should see as failures.
WARNING_FILTERS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",  # megatron-core on CPU, by design
    "ignore:Warning. tp_group is None:DeprecationWarning",  # megatron-core 0.16 linears at world size 1
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",  # raised inside torch 2.13 itself
    "ignore:The following imports from `dynamic_context.py`:DeprecationWarning",  # megatron-core 0.16 import
)
# The suite's options: (flag, addoption keywords).
OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--gemma4-model", dict(default=None, metavar="DIR",
                            help="HF Gemma 4 checkpoint directory to validate (default: the embedded tiny MoE fixture)")),
    ("--report-dir", dict(default=None, metavar="DIR",
                          help="where run folders with the stage JSONs are written (default: reports/ in the current "
                               "directory)")),
    ("--gemma4-seed", dict(type=int, default=0, help="seed for every random input of the suite")),
    ("--gemma4-full-depth", dict(action="store_true",
                                 help="do not truncate --gemma4-model to the depth that covers every layer family")),
    ("--gemma4-chat-template", dict(default=None, metavar="FILE",
                                    help="a Gemma 4 chat template (Jinja) to run the tokenization stage with; default: "
                                         "the model's own, else the fixtures' template")),
    ("--gemma4-dtype", dict(default=None, choices=("float32", "bfloat16"),
                            help="precision of the mismatch stage against --vllm-url (the server's --dtype; default "
                                 "bfloat16); without --vllm-url the stage runs float32 and bfloat16 on the fixtures")),
    ("--trainability-publish", dict(default="auto", choices=("auto", "lora", "merged"),
                                    help="how the trainability loop serves each step's policy: vLLM runtime LoRA "
                                         "loading, or merged weights reloaded in place / restarted (default auto: lora "
                                         "for dense, merged for MoE)")),
    ("--gemma4-run-dir-file", dict(default=None, metavar="FILE",
                                   help="write this run's report folder to FILE when the session ends "
                                        "(gemma4-validate reads it)")),
    ("--gemma4-stage-run", dict(default=None, metavar="DIR",
                                help="write the selected stages' JSONs into this existing run folder, no INCOMPLETE "
                                     "marker or LATEST, and a summary and page only when the session does not "
                                     "complete: gemma4-validate's workflow runs each stage so and writes the run's "
                                     "summary, page and LATEST once at the end (replacing such a summary)")),
    ("--throughput-tokens", dict(type=int, default=8192, metavar="N",
                                 help="tokens per step of the GPU throughput test (one packed row of two documents; "
                                      "HF: 2 x N/2)")),
    ("--throughput-layers", dict(type=int, default=6, metavar="N",
                                 help="layers of the GPU throughput test's model (the 26B-A4B shapes, or "
                                      "--gemma4-model's config, cut to N; it must end on a full layer)")),
)
_VALUE_OPTIONS = frozenset(flag for flag, kw in OPTIONS if kw.get("action") != "store_true")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gemma4", "gemma4-support validation")
    for flag, keywords in OPTIONS:
        group.addoption(flag, **keywords)


# ---------------------------------------------------------------------------------------------------
# `--opt PATH` outside the repository: pytest decides its rootdir, ini file and first conftests before any plugin
# option is known, so it takes PATH for a test path (no pyproject.toml found, no conftest, "unrecognized arguments").


def join_option_values(args: Sequence[str], taken_as_paths: Sequence[str]) -> list[str]:
    """`args` with each suite option whose separate value pytest took for a test path written `--opt=VALUE`."""
    paths, out, i = set(map(str, taken_as_paths)), [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + list(args[i:])
        if arg in _VALUE_OPTIONS and i + 1 < len(args) and args[i + 1] in paths:
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


class _SuiteOptionValues:
    """Early plugin (entry point): restarts pytest once with `--opt=PATH` where pytest's early parsing took the PATH
    of a suite option for a test path; where it cannot restart (pytest.main in a process), one usage-error line."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_load_initial_conftests(self, early_config: pytest.Config) -> Iterator[None]:
        restarted = os.environ.pop(_RESTARTED, None)
        raw = list(early_config.invocation_params.args)
        fixed = join_option_values(raw, early_config.known_args_namespace.file_or_dir or [])
        if fixed != raw and any(_exists(early_config.invocation_params.dir, a.partition("=")[2])
                                for a in set(fixed) - set(raw)):
            if restarted or sys.argv[1:] != raw:
                joined = ", ".join(sorted(set(fixed) - set(raw)))
                raise pytest.UsageError(f"pytest took the value of a suite option for a test path — fix: write it "
                                        f"joined with '=': {joined}")
            prefix = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [*prefix, *fixed], {**os.environ, _RESTARTED: "1"})
        return (yield)


SUITE_OPTION_VALUES = _SuiteOptionValues()


def _exists(base: Path, value: str) -> bool:
    try:
        return (Path(base) / value).exists()
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# signals: SIGTERM interrupts as SIGINT does; held while the reports are written


def _note(signum: int) -> bool:
    """Record an interrupting signal; False when it repeats the last one within _DUPLICATE_S (the same interruption
    delivered twice: to the process group, and forwarded by a parent)."""
    now = time.monotonic()
    if _RECEIVED and now - _RECEIVED[-1][1] < _DUPLICATE_S:
        return False
    _RECEIVED.append((signal.Signals(signum).name, now))
    return True


def _interrupt(signum: int, _frame: object) -> None:
    """SIGINT / SIGTERM handler: pytest's orderly interruption (KeyboardInterrupt), passed on to the children in this
    process's group (the xdist workers, when only the controller was signalled)."""
    if not _note(signum):
        return
    import psutil

    for child in psutil.Process().children():
        try:
            if os.getpgid(child.pid) == os.getpgrp():
                child.send_signal(signum)
        except (OSError, psutil.Error):
            continue
    raise KeyboardInterrupt(f"{_RECEIVED[-1][0]} received")


def _install_interrupts(config: pytest.Config) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    previous = {}
    for sig in _INTERRUPTS:
        current = signal.getsignal(sig)
        if current in (signal.default_int_handler, signal.SIG_DFL):  # an ignored signal stays ignored
            previous[sig] = signal.signal(sig, _interrupt)
    config.stash[_HANDLERS] = previous
    if _is_worker(config):  # a worker whose controller dies is interrupted too
        from gemma4_support.serving.process import set_pdeathsig

        set_pdeathsig(signal.SIGTERM)


@contextmanager
def _signals_held() -> Iterator[list[str]]:
    """Hold SIGINT / SIGTERM (a second one interrupts); yields the names of those that arrived."""
    held: list[str] = []

    def hold(signum: int, _frame: object) -> None:
        if _note(signum):
            held.append(signal.Signals(signum).name)
        if len(held) > 1:
            raise KeyboardInterrupt(f"{held[-1]} received twice while the reports were written")

    on_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, hold) for sig in _INTERRUPTS
                if on_main and signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# configuration


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    for stage in STAGES:
        config.addinivalue_line("markers", f"{stage.marker}: {stage.description}")
    for name, text in EXTRA_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    for line in WARNING_FILTERS:
        config.addinivalue_line("filterwarnings", line)
    # torch.compile's structured trace logs every graph at DEBUG; pytest would replay it under each failure (GPU runs)
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    set_runtime(RuntimeConfig())  # one process, one model replica: tp = cp = ep = 1
    if _is_worker(config):
        config.stash[_RUN_DIR] = Path(config.workerinput["gemma4_run_dir"])
    elif not (config.option.collectonly or config.option.help):
        stage_run = config.getoption("--gemma4-stage-run")
        base = Path(config.invocation_params.dir) / (config.getoption("--report-dir") or "reports")
        if stage_run and not Path(stage_run).is_dir():
            raise pytest.UsageError(f"--gemma4-stage-run: {stage_run} is not a run folder — fix: pass the folder "
                                    "gemma4-validate made for this run")
        try:
            run = Path(stage_run).absolute() if stage_run else new_run_dir(base)
        except Gemma4Error as exc:
            raise pytest.UsageError(f"--report-dir: {exc}") from None
        config.stash[_RUN_DIR] = run
        config.pluginmanager.register(_RunCollector(config, run, stage_only=bool(stage_run)), "gemma4-run-collector")
    _install_interrupts(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    for sig, handler in config.stash.get(_HANDLERS, {}).items():
        signal.signal(sig, handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing report whose exception is a transient start-up failure says so (`gemma4_transient`, which travels
    with the report through pytest-xdist): gemma4-validate's workflow retries such a stage."""
    report = yield
    if report.failed and call.excinfo is not None:
        reason = transient_start_failure(call.excinfo.value, call.when)
        if reason:
            report.gemma4_transient = reason
    return report


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist: hand the run folder to each worker
    node.workerinput["gemma4_run_dir"] = str(node.config.stash[_RUN_DIR])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); this machine has no GPU — run it on a GPU runner")
    for item in gpu_items:
        item.add_marker(skip)


# ---------------------------------------------------------------------------------------------------
# what tests measured


class StageReport:
    """What a test measured, with thresholds and verdicts; failing gates fail the test."""

    def __init__(self, node: pytest.Item) -> None:
        self._node = node

    def _add(self, record: dict) -> None:
        self._node.user_properties.append((_RECORD_KEY, jsonable(record)))

    def record(self, case: str, **info: object) -> None:
        """Record information (timings, counts, ids) without a gate."""
        self._add({"case": case, "kind": "info", "info": info})

    def check(self, case: str, metrics: Mapping[str, object], gates: Sequence[Gate], **info: object) -> list[GateResult]:
        """Record metrics and judge them; fail the test naming every gate that failed."""
        from gemma4_support.metrics import evaluate

        results = evaluate(_numeric(metrics), gates)
        passed = all(r.passed for r in results)
        self._add({"case": case, "kind": "gate", "metrics": metrics, "gates": [r.to_dict() for r in results],
                   "passed": passed, "info": info})
        if not passed:
            failed = "; ".join(r.describe() for r in results if not r.passed)
            first = info.get("first_failures")
            example = f"; first failing example: {first[0]}" if isinstance(first, list) and first else ""
            pytest.fail(f"[{case}] gate failed: {failed}{example}", pytrace=False)
        return results

    def expect_caught(self, case: str, metrics: Mapping[str, object], gates: Sequence[Gate],
                      **info: object) -> list[GateResult]:
        """Sensitivity: a deliberately broken variant must fail at least one gate on a measured value (a metric
        missing from `metrics` fails its gate but catches nothing), else this test fails."""
        from gemma4_support.metrics import evaluate

        results = evaluate(_numeric(metrics), gates)
        caught = any(not r.passed and r.value is not None for r in results)
        self._add({"case": case, "kind": "sensitivity", "metrics": metrics, "gates": [r.to_dict() for r in results],
                   "passed": caught, "caught": caught, "info": info})
        if not caught:
            values = "; ".join(r.describe() for r in results)
            pytest.fail(f"[{case}] the broken variant failed no gate on a measured value — the gate cannot fail: {values}",
                        pytrace=False)
        return results


def _numeric(metrics: Mapping[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture
def stage_report(request: pytest.FixtureRequest) -> StageReport:
    """Record a test's measured metrics, thresholds and verdicts into its stage's JSON report."""
    return StageReport(request.node)


@pytest.fixture(scope="session")
def run_dir(pytestconfig: pytest.Config) -> Path:
    """This run's report folder (for artifacts a stage wants to keep beside its JSON)."""
    return pytestconfig.stash[_RUN_DIR]


# ---------------------------------------------------------------------------------------------------
# the run's reports (controller)


class _RunCollector:
    """Controller-side: gathers every test's outcome and records, and writes the run's reports."""

    def __init__(self, config: pytest.Config, run: Path, stage_only: bool = False) -> None:
        self.config = config
        self.run = run
        self.stage_only = stage_only  # a stage of gemma4-validate's workflow: its stage JSONs only
        self.tests: dict[str, dict] = {}
        self.collection_errors: list[dict] = []
        self.collection_skipped = 0
        self.internal_errors: list[str] = []
        self.interrupted: str | None = None
        self.outcome = "not written"
        self.started = datetime.now(timezone.utc)
        self.t0 = time.monotonic()

    def _category(self, report: pytest.TestReport | pytest.CollectReport) -> str:
        """pytest's own category of a report (what its summary line counts it as; '' for a passed setup/teardown)."""
        status = self.config.hook.pytest_report_teststatus(report=report, config=self.config)
        return status[0] if status else ""

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.setdefault(report.nodeid, {
            "nodeid": report.nodeid, "stage": stage_of(report.keywords), "outcome": "interrupted", "finished": False,
            "counted": [], "duration_s": 0.0, "records": [], "longrepr": None, "transient": None,
        })
        entry["duration_s"] += report.duration
        entry["records"].extend(v for k, v in report.user_properties if k == _RECORD_KEY and v not in entry["records"])
        if category := self._category(report):
            entry["counted"].append(category)
        # it ran to its end with its teardown report (or xdist's report of the worker that crashed running it)
        entry["finished"] = entry["finished"] or report.when not in ("setup", "call")
        if report.skipped and entry["longrepr"] is None:
            entry["longrepr"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.failed:
            entry["longrepr"] = str(report.longrepr)[-4000:]
            entry["transient"] = entry["transient"] or getattr(report, "gemma4_transient", None)
        entry["outcome"] = outcome_of(entry["counted"], entry["finished"])

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_errors.append({"nodeid": report.nodeid, "longrepr": str(report.longrepr)[-4000:]})
        elif report.skipped:
            self.collection_skipped += self._category(report) == "skipped"

    def pytest_internalerror(self, excrepr: object) -> None:
        self.internal_errors.append(str(excrepr).strip().splitlines()[-1][:500] if str(excrepr).strip() else "?")

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        self.interrupted = " ".join(str(excinfo.value).split()) or excinfo.typename

    def _run_state(self, session: pytest.Session, exitstatus: int) -> tuple[str, str | None]:
        """'complete', or 'interrupted' / 'error' with the reason the run did not complete."""
        if _RECEIVED:  # first: a signal during collection also fails the module being collected
            return "interrupted", f"{_RECEIVED[0][0]} received"
        if self.collection_errors:
            first = self.collection_errors[0]["nodeid"]
            return "error", f"{len(self.collection_errors)} collection error(s), first {first}"
        if self.internal_errors or exitstatus == pytest.ExitCode.INTERNAL_ERROR:
            return "error", f"pytest internal error: {(self.internal_errors or ['see its output'])[0]}"
        if exitstatus == pytest.ExitCode.USAGE_ERROR:
            return "error", "pytest usage error (see its output)"
        if self.interrupted or exitstatus == pytest.ExitCode.INTERRUPTED:
            return "interrupted", self.interrupted or "pytest was interrupted"
        stopped = session.shouldfail or session.shouldstop
        if stopped:
            return "interrupted", f"pytest stopped early: {stopped}"
        if any(t["outcome"] == "interrupted" for t in self.tests.values()):
            return "interrupted", "a test did not run to its end"
        return "complete", None

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        with _signals_held() as held:
            state, reason = self._run_state(session, exitstatus)
            provenance = self._provenance()
            while True:
                self._write_reports(state, reason, int(exitstatus), provenance)
                if not held or state != "complete":
                    break
                state, reason = "interrupted", f"{held[0]} received while the reports were written"
                exitstatus = session.exitstatus = pytest.ExitCode.INTERRUPTED
            if state == "complete" and not self.stage_only:  # a workflow's stage: the workflow finishes the run
                finish_run(self.run)
            elif not self.stage_only:
                mark_incomplete(self.run, f"{state}: {reason}")
            self.outcome = "complete" if state == "complete" else f"not complete: {state}, {reason}"
            pointer = self.config.getoption("--gemma4-run-dir-file")
            if pointer:
                write_atomic(Path(pointer), str(self.run) + "\n")

    def _provenance(self) -> dict:
        from gemma4_support.reports.provenance import collect

        model = self.config.getoption("--gemma4-model")
        return collect(REPO, Path(model) if model else _default_model_dir(), self.config.getoption("--gemma4-seed"),
                       started=self.started)

    def _write_reports(self, state: str, reason: str | None, exitstatus: int, provenance: dict) -> None:
        complete = state == "complete"
        run = {"complete": complete, "state": state, "reason": reason}
        selected = selected_stages(self.config.getoption("markexpr"))
        tests = list(self.tests.values())
        other = [t for t in tests if t["stage"] is None]
        stages = {}
        for stage in STAGES:
            if self.stage_only and stage.name not in selected:
                continue  # another stage's session writes that one
            mine = [t for t in tests if t["stage"] == stage.name]
            doc = {"stage": stage.name, "marker": stage.marker, "description": stage.description,
                   "status": stage_status([t["outcome"] for t in mine], state, stage.name in selected),
                   "counts": count_outcomes(mine), "run": run, "provenance": provenance, "tests": mine}
            if self.stage_only:  # what the workflow's summary needs of this session
                doc["session"] = {"exit_status": exitstatus, "duration_s": round(time.monotonic() - self.t0, 2),
                                  "started_utc": self.started.isoformat(timespec="seconds"),
                                  "collection": {"errors": self.collection_errors, "skipped": self.collection_skipped},
                                  "unstaged": other, "selection": self.config.getoption("markexpr") or None,
                                  "options": {flag.lstrip("-"): self.config.getoption(flag) for flag, _ in OPTIONS}}
            write_json(self.run / f"{stage.name}.json", doc)
            stages[stage.name] = {"status": doc["status"], "counts": doc["counts"]}
        if self.stage_only and complete:
            return  # else the session's own summary and page below: the run's, should gemma4-validate die before its own
        totals = count_outcomes(tests)
        totals["error"] += len(self.collection_errors)
        totals["skipped"] += self.collection_skipped
        statuses = [s["status"] for s in stages.values()]
        unstaged = {"status": stage_status([t["outcome"] for t in other], state, False),
                    "counts": count_outcomes(other)}
        verdict = state if not complete else (
            "failed" if "failed" in [*statuses, unstaged["status"]] else "not_run" if not tests else "passed")
        summary = {"not_run": [name for name, s in stages.items() if s["status"] == "not_run"],
                   "verdict": verdict, **run, "run_dir": str(self.run), "exit_status": exitstatus,
                   "selection": self.config.getoption("markexpr") or None,
                   "started_utc": self.started.isoformat(timespec="seconds"),
                   "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "duration_s": round(time.monotonic() - self.t0, 2), "counts": totals, "stages": stages,
                   "unstaged": unstaged,
                   "collection": {"errors": self.collection_errors, "skipped": self.collection_skipped},
                   "options": {flag.lstrip("-"): self.config.getoption(flag) for flag, _ in OPTIONS},
                   "provenance": provenance}
        write_json(self.run / "summary.json", summary)
        write_atomic(self.run / "index.html", render_run(summary, tests))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"gemma4-support reports: {self.run} ({self.outcome})")


def _default_model_dir() -> Path | None:
    try:
        from fixtures.factory import fixture_dir

        return fixture_dir("moe")
    except Exception:
        return None

