"""A safetensors checkpoint directory read by its headers only (each file's 8-byte length, JSON header and size,
plus the shard index): every tensor's name, shape, dtype and file, and every file that is missing, truncated,
padded or not safetensors at all, as one problem each. Tensor data is never read, so a 50 GB checkpoint is
inventoried in milliseconds; what is accepted here is what `safetensors.safe_open` accepts."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gemma4_support.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
# safetensors dtype code -> (torch dtype name, bits per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 64), "F32": ("float32", 32), "F16": ("float16", 16), "BF16": ("bfloat16", 16),
    "F8_E4M3": ("float8_e4m3fn", 8), "F8_E5M2": ("float8_e5m2", 8), "F8_E8M0": ("float8_e8m0fnu", 8),
    "I64": ("int64", 64), "I32": ("int32", 32), "I16": ("int16", 16), "I8": ("int8", 8),
    "U64": ("uint64", 64), "U32": ("uint32", 32), "U16": ("uint16", 16), "U8": ("uint8", 8), "BOOL": ("bool", 8),
}
FLOAT_DTYPES = frozenset(("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"))
_REPAIR = "re-download or re-save the checkpoint (the file is damaged or was never a safetensors file)"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file's header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    file: str  # file name inside the checkpoint directory


@dataclass
class Inventory:
    """Every tensor of a checkpoint directory (from headers), its files' sizes and header digests, and its problems."""

    directory: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)
    header_sha256: dict[str, str] = field(default_factory=dict)
    problems: list[CheckpointError] = field(default_factory=list)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape."""
        return {name: t.shape for name, t in self.tensors.items()}

    def dtype_counts(self) -> dict[str, int]:
        """How many tensors are stored in each dtype."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return dict(sorted(counts.items()))


def printable(name: str) -> str:
    """A tensor or file name as it can be shown on one line (its repr when it holds control characters)."""
    return name if name.isprintable() and len(name) <= 200 else repr(name[:200])


def has_weights(directory: Path) -> bool:
    """Whether a directory holds safetensors weights (files or a shard index)."""
    return directory.is_dir() and ((directory / INDEX_FILE).is_file() or any(directory.glob("*.safetensors")))


def read_header(path: Path) -> tuple[dict[str, TensorInfo], str]:
    """The tensors a safetensors file's header describes and the header's sha256; CheckpointError naming the file
    when it is not a complete safetensors file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"file {path.name} ({size} bytes) has no complete safetensors header "
                                      "(truncated, or not a safetensors file)", _REPAIR)
            header = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"file {path.name} cannot be read ({exc.strerror or exc})", "make it readable") from None
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"file {path.name} has an unreadable safetensors header (not a JSON object)", _REPAIR)
    tensors, spans = {}, []
    for name, entry in meta.items():
        if name == "__metadata__":
            continue
        info, span = _entry(path.name, name, entry)
        tensors[name] = info
        spans.append(span)
    expected = 0
    for begin, end in sorted(spans):
        if begin != expected:
            raise CheckpointError(f"file {path.name}: tensor byte ranges overlap or leave gaps at offset {begin}", _REPAIR)
        expected = end
    data = size - 8 - length
    if data != expected:
        what = "truncated" if data < expected else "longer than its header says"
        raise CheckpointError(f"file {path.name} is {what}: its header declares {expected} bytes of tensor data, "
                              f"the file holds {data}", _REPAIR)
    return tensors, hashlib.sha256(header).hexdigest()


def _entry(file: str, name: str, entry: object) -> tuple[TensorInfo, tuple[int, int]]:
    code = entry.get("dtype") if isinstance(entry, dict) else None
    if isinstance(code, str) and code not in DTYPES:
        raise CheckpointError(f"file {file}: tensor {printable(name)} has dtype {code[:20]!r}, which this library "
                              "does not read", "re-save the checkpoint in bfloat16 or float32")
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
    if not (isinstance(code, str) and isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
            and all(type(v) is int and v >= 0 for v in [*shape, *offsets]) and offsets[0] <= offsets[1]):
        raise CheckpointError(f"file {file}: the header entry of tensor {printable(name)} is malformed", _REPAIR)
    dtype, bits = DTYPES[code]
    if math.prod(shape) * bits != 8 * (offsets[1] - offsets[0]):
        raise CheckpointError(f"file {file}: tensor {printable(name)} {tuple(shape)} {dtype} spans "
                              f"{offsets[1] - offsets[0]} bytes, not what its shape and dtype take", _REPAIR)
    return TensorInfo(name, tuple(shape), dtype, file), (offsets[0], offsets[1])


def read_inventory(directory: str | Path) -> Inventory:
    """Every tensor of a checkpoint directory (one file, several, or shards with an index), from headers only; a
    problem for each file that is missing or damaged, each tensor listed twice, and index entries its shard lacks."""
    inv = Inventory(Path(directory))
    index = inv.directory / INDEX_FILE
    weight_map = _weight_map(index, inv.problems) if index.is_file() else None
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in inv.directory.glob("*.safetensors")) if inv.directory.is_dir() else []
        if not files and not inv.problems:
            legacy = sorted(p.name for p in inv.directory.glob("*.bin")) if inv.directory.is_dir() else []
            inv.problems.append(CheckpointError(
                f"no *.safetensors files in {inv.directory}" + (f" (found {', '.join(legacy[:3])})" if legacy else ""),
                "point at an HF checkpoint directory saved with safetensors (save_pretrained(safe_serialization=True))"))
    for file in files:
        path = inv.directory / file
        if not path.is_file():
            inv.problems.append(CheckpointError(f"{INDEX_FILE} names shard {printable(file)}, which is not in "
                                                f"{inv.directory}", "copy the missing shard, or re-save the checkpoint"))
            continue
        try:
            tensors, digest = read_header(path)
        except CheckpointError as exc:
            inv.problems.append(exc)
            continue
        inv.file_bytes[file], inv.header_sha256[file] = path.stat().st_size, digest
        for name, info in tensors.items():
            if name in inv.tensors:
                inv.problems.append(CheckpointError(f"tensor {printable(name)} is stored twice "
                                                    f"({inv.tensors[name].file} and {file})",
                                                    "keep one copy: re-save the checkpoint"))
            elif weight_map is not None and weight_map.get(name) != file:
                inv.problems.append(CheckpointError(f"tensor {printable(name)} is in {file} but {INDEX_FILE} does not "
                                                    "map it there", "re-save the checkpoint (its index and shards disagree)"))
            else:
                inv.tensors[name] = info
    if weight_map is not None:
        for name, file in sorted(weight_map.items()):
            if file in inv.file_bytes and name not in inv.tensors:
                inv.problems.append(CheckpointError(f"{INDEX_FILE} maps tensor {printable(name)} to {file}, which "
                                                    "does not hold it", "re-save the checkpoint (its index and shards disagree)"))
    return inv


def _weight_map(index: Path, problems: list[CheckpointError]) -> dict[str, str] | None:
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
        problems.append(CheckpointError(f"{index.name} has no readable weight_map of tensor name -> shard file",
                                        "re-save the checkpoint, or delete the index of a single-file checkpoint"))
        return {}
    return weight_map
