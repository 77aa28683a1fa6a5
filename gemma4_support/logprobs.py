"""Log-probs of given tokens from the model — the trainer's side of every train/inference comparison and of the
policy-gradient loss — without materialising [tokens, vocab] fp32 logits.

The hidden states are turned into logits a chunk of positions at a time (in the model's dtype, softcap
included), log-softmaxed in fp32 and reduced at once to the label's log-prob and, when asked, the top-k; peak
memory is one chunk's logits. With gradients, each chunk is recomputed in the backward pass (activation
checkpointing), so training keeps only the hidden states. A packed row that carries the sampler's MoE routing
(`PackedRow.routed_experts`) is scored with those expert choices replayed unless `replay=False`.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from gemma4_support.errors import PackingError
from gemma4_support.packing import PackedRow

__all__ = ["TokenLogprobs", "chunked_logprobs", "score_row"]


@dataclass(frozen=True)
class TokenLogprobs:
    """Per position of a row: log p(label) [L] (fp32), and the top-k ids / log-probs [L, k] when asked."""

    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def chunked_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, *,
                     top_k: int = 0, chunk_tokens: int = 1024) -> TokenLogprobs:
    """hidden [L, h] -> TokenLogprobs of `labels` [L] under logits = head(hidden), `chunk_tokens` positions at a time."""
    if hidden.shape[0] != labels.shape[0]:
        raise PackingError(f"{hidden.shape[0]} hidden positions but {labels.shape[0]} labels",
                           "pass one label per position of the row")
    if chunk_tokens < 1:
        raise PackingError(f"chunk_tokens is {chunk_tokens}", "use a positive number of positions per chunk")

    def one(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logp = torch.log_softmax(head(h).float(), dim=-1)
        picked = logp.gather(-1, y[:, None])[:, 0]
        if not top_k:
            return (picked,)
        top = logp.detach().topk(top_k, dim=-1)
        return picked, top.indices, top.values

    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        pieces.append(checkpoint(one, h, y, use_reentrant=False) if torch.is_grad_enabled() and h.requires_grad
                      else one(h, y))
    cols = [torch.cat(parts) for parts in zip(*pieces)]
    return TokenLogprobs(*cols) if top_k else TokenLogprobs(cols[0])


def score_row(model: torch.nn.Module, row: PackedRow, *, top_k: int = 0, chunk_tokens: int = 1024,
              replay: bool = True) -> TokenLogprobs:
    """The model's log-probs of a packed row's labels (top-k when asked), the sampler's routing replayed when the
    row carries it."""
    from gemma4_support.model.router_replay import recorded_routing, replay_routing

    if row.labels is None:
        raise PackingError("the packed row has no labels to score", "build it with PackedRow.with_tokens or pack_sequences")
    routed = row.routed_experts is not None and replay
    context = (replay_routing(model, recorded_routing(model, row.routed_experts.to(row.position_ids.device)), row.length)
               if routed else nullcontext())
    with context:
        hidden = model.hidden_states(*row.model_inputs(), branch_ids=row.batched_branch_ids())
    return chunked_logprobs(hidden[:, 0], model.logits, row.labels, top_k=top_k, chunk_tokens=chunk_tokens)
