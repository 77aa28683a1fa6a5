"""Attention backends: one object per model that prepares masks before the forward and attends in each layer.

An `AttentionBackend` has three methods, and the model calls nothing else:
  prepare(position_ids, document_ids, windows, branch_ids, device) -> PreparedMasks   once per forward, before the layers
  build_mask(row, window, query_range, device)                       -> mask          one mask of a packed row (CP chunks)
  attend(query, key, value, mask)                            -> output        in every layer

Registry (`attention_backend(name, spec, device)`):
`dense`: boolean masks and eager attention (`core.attend`) — the reference, runs everywhere.
`flex`: BlockMasks planned from the row's geometry and `flex_attention` — runs compiled, with backward, on
CUDA; on CPU torch's flex is eager and forward-only, so training there stays dense.
`auto`: flex on CUDA, dense elsewhere. Gemma 4's 512-wide global heads run flex with smaller kernel tiles
(`block_masks.kernel_options`: flex's default tiles need more shared memory than Hopper has at head dim 512).
Context parallelism wraps either (`gemma4_support.parallel.cp_attention.ContextParallelBackend`).

Masks are placed on `device` (default: the ids' device). Ids on the host with a CUDA `device` is how a trainer plans
without waiting on the GPU: flex plans from the row's geometry on the host either way, and ids already on the GPU
must first be read back (a host synchronisation before the forward can start).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask

from gemma4_support.attention import core
from gemma4_support.attention.block_masks import block_size_for_head_dim, build_block_mask, flex_attend
from gemma4_support.attention.masks import PreparedMasks, dense_mask, packing_dense_mask
from gemma4_support.config.spec import ModelSpec
from gemma4_support.errors import Gemma4Error
from gemma4_support.packing import PackedRow



def attend_any(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
    """Attend with whatever was prepared for the layer: flex for a BlockMask, eager for a boolean mask."""
    if isinstance(mask, BlockMask):
        return flex_attend(query, key, value, mask, scale=1.0)
    return core.attend(query, key, value, mask)


class AttentionBackend:
    """How a model's attention masks are prepared and how each layer attends (see the module docstring)."""

    name = "abstract"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> object:
        """The mask relating the queries in `query_range` (default: the whole row) to every key of `row`, on
        `device` (default: the row's)."""
        raise NotImplementedError

    def prepare(self, position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None],
                branch_ids: torch.Tensor | None = None, device: torch.device | str | None = None) -> PreparedMasks:
        """One mask per distinct window (None = global), keyed by window, for one packed row ([1, L] ids), on
        `device` (default: the ids')."""
        _require_one_row(position_ids, self.name)
        row = PackedRow(position_ids[0], document_ids[0], None if branch_ids is None else branch_ids[0])
        t0 = time.perf_counter()
        masks = {w: self.build_mask(row, w, device=device) for w in set(windows)}
        return PreparedMasks(masks, plan_seconds=time.perf_counter() - t0, kind=self.name)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
        """(query [b, q_heads, s_q, d], key/value [b, kv_heads, s_k, d], prepared mask) -> [b, q_heads, s_q, d]."""
        raise NotImplementedError


class DenseBackend(AttentionBackend):
    """Boolean masks and eager attention: the reference. Handles any batch of rows."""

    name = "dense"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean [1, q, L] mask (True = may attend)."""
        return _on(packing_dense_mask(row, window, query_range).unsqueeze(0), device)

    def prepare(self, position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None],
                branch_ids: torch.Tensor | None = None, device: torch.device | str | None = None) -> PreparedMasks:
        """Boolean [b, s, s] masks for each distinct window, for a batch of packed rows (built on `device`)."""
        position_ids, document_ids, branch_ids = (_on(t, device) for t in (position_ids, document_ids, branch_ids))
        t0 = time.perf_counter()
        masks = {w: dense_mask(position_ids, document_ids, w, branch_ids=branch_ids) for w in set(windows)}
        return PreparedMasks(masks, plan_seconds=time.perf_counter() - t0, kind=self.name)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
        """Eager attention (scale 1.0)."""
        return core.attend(query, key, value, mask)


@dataclass(frozen=True)
class FlexBackend(AttentionBackend):
    """BlockMasks planned from the row's geometry with a block size per window; a window mapped to None (or
    absent) stays dense (boolean mask, eager attention)."""

    block_sizes: Mapping[int | None, int | None] = field(default_factory=dict)
    name = "flex"

    def build_mask(self, row: PackedRow, window: int | None, query_range: tuple[int, int] | None = None,
                   device: torch.device | str | None = None) -> object:
        """A BlockMask, or a boolean [1, q, L] mask for a window kept dense."""
        size = self.block_sizes.get(window)
        if size is None:
            return _on(packing_dense_mask(row, window, query_range).unsqueeze(0), device)
        return build_block_mask(row, window, size, query_range, device=device or row.position_ids.device)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
        """flex_attention for a BlockMask, eager attention for a window kept dense."""
        return attend_any(query, key, value, mask)


def flex_backend(spec: ModelSpec, dense_head_dims: Iterable[int] = ()) -> FlexBackend:
    """Block size per window from the head dim of the layers using it (windows of `dense_head_dims` stay dense)."""
    keep_dense = set(dense_head_dims)
    sizes: dict[int | None, int | None] = {}
    for layer in spec.layers:
        sizes[layer.window] = None if layer.head_dim in keep_dense else block_size_for_head_dim(layer.head_dim)
    return FlexBackend(sizes)


def _auto(spec: ModelSpec, device: torch.device) -> AttentionBackend:
    if device.type != "cuda":
        return DenseBackend()
    return flex_backend(spec)


BACKENDS: dict[str, Callable[[ModelSpec, torch.device], AttentionBackend]] = {
    "auto": _auto,
    "dense": lambda spec, device: DenseBackend(),
    "flex": lambda spec, device: flex_backend(spec),
}


def attention_backend(name: str, spec: ModelSpec, device: str | torch.device) -> AttentionBackend:
    """The backend registered as `name` for `spec` on `device` ("auto": flex on CUDA, dense elsewhere)."""
    if name not in BACKENDS:
        raise Gemma4Error(f"unknown attention backend {name!r}", f"choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name](spec, torch.device(device))


def _on(t: torch.Tensor | None, device: torch.device | str | None) -> torch.Tensor | None:
    """`t` on `device` (unchanged when None); a host tensor is copied without waiting for the device."""
    return t if t is None or device is None else t.to(device, non_blocking=t.device.type == "cpu")


def _require_one_row(position_ids: torch.Tensor, backend: str) -> None:
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise Gemma4Error(f"the {backend} backend plans one packed row per forward, got ids of shape "
                          f"{tuple(position_ids.shape)}",
                          "pack the batch into one row (document ids separate the sequences) or use the dense backend")
