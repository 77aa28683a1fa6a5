"""HF transformers vs megatron-core Gemma 4 on the same tokens: inputs, the two sides, and the metrics.

The HF reference (`Gemma4ForCausalLM`, eager attention) runs every document of a packed row alone
(positions restart at 0) and its logits are concatenated; the Megatron model runs the packed row once with
position_ids / document_ids. Labels are the next token within each document; the last token of each
document has no label. Loss = mean token cross entropy over labelled positions (fp32) on both sides.
Megatron gradients are mapped to HF names through the same table as the weights (`convert.mapping`).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from gemma4_support.convert.checkpoint import megatron_to_hf
from gemma4_support.loss import token_loss
from gemma4_support.metrics import logprob_metrics, named_tensor_metrics, routing_agreement
from gemma4_support.model.router_replay import replay_routing
from gemma4_support.packing import PackedRow, pack


def random_row(doc_lengths: tuple[int, ...], vocab_size: int, seed: int, low: int = 0,
               pad_id: int | None = None) -> PackedRow:
    """A deterministic random row packing documents of the given lengths (token ids in [low, vocab)); `pad_id`
    is planted at position 1 so the pad row's gradient rule (HF's padding_idx) is always exercised."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(doc_lengths)
    ids = torch.randint(low, vocab_size, (1, total), generator=gen)
    if pad_id is not None and total > 1:
        ids[0, 1] = pad_id
    return pack(list(doc_lengths)).with_tokens(ids[0])


def packed_lengths(total: int, window: int) -> tuple[int, ...]:
    """Three documents filling `total` tokens, boundaries off window multiples (each > window when possible)."""
    first = int(total * 0.42) | 1
    second = int(total * 0.33)
    if second % window == 0:
        second += 1
    return first, second, total - first - second


def row_loss(logits: torch.Tensor, row: PackedRow) -> torch.Tensor:
    """Mean cross entropy over the row's labelled positions."""
    return token_loss(logits, row.labels, row.loss_mask)


@dataclass
class SideResult:
    """What one implementation produced for a batch."""

    logits: torch.Tensor  # [1, S, V], detached
    loss: float | None = None
    grads: dict[str, torch.Tensor] | None = None  # HF names
    routing: "RoutingCapture | None" = None  # router outputs per layer (MoE models)


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient by name (zeros where backward left none)."""
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            for name, p in model.named_parameters() if p.requires_grad}


def hf_side(hf_model: torch.nn.Module, row: PackedRow, backward: bool) -> SideResult:
    """HF reference: every document alone, logits concatenated; optional loss/backward over the whole row."""
    hf_model.zero_grad(set_to_none=True)
    pieces, start = [], 0
    with torch.set_grad_enabled(backward), RoutingCapture(hf_model) as routing:
        for n in row.document_lengths():
            pieces.append(hf_model(input_ids=row.input_ids[None, start:start + n], use_cache=False).logits)
            start += n
        logits = torch.cat(pieces, dim=1)
        if not backward:
            return SideResult(logits.detach(), routing=routing)
        loss = row_loss(logits, row)
        loss.backward()
    return SideResult(logits.detach(), loss.item(), parameter_grads(hf_model), routing)


def megatron_side(model: torch.nn.Module, row: PackedRow, backward: bool, replay: RoutingCapture | None = None) -> SideResult:
    """Megatron candidate: the packed row in one forward with position/document ids; with `replay` (a
    reference's routing), its expert choices are imposed so routing flips at near ties cannot mask numerics."""
    model.zero_grad(set_to_none=True)
    imposed = replay_routing(model, replay.indices(), row.length) if replay and replay.calls else nullcontext()
    with torch.set_grad_enabled(backward), RoutingCapture(model) as routing, imposed:
        logits = model(*row.model_inputs())
        if not backward:
            return SideResult(logits.detach(), routing=routing)
        loss = row_loss(logits, row)
        loss.backward()
    return SideResult(logits.detach(), loss.item(),
                      megatron_to_hf(parameter_grads(model), model.spec, allow_absent_rows=True), routing)


def forward_metrics(ref: SideResult, cand: SideResult, row: PackedRow, tie_margin: float = 0.0) -> dict[str, float]:
    """Log-prob metrics at every labelled position (label log-probs and full-distribution KL(HF || Megatron)),
    plus routing agreement on MoE models (expert-set flips within `tie_margin` of a tie are not decisive)."""
    out = logprob_metrics(ref.logits[0], cand.logits[0], row.labels, row.loss_mask)
    if ref.routing is not None and ref.routing.calls and cand.routing is not None and cand.routing.calls:
        out.update(routing_metrics(ref.routing, cand.routing, tie_margin))
    return out


def backward_metrics(ref: SideResult, cand: SideResult) -> dict[str, object]:
    """Loss relative difference and per-tensor gradient rel-L2 (worst tensor named)."""
    grads = named_tensor_metrics(ref.grads, cand.grads)
    return {
        "loss_hf": ref.loss, "loss_megatron": cand.loss,
        "loss_rel_diff": abs(cand.loss - ref.loss) / abs(ref.loss),
        "max_rel_l2": grads["max_rel_l2"], "worst": grads["worst"],
        "per_tensor_rel_l2": grads["per_tensor_rel_l2"],
    }


def load_hf_reference(hf_dir: str, depth: int | None = None, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> torch.nn.Module:
    """HF `Gemma4ForCausalLM` (eager attention, eager experts) from a text checkpoint, cut to `depth` layers."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from gemma4_support.config.families import truncate_config
    from gemma4_support.config.spec import read_config

    raw, _ = read_config(hf_dir)
    if depth is not None:
        raw = truncate_config(raw, depth)
    config = Gemma4TextConfig.from_dict({k: v for k, v in raw.items() if k != "dtype"})
    model = Gemma4ForCausalLM.from_pretrained(hf_dir, config=config, attn_implementation="eager",
                                              experts_implementation="eager", dtype=dtype)
    return model.to(device).train()


class RoutingCapture:
    """Records every router call's (weights, indices) per layer index, HF or Megatron, while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = []

    def __enter__(self) -> "RoutingCapture":
        routers = [(n, m) for n, m in self.model.named_modules() if type(m).__name__ in ("Gemma4TextRouter", "Gemma4Router")]
        for name, module in routers:
            index = int(name.split("layers.")[1].split(".")[0])
            self._handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def _hook(self, index: int):
        def hook(module, args, output):
            if len(output) == 3:  # HF: (probs, weights, indices)
                probs, weights, indices = output
            else:  # Megatron: (weights, indices used); its own top-k choice is kept apart (differs under replay)
                (weights, _), probs, indices = output, None, module.last_choice
            k = indices.shape[-1]
            self.calls.setdefault(index, []).append((
                weights.detach().float().reshape(-1, k), indices.detach().reshape(-1, k),
                None if probs is None else probs.detach().float().reshape(-1, probs.shape[-1])))
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def per_layer(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """{layer: (weights [T, k], indices [T, k], probs [T, E] or None)}, calls concatenated in packed token order."""
        out = {}
        for i, calls in self.calls.items():
            probs = None if calls[0][2] is None else torch.cat([c[2] for c in calls])
            out[i] = (torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]), probs)
        return out

    def indices(self) -> dict[int, torch.Tensor]:
        """{layer: expert indices [T, k]} — what router replay imposes."""
        return {i: idx for i, (_, idx, _) in self.per_layer().items()}


def routing_metrics(ref: RoutingCapture, cand: RoutingCapture, tie_margin: float) -> dict[str, float | str]:
    """Routing agreement of the worst layer (expert choices and, where they agree, weights), layer named."""
    ref_layers, cand_layers = ref.per_layer(), cand.per_layer()
    worst: dict[str, float | str] = {"router_decisive_mismatch_frac": 0.0, "router_token_mismatch_frac": 0.0,
                                     "router_weight_max_abs": 0.0, "router_worst_layer": ""}
    for i in sorted(ref_layers):
        ref_w, ref_idx, ref_probs = ref_layers[i]
        cand_w, cand_idx, _ = cand_layers[i]
        m = routing_agreement(ref_w, ref_idx, cand_w, cand_idx, ref_probs, tie_margin)
        key = (m["router_decisive_mismatch_frac"], m["router_token_mismatch_frac"], m["router_weight_max_abs"])
        if key >= (worst["router_decisive_mismatch_frac"], worst["router_token_mismatch_frac"], worst["router_weight_max_abs"]):
            worst = {**m, "router_worst_layer": str(i)}
    return worst
