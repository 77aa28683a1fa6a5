"""Attention backends of the model: how masks are prepared before the forward and how each layer attends.

`dense`: boolean masks and eager attention (`core.attend`) — the reference, runs everywhere.
`flex`: BlockMasks planned from the row's geometry and `flex_attention` — runs compiled, with backward, on
CUDA; on CPU torch's flex is eager and forward-only, so training there stays dense.
`auto`: flex on CUDA for head dims up to 256, dense elsewhere and for larger heads: on the H200 (torch 2.11)
compiled flex_attention for Gemma 4's 512-wide global heads needs 264,192 bytes of shared memory in bf16 and
fails to compile ("out of resource", limit 232,448); see docs/gpu_flex_attention.md. Head dims listed in
`dense_head_dims` stay dense under flex (routed around, per window, not failed).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask

from gemma4_support.attention import core
from gemma4_support.attention.block_masks import block_size_for_head_dim, build_block_mask, flex_attend
from gemma4_support.attention.masks import Packing, PreparedMasks, dense_mask
from gemma4_support.config.spec import ModelSpec
from gemma4_support.errors import Gemma4Error

BACKENDS = ("auto", "dense", "flex")


def attend_any(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: object) -> torch.Tensor:
    """Attend with whatever was prepared for the layer: flex for a BlockMask, eager for a boolean mask."""
    if isinstance(mask, BlockMask):
        return flex_attend(query, key, value, mask, scale=1.0)
    return core.attend(query, key, value, mask)


@dataclass(frozen=True)
class FlexPlan:
    """Per window: the block size to plan with, or None to keep that window dense."""

    block_sizes: dict[int | None, int | None] = field(default_factory=dict)

    def prepare(self, position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None],
                branch_ids: torch.Tensor | None = None) -> PreparedMasks:
        """BlockMasks (dense masks for windows kept dense), keyed by window, for one packed row."""
        if position_ids.dim() != 2 or position_ids.shape[0] != 1:
            raise Gemma4Error(f"the flex backend plans one packed row per forward, got ids of shape {tuple(position_ids.shape)}",
                              "pack the batch into one row (document ids separate the sequences) or use the dense backend")
        packing = Packing(position_ids[0], document_ids[0], None if branch_ids is None else branch_ids[0])
        masks: dict[int | None, object] = {}
        for window in set(windows):
            size = self.block_sizes.get(window)
            masks[window] = (dense_mask(position_ids, document_ids, window, branch_ids=branch_ids) if size is None
                             else build_block_mask(packing, window, size, device=position_ids.device))
        return PreparedMasks(masks, kind="flex")


def flex_plan(spec: ModelSpec, dense_head_dims: Iterable[int] = ()) -> FlexPlan:
    """Block size per window from the head dim of the layers using it (windows of `dense_head_dims` stay dense)."""
    keep_dense = set(dense_head_dims)
    sizes: dict[int | None, int | None] = {}
    for layer in spec.layers:
        sizes[layer.window] = None if layer.head_dim in keep_dense else block_size_for_head_dim(layer.head_dim)
    return FlexPlan(sizes)


def resolve(name: str, device: str | torch.device) -> str:
    """The concrete backend ("dense" or "flex") for a requested one on a device."""
    if name not in BACKENDS:
        raise Gemma4Error(f"unknown attention backend {name!r}", f"choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flex" if torch.device(device).type == "cuda" else "dense"
    return name


FLEX_MAX_AUTO_HEAD_DIM = 256


def backend_hooks(name: str, spec: ModelSpec, device: str | torch.device,
                  dense_head_dims: Iterable[int] | None = None) -> tuple[Callable, Callable]:
    """(prepare_masks, attend) for the model: the two hooks an attention backend consists of."""
    from gemma4_support.attention.masks import prepare_dense_masks

    if resolve(name, device) == "dense":
        return prepare_dense_masks, core.attend
    if dense_head_dims is None:
        dense_head_dims = {l.head_dim for l in spec.layers if l.head_dim > FLEX_MAX_AUTO_HEAD_DIM} if name == "auto" else ()
    return flex_plan(spec, dense_head_dims).prepare, attend_any
