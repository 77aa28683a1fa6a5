"""Build the megatron-core Gemma 4 model: parallel state (world size 1 is enough for parity), model from a
spec, weights from an HF checkpoint directory (optionally truncated to the depth covering every layer family)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from gemma4_support.attention.backends import backend_hooks
from gemma4_support.config.families import discover, truncate_config
from gemma4_support.config.spec import ModelSpec, load_spec, read_config
from gemma4_support.model import cpu_patches
from gemma4_support.model.attention import AttendFn
from gemma4_support.model.config import transformer_config
from gemma4_support.model.model import Gemma4Model
from gemma4_support.ports import free_port


def init_parallel_state(device: str | torch.device = "cpu") -> None:
    """Idempotently start a world-size-1 process group (gloo on CPU, nccl on CUDA) and Megatron's parallel state."""
    from megatron.core import parallel_state

    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        cpu_patches.apply()
    if not dist.is_initialized():
        backend = "gloo" if on_cpu else "nccl"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def build_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attend: AttendFn | None = None, attention: str = "auto") -> Gemma4Model:
    """A Gemma 4 megatron-core model for `spec` (weights uninitialised: load them next).

    `attention`: "auto" (flex on CUDA, dense elsewhere), "dense" (the reference) or "flex" — see gemma4_support.attention.backends;
    an explicit `attend` replaces the backend's attend step.
    """
    from megatron.core import parallel_state

    init_parallel_state(device)
    config = transformer_config(spec, params_dtype=dtype)
    prepare, backend_attend = backend_hooks(attention, spec, device)
    model = Gemma4Model(config, spec, attend=attend or backend_attend,
                        tp_size=parallel_state.get_tensor_model_parallel_world_size())
    model.prepare_masks = prepare
    return model.to(device)


def model_spec(hf_dir: str | Path, depth: int | None = None) -> ModelSpec:
    """The spec of an HF checkpoint, cut to `depth` layers ("covering" = the depth covering every family)."""
    raw, _ = read_config(hf_dir)
    if depth is None:
        return load_spec(raw)
    if depth == "covering":
        depth = discover(load_spec(raw)).truncation_depth
    return load_spec(truncate_config(raw, depth))


def load_model(hf_dir: str | Path, *, depth: int | str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", attend: AttendFn | None = None, attention: str = "auto") -> Gemma4Model:
    """Build the model for an HF checkpoint directory and load its weights (lazily, tensor by tensor)."""
    from gemma4_support.convert.checkpoint import HFCheckpoint, load_hf_weights

    spec = model_spec(hf_dir, depth)
    model = build_model(spec, dtype=dtype, device=device, attend=attend, attention=attention)
    load_hf_weights(model, HFCheckpoint(hf_dir))
    return model
