"""Attention-mask predicates and their dense (reference) realisation, prepared ahead of the forward.

The one predicate every realisation must equal: query i may attend key j iff
  same document (segment)            doc[i] == doc[j]
  causal in position ids             pos[j] <= pos[i]
  inside the window (sliding layers) pos[i] - W < pos[j]      (W keys, itself included)
  shared-prefix packing (optional)   branch[j] == branch[i] or branch[j] == 0
Distances are measured in position ids, never in packed indices.

Shared-prefix packing: a document may hold one prompt (branch 0) followed by several completions
(branch 1, 2, ...). A completion token sees its document's prompt and its own branch, never a sibling;
prompt tokens see only the prompt. Each completion's positions continue from the prompt's end, so
siblings reuse the same position ids.

Two realisations exist: dense boolean masks here (the reference) and flex_attention BlockMasks in
`gemma4_support.attention.block_masks`; both are keyed and looked up through `PreparedMasks`, which
never builds a mask on the fly.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gemma4_support.errors import MaskNotPreparedError, PackingError
from gemma4_support.packing import PackedRow

GLOBAL = None  # the window value that means "full attention"

MaskPredicate = Callable[..., torch.Tensor]
"""Signature of `allowed`: (q_pos, k_pos, q_doc, k_doc, window, q_branch=None, k_branch=None) -> bool tensor."""


def allowed(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_doc: torch.Tensor,
    k_doc: torch.Tensor,
    window: int | None,
    q_branch: torch.Tensor | None = None,
    k_branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise predicate (broadcasting): may a query at (q_pos, q_doc, q_branch) attend a key at (k_pos, ...)."""
    ok = (q_doc == k_doc) & (k_pos <= q_pos)
    if window is not None:
        ok = ok & (q_pos - window < k_pos)
    if q_branch is not None or k_branch is not None:
        if q_branch is None or k_branch is None:
            raise PackingError("branch ids given for only one side of the mask", "pass branch ids for queries and keys")
        ok = ok & ((k_branch == q_branch) | (k_branch == 0))
    return ok


def dense_mask(
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
    window: int | None,
    key_position_ids: torch.Tensor | None = None,
    key_document_ids: torch.Tensor | None = None,
    *,
    branch_ids: torch.Tensor | None = None,
    key_branch_ids: torch.Tensor | None = None,
    predicate: MaskPredicate = allowed,
) -> torch.Tensor:
    """Boolean [..., q, k] mask, True where attention is allowed (keys default to the queries)."""
    check_window(window)
    k_pos = position_ids if key_position_ids is None else key_position_ids
    k_doc = document_ids if key_document_ids is None else key_document_ids
    k_br = branch_ids if key_branch_ids is None else key_branch_ids
    if position_ids.shape != document_ids.shape or k_pos.shape != k_doc.shape:
        raise PackingError(
            f"position ids {tuple(position_ids.shape)} / document ids {tuple(document_ids.shape)} shapes differ",
            "give one position id and one document id per token",
        )
    q_br = None if branch_ids is None else branch_ids.unsqueeze(-1)
    k_br = None if k_br is None else k_br.unsqueeze(-2)
    return predicate(
        position_ids.unsqueeze(-1), k_pos.unsqueeze(-2), document_ids.unsqueeze(-1), k_doc.unsqueeze(-2), window,
        q_br, k_br,
    )


def check_window(window: int | None) -> None:
    """Refuse a window that is neither a positive integer nor None (global)."""
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise PackingError(f"window {window!r} is not a positive integer or None (global)", "pass W >= 1 or None")


def packing_dense_mask(
    row: PackedRow,
    window: int | None,
    query_range: tuple[int, int] | None = None,
    predicate: MaskPredicate = allowed,
) -> torch.Tensor:
    """Dense [q, L] mask of a packed row: queries are the tokens in `query_range` (default all), keys the row."""
    q0, q1 = query_range if query_range is not None else (0, row.length)
    if not 0 <= q0 < q1 <= row.length:
        raise PackingError(f"query range {query_range} outside the row of {row.length} tokens", "fix the range")
    br = row.branch_ids
    return dense_mask(
        row.position_ids[q0:q1], row.segment_ids()[q0:q1], window,
        row.position_ids, row.segment_ids(),
        branch_ids=None if br is None else br[q0:q1], key_branch_ids=br, predicate=predicate,
    )


class MaskLookup(Protocol):
    """What a forward receives as `masks`: prepared masks looked up by a layer's window."""

    def lookup(self, key: Hashable) -> object:
        """The mask prepared for `key` (a layer's window)."""


@dataclass
class PreparedMasks:
    """Masks built before the forward, looked up by key during it; a missing key is an error, never built."""

    masks: dict[Hashable, object] = field(default_factory=dict)
    lookups: int = 0
    plan_seconds: float = 0.0
    kind: str = "dense"

    def lookup(self, key: Hashable) -> object:
        """Return the mask prepared for `key`; raise MaskNotPreparedError naming the key otherwise."""
        try:
            mask = self.masks[key]
        except KeyError:
            raise MaskNotPreparedError(
                f"no attention mask was prepared for key {key!r} (prepared: {sorted(map(repr, self.masks))})",
                "prepare masks for every key the forward looks up (window; or rank, chunk, window under CP) "
                "before calling forward",
            ) from None
        self.lookups += 1
        return mask

    def __contains__(self, key: Hashable) -> bool:
        return key in self.masks

    def __len__(self) -> int:
        return len(self.masks)

    def summary(self) -> dict:
        """Counts and planning time, for reports."""
        return {"kind": self.kind, "prepared": len(self.masks), "lookups": self.lookups, "plan_seconds": self.plan_seconds}
