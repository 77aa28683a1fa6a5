"""A self-contained HTML page for one run: the run's verdict (complete or not, and why), stage verdicts, every gate
with value and threshold, and the provenance in a footer."""
from __future__ import annotations

import html
import json


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return text if len(text) < 120 else text[:117] + "…"
    return str(value)


def curve_svg(points: list[tuple[float, float]], *, label: str, threshold: float | None = None,
              width: int = 360, height: int = 160) -> str:
    """An inline SVG line chart of (x, y) points (no scripts, no network), with an optional dashed threshold line."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points] + ([threshold] if threshold is not None else [])
    x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(0.0, min(ys)), max(ys) or 1.0
    pad = 30

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - 2 * pad)
        py = height - pad - (y - y0) / ((y1 - y0) or 1.0) * (height - 2 * pad)
        return f"{px:.1f},{py:.1f}"

    line = " ".join(at(x, y) for x, y in points)
    dots = "".join(f"<circle cx='{at(x, y).split(',')[0]}' cy='{at(x, y).split(',')[1]}' r='2.5'/>" for x, y in points)
    limit = ""
    if threshold is not None:
        a, b = at(x0, threshold), at(x1, threshold)
        limit = (f"<line x1='{a.split(',')[0]}' y1='{a.split(',')[1]}' x2='{b.split(',')[0]}' y2='{b.split(',')[1]}' "
                 f"stroke='#b60' stroke-dasharray='4 3'/>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
            f"aria-label='{html.escape(label)}'><rect width='100%' height='100%' fill='#fafafa' stroke='#ccc'/>"
            f"{limit}<polyline fill='none' stroke='#036' stroke-width='1.5' points='{line}'/><g fill='#036'>{dots}</g>"
            f"<text x='{pad}' y='14' font-size='11'>{html.escape(label)} (max {y1:.3g})</text>"
            f"<text x='{pad}' y='{height - 8}' font-size='10'>{x0:g}</text>"
            f"<text x='{width - pad}' y='{height - 8}' font-size='10'>{x1:g}</text></svg>")


def _step_curve(rec: dict) -> str:
    """The error curve of a record that carries per-step numbers (the trainability stage)."""
    steps = (rec.get("info") or {}).get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) and "mean_error" in s for s in steps):
        return ""
    threshold = next((g["threshold"] for g in rec.get("gates", []) if g["metric"] == "best_error"), None)
    return "<p>" + curve_svg([(s["step"], s["mean_error"]) for s in steps], label="mean |generated − target| per step",
                             threshold=threshold) + "</p>"


def _provenance_html(value: object, depth: int = 0) -> str:
    """Any provenance value as HTML: dicts as nested definition lists, lists joined, long text shortened."""
    esc = html.escape
    if isinstance(value, dict):
        if not value:
            return "—"
        items = "".join(f"<dt>{esc(str(k))}</dt><dd>{_provenance_html(v, depth + 1)}</dd>" for k, v in value.items())
        return f"<dl class='prov'>{items}</dl>" if depth < 4 else esc(_fmt(value))
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            text = ", ".join(str(v) for v in value)
            return esc(text if len(text) < 400 else text[:397] + "…") or "—"
        return "<ol>" + "".join(f"<li>{_provenance_html(v, depth + 1)}</li>" for v in value) + "</ol>"
    return "—" if value is None else esc(_fmt(value))


def _verdict_html(summary: dict) -> str:
    """The run's verdict, first on the page; an incomplete run says why and that LATEST does not name it."""
    esc = html.escape
    verdict = str(summary.get("verdict") or "unknown")
    if summary.get("complete", True):
        return f"<p class='verdict {esc(verdict)}'><b>verdict: {esc(verdict)}</b> (the run completed)</p>"
    return (f"<p class='verdict {esc(verdict)} attention'><b>verdict: {esc(verdict).upper()} — this run is not "
            f"complete</b>: {esc(str(summary.get('reason') or 'unknown reason'))}. Only tests that ran to their end "
            f"are counted passed; LATEST does not name this run.</p>")


def _get(tree: object, *keys: str) -> object:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def render_run(summary: dict, tests: list[dict]) -> str:
    """Render the run summary and every test's records as one HTML page (verdict first, provenance in the footer)."""
    esc = html.escape
    prov = summary.get("provenance") or {}
    rows = []
    for name, stage in summary["stages"].items():
        c = stage["counts"]
        rows.append(f"<tr class='{esc(stage['status'])}'><td>{esc(name)}</td><td>{esc(stage['status'])}</td>"
                    f"<td>{c.get('passed', 0)}</td><td>{c.get('failed', 0) + c.get('error', 0)}</td>"
                    f"<td>{c.get('skipped', 0)}</td><td>{c.get('interrupted', 0)}</td></tr>")
    not_run = summary.get("not_run") or []
    banner = (f"<p class='attention'><b>not run (no tests; not green): {esc(', '.join(not_run))}</b></p>"
              if not_run else "")
    detail = []
    for test in tests:
        detail.append(f"<h3 class='{esc(test['outcome'])}'>{esc(test['nodeid'])} — {esc(test['outcome'])}"
                      f" ({test['duration_s']:.2f} s)</h3>")
        if test["outcome"] == "skipped" and test.get("longrepr"):
            detail.append(f"<p>{esc(str(test['longrepr']))}</p>")
        for rec in test["records"]:
            if rec["kind"] == "info":
                detail.append(f"<p><b>{esc(rec['case'])}</b>: {esc(_fmt(rec['info']))}</p>")
                continue
            gates = "".join(
                f"<tr class='{'passed' if g['passed'] else 'failed'}'><td>{esc(g['metric'])}</td><td>{esc(_fmt(g['value']))}</td>"
                f"<td>{esc(g['op'])} {esc(_fmt(g['threshold']))}</td><td>{'ok' if g['passed'] else 'FAIL'}</td></tr>"
                for g in rec["gates"])
            label = "sensitivity (broken on purpose; must be caught)" if rec["kind"] == "sensitivity" else "gate"
            verdict = ("caught" if rec.get("caught") else "NOT caught") if rec["kind"] == "sensitivity" else (
                "passed" if rec["passed"] else "FAILED")
            detail.append(f"<p><b>{esc(rec['case'])}</b> — {label}: {verdict}</p><table><tr><th>metric</th><th>value</th>"
                          f"<th>threshold</th><th>verdict</th></tr>{gates}</table>{_step_curve(rec)}")
    commit, dirty = _get(prov, "git", "commit"), _get(prov, "git", "dirty")
    started = summary.get("started_utc") or _get(prov, "started_utc")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>gemma4-support run {esc(summary['run_dir'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px}}.failed,.error,.interrupted{{color:#b00}}.passed{{color:#070}}
.skipped,.not_run,.xfailed{{color:#777}}.attention{{color:#b60}}dl.prov{{margin:0 0 0 1em}}dl.prov dt{{font-weight:bold}}
dl.prov dd{{margin:0 0 .2em 1.5em}}footer{{margin-top:2em;border-top:1px solid #ccc;font-size:90%}}</style>
</head><body><h1>gemma4-support validation run</h1>
{_verdict_html(summary)}
{banner}
<p>{esc(summary['run_dir'])} — exit status {summary['exit_status']} — {summary['duration_s']} s</p>
<p>host {esc(str(_get(prov, 'host')))} · started {esc(str(started))} · device {esc(str(_get(prov, 'device', 'name')))}
 · commit {esc(str(commit))}{' (dirty)' if dirty else ''} · model {esc(str(_get(prov, 'model', 'path')))} · seed {esc(str(_get(prov, 'seed')))}</p>
<table><tr><th>stage</th><th>status</th><th>passed</th><th>failed</th><th>skipped</th><th>interrupted</th></tr>{''.join(rows)}</table>
{''.join(detail)}
<footer><h2>provenance</h2>{_provenance_html(prov)}</footer></body></html>
"""
