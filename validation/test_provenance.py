"""Provenance that identifies the run (issue 13): the model fingerprint tells a good, a truncated and a NaN checkpoint
of one config apart (and a changed tokenizer file), covers every tensor's name/shape/dtype, hashes file contents
within its bound and headers beyond it (recorded as such); the checkpoint's dtypes are recorded; git's dirty flag sees
untracked files (not ignored ones); the device is named; host and the run's start time are stamped."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.factory import fixture_dir
from gemma4_support.reports import provenance
from gemma4_support.reports.provenance import collect, cpu_model, device_info, git_commit, model_info

REPO = Path(__file__).resolve().parents[1]


def _copy(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(fixture_dir("dense"), out)
    return out


def _rewrite(model: Path, edit) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def test_fingerprint_tells_good_truncated_and_nan_checkpoints_apart(tmp_path: Path) -> None:
    good, same, cut, nan, tok = (_copy(tmp_path, n) for n in ("good", "same", "cut", "nan", "tok"))
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    _rewrite(nan, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    (tok / "tokenizer_config.json").write_text((tok / "tokenizer_config.json").read_text().replace("<", "< ", 1))
    info = {p.name: model_info(p) for p in (good, same, cut, nan, tok)}
    assert len({i["config_fingerprint"] for i in info.values()}) == 1  # one config
    assert info["good"]["fingerprint"] == info["same"]["fingerprint"]  # stable across copies
    assert len({info[n]["fingerprint"] for n in ("good", "cut", "nan", "tok")}) == 4
    assert info["good"]["files"]["model.safetensors"]["hashed"] == "content" and info["good"]["problems"] == []
    assert "truncated" in info["cut"]["problems"][0] and info["cut"]["tensors"] == 0
    assert info["good"]["dtypes"] == {"float32": info["good"]["tensors"]} and info["good"]["declared_dtype"] == "float32"


def test_fingerprint_covers_names_shapes_dtypes_beyond_the_content_bound(tmp_path: Path, monkeypatch) -> None:
    """Over the content-hash bound a weight file is fingerprinted by its header (recorded as such): a changed value
    no longer shows, a changed dtype still does; the checkpoint's dtypes and dtype warnings are recorded."""
    monkeypatch.setattr(provenance, "CONTENT_HASH_BOUND", 1 << 20)  # the fixture's 6 MB file is "large" here
    good, nan, half = (_copy(tmp_path, n) for n in ("good", "nan", "half"))
    _rewrite(nan, lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    _rewrite(half, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].to(torch.bfloat16)))
    info = {p.name: model_info(p) for p in (good, nan, half)}
    record = info["good"]["files"]["model.safetensors"]
    assert record["hashed"] == "header" and len(record["sha256"]) == 64
    assert info["good"]["files"]["tokenizer.json"]["hashed"] == "content"  # small files stay content-hashed
    assert info["good"]["fingerprint"] == info["nan"]["fingerprint"] != info["half"]["fingerprint"]
    assert info["half"]["dtypes"] == {"bfloat16": 1, "float32": info["half"]["tensors"] - 1}
    assert info["half"]["dtype_warnings"] == [
        "1 weight tensor(s) stored as bfloat16 but config.json declares float32 (e.g. model.norm.weight): they are "
        "cast to the run's precision on load"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_dirty_means_any_tracked_change_or_untracked_file(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("reports/\n")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    clean = git_commit(repo)
    assert clean["dirty"] is False and clean["changes"] == 0 and len(clean["commit"]) == 40
    (repo / "reports").mkdir()
    (repo / "reports" / "run.json").write_text("{}")  # ignored: not a change
    assert git_commit(repo)["dirty"] is False
    (repo / "sub").mkdir()
    (repo / "sub" / "test_new.py").write_text("")  # an untracked test that would run
    untracked = git_commit(repo)
    assert untracked["dirty"] is True and untracked["changed"] == ["sub/test_new.py"]
    (repo / "sub" / "test_new.py").unlink()
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo)["changed"] == ["a.py"]
    assert git_commit(tmp_path / "not-a-repo")["dirty"] is None


def test_device_is_named_and_the_run_is_stamped_with_host_and_start() -> None:
    device = device_info()
    assert device["name"] and device["count"] >= 1 and device["cpu"] == cpu_model()
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert device["cpu"] != device["arch"]  # the model name, not "x86_64"
    if not torch.cuda.is_available():
        assert device["type"] == "cpu" and device["name"] == device["cpu"]
    started = time.time() - 3600
    block = collect(REPO, None, 0, argv=["x"], started=started)
    assert block["host"] == socket.gethostname()
    assert block["started_utc"] == datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds")
    assert block["started_utc"] < block["created_utc"]
    default = datetime.fromisoformat(collect(REPO, None, 0, argv=[])["started_utc"])
    assert default <= datetime.now(timezone.utc)  # this process's start, not the report's time
    assert default == provenance.process_start().replace(microsecond=0)


def test_a_run_records_the_checkpoint_it_ran_on(tmp_path: Path) -> None:
    """A real pytest run on --gemma4-model: every stage JSON carries host, start, the checkpoint's fingerprint and
    dtypes, and the dirty flag."""
    model = _copy(tmp_path, "model")
    reports = tmp_path / "reports"
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "validation/test_discovery.py",
                          "-k", "model_under_test", f"--gemma4-model={model}", "--report-dir", str(reports)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    prov = json.loads((run / "discovery.json").read_text())["provenance"]
    assert prov["host"] and prov["started_utc"] <= prov["created_utc"]
    assert prov["model"]["fingerprint"] == model_info(model)["fingerprint"]
    assert prov["model"]["dtypes"] == {"float32": prov["model"]["tensors"]} and isinstance(prov["git"]["dirty"], bool)
