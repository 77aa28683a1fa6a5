"""The one packed-row type: several sequences in one training row, with the ids every consumer needs.

A `PackedRow` holds, per token ([L] tensors): position ids (restarting at 0 per document), document ids
(each document one contiguous run), optional branch ids (shared-prefix packing: 0 = a document's prompt,
k > 0 its k-th completion, whose positions continue from the prompt's end), and where present the token
ids, the labels (the next token of the same sequence), the loss mask, the sampler's per-token log-probs
and per-token loss weights; and where recorded, the MoE expert choices the sampler used for each token
(`routed_experts` [L, moe_layers, top_k], -1 for a token it never routed). The attention masks, context-parallel planning, the HF parity harness and the
RL packing all read this one type.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gemma4_support.errors import PackingError

#: What `pack` accepts per document: n (a plain document of n tokens), or (prompt, [completion, ...]).
DocumentSpec = int | tuple[int, Sequence[int]]

_INTEGER_FIELDS = ("position_ids", "document_ids", "branch_ids", "input_ids", "labels")


@dataclass(frozen=True, eq=False)
class PackedRow:
    """One packed row: token geometry, then tokens and per-token training data where present (all [L])."""

    position_ids: torch.Tensor
    document_ids: torch.Tensor
    branch_ids: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        present = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        routes = present.pop("routed_experts", None)
        if routes is not None and (not isinstance(routes, torch.Tensor) or routes.dim() != 3
                                   or routes.shape[0] != self.position_ids.numel() or routes.is_floating_point()):
            raise PackingError(f"routed_experts must be an integer [L, moe_layers, top_k] tensor with L = "
                               f"{self.position_ids.numel()}, got {getattr(routes, 'shape', type(routes).__name__)}",
                               "give one row of expert ids per token (-1 where none was recorded)")
        for name, t in present.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise PackingError(f"{name} must be a 1-D tensor (one packed row)", "pass [L] tensors, one entry per token")
            if name in _INTEGER_FIELDS and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                raise PackingError(f"{name} must hold integer ids, got {t.dtype}", "pass torch.long ids")
        lengths = {name: t.numel() for name, t in present.items()}
        if len(set(lengths.values())) != 1 or self.position_ids.numel() == 0:
            raise PackingError(f"inconsistent or empty packed-row lengths {lengths}", "give one entry of each kind per token")
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

    def document_lengths(self) -> list[int]:
        """Tokens per document, in packing order."""
        return torch.bincount(self.segment_ids()).tolist()

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

    def with_tokens(self, input_ids: torch.Tensor) -> PackedRow:
        """This geometry with tokens: labels are the next token of the same sequence (same document and branch);
        the loss mask is true where such a next token exists."""
        input_ids = input_ids.reshape(-1)
        seg, br = self.segment_ids(), self.branches()
        valid = torch.zeros(self.length, dtype=torch.bool, device=input_ids.device)
        valid[:-1] = (seg[1:] == seg[:-1]) & (br[1:] == br[:-1])
        labels = torch.roll(input_ids, -1).masked_fill(~valid, 0)
        return dataclasses.replace(self, input_ids=input_ids, labels=labels, loss_mask=valid)

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, position_ids, document_ids) as [1, L] batches, the model's positional arguments."""
        if self.input_ids is None:
            raise PackingError("this packed row has no input_ids", "add tokens with PackedRow.with_tokens(ids)")
        return self.input_ids[None], self.position_ids[None], self.document_ids[None]

    def batched_branch_ids(self) -> torch.Tensor | None:
        """Branch ids as a [1, L] batch (None for plain packing)."""
        return None if self.branch_ids is None else self.branch_ids[None]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedRow:
        """The same row on another device (not checked again: the checks read values back, which would wait on it)."""
        moved = object.__new__(PackedRow)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(moved, f.name, None if value is None else  # non-blocking only from the host
                               value.to(device, non_blocking=non_blocking and value.device.type == "cpu"))
        return moved


def pack(documents: Sequence[DocumentSpec]) -> PackedRow:
    """The geometry of a packed row: an int n is a plain document of n tokens; (p, [c1, c2, ...]) is a prompt of
    p tokens shared by completions of c1, c2, ... tokens (positions of each continue from the prompt's end)."""
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
    return PackedRow(t(pos), t(doc), t(br) if shared else None)
