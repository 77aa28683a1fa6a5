"""The door every run passes before any stage: the config's fields checked (`config.check`, all problems on one line),
then the checkpoint's files parsed by their headers and every tensor's name, shape and dtype checked against the
weight table, every problem on its own line, then stop. Tensor data is never read.

Dtypes: every weight of the table is floating point, so an integer or bool tensor is an error. A float dtype other
than the one config.json declares (`dtype`, or `torch_dtype`) is a warning: transformers and this library cast on
load, so the run is valid, but it is recorded (provenance) and printed, because it changes what the run measured."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gemma4_support.config.hf_fields import declared_dtype
from gemma4_support.config.spec import ModelSpec, load_spec, read_config
from gemma4_support.convert.checkpoint import account
from gemma4_support.convert.headers import FLOAT_DTYPES, Inventory, TensorInfo, has_weights, read_inventory
from gemma4_support.errors import CheckpointError, combined


@dataclass(frozen=True)
class Preflight:
    """What passed the door: the model's spec and, when its weights were checked, a summary of them and warnings."""

    spec: ModelSpec
    checkpoint: dict | None = None  # files, tensors, bytes, dtypes (count per dtype), declared dtype
    warnings: tuple[str, ...] = field(default=())


def preflight(model: str | Path, *, weights: bool | None = True) -> Preflight:
    """Check a model (directory, or config.json file) before anything runs: ConfigError naming every bad config
    field, else CheckpointError naming every bad file and tensor (weights=None: only if the directory has any)."""
    spec = load_spec(model)
    path = Path(model)
    if weights is None:
        weights = path.is_dir() and has_weights(path)
    if not weights:
        return Preflight(spec)
    directory = path if path.is_dir() else path.parent
    inventory = read_inventory(directory)
    declared = declared_dtype(read_config(model)[0])
    problems, warnings = checkpoint_problems(inventory, spec, declared)
    if problems:
        raise combined(problems, CheckpointError, f"checkpoint {directory}", one_line=False)
    summary = {"files": len(inventory.file_bytes), "tensors": len(inventory.tensors),
               "bytes": sum(inventory.file_bytes.values()), "dtypes": inventory.dtype_counts(), "declared_dtype": declared}
    return Preflight(spec, summary, tuple(warnings))


def checkpoint_problems(inventory: Inventory, spec: ModelSpec, declared: str | None
                        ) -> tuple[list[CheckpointError], list[str]]:
    """(problems, warnings) of a checkpoint's inventory: damaged files, else every tensor against the weight table
    (name, shape) and every weight's dtype against the declared one."""
    if inventory.problems:  # a damaged file hides its tensors: listing them as missing would only add noise
        return list(inventory.problems), []
    _, acc, problems = account(inventory.shapes(), spec)
    weights = {name: inventory.tensors[name] for name in acc.converted + acc.tied_duplicates}
    errors, warnings = dtype_findings(weights, declared)
    return problems + errors, warnings


def dtype_findings(weights: Mapping[str, TensorInfo], declared: str | None) -> tuple[list[CheckpointError], list[str]]:
    """An error for each weight stored in a non-float dtype; a warning for each float dtype other than `declared`."""
    errors = [CheckpointError(f"tensor {t.name} is stored as {t.dtype}, not a floating-point dtype",
                              f"re-save the checkpoint with its weights in {declared or 'bfloat16 or float32'}")
              for t in weights.values() if t.dtype not in FLOAT_DTYPES]
    others: dict[str, list[str]] = {}
    for t in weights.values():
        if declared and t.dtype in FLOAT_DTYPES and t.dtype != declared:
            others.setdefault(t.dtype, []).append(t.name)
    warnings = [f"{len(names)} weight tensor(s) stored as {dtype} but config.json declares {declared} "
                f"(e.g. {', '.join(sorted(names)[:3])}): they are cast to the run's precision on load"
                for dtype, names in sorted(others.items())]
    return errors, warnings
