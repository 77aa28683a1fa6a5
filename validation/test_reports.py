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
