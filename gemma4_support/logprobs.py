"""Log-probs of given tokens from the model — the trainer's side of every train/inference comparison and of the
policy-gradient loss — without materialising [tokens, vocab] fp32 logits.

The hidden states are turned into logits a chunk of positions at a time (in the model's dtype, softcap
included), log-softmaxed in fp32 and reduced at once to the label's log-prob and, when asked, the top-k; peak
memory is one chunk's logits. With gradients, each chunk is recomputed in the backward pass (activation
checkpointing), so training keeps only the hidden states. The label log-probs alone (no top-k) take a fused path
under gradients instead (`label_logprobs`): the gradient with respect to the pre-softcap logits per unit upstream gradient,
(onehot − softmax)·(1 − tanh²), is formed while each chunk's logits are at hand and kept in the model's dtype
([tokens, vocab]: 4 GiB for 8,192 bf16 tokens of a 262,144 vocabulary), so the backward pass is two matrix products
— no recomputed head, no fp32 re-pass, one weight-gradient product instead of one per chunk. With a frozen head
(LoRA training) only its product with the head is kept ([tokens, h]: the hidden states' gradient before the
per-position upstream scale). A packed row that carries the sampler's MoE routing
(`PackedRow.routed_experts`) is scored with those expert choices replayed unless `replay=False`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from gemma4_support.errors import PackingError
from gemma4_support.fused import compiled_enabled, cuda_compiled
from gemma4_support.packing import PackedRow

__all__ = ["TokenLogprobs", "chunked_logprobs", "label_logprobs", "score_row"]


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


@cuda_compiled
def _head_chunk(z: torch.Tensor, labels: torch.Tensor, softcap: float | None, train: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits z [c, V] (the model's dtype, before the softcap) and labels [c] -> log p(label) [c] (fp32) and, when
    training, d log p(label) / dz [c, V] in z's dtype. Elementwise only (one compiled kernel on CUDA)."""
    t = torch.tanh(z / softcap) if softcap else None  # the model's own rounding: the softcap in its dtype
    zc = (t * softcap if softcap else z).float()
    lse = torch.logsumexp(zc, dim=-1, keepdim=True)
    picked = (zc.gather(-1, labels[:, None]) - lse)[:, 0]
    if not train:
        return picked, None
    onehot = torch.arange(zc.shape[-1], device=zc.device)[None, :] == labels[:, None]
    grad = onehot.float() - torch.exp(zc - lse)
    if softcap:
        grad = grad * (1 - t.float().square())
    return picked, grad.to(z.dtype)


class _LabelLogprobs(torch.autograd.Function):
    """log p(label) under logits = softcap(hidden @ weightᵀ), chunked; backward from the stored per-unit gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,  # noqa: ANN001
                chunk: int) -> torch.Tensor:
        wants_hidden, wants_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        # The weight's gradient needs every position's per-unit gradient [tokens, vocab] at backward time (the
        # upstream gradient weights each position); the hidden states' gradient alone is that, times the weight,
        # scaled per position — so with a frozen head (LoRA) only its [tokens, h] product is kept.
        unit = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device) \
            if wants_weight else None
        product = torch.empty_like(hidden) if wants_hidden and not wants_weight else None
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            picked, grad = _head_chunk(hidden[start:end] @ weight.t(), labels[start:end], softcap,
                                       wants_hidden or wants_weight)
            out[start:end] = picked
            if unit is not None:
                unit[start:end] = grad
            elif product is not None:
                product[start:end] = grad @ weight
        ctx.save_for_backward(hidden if wants_weight else None, weight if wants_weight else None, unit, product)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # noqa: ANN001
        hidden, weight, unit, product = ctx.saved_tensors
        if product is not None:  # frozen head: d/dhidden = grad_out · (unit @ weight), formed in forward
            return product.mul_(grad_out.to(product.dtype)[:, None]), None, None, None, None
        unit.mul_(grad_out.to(unit.dtype)[:, None])  # in place: the stored tensor serves this one backward
        grad_hidden = unit @ weight if ctx.needs_input_grad[0] else None
        grad_weight = unit.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def label_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap: float | None = None,
                   chunk_tokens: int = 1024) -> torch.Tensor:
    """log p(label) [L] (fp32) under logits = softcap·tanh((hidden @ weightᵀ)/softcap), hidden [L, h], weight [V, h];
    differentiable in hidden and weight (one backward per call)."""
    if hidden.shape[0] != labels.shape[0]:
        raise PackingError(f"{hidden.shape[0]} hidden positions but {labels.shape[0]} labels",
                           "pass one label per position of the row")
    if chunk_tokens < 1:
        raise PackingError(f"chunk_tokens is {chunk_tokens}", "use a positive number of positions per chunk")
    return _LabelLogprobs.apply(hidden, weight, labels, softcap, chunk_tokens)


def score_row(model: torch.nn.Module, row: PackedRow, *, top_k: int = 0, chunk_tokens: int = 1024,
              replay: bool = True) -> TokenLogprobs:
    """The model's log-probs of a packed row's labels (top-k when asked), the sampler's routing replayed when the
    row carries it. A row still on the host (as a data loader packs it) has its masks planned there and is moved to
    the model's device without the step waiting on the device; a row already there is planned from its ids."""
    from gemma4_support.model.router_replay import replay_recorded

    if row.labels is None:
        raise PackingError("the packed row has no labels to score", "build it with PackedRow.with_tokens or pack_sequences")
    masks, device = None, next(model.parameters()).device
    if row.position_ids.device != device:  # a host row: its masks planned here, then both queued to the device
        masks = model.backend.prepare(*row.model_inputs()[1:], model.windows, row.batched_branch_ids(), device=device)
        row = row.to(device, non_blocking=True)
    with replay_recorded(model, row.routed_experts if replay else None):
        hidden = model.hidden_states(*row.model_inputs(), masks=masks, branch_ids=row.batched_branch_ids())
    head = model.head_weight() if hasattr(model, "head_weight") else None
    # The fused path under gradients everywhere, and for plain scoring where its chunk is compiled (CUDA).
    if top_k == 0 and head is not None and (torch.is_grad_enabled() or (hidden.is_cuda and compiled_enabled())):
        return TokenLogprobs(label_logprobs(hidden[:, 0], head, row.labels, softcap=model.softcap,
                                            chunk_tokens=chunk_tokens))
    return chunked_logprobs(hidden[:, 0], model.logits, row.labels, top_k=top_k, chunk_tokens=chunk_tokens)
