"""Run folders and atomic report files: a run never overwrites an earlier one."""
from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def new_run_dir(base: Path) -> Path:
    """Create a fresh, uniquely named run folder under `base` (never reuses an existing one)."""
    base.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    while True:
        path = base / f"run-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def write_atomic(path: Path, text: str) -> Path:
    """Write text to `path` atomically (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (NaN/inf written as strings so the file stays valid JSON)."""
    return write_atomic(path, json.dumps(jsonable(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def jsonable(value: Any) -> Any:
    """Convert tensors, numpy values, paths and dataclass-likes to plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (str, int)):  # exact types: subclasses (torch's TorchVersion, IntEnum) cannot cross xdist
        return str(value) if isinstance(value, str) else int(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch / numpy
        return jsonable(value.tolist())
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return str(value)
