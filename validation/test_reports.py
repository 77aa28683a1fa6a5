"""Reports: every run gets its own folder with one valid JSON per stage carrying provenance, written
atomically, also under pytest-xdist; the CLI runs stages and discovery from the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_support.reports.files import new_run_dir, write_json
from validation.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_two_runs_leave_two_complete_run_folders(tmp_path):
    select = ["validation/test_discovery.py", "-m", "stage_discovery", "-k", "pattern or sensitivity",
              "--report-dir", str(tmp_path)]
    first = _pytest(*select)
    second = _pytest(*select, "-n", "2")
    assert first.returncode == 0, first.stdout[-2000:]
    assert second.returncode == 0, second.stdout[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        names = {p.name for p in run.iterdir()}
        assert {f"{s}.json" for s in STAGE_NAMES} | {"summary.json", "index.html"} <= names
        assert not [n for n in names if n.endswith(".tmp")]
        doc = json.loads((run / "discovery.json").read_text())
        assert doc["status"] == "passed" and doc["counts"]["passed"] >= 6
        prov = doc["provenance"]
        assert prov["packages"]["torch"] and prov["git"]["commit"] and prov["device"]["type"] in ("cpu", "cuda")
        assert prov["model"]["config_fingerprint"] and prov["seed"] == 0
        sensitivity = [r for t in doc["tests"] for r in t["records"] if r["kind"] == "sensitivity"]
        assert sensitivity and all(r["caught"] for r in sensitivity)
        assert json.loads((run / "hf_parity.json").read_text())["status"] in ("not_run", "passed")
    assert (tmp_path / "LATEST").read_text().strip() in {r.name for r in runs}


def test_run_folders_are_never_reused(tmp_path):
    made = {new_run_dir(tmp_path) for _ in range(5)}
    assert len(made) == 5


def test_json_writer_is_atomic_and_valid(tmp_path):
    import torch

    path = write_json(tmp_path / "x.json", {"a": torch.tensor([1.5, float("nan")]), "p": tmp_path, "i": float("inf")})
    data = json.loads(path.read_text())
    assert data["a"] == [1.5, "nan"] and data["i"] == "inf"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.stage_discovery
def test_cli_discover_json_and_refusals(tmp_path):
    from fixtures.configs import real_config
    from fixtures.factory import fixture_dir

    exe = [sys.executable, "-m", "validation.cli"]
    out = subprocess.run([*exe, "discover", "--model", str(fixture_dir("moe")), "--json"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["families"]["full_attention"]["first_index"] == 5 and doc["families"]["moe_mlp"]["indices"] == list(range(6))
    bad = real_config("26B-A4B")
    bad["hidden_size_per_layer_input"] = 256
    (tmp_path / "config.json").write_text(json.dumps(bad))
    out = subprocess.run([*exe, "discover", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "hidden_size_per_layer_input" in lines[0] and "fix:" in lines[0]
    out = subprocess.run([*exe, "run", "--stages", "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown stage" in out.stderr


# ---------------------------------------------------------------------------------------------------
# gates that measure: property and sensitivity records carry measured values; the CLI's exit codes

_MEASURED_SELECTION = [
    "validation/test_masks.py", "validation/test_cp_masks.py", "validation/test_collapse.py",
    "-m", "stage_cp_masks or stage_tokenization",
    "-k", "mask_properties or mask_window_off_by_one or packing_sensitivity or collapse_append or changed_token or report_counts",
]


def _records(run: Path) -> list[dict]:
    """Every gate and sensitivity record of every stage JSON in a run folder."""
    out = []
    for name in STAGE_NAMES:
        doc = json.loads((run / f"{name}.json").read_text())
        out += [r for t in doc["tests"] for r in t["records"] if r["kind"] in ("gate", "sensitivity")]
    return out


def _check_property_record(rec: dict) -> None:
    """A property gate ran examples and counted its failures, describing the first three."""
    examples, failures = rec["metrics"]["examples"], rec["metrics"].get("failures")
    assert type(examples) is int and examples >= 1, rec
    assert type(failures) is int and 0 <= failures <= examples, rec
    first = rec["info"]["first_failures"]
    assert len(first) == min(failures, 3) and all(isinstance(f, str) and len(f) <= 1000 for f in first), rec
    if rec["kind"] == "sensitivity":  # caught by counted failing examples, not by a written-in count
        assert failures >= 1 and first, rec


def _check_sensitivity_record(rec: dict) -> None:
    """A sensitivity record names its mutation, measured every metric its gates judge, and a measured value failed."""
    assert isinstance(rec["info"].get("broken"), str) and rec["info"]["broken"], rec["case"]
    assert all(g["value"] is not None and g["metric"] in rec["metrics"] for g in rec["gates"]), rec["case"]
    assert rec["caught"] and any(not g["passed"] for g in rec["gates"]), rec["case"]


def test_no_gate_records_a_literal(tmp_path):
    """A small staged run: every property gate counts examples and failures (the broken property's failures are
    counted examples, each described); every sensitivity record says what it broke and measured each gated metric."""
    out = _pytest(*_MEASURED_SELECTION, "--report-dir", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    records = _records(run)
    properties = [r for r in records if "examples" in r["metrics"]]
    sensitivity = [r for r in records if r["kind"] == "sensitivity"]
    assert len(properties) >= 5 and any(r["kind"] == "sensitivity" for r in properties)
    assert len(sensitivity) >= 3
    for rec in properties:
        _check_property_record(rec)
    for rec in sensitivity:
        _check_sensitivity_record(rec)


def test_cli_command_line_defaults(tmp_path):
    """`run` asks pytest for short tracebacks unless the user chose --tb, and passes --chat-template resolved."""
    from validation.cli import build_parser, pytest_command

    template = tmp_path / "t.jinja"
    args = build_parser().parse_args(["run", "--chat-template", str(template), "--stages", "discovery"])
    cmd = pytest_command(args, ["discovery"], tmp_path / "run_dir")
    assert "--tb=short" in cmd
    assert cmd[cmd.index("--gemma4-chat-template") + 1] == str(template.resolve())
    args = build_parser().parse_args(["run", "--", "--tb=long"])
    args.pytest_args = args.pytest_args[1:]  # main() drops the "--"
    cmd = pytest_command(args, ["discovery"], tmp_path / "run_dir")
    assert "--tb=short" not in cmd and cmd[-1] == "--tb=long"


def test_cli_exits_3_when_a_selected_stage_has_no_tests(tmp_path):
    """A selected stage that runs no tests is not green: exit 3 (summary.json lists it first, the HTML at the top);
    --allow-not-run exits 0, here with --chat-template (which the plugin must accept). Every stage has tests, so the
    situation is made the way a user meets it: `-k` deselects every test of the selected stage."""
    template = tmp_path / "chat_template.jinja"  # only passed through: nothing reads it yet
    template.write_text("{{ messages }}")
    exe = [sys.executable, "-m", "validation.cli", "run", "--stages", "throughput", "--workers", "0"]
    deselect = ["--", "-k", "no_test_has_this_name"]
    out = subprocess.run([*exe, "--report-dir", str(tmp_path / "a"), *deselect], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "throughput" in out.stderr and "--allow-not-run" in out.stderr
    (run,) = [p for p in (tmp_path / "a").iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert next(iter(summary)) == "not_run" and "throughput" in summary["not_run"]
    page = (run / "index.html").read_text()
    assert page.index("not run (no tests") < page.index("<table>")
    out = subprocess.run([*exe, "--report-dir", str(tmp_path / "b"), "--allow-not-run", "--chat-template", str(template),
                          *deselect], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_html_states_an_incomplete_run_and_renders_any_provenance():
    """The page opens with the run's verdict (an incomplete run says why and that LATEST does not name it) and ends
    with the provenance, every field whatever its shape (fields the provenance adds later included)."""
    from gemma4_support.reports.html import render_run

    prov = {"host": "box-7", "started_utc": "2026-01-02T03:04:05+00:00", "seed": 0,
            "device": {"type": "cpu", "name": "Xeon Gold", "count": 2}, "git": {"commit": "abc123", "dirty": True,
                                                                                 "changed": ["a.py", "b.py"]},
            "model": {"path": "/ckpt", "files": {"config.json": {"bytes": 3, "sha256": "f00d"}}},
            "added_later": {"nested": [{"k": 1}, 2.5]}}
    summary = {"run_dir": "/r/run-x", "exit_status": 2, "duration_s": 1.0, "verdict": "interrupted", "complete": False,
               "reason": "SIGTERM received", "not_run": [], "started_utc": prov["started_utc"], "provenance": prov,
               "stages": {"discovery": {"status": "interrupted", "counts": {"passed": 1, "interrupted": 1}}}}
    tests = [{"nodeid": "t.py::a", "outcome": "interrupted", "duration_s": 0.1, "records": []}]
    page = render_run(summary, tests)
    assert page.index("verdict: INTERRUPTED") < page.index("<table>") and "SIGTERM received" in page
    assert "LATEST does not name this run" in page
    footer = page[page.index("<footer>"):]
    for text in ("box-7", "2026-01-02T03:04:05", "Xeon Gold", "abc123", "a.py, b.py", "config.json", "f00d",
                 "added_later", "nested", "2.5"):
        assert text in footer, text
    done = render_run({**summary, "verdict": "passed", "complete": True, "reason": None}, tests)
    assert "the run completed" in done and "not complete" not in done
