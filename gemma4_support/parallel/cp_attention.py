"""Context-parallel attention: a backend that wraps another (dense or flex) across the ranks of a CP group.

Each rank holds two chunks of a packed row (`cp_plan`). `ContextParallelBackend.prepare_row(row, windows)`
builds, before the forward, the masks of every (rank, chunk, window) this rank uses, through the wrapped
backend's `build_mask`; the model then runs the rank's local tokens (`cp_forward`) with
`masks=CPMasks(...)`. In each layer `attend` all-gathers keys and values along the sequence (with
autograd: backward sums the key/value gradients of every rank and hands each rank its own slice) and
attends the front and back query chunks with the wrapped backend. A lookup of an unprepared key raises
`MaskNotPreparedError` naming it; nothing is built during the forward. Rotary tables need no change: the
model gathers them by the local tokens' own position ids. Gradients of replicated parameters, summed
over the CP group (`allreduce_grads`), equal the unsplit run's.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gemma4_support.attention.backends import AttentionBackend
from gemma4_support.attention.masks import PreparedMasks
from gemma4_support.errors import PackingError
from gemma4_support.model.router_replay import replay_recorded
from gemma4_support.packing import PackedRow
from gemma4_support.parallel.cp_plan import CPMaskKey, CPPlan, plan_cp


@dataclass(frozen=True)
class CPLayerMasks:
    """The two prepared masks one layer uses on one rank: (front chunk, back chunk) for its window."""

    rank: int
    window: int | None
    front: object
    back: object
    plan: CPPlan


class CPMasks:
    """What the model receives as `masks` under CP: `lookup(window)` returns that window's CPLayerMasks."""

    def __init__(self, prepared: PreparedMasks, plan: CPPlan, rank: int) -> None:
        self.prepared = prepared
        self.plan = plan
        self.rank = rank

    def lookup(self, window: int | None) -> CPLayerMasks:
        """The (rank, 0, window) and (rank, 1, window) masks; MaskNotPreparedError naming a missing key."""
        front = self.prepared.lookup(CPMaskKey(self.rank, 0, window))
        back = self.prepared.lookup(CPMaskKey(self.rank, 1, window))
        return CPLayerMasks(self.rank, window, front, back, self.plan)

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


class ContextParallelBackend(AttentionBackend):
    """Context parallelism around another backend, over the ranks of `group` (None = the default group)."""

    def __init__(self, inner: AttentionBackend, group: dist.ProcessGroup | None = None) -> None:
        self.inner = inner
        self.group = group
        self.cp_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.name = f"cp{self.cp_size}/{inner.name}"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> object:
        """The wrapped backend's mask."""
        return self.inner.build_mask(row, window, query_range, device)

    def prepare_row(self, row: PackedRow, windows: Iterable[int | None], ranks: Iterable[int] | None = None) -> CPMasks:
        """Every (rank, chunk, window) mask of `ranks` (default: this rank) for the whole row, built now."""
        plan = plan_cp(row.length, self.cp_size)
        t0 = time.perf_counter()
        masks = {}
        for rank in [self.rank] if ranks is None else ranks:
            for chunk in (0, 1):
                for w in set(windows):
                    masks[CPMaskKey(rank, chunk, w)] = self.build_mask(row, w, plan.chunk_range(rank, chunk))
        prepared = PreparedMasks(masks, plan_seconds=time.perf_counter() - t0, kind=self.name)
        return CPMasks(prepared, plan, self.rank)

    def prepare(self, position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None],
                branch_ids: torch.Tensor | None = None, device: torch.device | str | None = None) -> PreparedMasks:
        """Refused: a rank sees only its local tokens, and CP masks need the whole row."""
        raise PackingError("a context-parallel forward was called without masks: CP masks need the whole packed row",
                           "run it through gemma4_support.parallel.cp_forward(model, row), or pass "
                           "masks=model.backend.prepare_row(row, model.windows)")

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
        """Attend the rank's front and back query chunks against the whole row's keys and values."""
        if not isinstance(mask, CPLayerMasks) or mask.rank != self.rank:
            raise PackingError(
                f"CP attend on rank {self.rank} got {type(mask).__name__} masks"
                + (f" of rank {mask.rank}" if isinstance(mask, CPLayerMasks) else ""),
                "call the model with masks=model.backend.prepare_row(row, model.windows)",
            )
        d_k = key.shape[-1]
        kv = gather_sequence(torch.cat([key, value], dim=-1), mask.plan, self.group, dim=2)
        full_k, full_v = kv[..., :d_k], kv[..., d_k:]
        c = mask.plan.chunk_len
        front = self.inner.attend(query[:, :, :c], full_k, full_v, mask.front)
        back = self.inner.attend(query[:, :, c:], full_k, full_v, mask.back)
        return torch.cat([front, back], dim=2)


def allreduce_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over the CP group (the parameters are replicated on CP ranks)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


def cp_forward(model: nn.Module, row: PackedRow, masks: CPMasks | None = None, *, replay: bool = True) -> torch.Tensor:
    """This rank's forward of a whole packed row with tokens: its local logits [1, 2·chunk, vocab]; a row carrying
    the sampler's MoE routing (`routed_experts`) has this rank's part of it replayed unless `replay=False`."""
    backend = getattr(model, "backend", None)
    if not isinstance(backend, ContextParallelBackend):
        raise PackingError(f"cp_forward needs a model built with context parallelism, got backend "
                           f"{getattr(backend, 'name', None)!r}",
                           "set RuntimeConfig(cp=N) before build_model, or pass attention=ContextParallelBackend(...)")
    if masks is None:
        masks = backend.prepare_row(row, model.windows)
    local = [masks.plan.shard(t, backend.rank, dim=1) for t in row.model_inputs()]
    routes = row.routed_experts if replay else None
    with replay_recorded(model, None if routes is None else masks.plan.shard(routes, backend.rank, dim=0)):
        return model(*local, masks=masks)
