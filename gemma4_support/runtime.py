"""The process-wide runtime config: topology and packing capacity, set once at start-up, frozen, read everywhere.

`set_runtime(RuntimeConfig(...))` once per process (an equal value again is a no-op, a different one raises);
`get_runtime()` raises, naming the call to make, when it was never set. The model builder reads the topology
(tensor, context and expert parallel sizes: Megatron's parallel state and the attention backend follow it);
RL packing reads the packing capacity. The model's maximum sequence length is not here: it comes from the
model's config.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from gemma4_support.errors import RuntimeConfigError, require_positive_ints


@dataclass(frozen=True)
class RuntimeConfig:
    """Topology of this process's model and the packing capacity of its training rows."""

    tp: int = 1  # tensor parallel size
    cp: int = 1  # context parallel size
    ep: int = 1  # expert parallel size
    packing_capacity: int = 4096  # tokens per packed training row

    def __post_init__(self) -> None:
        require_positive_ints(asdict(self), RuntimeConfigError, "runtime config")
        if self.packing_capacity % (2 * self.cp):
            raise RuntimeConfigError(
                f"packing_capacity={self.packing_capacity} is not divisible by 2*cp={2 * self.cp} (two chunks per CP rank)",
                "round packing_capacity up to a multiple of 2*cp",
            )

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans (tensor x context parallel)."""
        return self.tp * self.cp

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
            "call gemma4_support.runtime.set_runtime(RuntimeConfig(...)) at start-up, before building a model",
        )
    return _current
