"""A self-contained HTML page for one run: stage verdicts, then every gate with value and threshold."""
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


def render_run(summary: dict, tests: list[dict]) -> str:
    """Render the run summary and every test's records as one HTML page."""
    esc = html.escape
    prov = summary["provenance"]
    rows = []
    for name, stage in summary["stages"].items():
        c = stage["counts"]
        rows.append(f"<tr class='{esc(stage['status'])}'><td>{esc(name)}</td><td>{esc(stage['status'])}</td>"
                    f"<td>{c['passed']}</td><td>{c['failed'] + c['error']}</td><td>{c['skipped']}</td></tr>")
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
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>gemma4-support run {esc(summary['run_dir'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px}}.failed,.error{{color:#b00}}.passed{{color:#070}}.skipped,.not_run{{color:#777}}.attention{{color:#b60}}</style>
</head><body><h1>gemma4-support validation run</h1>
{banner}
<p>{esc(summary['run_dir'])} — exit status {summary['exit_status']} — {summary['duration_s']} s</p>
<p>commit {esc(str(prov['git']['commit']))}{' (dirty)' if prov['git']['dirty'] else ''} · device {esc(str(prov['device']['name']))}
 · model {esc(str(prov['model']['path']))} ({esc(str(prov['model']['config_fingerprint']))}) · seed {prov['seed']}</p>
<p>{esc(', '.join(f'{k} {v}' for k, v in prov['packages'].items() if v))}</p>
<table><tr><th>stage</th><th>status</th><th>passed</th><th>failed</th><th>skipped</th></tr>{''.join(rows)}</table>
{''.join(detail)}</body></html>
"""
