"""A run's `index.html`, self-contained (no scripts, fonts or network): the verdict and the failures with their
reasons first, a row per stage, then per stage its gates (value, threshold, margin), its sensitivity variants, its
informative values and figures; provenance and links to the run's files in a footer."""
from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from gemma4_support.reports.compare import Comparison, as_float, margin, records

esc = html.escape
HISTOGRAM_KEY = "abs_delta_log10_histogram"  # a record's info key holding a |Δ log-prob| histogram (log10_histogram)
_BAD = ("failed", "error", "interrupted")


def _fmt(value: object) -> str:
    """A value in full: floats with every digit, containers as JSON (never shortened)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return "—" if value is None else str(value)


def _pct(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isinf(value) or abs(value) >= 10:
        return f"{value:+.4g}×"
    return f"{value:+.1%}"


# ---------------------------------------------------------------------------------------------------
# figures


def curve_svg(points: list[tuple[float, float]], *, label: str, threshold: float | None = None,
              width: int = 360, height: int = 160) -> str:
    """An inline SVG line chart of (x, y) points (no scripts, no network), with an optional dashed threshold line."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([threshold] if threshold is not None else [])
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(0.0, min(ys)), max(ys) or 1.0
    pad = 30

    def at(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x0) / (x1 - x0) * (width - 2 * pad),
                height - pad - (y - y0) / ((y1 - y0) or 1.0) * (height - 2 * pad))

    line = " ".join("{:.1f},{:.1f}".format(*at(x, y)) for x, y in points)
    dots = "".join("<circle cx='{:.1f}' cy='{:.1f}' r='2.5'/>".format(*at(x, y)) for x, y in points)
    limit = ""
    if threshold is not None:
        (ax, ay), (bx, by) = at(x0, threshold), at(x1, threshold)
        limit = f"<line x1='{ax:.1f}' y1='{ay:.1f}' x2='{bx:.1f}' y2='{by:.1f}' stroke='#b60' stroke-dasharray='4 3'/>"
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
            f"aria-label='{esc(label)}'><rect width='100%' height='100%' fill='#fafafa' stroke='#ccc'/>"
            f"{limit}<polyline fill='none' stroke='#036' stroke-width='1.5' points='{line}'/><g fill='#036'>{dots}</g>"
            f"<text x='{pad}' y='14' font-size='11'>{esc(label)} (max {y1:.3g})</text>"
            f"<text x='{pad}' y='{height - 8}' font-size='10'>{x0:g}</text>"
            f"<text x='{width - pad}' y='{height - 8}' font-size='10'>{x1:g}</text></svg>")


def log10_histogram(values: Iterable[float], *, low: int = -10, high: int = 1) -> dict:
    """A compact histogram of non-negative values per decade: zero count, one count per [10^k, 10^(k+1)) for k in
    [low, high), values under 10^low and at or over 10^high counted in the end bins."""
    counts = [0] * (high - low)
    zeros = 0
    for value in values:
        v = float(value)
        if v == 0.0:
            zeros += 1
            continue
        k = math.floor(math.log10(v)) if math.isfinite(v) and v > 0 else high - 1
        counts[min(max(k, low), high - 1) - low] += 1
    return {"low_decade": low, "zeros": zeros, "counts": counts}


def histogram_svg(hist: dict, *, label: str, width: int = 420, height: int = 170) -> str:
    """An inline SVG bar chart of a `log10_histogram` (a bar for zeros, then one per decade)."""
    counts = [int(hist.get("zeros", 0)), *[int(c) for c in hist.get("counts", [])]]
    if not any(counts):
        return ""
    low = int(hist.get("low_decade", 0))
    names = ["0", *[f"1e{low + i}" for i in range(len(counts) - 1)]]
    pad, top = 30, max(counts)
    bar = (width - 2 * pad) / len(counts)
    bars, ticks = [], []
    for i, (name, count) in enumerate(zip(names, counts)):
        h = (height - 2 * pad) * count / top
        x = pad + i * bar
        bars.append(f"<rect x='{x + 1:.1f}' y='{height - pad - h:.1f}' width='{bar - 2:.1f}' height='{h:.1f}'>"
                    f"<title>{esc(name)}: {count}</title></rect>")
        if i % 2 == 0 or len(counts) <= 8:
            ticks.append(f"<text x='{x + bar / 2:.1f}' y='{height - pad + 12}' font-size='9' "
                         f"text-anchor='middle'>{esc(name)}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
            f"aria-label='{esc(label)}'><rect width='100%' height='100%' fill='#fafafa' stroke='#ccc'/>"
            f"<g fill='#036'>{''.join(bars)}</g>{''.join(ticks)}"
            f"<text x='{pad}' y='14' font-size='11'>{esc(label)} ({sum(counts)} tokens, max bin {top})</text></svg>")


def _figures(rec: dict) -> str:
    """The figures a record carries: the trainability error curve, the mismatch |Δ log-prob| histogram."""
    info = rec.get("info") or {}
    out = []
    steps = info.get("steps")
    if isinstance(steps, list) and steps and all(isinstance(s, dict) and "mean_error" in s for s in steps):
        threshold = next((g["threshold"] for g in rec.get("gates", []) if g["metric"] == "best_error"), None)
        out.append(curve_svg([(s["step"], s["mean_error"]) for s in steps],
                             label=f"{rec['case']}: mean |generated − target| per step", threshold=threshold))
    if isinstance(info.get(HISTOGRAM_KEY), dict):
        out.append(histogram_svg(info[HISTOGRAM_KEY], label=f"{rec['case']}: |Δ log-prob| per token (decades)"))
    return "".join(f"<figure>{f}</figure>" for f in out if f)


# ---------------------------------------------------------------------------------------------------
# reasons and values


def failure_reason(test: dict) -> str:
    """Why a test failed: its failing gates (value against threshold), an uncaught sensitivity variant, else the
    assertion line of its report."""
    reasons = []
    for rec in test.get("records", []):
        if rec.get("kind") == "gate" and not rec.get("passed", True):
            bad = [g for g in rec["gates"] if not g["passed"]]
            reasons.append(f"[{rec['case']}] gate failed: " + "; ".join(
                f"{g['metric']} = {_fmt(g['value'])} (must be {g['op']} {_fmt(g['threshold'])})" for g in bad))
        elif rec.get("kind") == "sensitivity" and not rec.get("caught", True):
            reasons.append(f"[{rec['case']}] the broken variant failed no gate")
    if reasons:
        return " · ".join(reasons)
    return assertion_line(str(test.get("longrepr") or "")) or f"the test ended {test.get('outcome', '?')}"


def assertion_line(longrepr: str) -> str:
    """The most telling line of a failure report: pytest's 'E ' lines joined, else its last non-empty line."""
    lines = longrepr.splitlines()
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    if errors:
        return " ".join(e for e in errors if e)
    rest = [ln.strip() for ln in lines if ln.strip()]
    return rest[-1] if rest else ""


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, value) rows; lists and scalars kept whole."""
    if isinstance(value, dict) and value:
        rows: list[tuple[str, object]] = []
        for k, v in value.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix, value)] if prefix else []


def _informative(rec: dict) -> list[tuple[str, object]]:
    """A record's values without a gate: its info, and the metrics no gate judges (e.g. the worst tensor)."""
    gated = {g["metric"] for g in rec.get("gates", [])}
    metrics = {k: v for k, v in (rec.get("metrics") or {}).items() if k not in gated}
    info = {k: v for k, v in (rec.get("info") or {}).items() if k not in ("steps", HISTOGRAM_KEY)}
    steps = (rec.get("info") or {}).get("steps")
    if steps is not None:
        info["steps"] = steps
    return _flatten(metrics) + _flatten(info)


# ---------------------------------------------------------------------------------------------------
# page parts


def _verdict_html(summary: dict) -> str:
    """The run's verdict, first on the page; an incomplete run says why and that LATEST does not name it."""
    verdict = str(summary.get("verdict") or "unknown")
    if summary.get("complete", True):
        return (f"<p id='verdict' class='verdict {esc(verdict)}'><b>verdict: {esc(verdict)}</b> "
                f"(the run completed)</p>")
    return (f"<p id='verdict' class='verdict {esc(verdict)} attention'><b>verdict: {esc(verdict).upper()} — this run "
            f"is not complete</b>: {esc(str(summary.get('reason') or 'unknown reason'))}. Only tests that ran to "
            f"their end are counted passed; LATEST does not name this run.</p>")


def _failures_html(summary: dict, tests: Sequence[dict]) -> str:
    """Every failed, errored or interrupted test with its reason, and the collection errors."""
    items = [f"<li class='{esc(t['outcome'])}'><a href='#stage-{esc(t.get('stage') or 'unstaged')}'>"
             f"{esc(t.get('stage') or 'unstaged')}</a> · <code>{esc(t['nodeid'])}</code> — <b>{esc(t['outcome'])}</b>: "
             f"<span class='reason'>{esc(failure_reason(t))}</span></li>" for t in tests if t["outcome"] in _BAD]
    for err in (summary.get("collection") or {}).get("errors", []):
        items.append(f"<li class='error'><code>{esc(err['nodeid'])}</code> — <b>collection error</b>: "
                     f"<span class='reason'>{esc(assertion_line(str(err.get('longrepr') or '')))}</span></li>")
    failing_stages = {t.get("stage") for t in tests if t["outcome"] in _BAD}
    for name, stage in (summary.get("stages") or {}).items():
        if stage.get("status") in _BAD and name not in failing_stages:
            items.append(f"<li class='{esc(str(stage['status']))}'><a href='#stage-{esc(name)}'>{esc(name)}</a> — "
                         f"<b>{esc(str(stage['status']))}</b>: <span class='reason'>"
                         f"{esc(str(stage.get('reason') or 'no test of it failed; see its JSON'))}</span></li>")
        if stage.get("status") == "blocked":
            items.append(f"<li class='blocked'><a href='#stage-{esc(name)}'>{esc(name)}</a> — <b>blocked</b> by "
                         f"{esc(str(stage.get('blocked_by') or 'an earlier stage'))}: not run</li>")
    if not items:
        return "<section id='failures'><h2>failures</h2><p class='passed'>none</p></section>"
    return f"<section id='failures'><h2>failures ({len(items)})</h2><ul>{''.join(items)}</ul></section>"


def _gate_counts(tests: Sequence[dict]) -> tuple[int, int, int, int]:
    """(gates passed, gates failed, sensitivity variants caught, variants) of some tests."""
    passed = failed = caught = variants = 0
    for t in tests:
        for rec in t.get("records", []):
            if rec.get("kind") == "gate":
                passed += sum(1 for g in rec["gates"] if g["passed"])
                failed += sum(1 for g in rec["gates"] if not g["passed"])
            elif rec.get("kind") == "sensitivity":
                variants += 1
                caught += bool(rec.get("caught"))
    return passed, failed, caught, variants


def _json_link(name: str, run_dir: Path | None) -> str:
    """A link to a stage's JSON when the run folder holds it (or cannot be looked at)."""
    if run_dir is not None and run_dir.is_dir() and not (run_dir / f"{name}.json").is_file():
        return "—"
    return f"<a href='{esc(name)}.json'>{esc(name)}.json</a>"


def _stage_rows(summary: dict, by_stage: dict[str, list[dict]], run_dir: Path | None) -> str:
    """A row per stage: status (blocked by whom), time, tests, gates, sensitivity, links to its section and JSON."""
    rows = []
    for name, stage in (summary.get("stages") or {}).items():
        mine = by_stage.get(name, [])
        c = stage.get("counts") or {}
        gp, gf, caught, variants = _gate_counts(mine)
        status = str(stage.get("status"))
        if stage.get("blocked_by"):
            status += f" (by {stage['blocked_by']})"
        seconds = stage.get("duration_s", sum(t.get("duration_s", 0.0) for t in mine))
        junit = f" · <a href='{esc(str(stage['junit']))}'>JUnit</a>" if stage.get("junit") else ""
        attempts = stage.get("attempts") or []
        note = "; ".join(x for x in (
            str(stage.get("reason") or "") if stage.get("status") != "passed" else "",
            f"{len(attempts)} attempts" if len(attempts) > 1 else "") if x)
        rows.append(f"<tr class='{esc(str(stage.get('status')))}'><td><a href='#stage-{esc(name)}'>{esc(name)}</a></td>"
                    f"<td>{esc(status)}</td><td>{float(seconds or 0.0):.1f} s</td><td>{c.get('passed', 0)}</td>"
                    f"<td>{c.get('failed', 0) + c.get('error', 0)}</td><td>{c.get('skipped', 0)}</td>"
                    f"<td>{c.get('interrupted', 0)}</td><td>{gp}</td><td class='{'failed' if gf else ''}'>{gf}</td>"
                    f"<td>{caught}/{variants}</td><td>{_json_link(name, run_dir)}{junit}</td>"
                    f"<td>{esc(note)}</td></tr>")
    return ("<div id='stages'><table><tr><th>stage</th><th>status</th><th>time</th><th>tests passed</th><th>failed</th>"
            "<th>skipped</th><th>interrupted</th><th>gates passed</th><th>gates failed</th><th>sensitivity caught</th>"
            f"<th>report</th><th>note</th></tr>{''.join(rows)}</table></div>")


def _gates_table(tests: Sequence[dict]) -> str:
    """Every gate of the stage's tests: test, case, metric, value, threshold, margin, verdict (failing rows first)."""
    rows = []
    for t, rec in records(tests, "gate"):
        for g in rec["gates"]:
            room = margin(g["op"], g["value"], g["threshold"])
            rows.append((g["passed"], f"<tr class='{'passed' if g['passed'] else 'failed fail-row'}'>"
                         f"<td><code>{esc(_short(t['nodeid']))}</code></td><td>{esc(rec['case'])}</td>"
                         f"<td>{esc(g['metric'])}</td><td class='num'>{esc(_fmt(g['value']))}</td>"
                         f"<td class='num'>{esc(g['op'])} {esc(_fmt(g['threshold']))}</td>"
                         f"<td class='num'>{_pct(room)}</td><td>{'ok' if g['passed'] else 'FAIL'}</td></tr>"))
    if not rows:
        return ""
    rows.sort(key=lambda r: r[0])  # stable: failing gates first, the rest in run order
    return ("<h3>gates</h3><table class='gates'><tr><th>test</th><th>case</th><th>metric</th><th>measured</th>"
            "<th>threshold</th><th>margin (of threshold)</th><th>verdict</th></tr>"
            + "".join(r[1] for r in rows) + "</table>")


def _sensitivity_table(tests: Sequence[dict]) -> str:
    """Each deliberately broken variant: the gate(s) that caught it with the measured value (caught is good)."""
    rows = []
    for t, rec in records(tests, "sensitivity"):
        caught_by = [g for g in rec["gates"] if not g["passed"] and g["value"] is not None]
        gates = "<br>".join(f"{esc(g['metric'])} = {esc(_fmt(g['value']))} (gate {esc(g['op'])} "
                            f"{esc(_fmt(g['threshold']))})" for g in caught_by) or "no gate failed"
        ok = bool(rec.get("caught"))
        rows.append(f"<tr class='{'caught' if ok else 'failed fail-row'}'><td><code>{esc(_short(t['nodeid']))}"
                    f"</code></td><td>{esc(rec['case'])}</td><td>{gates}</td>"
                    f"<td>{'caught' if ok else 'NOT caught'}</td></tr>")
    if not rows:
        return ""
    return ("<h3>sensitivity (broken on purpose; a gate must catch each)</h3><table class='sensitivity'><tr>"
            "<th>test</th><th>variant</th><th>gate that caught it: measured value</th><th>verdict</th></tr>"
            + "".join(rows) + "</table>")


def _info_tables(tests: Sequence[dict]) -> str:
    """The informative, non-gated values of each record, in full."""
    out = []
    for t in tests:
        for rec in t.get("records", []):
            values = _informative(rec)
            if not values:
                continue
            rows = "".join(f"<tr><td>{esc(k)}</td><td class='val'>{esc(_fmt(v))}</td></tr>" for k, v in values)
            opened = " open" if len(values) <= 12 else ""
            out.append(f"<details{opened}><summary>{esc(rec['case'])} <small>({esc(rec['kind'])}, "
                       f"{len(values)} values; <code>{esc(_short(t['nodeid']))}</code>)</small></summary>"
                       f"<table class='info'>{rows}</table></details>")
    return ("<h3>informative values (not gated)</h3>" + "".join(out)) if out else ""


def _tests_table(tests: Sequence[dict]) -> str:
    """Every test of the stage with its outcome, time and (for skips and failures) reason."""
    rows = []
    for t in tests:
        why = failure_reason(t) if t["outcome"] in _BAD else str(t.get("longrepr") or "") if t["outcome"] == "skipped" else ""
        rows.append(f"<tr class='{esc(t['outcome'])}'><td><code>{esc(t['nodeid'])}</code></td><td>{esc(t['outcome'])}"
                    f"</td><td class='num'>{t.get('duration_s', 0.0):.2f} s</td><td>{esc(why)}</td></tr>")
    return (f"<details><summary>tests ({len(tests)})</summary><table class='tests'><tr><th>test</th><th>outcome</th>"
            f"<th>time</th><th>reason</th></tr>{''.join(rows)}</table></details>")


def _short(nodeid: str) -> str:
    return re.sub(r"^validation/", "", nodeid)


def _stage_section(name: str, stage: dict, description: str, tests: Sequence[dict], run_dir: Path | None) -> str:
    """One stage: status, then its failing-first gate table, sensitivity variants, figures and informative values."""
    status = str(stage.get("status"))
    head = (f"<section id='stage-{esc(name)}' class='stage'><h2 class='{esc(status)}'>{esc(name)} — {esc(status)}</h2>"
            f"<p>{esc(description) + ' · ' if description else ''}{_json_link(name, run_dir)}</p>")
    if status == "blocked":
        return head + f"<p class='blocked'>blocked by {esc(str(stage.get('blocked_by') or '?'))}: not run</p></section>"
    if not tests:
        why = "not selected for this run" if status == "not_selected" else "no tests ran in this stage"
        return head + f"<p class='not_run'>{why}</p></section>"
    figures = "".join(_figures(r) for t in tests for r in t.get("records", []))
    return (head + _gates_table(tests) + _sensitivity_table(tests) + (f"<h3>figures</h3>{figures}" if figures else "")
            + _info_tables(tests) + _tests_table(tests) + "</section>")


def _provenance_html(value: object, depth: int = 0) -> str:
    """Any provenance value as HTML: dicts as nested definition lists, lists joined, in full."""
    if isinstance(value, dict):
        if not value:
            return "—"
        items = "".join(f"<dt>{esc(str(k))}</dt><dd>{_provenance_html(v, depth + 1)}</dd>" for k, v in value.items())
        return f"<dl class='prov'>{items}</dl>" if depth < 4 else esc(_fmt(value))
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return esc(", ".join(str(v) for v in value)) or "—"
        return "<ol>" + "".join(f"<li>{_provenance_html(v, depth + 1)}</li>" for v in value) + "</ol>"
    return "—" if value is None else esc(_fmt(value))


def _files_html(run_dir: Path | None) -> str:
    """Links to the run folder's files: stage JSONs, summary, server logs and anything else a stage left there."""
    if run_dir is None or not run_dir.is_dir():
        return ""
    names = sorted(p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name != "index.html")
    logs = [n for n in names if n.endswith(".log")]
    other = [n for n in names if n not in logs]
    other_links = ", ".join(f"<a href='{esc(n)}'>{esc(n)}</a>" for n in other) or "—"
    log_links = ", ".join(f"<a href='{esc(n)}'>{esc(n)}</a>" for n in logs) or "none (this run started no server)"
    return f"<p>files: {other_links}</p><p>server logs: {log_links}</p>"


def render_comparison_html(comparison: Comparison) -> str:
    """A comparison of two runs as an HTML section: each gate metric's A, B, drift, threshold, regressions first."""
    rows = []
    for d in sorted(comparison.drifts, key=lambda d: d.regression is None):
        cls = "failed fail-row" if d.regression else "attention" if d.status in ("missing", "fails") else ""
        drift = d.drift
        rows.append(f"<tr class='{cls}'><td>{esc(d.stage)}</td><td>{esc(d.case)}</td><td>{esc(d.metric)}</td>"
                    f"<td class='num'>{esc(_fmt(d.value_a))}</td><td class='num'>{esc(_fmt(d.value_b))}</td>"
                    f"<td class='num'>{_pct(drift)}</td><td class='num'>{esc(d.op)} {esc(_fmt(d.threshold))}</td>"
                    f"<td>{esc(d.status)}{esc(': ' + d.regression) if d.regression else ''}</td></tr>")
    n = len(comparison.regressions)
    notes = "".join(f"<p class='attention'>{esc(x)}</p>" for x in comparison.notes)
    return (f"<section id='comparison'><h2>compared with {esc(str(comparison.run_a))}</h2>"
            f"<p class='{'failed' if n else 'passed'}'><b>{n} regression{'s' if n != 1 else ''}</b> among "
            f"{len(comparison.drifts)} gate metrics (tolerance: a move toward the threshold of more than "
            f"{comparison.tolerance:g} × |threshold|, or a gate that passed and now fails)</p>{notes}"
            "<details" + (" open" if n else "") + "><summary>every gate metric</summary><table class='compare'><tr>"
            "<th>stage</th><th>case</th><th>metric</th><th>baseline</th><th>this run</th><th>drift</th>"
            f"<th>threshold</th><th>status</th></tr>{''.join(rows)}</table></details></section>")


def _baseline_html(summary: dict) -> str:
    """The comparison with the baseline run `summary['baseline']` names (a line saying why when it cannot be made)."""
    baseline = summary.get("baseline")
    if not baseline:
        return ""
    from gemma4_support.errors import Gemma4Error
    from gemma4_support.reports.compare import DEFAULT_TOLERANCE, compare_runs

    tolerance = as_float(summary.get("baseline_tolerance"))
    try:
        return render_comparison_html(compare_runs(baseline, summary["run_dir"],
                                                   DEFAULT_TOLERANCE if tolerance is None else tolerance))
    except Gemma4Error as exc:
        return f"<section id='comparison'><p class='attention'>no comparison with the baseline: {esc(str(exc))}</p></section>"


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:110em}table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top;text-align:left}th{background:#f3f3f3}
.num{font-family:monospace;white-space:nowrap}.val{font-family:monospace;word-break:break-all}
.failed,.error,.interrupted{color:#b00}.passed,.caught{color:#070}.skipped,.not_run,.not_selected,.xfailed{color:#777}
.blocked,.attention{color:#b60}tr.fail-row{background:#fde8e8}tr.caught{background:#eef8ee}
.verdict{font-size:130%;padding:.4em;border:2px solid}.verdict.passed{background:#eef8ee}
.verdict.failed,.verdict.error,.verdict.interrupted{background:#fde8e8}section.stage{border-top:2px solid #999;margin-top:1.5em}
figure{display:inline-block;margin:.3em}dl.prov{margin:0 0 0 1em}dl.prov dt{font-weight:bold}
dl.prov dd{margin:0 0 .2em 1.5em}footer{margin-top:2em;border-top:2px solid #999;font-size:90%}"""


def render_run(summary: dict, tests: list[dict], descriptions: dict[str, str] | None = None) -> str:
    """Render a run's summary and every test's records as one self-contained HTML page (verdict and failures first,
    provenance and links to the run's files in the footer)."""
    prov = summary.get("provenance") or {}
    run_dir = Path(summary["run_dir"]) if summary.get("run_dir") else None
    if descriptions is None:
        descriptions = _stage_descriptions(run_dir, summary.get("stages") or {})
    by_stage: dict[str, list[dict]] = {}
    for t in tests:
        by_stage.setdefault(str(t.get("stage")), []).append(t)
    not_run = summary.get("not_run") or []
    banner = (f"<p class='attention'><b>not run (no tests; not green): {esc(', '.join(not_run))}</b></p>"
              if not_run else "")
    sections = [_stage_section(name, stage, descriptions.get(name, ""), by_stage.get(name, []), run_dir)
                for name, stage in (summary.get("stages") or {}).items()]
    if by_stage.get("None"):
        sections.append(_stage_section("unstaged", summary.get("unstaged") or {}, "tests of no stage",
                                       by_stage["None"], run_dir))
    git = prov.get("git") if isinstance(prov.get("git"), dict) else {}
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    device = prov.get("device") if isinstance(prov.get("device"), dict) else {}
    facts = (f"{esc(str(summary.get('run_dir')))} — exit status {esc(str(summary.get('exit_status')))} — "
             f"{esc(str(summary.get('duration_s')))} s · started {esc(str(summary.get('started_utc')))} · "
             f"commit {esc(str(git.get('commit')))}{' (dirty)' if git.get('dirty') else ''} · model "
             f"{esc(str(model.get('path')))} · device {esc(str(device.get('name')))}")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>gemma4-support run {esc(str(summary.get('run_dir')))}: {esc(str(summary.get('verdict')))}</title>
<style>{_STYLE}</style></head><body><h1>gemma4-support validation run</h1>
{_verdict_html(summary)}
{banner}
<p>{facts}</p>
{_failures_html(summary, tests)}
<h2>stages</h2>
{_stage_rows(summary, by_stage, run_dir)}
{_baseline_html(summary)}
{''.join(sections)}
<footer><h2>run folder</h2>{_files_html(run_dir)}<h2>provenance</h2>{_provenance_html(prov)}</footer></body></html>
"""


def _stage_descriptions(run_dir: Path | None, names: Iterable[str]) -> dict[str, str]:
    """Each stage's one-line description, from its JSON in the run folder (empty where it cannot be read)."""
    out = {}
    for name in names:
        try:
            out[name] = str(json.loads((run_dir / f"{name}.json").read_text()).get("description") or "")
        except (OSError, ValueError, TypeError, AttributeError):
            out[name] = ""
    return out
