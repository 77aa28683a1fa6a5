"""gemma4-validate's workflow: the selected stages in workflow order (validation/stages.py's STAGES), each in its own
supervised pytest session with its own time limit, all writing into one run folder.

A stage after one that failed (failed, error, timed out, stopped early) is `blocked`, naming the blocking stage, unless
keep_going. A stage whose every failing test failed on a transient start-up failure (a port in use, a vLLM start
time-out, a refused connection before the comparison began: `stages.transient_start_failure`) is run again, up to
`retries` times, each attempt recorded; anything else fails at once. At the end the workflow writes the run's
`summary.json` (complete true/false, every stage's status and attempts), `index.html`, the merged `junit.xml` (one
testsuite per stage; each stage's own file stays in `junit/`) and moves LATEST to the run when it is complete."""
from __future__ import annotations

import argparse
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from gemma4_support.errors import Gemma4Error
from validation.stages import STAGE_NAMES, STAGES, Stage, count_outcomes

DEFAULT_STAGE_TIMEOUT_S = 3 * 3600.0  # generous: a full-depth checkpoint's hf_parity on a GPU runner fits
FAILING = ("failed", "error", "timed_out", "interrupted")  # statuses that block the stages after them
JUNIT = "junit.xml"
_TIMEOUT_FIX = "write --stage-timeout SECONDS (every stage) or --stage-timeout STAGE=SECONDS, seconds > 0"


@dataclass(frozen=True)
class Workflow:
    """What a workflow runs: stages in workflow order, each stage's time limit, retries, whether to keep going."""

    stages: tuple[str, ...]
    timeouts: Mapping[str, float]
    retries: int = 1
    keep_going: bool = False


@dataclass
class StageRun:
    """One stage's outcome in the workflow: its status, the attempts that made it and its final stage report."""

    name: str
    status: str
    attempts: list[dict] = field(default_factory=list)
    doc: dict | None = None
    blocked_by: str | None = None
    reason: str | None = None


def in_workflow_order(stages: Iterable[str]) -> tuple[str, ...]:
    """The given stage names in workflow order."""
    chosen = set(stages)
    return tuple(name for name in STAGE_NAMES if name in chosen)


def parse_stage_timeouts(values: Sequence[str] | None) -> dict[str, float]:
    """Each stage's time limit in seconds from `--stage-timeout` values ("S" for every stage, "STAGE=S" for one; later
    values win, comma-separated lists allowed); Gemma4Error naming a malformed value or an unknown stage."""
    limits = dict.fromkeys(STAGE_NAMES, DEFAULT_STAGE_TIMEOUT_S)
    for value in values or ():
        for item in value.split(","):
            stage, _, seconds = item.strip().rpartition("=")
            try:
                limit = float(seconds)
            except ValueError:
                raise Gemma4Error(f"--stage-timeout {item.strip()!r} is not a number of seconds", _TIMEOUT_FIX) from None
            if not limit > 0 or limit == float("inf"):
                raise Gemma4Error(f"--stage-timeout {item.strip()!r} is not a positive, finite number of seconds",
                                  _TIMEOUT_FIX)
            if stage and stage not in STAGE_NAMES:
                raise Gemma4Error(f"--stage-timeout names unknown stage {stage!r}", f"choose from {', '.join(STAGE_NAMES)}")
            limits.update({stage: limit} if stage else dict.fromkeys(STAGE_NAMES, limit))
    return limits


def transient_reasons(doc: Mapping | None) -> list[str]:
    """The transient start-up failures of a stage session when every failing test failed on one and nothing else went
    wrong (no collection error, no other failure); empty when the stage must not be retried."""
    if doc is None or (doc.get("session") or {}).get("collection", {}).get("errors"):
        return []
    failing = [t for t in doc.get("tests", []) if t["outcome"] in ("failed", "error", "interrupted")]
    if not failing or any(not t.get("transient") for t in failing):
        return []
    return sorted({t["transient"] for t in failing})


def stage_verdict(doc: Mapping | None, timed_out_after: float | None, returncode: int) -> tuple[str, str | None]:
    """A stage attempt's status and reason: timed_out (stopped past its limit of `timed_out_after` s), error (no stage
    report: pytest crashed or refused its command line), the session's state when it did not complete (interrupted,
    error), else the stage report's status."""
    if timed_out_after is not None:
        return "timed_out", f"the stage exceeded its time limit of {timed_out_after:g} s and was stopped"
    if doc is None:
        return "error", f"pytest exited with code {returncode} without writing the stage's report (see its output)"
    run = doc.get("run") or {}
    if run.get("state", "complete") != "complete":
        return doc["status"], run.get("reason")
    return doc["status"], None


def blocking(runs: Sequence[StageRun]) -> str | None:
    """The first stage whose status blocks the stages after it (None when none does)."""
    return next((r.name for r in runs if r.status in FAILING), None)


def exit_code(statuses: Mapping[str, str], signal_number: int | None, usage_error: bool, allow_not_run: bool) -> int:
    """gemma4-validate's exit code for the selected stages' statuses: 128 + the signal when interrupted, 2 for a usage
    error, 1 when a stage failed (or errored, timed out, stopped early), 3 when a stage was blocked or ran no tests
    (not_run, unless allowed), else 0."""
    if signal_number is not None:
        return 128 + signal_number
    if usage_error:
        return 2
    values = set(statuses.values())
    if values & set(FAILING):
        return 1
    if "blocked" in values or ("not_run" in values and not allow_not_run):
        return 3
    return 0


def run_verdict(statuses: Mapping[str, str], signal_number: int | None) -> tuple[bool, str, str | None]:
    """(complete, verdict, state) of the workflow: not complete when a signal stopped it or a stage did not complete
    (error, interrupted); else failed, not_run (nothing ran), or passed."""
    values = list(statuses.values())
    if signal_number is not None or "interrupted" in values:
        return False, "interrupted", "interrupted"
    if "error" in values:
        return False, "error", "error"
    if set(values) & {"failed", "timed_out", "blocked"}:
        return True, "failed", "complete"
    if values and all(v == "not_run" for v in values):
        return True, "not_run", "complete"
    return True, "passed", "complete"


# ---------------------------------------------------------------------------------------------------
# running it


def run_workflow(args: argparse.Namespace, workflow: Workflow, run: Path) -> tuple[int, dict, list[dict]]:
    """Run `workflow` into the run folder `run` (made INCOMPLETE by the caller); its exit code, its summary and every
    test's entry (from the stages' final reports)."""
    started, t0 = datetime.now(timezone.utc), time.monotonic()
    runs: list[StageRun] = []
    received, usage_error = None, False
    with tempfile.TemporaryDirectory(prefix="gemma4-validate-") as tmp:
        for name in workflow.stages:
            blocker = blocking(runs)
            if received is not None or usage_error:
                runs.append(StageRun(name, "interrupted" if received is not None else "not_run",
                                     reason="the workflow stopped before this stage"))
                continue
            if blocker and not workflow.keep_going:
                runs.append(StageRun(name, "blocked", blocked_by=blocker, reason=f"blocked by {blocker}, which "
                                     f"{next(r.status for r in runs if r.name == blocker).replace('_', ' ')}"))
                continue
            stage = StageRun(name, "not_run")
            for attempt in range(1, workflow.retries + 2):
                record, received = _attempt(args, name, attempt, workflow.timeouts[name], run, Path(tmp))
                stage.attempts.append(record)
                stage.status, stage.reason, stage.doc = record["status"], record["reason"], record.pop("doc")
                usage_error = record["exit_code"] == 4  # pytest's usage error: its command line or an option
                if received is not None or usage_error or not record["transient"] or attempt > workflow.retries:
                    break
                _keep_attempt(run, name, record)
            runs.append(stage)
    statuses = {r.name: r.status for r in runs}
    code = exit_code(statuses, received, usage_error, args.allow_not_run)
    summary, tests = _summary(args, workflow, run, runs, received, code, started, time.monotonic() - t0)
    return code, summary, tests


def _attempt(args: argparse.Namespace, name: str, attempt: int, timeout_s: float, run: Path,
             tmp: Path) -> tuple[dict, int | None]:
    """Run one attempt of a stage: its record (status, reason, exit code, transient failures, files) and the signal
    that interrupted it (None if none)."""
    from validation.cli import pytest_command, run_supervised

    junit = run / "junit" / f"{name}.xml"
    junit.parent.mkdir(exist_ok=True)
    (run / f"{name}.json").unlink(missing_ok=True)
    cmd = pytest_command(args, [name], tmp / f"{name}-{attempt}",
                         extra=["--gemma4-stage-run", str(run), f"--junitxml={junit}"])
    t0 = time.monotonic()
    done = run_supervised(cmd, timeout_s=timeout_s)
    doc = _read_json(run / f"{name}.json")
    status, reason = stage_verdict(doc, timeout_s if done.timed_out else None, done.returncode)
    transient = transient_reasons(doc) if status in ("failed", "error") else []
    return {"attempt": attempt, "status": status, "reason": reason, "exit_code": done.returncode,
            "timed_out": done.timed_out, "timeout_s": timeout_s, "duration_s": round(time.monotonic() - t0, 2),
            "transient": transient, "report": f"{name}.json" if doc is not None else None,
            "junit": str(junit.relative_to(run)) if junit.is_file() else None, "doc": doc}, done.received


def _keep_attempt(run: Path, name: str, record: dict) -> None:
    """Move an attempt that will be retried aside (`<stage>.attempt<N>.json`, `junit/<stage>.attempt<N>.xml`)."""
    for key, path in (("report", run / f"{name}.json"), ("junit", run / "junit" / f"{name}.xml")):
        if record[key] and path.is_file():
            kept = path.with_name(f"{name}.attempt{record['attempt']}{path.suffix}")
            path.replace(kept)
            record[key] = str(kept.relative_to(run))


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summary(args: argparse.Namespace, workflow: Workflow, run: Path, runs: list[StageRun], received: int | None,
             code: int, started: datetime, duration_s: float) -> tuple[dict, list[dict]]:
    """The run's summary.json content from the stages' final reports and attempts, and every test's entry."""
    import signal

    complete, verdict, state = run_verdict({r.name: r.status for r in runs}, received)
    docs = [r.doc for r in runs if r.doc is not None]
    sessions = [d.get("session") or {} for d in docs]
    reason = None
    if received is not None:
        reason = f"{signal.Signals(received).name} received"
    elif not complete:
        first = next(r for r in runs if r.status in ("interrupted", "error"))
        reason = f"stage {first.name}: {first.reason}"
    provenance = docs[-1]["provenance"] if docs else _provenance(args, started)
    stages, tests = {}, []
    by_name = {r.name: r for r in runs}
    for stage in STAGES:
        r = by_name.get(stage.name)
        if r is None:
            stages[stage.name] = {"status": "not_selected", "counts": count_outcomes([])}
            continue
        mine = r.doc["tests"] if r.doc else []
        tests += mine
        if r.doc is None:  # a stage with no session of its own still gets its JSON
            _write_stage_json(run, stage, r, provenance, {"complete": complete, "state": state, "reason": reason})
        stages[stage.name] = {"status": r.status, "counts": count_outcomes(mine), "reason": r.reason,
                              "blocked_by": r.blocked_by, "timeout_s": workflow.timeouts[stage.name],
                              "duration_s": round(sum(a["duration_s"] for a in r.attempts), 2),
                              "attempts": r.attempts, "report": f"{stage.name}.json",
                              "junit": r.attempts[-1]["junit"] if r.attempts else None}
    unstaged = [t for s in sessions for t in s.get("unstaged", [])]
    counts = count_outcomes(tests + unstaged)
    counts["error"] += sum(len(s.get("collection", {}).get("errors", [])) for s in sessions)
    counts["skipped"] += sum(s.get("collection", {}).get("skipped", 0) for s in sessions)
    summary = {"not_run": [r.name for r in runs if r.status == "not_run"],
               "blocked": [r.name for r in runs if r.status == "blocked"],
               "verdict": verdict, "complete": complete, "state": state, "reason": reason, "run_dir": str(run),
               "exit_status": code, "selection": list(workflow.stages),
               "started_utc": started.isoformat(timespec="seconds"),
               "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "duration_s": round(duration_s, 2), "counts": counts, "stages": stages,
               "unstaged": {"status": "not_run" if not unstaged else "ran", "counts": count_outcomes(unstaged)},
               "collection": {"errors": [e for s in sessions for e in s.get("collection", {}).get("errors", [])],
                              "skipped": sum(s.get("collection", {}).get("skipped", 0) for s in sessions)},
               "options": sessions[-1].get("options", {}) if sessions else {},
               "workflow": {"order": list(workflow.stages), "keep_going": workflow.keep_going,
                            "retries": workflow.retries},
               "junit": JUNIT, "baseline": str(Path(args.baseline).resolve()) if args.baseline else None,
               "provenance": provenance}
    return summary, tests


def _write_stage_json(run: Path, stage: Stage, r: StageRun, provenance: dict, state: dict) -> None:
    """The JSON of a stage that had no session of its own (blocked, or never started): its status and why."""
    from gemma4_support.reports.files import write_json

    write_json(run / f"{stage.name}.json", {
        "stage": stage.name, "marker": stage.marker, "description": stage.description, "status": r.status,
        "reason": r.reason, "blocked_by": r.blocked_by, "counts": count_outcomes([]), "run": state,
        "attempts": r.attempts, "provenance": provenance, "tests": []})


def _provenance(args: argparse.Namespace, started: datetime) -> dict:
    """The run's provenance when no stage wrote one (the workflow stopped before any stage reported)."""
    from fixtures.factory import fixture_dir
    from gemma4_support.reports.provenance import collect
    from validation.plugin import REPO

    model = Path(args.model).resolve() if args.model else fixture_dir("moe")
    return collect(REPO, model, 0, started=started)


def write_run(run: Path, summary: dict, tests: list[dict]) -> None:
    """Write the run's summary.json, index.html and merged junit.xml; then finish the run when it is complete (LATEST
    moves to it), else mark it INCOMPLETE with the reason."""
    from gemma4_support.reports.files import finish_run, mark_incomplete, write_atomic, write_json
    from gemma4_support.reports.html import render_run

    write_atomic(run / JUNIT, merged_junit(run, summary["stages"]))
    write_json(run / "summary.json", summary)
    write_atomic(run / "index.html", render_run(summary, tests))
    if summary["complete"]:
        finish_run(run)
    else:
        mark_incomplete(run, f"{summary['state']}: {summary['reason']}")


def merged_junit(run: Path, stages: Mapping[str, Mapping]) -> str:
    """One JUnit XML document for CI systems: each run stage's testsuite (named after the stage), and for a stage
    without one (blocked, timed out, crashed) a testsuite with one skipped or errored testcase saying why."""
    root = ET.Element("testsuites", name="gemma4-validate")
    for name, stage in stages.items():
        if stage["status"] == "not_selected":
            continue
        path = run / stage["junit"] if stage.get("junit") else None
        suites = []
        if path is not None and path.is_file():
            try:
                suites = list(ET.parse(path).getroot().iter("testsuite"))
            except ET.ParseError:
                suites = []
        for suite in suites:
            suite.set("name", name)
            root.append(suite)
        if suites and stage["status"] != "timed_out":
            continue
        kind = "skipped" if stage["status"] in ("blocked", "not_run", "skipped") else "error"
        suite = ET.SubElement(root, "testsuite", name=name, tests="1", failures="0", skipped=str(int(kind == "skipped")),
                              errors=str(int(kind == "error")))
        case = ET.SubElement(suite, "testcase", classname=f"gemma4-validate.{name}", name=f"stage {stage['status']}")
        ET.SubElement(case, kind, message=str(stage.get("reason") or stage["status"]))
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key, 0)) for s in root.iter("testsuite"))))
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
