"""Build the megatron-core Gemma 4 model: parallel state from the runtime config's topology, the model from a
spec with its attention backend, weights from an HF checkpoint directory (optionally truncated to the depth
covering every layer family)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from gemma4_support.attention.backends import AttentionBackend, attention_backend
from gemma4_support.config.families import discover, truncate_config
from gemma4_support.config.spec import ModelSpec, load_spec, read_config
from gemma4_support.errors import RuntimeConfigError
from gemma4_support.model import cpu_patches
from gemma4_support.model.config import transformer_config
from gemma4_support.model.mlp import pack_expert_weights
from gemma4_support.model.model import Gemma4Model
from gemma4_support.parallel.cp_attention import ContextParallelBackend
from gemma4_support.ports import free_port
from gemma4_support.runtime import RuntimeConfig, get_runtime


def init_parallel_state(device: str | torch.device = "cpu") -> RuntimeConfig:
    """Start Megatron's parallel state with the runtime config's topology (idempotent). Without a running process
    group a world-size-1 group is started (gloo on CPU, nccl on CUDA); returns the runtime config."""
    from megatron.core import parallel_state

    runtime = get_runtime()
    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        cpu_patches.apply()
    if not dist.is_initialized():
        if runtime.model_parallel_size > 1 or runtime.ep > 1:
            raise RuntimeConfigError(f"the runtime config asks for tp={runtime.tp}, cp={runtime.cp}, ep={runtime.ep} "
                                     "but no torch.distributed process group is running",
                                     "launch one process per rank (torchrun --nproc-per-node N) and init the group first")
        backend = "gloo" if on_cpu else "nccl"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    world = dist.get_world_size()
    if world % runtime.model_parallel_size or world % (runtime.tp * runtime.ep):
        raise RuntimeConfigError(f"{world} ranks cannot be split into tp={runtime.tp} x cp={runtime.cp} "
                                 f"(and tp x ep={runtime.ep}) groups",
                                 "launch a multiple of tp*cp and of tp*ep ranks, or change the runtime config")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=runtime.tp,
                                                 context_parallel_size=runtime.cp,
                                                 expert_model_parallel_size=runtime.ep)
    running = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_context_parallel_world_size(),
               parallel_state.get_expert_model_parallel_world_size())
    if running != (runtime.tp, runtime.cp, runtime.ep):
        raise RuntimeConfigError(f"Megatron's parallel state runs tp, cp, ep = {running}, the runtime config says "
                                 f"{(runtime.tp, runtime.cp, runtime.ep)}", "initialise the parallel state from one config")
    return runtime


def build_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attention: str | AttentionBackend = "auto") -> Gemma4Model:
    """A Gemma 4 megatron-core model for `spec` (weights uninitialised: load them next).

    `attention`: a registered backend name — "auto" (flex on CUDA, dense elsewhere), "dense" (the reference) or
    "flex" — or a backend object; wrapped in context parallelism over Megatron's CP group when the runtime
    config's cp > 1 (a `ContextParallelBackend` given here is used as it is).
    """
    from megatron.core import parallel_state

    runtime = init_parallel_state(device)
    backend = attention if isinstance(attention, AttentionBackend) else attention_backend(attention, spec, device)
    if runtime.cp > 1 and not isinstance(backend, ContextParallelBackend):
        backend = ContextParallelBackend(backend, parallel_state.get_context_parallel_group())
    config = transformer_config(spec, params_dtype=dtype)
    model = Gemma4Model(config, spec, backend, tp_size=parallel_state.get_tensor_model_parallel_world_size()).to(device)
    pack_expert_weights(model)  # the grouped expert path reads each linear's experts as one tensor, no copy
    return model


def model_spec(hf_dir: str | Path, depth: int | str | None = None) -> ModelSpec:
    """The spec of an HF checkpoint, cut to `depth` layers ("covering" = the depth covering every family)."""
    raw, _ = read_config(hf_dir)
    if depth is None:
        return load_spec(raw)
    if depth == "covering":
        depth = discover(load_spec(raw)).truncation_depth
    return load_spec(truncate_config(raw, depth))


def load_model(hf_dir: str | Path, *, depth: int | str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attention: str | AttentionBackend = "auto") -> Gemma4Model:
    """Build the model for an HF checkpoint directory and load its weights (lazily, tensor by tensor)."""
    from gemma4_support.convert.checkpoint import HFCheckpoint, load_hf_weights

    spec = model_spec(hf_dir, depth)
    model = build_model(spec, dtype=dtype, device=device, attention=attention)
    load_hf_weights(model, HFCheckpoint(hf_dir))
    return model
