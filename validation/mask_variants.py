"""Attention backends the harness builds models with: a counting wrapper (a forward must build no mask) and
deliberately broken mask realisations for sensitivity tests (each must fail the stage's gates)."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from gemma4_support.attention.backends import AttentionBackend, DenseBackend
from gemma4_support.attention.masks import PreparedMasks
from gemma4_support.packing import PackedRow


class CountingBackend(AttentionBackend):
    """Delegates to `inner` and counts the masks it builds."""

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.builds = 0

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> object:
        """The inner backend's mask, counted."""
        self.builds += 1
        return self.inner.build_mask(row, window, query_range, device)

    def prepare(self, position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None],
                branch_ids: torch.Tensor | None = None, device: torch.device | str | None = None) -> PreparedMasks:
        """The inner backend's masks, counted."""
        prepared = self.inner.prepare(position_ids, document_ids, windows, branch_ids, device)
        self.builds += len(prepared)
        return prepared

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
        """The inner backend's attention."""
        return self.inner.attend(query, key, value, mask)


class DropWindow(DenseBackend):
    """Broken: masks built without the sliding window (keyed as if they had it)."""

    name = "dense/drop_window"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """A global mask whatever the window."""
        return super().build_mask(row, None, query_range, device)


class NoSharedPrefix(DenseBackend):
    """Broken: masks built without the shared-prefix rule (completions see their siblings)."""

    name = "dense/no_shared_prefix"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The mask of the row's geometry without its branch ids."""
        return super().build_mask(PackedRow(row.position_ids, row.document_ids), window, query_range, device)

    def prepare(self, position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None],
                branch_ids: torch.Tensor | None = None, device: torch.device | str | None = None) -> PreparedMasks:
        """Masks prepared as if the row had no branches."""
        return super().prepare(position_ids, document_ids, windows, None, device)


class ChunkOffByOne(DenseBackend):
    """Broken: a query range that does not start the row is built shifted back by one token (a CP chunk boundary
    off by one)."""

    name = "dense/chunk_off_by_one"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The mask of the query range shifted back by one."""
        if query_range is not None and query_range[0] > 0:
            query_range = (query_range[0] - 1, query_range[1] - 1)
        return super().build_mask(row, window, query_range, device)


BROKEN_MASKS: dict[str, type[DenseBackend]] = {
    "drop_window": DropWindow, "no_shared_prefix": NoSharedPrefix, "chunk_off_by_one": ChunkOffByOne,
}
