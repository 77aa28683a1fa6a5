"""Run folders and atomic report files: a run never overwrites an earlier one, and a folder whose run did not
complete says so (the INCOMPLETE marker, written when the folder is made and removed only after a complete run's
last report is written); `LATEST` names the newest complete run."""
from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gemma4_support.errors import Gemma4Error

INCOMPLETE = "INCOMPLETE"  # marker file in a run folder whose run has not (or never) completed
LATEST = "LATEST"  # file beside the run folders naming the newest complete run
FILE_MODE, DIR_MODE = 0o644, 0o755  # reports are read by others (a web server, CI uploaders): not mkstemp's 0600
_REPORT_DIR_FIX = "pass --report-dir a directory you can write to (it is created if missing)"


def _report_dir_error(base: Path, exc: OSError) -> Gemma4Error:
    """The one-line error for a report folder that cannot be created or written."""
    blocker = next((p for p in (base, *base.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        where = "is a file" if blocker == base else f"lies under {blocker}, which is a file"
        return Gemma4Error(f"report dir {base} {where}, not a directory", _REPORT_DIR_FIX)
    return Gemma4Error(f"report dir {base} cannot be written: {exc.strerror or exc}", _REPORT_DIR_FIX)


def ensure_report_dir(base: Path) -> Path:
    """`base` made (if missing) and checked to accept a run folder; Gemma4Error naming the problem otherwise."""
    base = Path(base).absolute()
    try:
        base.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".probe-", dir=base)).rmdir()
    except OSError as exc:
        raise _report_dir_error(base, exc) from None
    return base


def new_run_dir(base: Path) -> Path:
    """Create a fresh, uniquely named run folder under `base` (never reuses an existing one), marked INCOMPLETE
    until `finish_run`; Gemma4Error naming the problem when `base` cannot hold one."""
    base = ensure_report_dir(base)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    while True:
        path = base / f"run-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            path.chmod(DIR_MODE)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _report_dir_error(base, exc) from None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    mark_incomplete(path, f"running since {started} (pid {os.getpid()})")
    return path


def mark_incomplete(run: Path, reason: str) -> Path:
    """(Re)write the run folder's INCOMPLETE marker with why the run is not complete."""
    return write_atomic(run / INCOMPLETE, f"this run is not complete: {reason}; its reports (if any) cover only what "
                                          f"ran, and {LATEST} does not name it\n")


def finish_run(run: Path) -> None:
    """Declare a run complete: remove its INCOMPLETE marker, then point LATEST at it (after every report is written)."""
    (run / INCOMPLETE).unlink(missing_ok=True)
    write_atomic(run.parent / LATEST, run.name + "\n")


def write_atomic(path: Path, text: str) -> Path:
    """Write text to `path` atomically (temp file in the same folder, fsync, rename), readable by all (0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), FILE_MODE)
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
