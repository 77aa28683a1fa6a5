"""Elementwise regions compiled on CUDA: one kernel (forward and backward) instead of a chain of small ones.

`cuda_compiled(fn)` returns a function that runs `fn` through torch.compile when its first tensor argument is on
a CUDA device and eagerly elsewhere (CPU keeps the reference arithmetic; torch.compile is not needed to be correct).
Inductor is asked to round every intermediate to its dtype as eager PyTorch does (`emulate_precision_casts`), so a
compiled region keeps the model's own roundings (a bf16 softcap, RoPE's bf16 products) rather than computing them in
fp32. `GEMMA4_COMPILE=0` (or `set_compiled(False)`) runs everything eagerly, for bisecting a numerical difference.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["compile_region", "compiled_enabled", "cuda_compiled", "set_compiled"]

F = TypeVar("F", bound=Callable)
_ENABLED = [os.environ.get("GEMMA4_COMPILE", "1") != "0"]
_OPTIONS = {"emulate_precision_casts": True}


def set_compiled(enabled: bool) -> None:
    """Turn the compiled CUDA regions on or off (process-wide)."""
    _ENABLED[0] = bool(enabled)


def compiled_enabled() -> bool:
    """Whether CUDA regions run compiled."""
    return _ENABLED[0]


def compile_region(fn: Callable, *, emulate_precision_casts: bool = True) -> Callable:
    """`fn` (or a `cuda_compiled` function's eager body) through torch.compile as the CUDA regions are, on any device."""
    _allow_recompiles()
    options = {**_OPTIONS, "emulate_precision_casts": emulate_precision_casts}
    return torch.compile(getattr(fn, "eager", fn), dynamic=None, options=options)


def cuda_compiled(fn: F) -> F:
    """`fn`, run through torch.compile when its first tensor argument is on CUDA, eagerly otherwise."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda" or not _ENABLED[0]:
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(compile_region(fn))
        return compiled[0](*args, **kwargs)

    run.eager = fn  # type: ignore[attr-defined]
    return run  # type: ignore[return-value]


def _allow_recompiles(limit: int = 64) -> None:
    """Room for one graph per (dtype, rank, weighted or not) of every region: dynamo's default of 8 per function would
    silently fall back to eager in a run that mixes precisions and shapes."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name) and getattr(torch._dynamo.config, name) < limit:
            setattr(torch._dynamo.config, name, limit)
