"""Context-parallel attention: each rank attends its two query chunks against the gathered keys/values.

Wiring into the model (no model code changes): `context_parallel(model, plan, rank, group)` swaps, for
the duration of a `with` block,
  * every layer's attend step for `ContextParallelAttend` (the model's `set_attend` hook), and
  * the model's rotary module for `FullRowRotary`, which builds the cos/sin tables for the original
    (unsplit) row and gathers them by the local tokens' position ids.
The model is then called on the rank's local tokens with `masks=CPMasks(prepared, rank)`: each layer's
`masks.lookup(window)` fetches the prepared (rank, 0, window) and (rank, 1, window) masks — a missing
one raises `MaskNotPreparedError` naming the key; nothing is built during the forward.

Keys and values are all-gathered along the sequence with autograd (backward sums the key/value
gradients of every rank and hands each rank its own slice), so gradients of replicated parameters,
summed over the CP group (`allreduce_grads`), equal the unsplit run's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gemma4_support.attention.backends import attend_any
from gemma4_support.attention.masks import PreparedMasks
from gemma4_support.errors import PackingError
from gemma4_support.parallel.cp_plan import CPMaskKey, CPPlan


@dataclass(frozen=True)
class CPLayerMasks:
    """The two prepared masks one layer uses on one rank: (front chunk, back chunk) for its window."""

    rank: int
    window: int | None
    front: object
    back: object


class CPMasks:
    """What the model receives as `masks` under CP: `lookup(window)` returns that window's CPLayerMasks."""

    def __init__(self, prepared: PreparedMasks, rank: int) -> None:
        self.prepared = prepared
        self.rank = rank

    def lookup(self, window: int | None) -> CPLayerMasks:
        """The (rank, 0, window) and (rank, 1, window) masks; MaskNotPreparedError naming a missing key."""
        front = self.prepared.lookup(CPMaskKey(self.rank, 0, window))
        back = self.prepared.lookup(CPMaskKey(self.rank, 1, window))
        return CPLayerMasks(self.rank, window, front, back)

    @property
    def lookups(self) -> int:
        """Individual (rank, chunk, window) lookups so far."""
        return self.prepared.lookups


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim` in rank order; backward sums the gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None, dim: int) -> torch.Tensor:  # noqa: ANN001
        ctx.group, ctx.dim = group, dim
        ctx.world, ctx.rank = dist.get_world_size(group), dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.world, ctx.dim)[ctx.rank].contiguous(), None, None


def gather_sequence(x: torch.Tensor, plan: CPPlan, group: dist.ProcessGroup | None, dim: int = 2) -> torch.Tensor:
    """The full row (packed order) of a tensor whose `dim` holds this rank's local tokens; differentiable."""
    if x.shape[dim] != 2 * plan.chunk_len:
        raise PackingError(
            f"local tensor has {x.shape[dim]} tokens along dim {dim}, the CP plan {2 * plan.chunk_len} per rank",
            "shard inputs with the same CPPlan",
        )
    if dist.get_world_size(group) != plan.cp_size:
        raise PackingError(
            f"CP group has {dist.get_world_size(group)} ranks but the plan {plan.cp_size}", "plan for the group's size"
        )
    gathered = _GatherSequence.apply(x, group, dim)
    return gathered.index_select(dim, plan.restore_order().to(x.device))


class ContextParallelAttend:
    """The attend hook under CP: (q, k, v of local tokens [b, heads, 2·chunk, d], CPLayerMasks) -> local output."""

    def __init__(self, plan: CPPlan, rank: int, group: dist.ProcessGroup | None = None) -> None:
        self.plan, self.rank, self.group = plan, rank, group

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
        """Attend the rank's front and back query chunks against the whole row's keys and values."""
        if not isinstance(mask, CPLayerMasks) or mask.rank != self.rank:
            raise PackingError(
                f"CP attend on rank {self.rank} got {type(mask).__name__} masks"
                + (f" of rank {mask.rank}" if isinstance(mask, CPLayerMasks) else ""),
                "call the model with masks=CPMasks(prepare_cp_masks(...), rank)",
            )
        d_k = key.shape[-1]
        kv = gather_sequence(torch.cat([key, value], dim=-1), self.plan, self.group, dim=2)
        full_k, full_v = kv[..., :d_k], kv[..., d_k:]
        c = self.plan.chunk_len
        front = attend_any(query[:, :, :c], full_k, full_v, mask.front)
        back = attend_any(query[:, :, c:], full_k, full_v, mask.back)
        return torch.cat([front, back], dim=2)


class FullRowRotary(nn.Module):
    """Rotary tables built for the original (unsplit) row's positions, gathered by the local position ids."""

    def __init__(self, base: nn.Module, full_position_ids: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.length = int(full_position_ids.max().item()) + 1

    def forward(self, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer_type: (cos, sin) [s, b, 1, d]} for local position ids [b, s]."""
        if int(position_ids.max().item()) >= self.length:
            raise PackingError(
                f"local position id {int(position_ids.max())} beyond the row's table of {self.length} positions",
                "shard position ids from the same row the CP context was opened for",
            )
        table_positions = torch.arange(self.length, device=position_ids.device)[None]
        tables = self.base(table_positions)  # {type: (cos [L, 1, 1, d], sin)}
        idx = position_ids.t()
        return {t: (cos[:, 0][idx], sin[:, 0][idx]) for t, (cos, sin) in tables.items()}


@contextlib.contextmanager
def context_parallel(
    model: nn.Module,
    plan: CPPlan,
    rank: int,
    full_position_ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> Iterator[nn.Module]:
    """Within the block the model runs one CP rank's local tokens (attend hook and full-row rotary swapped in)."""
    layers = list(model.decoder.layers)
    saved = [layer.self_attention.attend for layer in layers]
    base_rotary = model.rotary
    model.set_attend(ContextParallelAttend(plan, rank, group))
    model.rotary = FullRowRotary(base_rotary, full_position_ids)
    try:
        yield model
    finally:
        model.rotary = base_rotary
        for layer, attend in zip(layers, saved):
            layer.self_attention.attend = attend


def allreduce_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over the CP group (the parameters are replicated on CP ranks)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def cp_forward(
    model: nn.Module,
    plan: CPPlan,
    rank: int,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
    masks: PreparedMasks,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """One rank's CP forward of a full row [1, L] of ids: returns its local logits [1, 2·chunk, vocab]."""
    if input_ids.shape != position_ids.shape or input_ids.shape != document_ids.shape or input_ids.shape[0] != 1:
        raise PackingError(
            f"ids shapes {tuple(input_ids.shape)}, {tuple(position_ids.shape)}, {tuple(document_ids.shape)} "
            "are not one matching [1, L] row",
            "pass one packed row (batch 1) with one id of each kind per token",
        )
    shard: Callable[[torch.Tensor], torch.Tensor] = lambda t: plan.shard(t, rank, dim=1)  # noqa: E731
    with context_parallel(model, plan, rank, position_ids, group):
        return model(shard(input_ids), shard(position_ids), shard(document_ids), masks=CPMasks(masks, rank))
