"""The run's reports, written by the controlling process: `_RunCollector` and what only it uses.

`_RunCollector` (registered by `pytest_configure` in the controller) gathers every test's outcome and the records
`stage_report` put on its report (`user_properties` under `_RECORD_KEY`, so they survive pytest-xdist), and at the end
of the session writes one JSON per stage, a summary and an HTML page into the run folder with the run's real verdict:
an interrupted, stopped or erroring run is marked INCOMPLETE and `LATEST` moves only to a complete one; with
`--gemma4-stage-run` only the selected stages' JSONs (and what the workflow's summary needs).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gemma4_support.reports.files import finish_run, mark_incomplete, write_atomic, write_json
from gemma4_support.reports.html import render_run
from validation.options import OPTIONS
from validation.signals import _RECEIVED, _signals_held
from validation.stages import STAGES, count_outcomes, outcome_of, selected_stages, stage_of, stage_status

REPO = Path(__file__).resolve().parents[1]
_RECORD_KEY = "gemma4"


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
        """Fold one phase's report into its test's entry: duration, records, outcome, failure text."""
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
        """Note a collection error, or count a skipped collection."""
        if report.failed:
            self.collection_errors.append({"nodeid": report.nodeid, "longrepr": str(report.longrepr)[-4000:]})
        elif report.skipped:
            self.collection_skipped += self._category(report) == "skipped"

    def pytest_internalerror(self, excrepr: object) -> None:
        """Note a pytest internal error (its last line)."""
        self.internal_errors.append(str(excrepr).strip().splitlines()[-1][:500] if str(excrepr).strip() else "?")

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo) -> None:
        """Note what interrupted the run."""
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
        """Write the run's reports with its real verdict, and finish the run folder or mark it INCOMPLETE."""
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

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Print where the run's reports are and whether the run completed."""
        terminalreporter.write_line(f"gemma4-support reports: {self.run} ({self.outcome})")


def _default_model_dir() -> Path | None:
    try:
        from fixtures.factory import fixture_dir

        return fixture_dir("moe")
    except Exception:
        return None

