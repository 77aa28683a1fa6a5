"""The library stands alone and the suite runs installed: a wheel of the project, installed into a fresh virtualenv
(no network: `--no-deps`, the running environment's site-packages appended for the dependencies), imports
`gemma4_support` without the harness, and runs `gemma4-validate discover` and `gemma4-validate run --stages
discovery` from a directory outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_TOP_LEVEL_NOT_SOURCE = {".git", ".venv", "build", "reports", ".hypothesis", ".pytest_cache"}


def _copy_source(dest: Path) -> Path:
    """The checkout without environments, caches and reports (a wheel build writes build/ next to the sources)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder) == REPO:
            skip |= _TOP_LEVEL_NOT_SOURCE & set(names)
        return skip | ({"cache"} if Path(folder) == REPO / "fixtures" else set())

    return Path(shutil.copytree(REPO, dest, ignore=ignore))


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd[:4]} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path, stage_report) -> None:
    source = _copy_source(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GEMMA4_FIXTURE_CACHE")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(source)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("gemma4_support-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the wheel's own files
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    alone = _run([str(python), "-c", textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import gemma4_support
        for m in pkgutil.walk_packages(gemma4_support.__path__, "gemma4_support."):
            importlib.import_module(m.name)
        print(json.dumps({"file": gemma4_support.__file__,
                          "harness": sorted(n for n in sys.modules if n.split(".")[0] in ("validation", "fixtures"))}))
    """)], elsewhere, env)
    doc = json.loads(alone.stdout)
    assert doc["file"].startswith(str(site)) and doc["harness"] == [], doc

    cli = str(venv / "bin" / "gemma4-validate")
    _run([cli, "fixtures", "--out", "made", "--variant", "dense"], elsewhere, env)
    discover = json.loads(_run([cli, "discover", "--model", "made/dense", "--json"], elsewhere, env).stdout)
    assert discover["covering_depth"] == 6 and discover["families"]["full_attention"]["first_index"] == 5
    run = _run([cli, "run", "--stages", "discovery", "--workers", "0"], elsewhere, env, 900)
    (folder,) = [p for p in (elsewhere / "reports").iterdir() if p.is_dir()]
    report = json.loads((folder / "discovery.json").read_text())
    nodeids = [t["nodeid"] for t in report["tests"]]
    assert report["status"] == "passed" and report["counts"]["passed"] >= 10, report["counts"]
    assert report["run"]["complete"] and not (folder / "INCOMPLETE").exists()  # the installed plugin's verdict
    assert (elsewhere / "reports" / "LATEST").read_text().strip() == folder.name
    assert all(n.startswith("validation/") for n in nodeids)
    assert (tmp_path / "cache" / "gemma4-support" / "fixtures").is_dir()  # the fixture cache left the checkout
    stage_report.record("installed_wheel", wheel=wheel.name, site_packages=str(site), discovery_tests=len(nodeids),
                        run_tail=run.stdout.strip().splitlines()[-1])
