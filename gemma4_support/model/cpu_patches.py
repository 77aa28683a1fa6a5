"""The one place megatron-core 0.16.1 is patched to run on CPU. Applied only when the model runs on CPU
(`build.init_parallel_state("cpu")`), idempotent, and every patch says what it replaces and why.

This model avoids most of megatron-core's CUDA-only paths by construction: weights are allocated on the
host (`use_cpu_initialization=True`) and never randomly initialised (`perform_initialization=False`, they
come from a checkpoint), there is no dropout (no CUDA RNG tracker fork), and rotary embeddings, attention
masks and the attend step are this package's own (no `torch.cuda.current_device()` in Megatron's rotary,
no SWA masks built on `device="cuda"`). What remains is patched here:

1. `tensor_parallel.random.model_parallel_cuda_manual_seed` seeds CUDA RNG trackers unconditionally
   (`torch.cuda.manual_seed`, CUDA generator states). On CPU it becomes a plain `torch.manual_seed`, so
   callers that seed the way Megatron training scripts do keep working.
2. `tensor_parallel.random.get_cuda_rng_tracker().fork()` switches CUDA generator states around random
   ops (dropout, GPU weight init); on CPU it becomes a no-op context.
3. `tensor_parallel.mappings._gather_along_last_dim` (the vocabulary-parallel output layer's `gather_output`
   at tensor parallel size > 1) allocates its buffer on `torch.cuda.current_device()`; on CPU it gathers
   into tensors on the input's device, concatenated in rank order along the last dimension as the original.
"""
from __future__ import annotations

import contextlib

import torch

_APPLIED = False


def apply() -> None:
    """Patch megatron-core for CPU execution (idempotent; call only when running on CPU)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core.tensor_parallel import random as mrandom

    def model_parallel_cpu_manual_seed(seed: int, *args, **kwargs) -> None:
        """Seed the CPU generator (megatron's version seeds CUDA RNG trackers)."""
        torch.manual_seed(seed)

    mrandom.model_parallel_cuda_manual_seed = model_parallel_cpu_manual_seed
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()

    from megatron.core.tensor_parallel import mappings

    def gather_along_last_dim_on_input_device(input_: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        """All-gather over `group`, concatenated along the last dimension (megatron's allocates on CUDA)."""
        if group.size() == 1:
            return input_
        parts = [torch.empty_like(input_) for _ in range(group.size())]
        torch.distributed.all_gather(parts, input_.contiguous(), group=group)
        return torch.cat(parts, dim=-1).contiguous()

    mappings._gather_along_last_dim = gather_along_last_dim_on_input_device
    _APPLIED = True

