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

import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from gemma4_support.errors import MaskNotPreparedError, PackingError

GLOBAL = None  # the window value that means "full attention"

MaskPredicate = Callable[..., torch.Tensor]
"""Signature of `allowed`: (q_pos, k_pos, q_doc, k_doc, window, q_branch=None, k_branch=None) -> bool tensor."""

_build_total = 0


def _count_build() -> None:
    global _build_total
    _build_total += 1


def mask_builds() -> int:
    """How many masks (dense or block) this process has built so far: a forward must not change it."""
    return _build_total


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
    _check_window(window)
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
    _count_build()
    return predicate(
        position_ids.unsqueeze(-1), k_pos.unsqueeze(-2), document_ids.unsqueeze(-1), k_doc.unsqueeze(-2), window,
        q_br, k_br,
    )


def _check_window(window: int | None) -> None:
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise PackingError(f"window {window!r} is not a positive integer or None (global)", "pass W >= 1 or None")


@dataclass(frozen=True, eq=False)
class Packing:
    """One packed row's token geometry: position ids (restarting per document), document ids, branch ids.

    Documents must be contiguous runs. `branch_ids` is None for plain packing; with shared-prefix
    packing 0 marks a document's prompt and k > 0 its k-th completion.
    """

    position_ids: torch.Tensor
    document_ids: torch.Tensor
    branch_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        tensors = {"position_ids": self.position_ids, "document_ids": self.document_ids}
        if self.branch_ids is not None:
            tensors["branch_ids"] = self.branch_ids
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.is_complex():
                raise PackingError(f"{name} must be a 1-D integer tensor (one packed row)", "pass torch.long ids [L]")
        lengths = {name: t.numel() for name, t in tensors.items()}
        if len(set(lengths.values())) != 1 or self.position_ids.numel() == 0:
            raise PackingError(f"inconsistent or empty packed-row lengths {lengths}", "give one id of each kind per token")
        if bool((self.position_ids < 0).any()):
            raise PackingError("negative position ids in a packed row", "positions restart at 0 per document")
        if self.branch_ids is not None and bool((self.branch_ids < 0).any()):
            raise PackingError("negative branch ids", "use 0 for the shared prompt and k >= 1 for completion k")
        doc = self.document_ids
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[1:] = doc[1:] != doc[:-1]
        run_docs = doc[starts]
        if run_docs.unique().numel() != run_docs.numel():
            raise PackingError(
                "a document id occurs in more than one contiguous run of the packed row",
                "pack each document as one contiguous segment (give separate documents distinct ids)",
            )

    @property
    def length(self) -> int:
        """Number of tokens in the row."""
        return self.position_ids.numel()

    def segment_ids(self) -> torch.Tensor:
        """Documents relabelled 0, 1, 2, ... in packing order (same partition as document_ids)."""
        doc = self.document_ids
        starts = torch.zeros_like(doc, dtype=torch.long)
        starts[1:] = (doc[1:] != doc[:-1]).long()
        return starts.cumsum(0)

    def branches(self) -> torch.Tensor:
        """Branch ids, zeros when the row has no shared-prefix packing."""
        return torch.zeros_like(self.position_ids) if self.branch_ids is None else self.branch_ids

    def standalone_sequences(self) -> list[torch.Tensor]:
        """Packed indices of each sequence as it would run alone: a plain document, or prompt + one completion."""
        seg = self.segment_ids()
        br = self.branches()
        out = []
        for s in range(int(seg[-1]) + 1):
            idx = (seg == s).nonzero().flatten()
            b = br[idx]
            completions = sorted(set(b[b > 0].tolist()))
            if not completions:
                out.append(idx)
            for k in completions:
                out.append(idx[(b == 0) | (b == k)])
        return out

    def to(self, device: torch.device | str) -> Packing:
        """The same row on another device."""
        br = None if self.branch_ids is None else self.branch_ids.to(device)
        return Packing(self.position_ids.to(device), self.document_ids.to(device), br)


def pack(documents: Sequence[int | tuple[int, Sequence[int]]]) -> Packing:
    """Build a packed row: an int n is a plain document of n tokens; (p, [c1, c2, ...]) is a prompt of p
    tokens shared by completions of c1, c2, ... tokens (positions of each continue from the prompt's end)."""
    pos, doc, br = [], [], []
    shared = False
    for d, item in enumerate(documents):
        if isinstance(item, int):
            if item < 1:
                raise PackingError(f"document {d} has length {item}", "documents need at least one token")
            pos += range(item)
            doc += [d] * item
            br += [0] * item
            continue
        prompt, completions = item
        if prompt < 1 or not completions or any(c < 1 for c in completions):
            raise PackingError(
                f"shared-prefix document {d} = {item!r} needs a prompt and completions of >= 1 token each",
                "pass (prompt_len, [completion_len, ...]) with positive lengths",
            )
        shared = True
        pos += range(prompt)
        doc += [d] * prompt
        br += [0] * prompt
        for k, c in enumerate(completions, start=1):
            pos += range(prompt, prompt + c)
            doc += [d] * c
            br += [k] * c
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Packing(t(pos), t(doc), t(br) if shared else None)


def packing_dense_mask(
    packing: Packing,
    window: int | None,
    query_range: tuple[int, int] | None = None,
    predicate: MaskPredicate = allowed,
) -> torch.Tensor:
    """Dense [q, L] mask of a packed row: queries are the tokens in `query_range` (default all), keys the row."""
    q0, q1 = query_range if query_range is not None else (0, packing.length)
    if not 0 <= q0 < q1 <= packing.length:
        raise PackingError(f"query range {query_range} outside the row of {packing.length} tokens", "fix the range")
    br = packing.branch_ids
    return dense_mask(
        packing.position_ids[q0:q1], packing.segment_ids()[q0:q1], window,
        packing.position_ids, packing.segment_ids(),
        branch_ids=None if br is None else br[q0:q1], key_branch_ids=br, predicate=predicate,
    )


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


def prepare_dense_masks(
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
    windows: Iterable[int | None],
    branch_ids: torch.Tensor | None = None,
) -> PreparedMasks:
    """Dense masks for each distinct window (None = global), keyed by window."""
    t0 = time.perf_counter()
    masks = {w: dense_mask(position_ids, document_ids, w, branch_ids=branch_ids) for w in set(windows)}
    return PreparedMasks(masks, plan_seconds=time.perf_counter() - t0, kind="dense")
