"""Context-parallel planning: split a packed row across CP ranks and prepare every rank's masks up front.

Load balance: the row is cut into 2·C equal chunks; rank r holds chunk r (front) and chunk 2C−1−r (back).
With causal attention the work of chunk j grows with j, so each rank's pair of chunks costs the same
on a single long document (exactly equal allowed-pair counts).

Masks are keyed by `CPMaskKey(rank, chunk, window)` — chunk 0 is the rank's front chunk, 1 its back
chunk — and relate the chunk's queries to the keys of the whole (gathered) row. They are all built by
`ContextParallelBackend.prepare_row` before the forward; the forward only looks them up
(`PreparedMasks.lookup` raises `MaskNotPreparedError` naming the missing key).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from gemma4_support.attention.masks import packing_dense_mask
from gemma4_support.errors import PackingError, require_positive_ints
from gemma4_support.packing import PackedRow


class CPMaskKey(NamedTuple):
    """The key of one prepared CP mask: rank, its chunk (0 front, 1 back), window (None = global)."""

    rank: int
    chunk: int
    window: int | None


@dataclass(frozen=True)
class CPPlan:
    """How one packed row of `seq_len` tokens is split over `cp_size` ranks (two chunks each)."""

    seq_len: int
    cp_size: int

    def __post_init__(self) -> None:
        require_positive_ints({"seq_len": self.seq_len, "cp_size": self.cp_size}, PackingError, "CP plan")
        if self.seq_len % (2 * self.cp_size):
            raise PackingError(
                f"a packed row of {self.seq_len} tokens cannot be split into 2*cp={2 * self.cp_size} equal chunks",
                f"pad the row to a multiple of {2 * self.cp_size} tokens (two chunks per CP rank)",
            )

    @property
    def chunk_len(self) -> int:
        """Tokens per chunk (each rank holds two)."""
        return self.seq_len // (2 * self.cp_size)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.cp_size:
            raise PackingError(f"CP rank {rank} outside 0..{self.cp_size - 1}", "pass a rank of the CP group")

    def global_chunks(self, rank: int) -> tuple[int, int]:
        """The (front, back) chunk indices among the row's 2·cp chunks held by `rank`."""
        self._check_rank(rank)
        return rank, 2 * self.cp_size - 1 - rank

    def chunk_range(self, rank: int, chunk: int) -> tuple[int, int]:
        """Packed [start, end) of the rank's chunk (0 front, 1 back)."""
        if chunk not in (0, 1):
            raise PackingError(f"chunk {chunk!r} is not 0 (front) or 1 (back)", "pass chunk 0 or 1")
        g = self.global_chunks(rank)[chunk]
        return g * self.chunk_len, (g + 1) * self.chunk_len

    def local_indices(self, rank: int) -> torch.Tensor:
        """Packed indices of the tokens `rank` holds: its front chunk, then its back chunk."""
        return torch.cat([torch.arange(*self.chunk_range(rank, c)) for c in (0, 1)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = -1) -> torch.Tensor:
        """The part of a full-row tensor (row along `dim`) that `rank` holds."""
        if x.shape[dim] != self.seq_len:
            raise PackingError(
                f"tensor dim {dim} has {x.shape[dim]} tokens, the CP plan {self.seq_len}", "shard the planned row"
            )
        return x.index_select(dim, self.local_indices(rank).to(x.device))

    def restore_order(self) -> torch.Tensor:
        """Permutation taking the ranks' local parts concatenated in rank order back to packed order."""
        return torch.argsort(torch.cat([self.local_indices(r) for r in range(self.cp_size)]))

    def unshard(self, parts: Sequence[torch.Tensor], dim: int = -1) -> torch.Tensor:
        """The full-row tensor from every rank's local part (in rank order)."""
        if len(parts) != self.cp_size:
            raise PackingError(f"{len(parts)} parts for cp={self.cp_size}", "pass one local part per rank")
        full = torch.cat(list(parts), dim)
        return full.index_select(dim, self.restore_order().to(full.device))


def plan_cp(seq_len: int, cp_size: int) -> CPPlan:
    """The load-balanced front/back split of a `seq_len`-token row over `cp_size` ranks."""
    return CPPlan(seq_len, cp_size)


def attention_work(plan: CPPlan, row: PackedRow, window: int | None) -> list[int]:
    """Allowed (query, key) pairs per rank for one window: the attention work each rank does."""
    return [
        sum(int(packing_dense_mask(row, window, plan.chunk_range(r, c)).sum()) for c in (0, 1))
        for r in range(plan.cp_size)
    ]
