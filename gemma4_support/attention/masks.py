"""Attention-mask predicates and their dense (reference) realisation, prepared ahead of the forward.

The one predicate every realisation must equal: query i may attend key j iff
  same document (segment)            doc[i] == doc[j]
  causal in position ids             pos[j] <= pos[i]
  inside the window (sliding layers) pos[i] - W < pos[j]      (W keys, itself included)
Distances are measured in position ids, never in packed indices.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from gemma4_support.errors import MaskNotPreparedError

GLOBAL = None  # the window value that means "full attention"


def allowed(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor, k_doc: torch.Tensor, window: int | None
) -> torch.Tensor:
    """Elementwise predicate (broadcasting): may a query at (q_pos, q_doc) attend a key at (k_pos, k_doc)."""
    ok = (q_doc == k_doc) & (k_pos <= q_pos)
    if window is not None:
        ok = ok & (q_pos - window < k_pos)
    return ok


def dense_mask(
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
    window: int | None,
    key_position_ids: torch.Tensor | None = None,
    key_document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean [..., q, k] mask, True where attention is allowed (keys default to the queries)."""
    k_pos = position_ids if key_position_ids is None else key_position_ids
    k_doc = document_ids if key_document_ids is None else key_document_ids
    return allowed(
        position_ids.unsqueeze(-1), k_pos.unsqueeze(-2), document_ids.unsqueeze(-1), k_doc.unsqueeze(-2), window
    )


@dataclass
class PreparedMasks:
    """Masks built before the forward, looked up by key during it; a missing key is an error, never built."""

    masks: dict[Hashable, object] = field(default_factory=dict)
    lookups: int = 0

    def lookup(self, key: Hashable) -> object:
        """Return the mask prepared for `key`; raise MaskNotPreparedError naming the key otherwise."""
        try:
            mask = self.masks[key]
        except KeyError:
            raise MaskNotPreparedError(
                f"no attention mask was prepared for key {key!r} (prepared: {sorted(map(repr, self.masks))})",
                "prepare masks for every (window) the model's layers use before calling forward",
            ) from None
        self.lookups += 1
        return mask


def prepare_dense_masks(
    position_ids: torch.Tensor, document_ids: torch.Tensor, windows: Iterable[int | None]
) -> PreparedMasks:
    """Dense masks for each distinct window (None = global), keyed by window."""
    return PreparedMasks({w: dense_mask(position_ids, document_ids, w) for w in set(windows)})


def masks_from(mapping: Mapping[Hashable, object]) -> PreparedMasks:
    """Wrap an existing key→mask mapping."""
    return PreparedMasks(dict(mapping))
