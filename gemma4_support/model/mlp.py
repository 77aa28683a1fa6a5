"""Gemma 4 feed-forward blocks from megatron-core: the dense GELU-tanh gated MLP (megatron `MLP`, linear_fc1 =
[gate; up]) and the routed experts (megatron `SequentialMLP`'s parameters, one `MLP` per expert), with a
sort-by-expert dispatch that works on one device. The experts run as two grouped GEMMs over every expert at once
(`torch._grouped_mm`, no host synchronisation) by default, or one megatron `MLP` call per expert (`sequential`,
the reference path); both add each token's expert outputs in expert order, as HF does."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP

from gemma4_support.errors import ConfigError
from gemma4_support.fused import cuda_compiled
from gemma4_support.model.router import Gemma4Router

__all__ = ["EXPERT_PATHS", "GatedMLP", "Gemma4Experts", "Gemma4MoE", "dense_mlp", "gated_activation", "pack_expert_weights",
           "routing_plan", "set_expert_path", "weighted_sum"]

EXPERT_PATHS = ("grouped", "sequential")
# LoRA on the grouped path: (which linear: "fc1" | "fc2", expert-sorted input [N, in], group offsets) -> delta [N, out]
GroupedDelta = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]

_LINEARS = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def dense_mlp(config: TransformerConfig) -> MLP:
    """The dense gated MLP of width `config.ffn_hidden_size` (Gemma 4's "shared expert" on MoE layers)."""
    return GatedMLP(config, _LINEARS, ffn_hidden_size=config.ffn_hidden_size,
                    tp_group=parallel_state.get_tensor_model_parallel_group())


class GatedMLP(MLP):
    """megatron `MLP` (same parameters and names) whose gated activation is `gated_activation`: one compiled kernel
    on CUDA instead of megatron's chunk, GELU, add-offset and multiply (Gemma 4 has no biases and no offset)."""

    def forward(self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None,
                **kwargs: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[s, b, h] -> ([s, b, h], output bias)."""
        plain = (per_token_scale is None and self.config.gated_linear_unit and not self.config.bias_activation_fusion
                 and not self.config.use_te_activation_func
                 and not self.config.glu_linear_offset and self.config.activation_func_clamp_value is None)
        if not plain:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        mid, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            mid = mid + bias
        return self.linear_fc2(gated_activation(mid, self.config.activation_func))


class Gemma4Experts(SequentialMLP):
    """Routed experts (megatron SequentialMLP: `local_experts.{e}.linear_fc1/linear_fc2`):
    out = sum over the chosen experts of weight * down_e(gelu_tanh(gate_e(x)) * up_e(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        pg = ProcessGroupCollection.use_mpu_process_groups()
        ep = pg.ep.size()
        if config.num_moe_experts % ep:
            raise ConfigError(f"{config.num_moe_experts} routed experts cannot be split over expert parallel size {ep}",
                              "choose an expert parallel size that divides the number of experts")
        super().__init__(config.num_moe_experts // ep, config, _LINEARS, pg_collection=pg)
        self.num_experts = config.num_moe_experts  # all of them; this rank holds num_local_experts from first_expert
        self.first_expert = pg.ep.rank() * self.num_local_experts
        self.path = "grouped"
        self.lora_delta: GroupedDelta | None = None  # set by LoRA on the grouped path (per-expert hooks never run)

    def routed(self, hidden: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """hidden [T, h], routing weights/indices [T, k] -> [T, h] (sort tokens by expert, run, add back)."""
        source, tokens_per_expert, offsets, rows, slot_order = routing_plan(indices, self.num_experts)
        x = hidden[source]
        dispatch = _ExpertDispatch(self.ep_group, tokens_per_expert) if self.ep_group.size() > 1 else None
        if dispatch is not None:  # to the ranks holding the chosen experts, sorted by local expert there
            x, tokens_per_expert = dispatch.send(x), dispatch.local_counts
        split = self.tp_group.size() > 1  # each expert's width split over expert-TP ranks: partial outputs
        if split:  # megatron's expert linears leave these collectives to the dispatcher (explicit_expert_comm)
            x = copy_to_tensor_model_parallel_region(x, self.tp_group)
        if self.path == "grouped":
            out = self._grouped(x, offsets if dispatch is None else tokens_per_expert.cumsum(0).to(torch.int32))
        else:
            # The routing weight multiplies each expert's output (as HF does), not its intermediate activation
            # (SequentialMLP's per-token scale): pass ones, so megatron's multiply is exact, and scale after fc2.
            out, _ = self(x, tokens_per_expert, torch.ones(x.shape[0], dtype=weights.dtype, device=x.device))
        if split:
            out = reduce_from_tensor_model_parallel_region(out, self.tp_group)
        if dispatch is not None:
            out = dispatch.receive(out)  # back to this rank's expert-sorted rows
        # Each token's k outputs, weighted and added one at a time in expert order, as HF adds them (one index_add_
        # per expert): the same roundings in bf16, no atomics, and read in place from the expert-sorted rows.
        return _Combine.apply(out, rows, weights.gather(1, slot_order))

    def _grouped(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Expert-sorted tokens [N, h] with cumulative group ends `offsets` [E] -> expert outputs [N, h]."""
        if self._expert_linears_hooked():
            raise ConfigError("a forward hook is registered on a per-expert linear, which the grouped expert "
                              "path never calls", "set_expert_path(model, 'sequential'), or hook the experts "
                              "through Gemma4Experts.lora_delta")
        fc1 = self.stacked("linear_fc1").transpose(-2, -1)  # [E, h, 2I]
        fc2 = self.stacked("linear_fc2").transpose(-2, -1)  # [E, I, h]
        mid = torch._grouped_mm(x, fc1, offs=offsets)
        if self.lora_delta is not None:
            mid = mid + self.lora_delta("fc1", x, offsets).to(mid.dtype)
        act = gated_activation(mid, self.config.activation_func)
        out = torch._grouped_mm(act, fc2, offs=offsets)
        if self.lora_delta is not None:
            out = out + self.lora_delta("fc2", act, offsets).to(out.dtype)
        return out


    def stacked(self, linear: str) -> torch.Tensor:
        """Every expert's `linear` weight as one [E, out, in] tensor whose gradient flows to each expert's parameter:
        the shared storage itself when `pack_expert_weights` made the parameters its views, else a stacked copy."""
        weights = self._expert_weights(linear)
        base = self._packed.get(linear) if hasattr(self, "_packed") else None
        if base is not None and _views_of(base, weights):
            if not (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
                return base  # no gradient to route back (scoring, frozen experts): the storage itself
            return _PackedWeights.apply(_Holder(base), *weights)
        return torch.stack(weights)

    # Per-forward bookkeeping over every expert is host time the device may wait on (128 experts, twice a layer):
    # plain dict reads, not nn.Module attribute lookups (10-15x faster on the host).
    def _expert_weights(self, linear: str) -> list[torch.Tensor]:
        """Each local expert's `linear` weight, in expert order."""
        return [e._modules[linear]._parameters["weight"] for e in self.local_experts._modules.values()]

    def _expert_linears_hooked(self) -> bool:
        """Whether a forward hook is registered on any local expert's linear."""
        return any(e._modules["linear_fc1"]._forward_hooks or e._modules["linear_fc2"]._forward_hooks
                   for e in self.local_experts._modules.values())


@cuda_compiled
def routing_plan(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Expert choices [T, k] -> (source: the token of each row once the (token, slot) pairs are sorted by expert,
    stably; tokens per expert [E]; their cumulative ends (int32, the grouped GEMMs' offsets); rows [T, k]: the sorted
    row of each token's j-th expert in expert order; slot_order [T, k]: the slot holding that expert). No host
    synchronisation: the counts come from a search of the sorted choices, not bincount (which reads its maximum)."""
    tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    edges = torch.arange(num_experts + 1, device=flat.device, dtype=flat.dtype)
    tokens_per_expert = torch.searchsorted(flat[order], edges).diff()
    slot_order = indices.argsort(dim=-1, stable=True)
    rows = _inverse(order).view(tokens, top_k).gather(1, slot_order)
    return order // top_k, tokens_per_expert, tokens_per_expert.cumsum(0).to(torch.int32), rows, slot_order


class _ExpertDispatch:
    """Expert parallelism: the expert-sorted rows of this rank go to the ranks holding their experts (rank r holds
    experts [r·L, (r+1)·L)), one all-to-all each way (torch.distributed's autograd `all_to_all_single`; megatron-core's
    allocates on CUDA only). There they are sorted by local expert (stable: source rank order within an expert);
    `receive` undoes both. Each token's k outputs come back to its own rank, where they are combined in expert order
    as on one device."""

    def __init__(self, group: torch.distributed.ProcessGroup, tokens_per_expert: torch.Tensor) -> None:
        ranks = group.size()
        sent = tokens_per_expert.view(ranks, -1)  # [destination rank, its local expert]
        received = torch.empty_like(sent)  # [source rank, my local expert]
        torch.distributed.all_to_all_single(received, sent.contiguous(), group=group)
        self.group = group
        self.send_splits, self.receive_splits = sent.sum(1).tolist(), received.sum(1).tolist()  # host: split sizes
        local = torch.arange(sent.shape[1], device=sent.device).repeat(ranks)
        self.order = torch.argsort(torch.repeat_interleave(local, received.reshape(-1)), stable=True)
        self.local_counts = received.sum(0)

    def send(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's expert-sorted rows -> the rows of its local experts from every rank, sorted by local expert."""
        return _all_to_all(rows, self.receive_splits, self.send_splits, self.group)[self.order]

    def receive(self, outputs: torch.Tensor) -> torch.Tensor:
        """The local experts' outputs (in `send`'s order) -> this rank's rows, in its expert-sorted order."""
        return _all_to_all(outputs[_inverse(self.order)], self.send_splits, self.receive_splits, self.group)


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation of 0..n-1: inverse[permutation[i]] = i."""
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    return inverse


def _all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: torch.distributed.ProcessGroup) -> torch.Tensor:
    """Rows [sum(input_splits), h] -> [sum(output_splits), h]: split k goes to rank k (differentiable)."""
    from torch.distributed.nn.functional import all_to_all_single

    out = rows.new_empty(sum(output_splits), *rows.shape[1:])
    return all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)


class _Holder:
    """Carries a tensor into an autograd Function without making it an input."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _PackedWeights(torch.autograd.Function):
    """The packed storage as the stack of its per-expert views (no copy); the gradient splits back per expert."""

    @staticmethod
    def forward(ctx, holder: _Holder, *weights: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return holder.tensor.view(holder.tensor.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        return (None, *grad.unbind(0))


def _views_of(base: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether weights[e] is still base[e] (a parameter replaced or moved since packing breaks it)."""
    step, start, shape = base[0].numel() * base.element_size(), base.data_ptr(), base.shape[1:]
    return ([w.data_ptr() for w in weights] == list(range(start, start + len(weights) * step, step))
            and all(w.shape == shape and w.is_contiguous() for w in weights))


def pack_expert_weights(model: torch.nn.Module) -> None:
    """Re-seat every expert's weights as views of one [E, out, in] tensor per linear, so the grouped path reads them
    without stacking a copy each forward (values, names and the state dict unchanged)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Gemma4Experts):
                module._packed = {}
                for linear in ("linear_fc1", "linear_fc2"):
                    params = module._expert_weights(linear)
                    base = torch.stack([p.detach() for p in params])
                    for e, p in enumerate(params):
                        p.data = base[e]
                    module._packed[linear] = base


@cuda_compiled
def weighted_sum(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """outputs [N, h], rows [T, k] (rows of outputs), weights [T, k] -> sum over j of round(outputs[rows[:, j]] *
    weights[:, j]), added in order j = 0..k-1 in outputs' dtype (HF's per-expert multiply and index_add_)."""
    total = outputs.new_zeros(rows.shape[0], outputs.shape[1])
    for j in range(rows.shape[1]):
        total = total + (outputs[rows[:, j]] * weights[:, j, None]).to(outputs.dtype)
    return total


@cuda_compiled
def _weighted_sum_grads(grad: torch.Tensor, outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """weighted_sum's gradients: per (token, j) the output row's [T, k, h] (outputs' dtype) and the weights' [T, k]."""
    g = grad.float()
    grad_rows = torch.stack([(g * weights[:, j, None]).to(outputs.dtype) for j in range(rows.shape[1])], dim=1)
    grad_weights = torch.stack([(g * outputs[rows[:, j]].float()).sum(-1) for j in range(rows.shape[1])], dim=1)
    return grad_rows, grad_weights.to(weights.dtype)


class _Combine(torch.autograd.Function):
    """`weighted_sum` with its gradient scattered back to the expert-sorted rows (each row read once)."""

    @staticmethod
    def forward(ctx, outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(outputs, rows, weights)
        return weighted_sum(outputs, rows, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        outputs, rows, weights = ctx.saved_tensors
        grad_rows, grad_weights = _weighted_sum_grads(grad.contiguous(), outputs, rows, weights)
        grad_outputs = torch.empty_like(outputs)
        grad_outputs[rows.reshape(-1)] = grad_rows.reshape(-1, outputs.shape[1])
        return grad_outputs, None, grad_weights


@cuda_compiled
def gated_activation(mid: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[..., 2I] laid out [gate; up] -> activation(gate) * up (megatron MLP's gated linear unit)."""
    gate, up = torch.chunk(mid, 2, dim=-1)
    return activation(gate) * up


def set_expert_path(model: torch.nn.Module, path: str) -> None:
    """Run every routed-experts block of `model` on `path`: "grouped" (default) or "sequential" (per expert)."""
    if path not in EXPERT_PATHS:
        raise ConfigError(f"unknown expert path {path!r}", f"choose one of {EXPERT_PATHS}")
    for module in model.modules():
        if isinstance(module, Gemma4Experts):
            if path == "grouped" and module._expert_linears_hooked():
                raise ConfigError("per-expert forward hooks are attached (e.g. LoRA attached on the sequential path)",
                                  "detach them first, then switch the expert path and attach again")
            if path == "sequential" and module.lora_delta is not None:
                raise ConfigError("LoRA is attached to the grouped expert path",
                                  "detach_lora first, then switch the expert path and attach again")
            module.path = path


class Gemma4MoE(MegatronModule):
    """The routed half of a Gemma 4 MoE layer: router (on the residual) + experts (on their own normed input)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.router = Gemma4Router(config)
        self.experts = Gemma4Experts(config)
        self.recompute = False  # recompute the routed experts in backward (set_recompute): keep only their inputs

    def forward(self, residual: torch.Tensor, expert_input: torch.Tensor, router_input: torch.Tensor | None = None
                ) -> torch.Tensor:
        """residual and normed expert input [s, b, h] -> experts' output [s, b, h]; `router_input`: the router's
        scaled input [s, b, h] when the caller has computed it (else the router computes it from the residual)."""
        hidden = residual.shape[-1]
        scaled = None if router_input is None else router_input.reshape(-1, hidden)
        weights, indices = self.router(residual.reshape(-1, hidden), scaled)
        args = (expert_input.reshape(-1, hidden), weights, indices)
        if self.recompute and torch.is_grad_enabled():
            out = checkpoint(self.experts.routed, *args, use_reentrant=False)
        else:
            out = self.experts.routed(*args)
        return out.reshape(residual.shape)
