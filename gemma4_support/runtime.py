"""The process-wide runtime config: set once, frozen, read everywhere."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from gemma4_support.errors import RuntimeConfigError

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RuntimeConfig:
    """Topology, packing capacity, device and dtype of this process."""

    tp: int = 1  # tensor parallel size
    cp: int = 1  # context parallel size
    ep: int = 1  # expert parallel size
    packed_seq_len: int = 4096  # packing capacity: tokens per packed row
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "ep", "packed_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RuntimeConfigError(f"runtime config {name}={value!r} must be a positive integer", f"pass {name}>=1")
        if self.dtype not in _DTYPES:
            raise RuntimeConfigError(f"runtime config dtype={self.dtype!r} is not one of {_DTYPES}", "pick one of them")
        if self.packed_seq_len % (2 * self.cp):
            raise RuntimeConfigError(
                f"packed_seq_len={self.packed_seq_len} is not divisible by 2*cp={2 * self.cp} (two chunks per CP rank)",
                "round packed_seq_len up to a multiple of 2*cp",
            )

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


_lock = threading.Lock()
_current: RuntimeConfig | None = None


def set_runtime(config: RuntimeConfig) -> RuntimeConfig:
    """Set the process-wide config; an equal config again is a no-op, a different one raises."""
    global _current
    with _lock:
        if _current is None:
            _current = config
        elif _current != config:
            raise RuntimeConfigError(
                f"runtime config is already set to {_current} and cannot change to {config}",
                "set it once per process (start a new process for another topology)",
            )
        return _current


def get_runtime() -> RuntimeConfig:
    """The process-wide config; raises if it has not been set."""
    if _current is None:
        raise RuntimeConfigError(
            "runtime config read before it was set",
            "call gemma4_support.runtime.set_runtime(RuntimeConfig(...)) at start-up",
        )
    return _current


def _reset_for_tests() -> None:
    """Forget the config (tests only: each test process starts clean)."""
    global _current
    with _lock:
        _current = None
