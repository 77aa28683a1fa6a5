"""Gate drift between two run folders: every gate metric's value in run A and run B, how far it moved, and whether
it regressed (a gate that passed in A fails in B, or B moved toward its threshold by more than a tolerance)."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gemma4_support.errors import Gemma4Error

DEFAULT_TOLERANCE = 0.1  # a move toward the threshold of more than 10 % of the threshold is a regression
_RUN_FIX = "pass a run folder that gemma4-validate wrote (it holds summary.json), or the report folder holding LATEST"


def as_float(value: object) -> float | None:
    """A measured value as a float ('nan'/'inf' strings as written by the JSON writer), None when not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def margin(op: str, value: object, threshold: object) -> float | None:
    """Headroom of a value against its gate as a fraction of |threshold| (absolute when the threshold is 0):
    positive inside the gate, negative past it; None when either is not a number."""
    v, t = as_float(value), as_float(threshold)
    if v is None or t is None or math.isnan(v) or math.isnan(t):
        return None
    if op == "==":
        room = 0.0 - abs(v - t)
    else:
        room = (t - v) if op in ("<=", "<") else (v - t)
    if math.isinf(room):
        return room
    return room / abs(t) if t else room


@dataclass(frozen=True)
class Drift:
    """One gate metric of one test case in both runs (a value is None where that run lacks the gate or the value)."""

    stage: str
    test: str
    case: str
    metric: str
    op: str
    threshold: float | None
    value_a: float | None
    value_b: float | None
    passed_a: bool | None
    passed_b: bool | None
    toward: float | None  # how far B moved toward (+) or away from (-) the threshold, as a fraction of |threshold|
    regression: str | None  # why this is a regression, None when it is not

    @property
    def drift(self) -> float | None:
        """Relative change (B - A) / |A| (0 when both are 0, inf when only A is 0)."""
        a, b = self.value_a, self.value_b
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            return None
        if a == b:
            return 0.0
        return (b - a) / abs(a) if a else math.copysign(math.inf, b)

    @property
    def status(self) -> str:
        """REGRESSION, new (only in B), missing (only in A), fails (fails in both) or ok."""
        if self.regression:
            return "REGRESSION"
        if self.passed_a is None:
            return "new"
        if self.passed_b is None:
            return "missing"
        return "fails" if not self.passed_b else "ok"


@dataclass
class Comparison:
    """Every gate metric's drift between run A and run B."""

    run_a: Path
    run_b: Path
    tolerance: float
    drifts: list[Drift] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Drift]:
        """The drifts flagged as regressions."""
        return [d for d in self.drifts if d.regression]


def judge(op: str, threshold: float | None, value_a: float | None, value_b: float | None, passed_a: bool | None,
          passed_b: bool | None, tolerance: float) -> tuple[float | None, str | None]:
    """(how far B moved toward the threshold as a fraction of it, the regression's reason or None)."""
    toward = None
    ma, mb = margin(op, value_a, threshold), margin(op, value_b, threshold)
    if ma is not None and mb is not None and not (math.isinf(ma) and math.isinf(mb)):
        toward = ma - mb
    if passed_a and passed_b is False:
        return toward, "passed in A, fails in B"
    if toward is not None and toward > tolerance:
        return toward, f"moved {toward:.3g} of the threshold toward it (tolerance {tolerance:g})"
    return toward, None


def resolve_run(path: Path | str) -> Path:
    """The run folder `path` names: itself when it holds summary.json, the run its LATEST names when it is a report
    folder; Gemma4Error naming the problem otherwise."""
    path = Path(path)
    if (path / "summary.json").is_file():
        return path
    if (path / "LATEST").is_file():
        named = path / (path / "LATEST").read_text().strip()
        if (named / "summary.json").is_file():
            return named
    if not path.is_dir():
        raise Gemma4Error(f"run folder {path} {'is not a folder' if path.exists() else 'does not exist'}", _RUN_FIX)
    raise Gemma4Error(f"{path} is not a run folder (no summary.json, no LATEST)", _RUN_FIX)


def records(tests: Iterable[dict], kind: str) -> Iterator[tuple[dict, dict]]:
    """(test, record) for every record of `kind` ("gate", "sensitivity", "info") in a stage report's tests."""
    for test in tests:
        for rec in test.get("records", []):
            if rec.get("kind") == kind:
                yield test, rec


def gate_values(run: Path) -> tuple[dict[tuple[str, str, str, str], dict], list[str]]:
    """A run's gate results keyed by (stage, test, case, metric), and notes about the run (incomplete, unreadable)."""
    notes: list[str] = []
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise Gemma4Error(f"{run}/summary.json cannot be read: {exc}", _RUN_FIX) from None
    if not summary.get("complete", True):
        notes.append(f"{run.name} is not complete ({summary.get('state')}: {summary.get('reason')}); "
                     f"its missing gates did not run")
    out: dict[tuple[str, str, str, str], dict] = {}
    for stage, status in (summary.get("stages") or {}).items():
        path = run / f"{stage}.json"
        if not path.exists() and (status or {}).get("status") in ("not_selected", "blocked", "not_run"):
            continue  # a stage that did not run may have no JSON
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            notes.append(f"{run.name}/{stage}.json is missing or unreadable")
            continue
        for test, rec in records(doc.get("tests", []), "gate"):
            for gate in rec.get("gates", []):
                out[(stage, test["nodeid"], rec["case"], gate["metric"])] = gate
    return out, notes


def compare_runs(run_a: Path | str, run_b: Path | str, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Every gate metric of run A against run B (B is the newer run), regressions flagged past `tolerance`."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise Gemma4Error(f"tolerance {tolerance!r} is not a non-negative number",
                          "pass --tolerance as a fraction of the threshold, e.g. 0.1")
    a, b = resolve_run(run_a), resolve_run(run_b)
    gates_a, notes_a = gate_values(a)
    gates_b, notes_b = gate_values(b)
    result = Comparison(a, b, float(tolerance), notes=notes_a + notes_b)
    order = list(gates_a) + [k for k in gates_b if k not in gates_a]
    for key in order:
        ga, gb = gates_a.get(key), gates_b.get(key)
        gate = gb or ga
        threshold = as_float(gate["threshold"])
        va = as_float(ga["value"]) if ga else None
        vb = as_float(gb["value"]) if gb else None
        pa = bool(ga["passed"]) if ga else None
        pb = bool(gb["passed"]) if gb else None
        toward, why = judge(gate["op"], threshold, va, vb, pa, pb, tolerance)
        result.drifts.append(Drift(*key, gate["op"], threshold, va, vb, pa, pb, toward, why))
    return result


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def format_comparison(comparison: Comparison) -> str:
    """The comparison as text: per stage and test case, each metric's A, B, drift, threshold and status."""
    lines = [f"A: {comparison.run_a}", f"B: {comparison.run_b}",
             f"tolerance: a move toward the threshold of more than {comparison.tolerance:g} × |threshold|"]
    lines += [f"note: {n}" for n in comparison.notes]
    header = f"    {'metric':<40} {'A':>12} {'B':>12} {'drift':>9}  {'threshold':<14} status"
    where = None
    for d in comparison.drifts:
        if (d.stage, d.test, d.case) != where:
            where = (d.stage, d.test, d.case)
            lines += [f"[{d.stage}] {d.test} :: {d.case}", header]
        drift = "—" if d.drift is None else f"{d.drift:+.1%}" if math.isfinite(d.drift) else f"{d.drift:+}"
        status = d.status + (f" ({d.regression})" if d.regression else "")
        lines.append(f"    {d.metric:<40} {_num(d.value_a):>12} {_num(d.value_b):>12} {drift:>9}  "
                     f"{d.op + ' ' + _num(d.threshold):<14} {status}")
    n = len(comparison.regressions)
    lines.append(f"{len(comparison.drifts)} gate metrics compared; {n} regression{'s' if n != 1 else ''}"
                 + (": " + "; ".join(f"{d.stage}/{d.case}/{d.metric}" for d in comparison.regressions) if n else ""))
    return "\n".join(lines)
