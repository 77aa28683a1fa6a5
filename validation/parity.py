"""HF transformers vs megatron-core Gemma 4 on the same tokens: inputs, the two sides, and the metrics.

The HF reference (`Gemma4ForCausalLM`, or `Gemma4ForConditionalGeneration` for a multimodal `gemma4` wrapper
checkpoint, eager attention and experts) runs every document of a packed row alone (positions restart at 0)
and its logits are concatenated; the Megatron model runs the packed row once with position_ids /
document_ids. Labels are the next token within each document; the last token of each document has no label.
Loss = mean token cross entropy over labelled positions (fp32) on both sides. Megatron gradients are mapped
to HF names through the same table as the weights (`convert.mapping`).

Precision references: the same HF checkpoint run in fp64 (`HF fp32`'s distance from it is the fp32 rounding
floor the fp32 gate is relative to) and in bf16; both get the fp32 run's expert choices imposed through
`HFRoutingReplay` (router replay on the HF side), so a near-tie flip cannot pass for a numerical difference.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma4_support.convert.checkpoint import megatron_to_hf
from gemma4_support.convert.mapping import NON_TEXT_PREFIXES
from gemma4_support.loss import token_loss
from gemma4_support.metrics import Gate, logprob_metrics, routing_agreement, tensor_diff
from gemma4_support.model.router_replay import replay_routing
from gemma4_support.packing import PackedRow, pack
from validation.thresholds import (
    HF_PARITY_BACKWARD_FP32, HF_PARITY_BACKWARD_FP32_UNRESOLVED, HF_PARITY_GRAD_NOISE_FLOOR, HF_PARITY_GRAD_RESOLVED,
    HF_PARITY_GRAD_SMALL, HF_PARITY_ROUTER_FP32, ROUTER_TIE_MARGIN, hf_parity_forward_fp32,
)


def random_row(doc_lengths: tuple[int, ...], vocab_size: int, seed: int, low: int = 0,
               pad_id: int | None = None, exclude: tuple[int, ...] = ()) -> PackedRow:
    """A deterministic random row packing documents of the given lengths (token ids in [low, vocab)); `pad_id`
    is planted at position 1 so the pad row's gradient rule (HF's padding_idx) is always exercised. Ids in
    `exclude` (a wrapper's image/video/audio placeholders, which its forward swaps for pad) are never drawn."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(doc_lengths)
    ids = torch.randint(low, vocab_size, (1, total), generator=gen)
    for token in sorted(exclude):
        ids[ids == token] = low + (token + 1 - low) % (vocab_size - low)
    if exclude and bool(torch.isin(ids, torch.tensor(sorted(exclude))).any()):
        raise ValueError(f"random_row could not avoid the excluded ids {sorted(exclude)}")
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
    """Every trainable text-model parameter's gradient by name (zeros where backward left none); a multimodal
    wrapper's vision/audio towers are not part of the text model and are left out."""
    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
            for name, p in model.named_parameters() if p.requires_grad and not name.startswith(NON_TEXT_PREFIXES)}


def hf_side(hf_model: torch.nn.Module, row: PackedRow, backward: bool,
            replay: RoutingCapture | None = None) -> SideResult:
    """HF reference: every document alone, logits concatenated; optional loss/backward over the whole row. With
    `replay` (another run's routing), its expert choices are imposed on HF's routers (`HFRoutingReplay`); the
    recorded routing is still HF's own choice."""
    hf_model.zero_grad(set_to_none=True)
    pieces, start = [], 0
    imposed = HFRoutingReplay(hf_model, replay.indices()) if replay and replay.calls else nullcontext()
    with torch.set_grad_enabled(backward), RoutingCapture(hf_model) as routing, imposed:
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


def rel_l2(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Relative L2 of `candidate` against `reference`; 0 for identical tensors (two all-zero gradients included)."""
    return tensor_diff(reference, candidate)["rel_l2"]


def backward_metrics(ref: SideResult, cand: SideResult, truth: SideResult | None = None,
                     resolved: tuple[float, float] | None = None) -> dict[str, object]:
    """Loss relative difference and per-tensor gradient rel-L2 against HF fp32 (worst tensor named).

    With `truth` (the HF fp64 run, same expert choices) and `resolved` = (rel-L2, size): a tensor fp32 cannot
    resolve — HF fp32's gradient more than `rel-L2` from the fp64 one, or the fp64 gradient's norm below `size` x
    the model's largest (a cancellation, or a gradient that is exactly zero) — leaves `max_rel_l2`; those are judged
    together against fp64 instead (`unresolved_metrics`). Neither test looks at Megatron's gradient."""
    if set(ref.grads) != set(cand.grads):
        raise ValueError(f"gradient names differ between HF and Megatron: {sorted(set(ref.grads) ^ set(cand.grads))[:8]}")
    per = {name: rel_l2(ref.grads[name], cand.grads[name]) for name in sorted(ref.grads)}
    out: dict[str, object] = {"loss_hf": ref.loss, "loss_megatron": cand.loss,
                              "loss_rel_diff": abs(cand.loss - ref.loss) / abs(ref.loss)}
    unresolved: list[str] = []
    if truth is not None:
        floor = {name: rel_l2(truth.grads[name], ref.grads[name]) for name in per}
        norms = {name: truth.grads[name].to(torch.float64).norm().item() for name in per}
        largest = max(norms.values(), default=0.0)
        unresolved = [name for name in per if floor[name] > resolved[0] or norms[name] < resolved[1] * largest]
        out["hf_fp32_grad_vs_fp64_max_rel_l2"] = max((floor[n] for n in per if n not in unresolved), default=0.0)
        out.update(unresolved_metrics(ref, cand, truth, unresolved, HF_PARITY_GRAD_NOISE_FLOOR * largest))
    gated = {n: v for n, v in per.items() if n not in unresolved}
    worst = max(gated, key=gated.get) if gated else ""
    out.update(max_rel_l2=gated[worst] if gated else 0.0, worst=worst, per_tensor_rel_l2=per)
    return out


def unresolved_metrics(ref: SideResult, cand: SideResult, truth: SideResult, names: list[str],
                       noise: float) -> dict[str, object]:
    """Megatron's and HF fp32's root-sum-square gradient error from fp64 over `names`, and their ratio, with HF's
    error floored at `noise` (an error below it counts as zero: HF fp32 is sometimes exactly right on a gradient
    that is pure rounding noise, which would make any ratio infinite)."""
    def error(side: SideResult, name: str) -> float:
        return (side.grads[name].to(torch.float64) - truth.grads[name].to(torch.float64)).norm().item()

    megatron = {name: error(cand, name) for name in names}
    hf = sum(error(ref, name) ** 2 for name in names) ** 0.5
    total = sum(e * e for e in megatron.values()) ** 0.5
    allowed = max(hf, noise)
    return {"unresolved_grad_tensors": len(names), "unresolved_grad_error_hf": hf, "unresolved_grad_error_megatron": total,
            "unresolved_grad_vs_fp64_ratio": total / allowed if allowed else (0.0 if total == 0 else float("inf")),
            "unresolved_worst": max(megatron, key=megatron.get) if megatron else ""}


def load_hf_reference(hf_dir: str, depth: int | None = None, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> torch.nn.Module:
    """The HF reference (eager attention, eager experts) cut to `depth` layers: `Gemma4ForCausalLM` for a text
    checkpoint; for a multimodal `gemma4` wrapper, transformers' own `Gemma4ForConditionalGeneration`, which
    reads the text model from `text_config` and `model.language_model.*` (its towers, if any, stay idle)."""
    import transformers
    from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

    from gemma4_support.config.families import truncate_config
    from gemma4_support.config.spec import WRAPPER_MODEL_TYPE, read_config

    transformers.logging.set_verbosity_error()  # a cut checkpoint's deeper layers are "unexpected keys"
    transformers.utils.logging.disable_progress_bar()
    raw, _ = read_config(hf_dir)
    if depth is not None:
        raw = truncate_config(raw, depth)
    raw = {k: v for k, v in raw.items() if k != "dtype"}
    wrapped = raw.get("model_type") == WRAPPER_MODEL_TYPE
    config = (Gemma4Config if wrapped else Gemma4TextConfig).from_dict(raw)
    cls = Gemma4ForConditionalGeneration if wrapped else Gemma4ForCausalLM
    model = cls.from_pretrained(hf_dir, config=config, attn_implementation="eager", experts_implementation="eager",
                                dtype=dtype)
    return model.to(device).train()


def placeholder_token_ids(hf_dir: str | Path) -> tuple[int, ...]:
    """The multimodal wrapper's image/video/audio placeholder ids (its forward replaces them with pad before the
    text model runs); () for a text checkpoint."""
    from transformers import Gemma4Config

    from gemma4_support.config.spec import WRAPPER_MODEL_TYPE, read_config

    raw, _ = read_config(hf_dir)
    if raw.get("model_type") != WRAPPER_MODEL_TYPE:
        return ()
    keys = ("image_token_id", "video_token_id", "audio_token_id")
    defaults = {k: getattr(Gemma4Config, k, None) for k in keys}
    return tuple(sorted({raw.get(k, defaults[k]) for k in keys} - {None}))


class RoutingCapture:
    """Records every router call's (weights, indices) per layer index, HF or Megatron, while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = []

    def __enter__(self) -> "RoutingCapture":
        for index, module in _routers(self.model, ("Gemma4TextRouter", "Gemma4Router")):
            self._handles.append(module.register_forward_hook(self._hook(index)))
        return self

    def _hook(self, index: int):
        def hook(module, args, output):
            if len(output) == 3:  # HF: (probs, weights, indices)
                probs, weights, indices = output
            else:  # Megatron: (weights, indices used); its own top-k choice is kept apart (differs under replay)
                (weights, used), probs, indices = output, None, module.last_choice
                weights = aligned_weights(weights, used, indices)
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


def aligned_weights(weights: torch.Tensor, used: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Routing weights given for the experts `used` (replayed, in the replay's slot order), put in the slot order of
    the router's own `choice`: wherever the two are the same set, slot j then holds the weight of expert choice[j]
    (the same set in another order — near-equal probabilities — must not compare one expert's weight with another's)."""
    by_expert = weights.gather(-1, used.argsort(dim=-1))
    return by_expert.gather(-1, choice.argsort(dim=-1).argsort(dim=-1))


def _routers(model: torch.nn.Module, kinds: tuple[str, ...]) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) of every router of the given class names."""
    return [(int(name.split("layers.")[1].split(".")[0]), module) for name, module in model.named_modules()
            if type(module).__name__ in kinds]


class HFRoutingReplay:
    """Router replay on the HF side: while active, every HF `Gemma4TextRouter` call takes the next rows of its layer's
    recorded [T, k] expert indices (calls consume them in packed token order) and recomputes its weights from its
    own probabilities the way HF does — gather, renormalise to sum 1, x per_expert_scale — as Megatron's
    `route(..., replay=...)` does. Every recorded row must be consumed, else the run and the record disagree."""

    def __init__(self, model: torch.nn.Module, indices: Mapping[int, torch.Tensor]) -> None:
        self.model = model
        self.indices = indices
        self.used: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> "HFRoutingReplay":
        routers = _routers(self.model, ("Gemma4TextRouter",))
        missing = sorted({layer for layer, _ in routers} - set(self.indices))
        if missing:
            raise ValueError(f"HF routing replay has no expert choices for MoE layer(s) {missing}")
        for layer, module in routers:
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def _hook(self, layer: int):
        def hook(module, args, output):
            probs = output[0]
            start = self.used.get(layer, 0)
            indices = self.indices[layer][start:start + probs.shape[0]].to(probs.device)
            if indices.shape[0] != probs.shape[0]:
                raise ValueError(f"HF routing replay for layer {layer} ran out of recorded tokens at {start}")
            self.used[layer] = start + probs.shape[0]
            weights = probs.gather(-1, indices)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            return probs, weights * module.per_expert_scale[indices], indices
        return hook

    def __exit__(self, exc_type, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if exc_type is None:
            short = {l: (self.used.get(l, 0), len(t)) for l, t in self.indices.items() if self.used.get(l, 0) != len(t)}
            if short:
                raise ValueError(f"HF routing replay used (rows, recorded) = {short}: the run and the record disagree")


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


# ---------------------------------------------------------------- precision references (fp64, bf16)


def fp32_floor_metrics(truth: SideResult, hf32: SideResult, cand: SideResult, row: PackedRow) -> dict[str, float]:
    """HF fp32's and Megatron fp32's distance from the HF fp64 run (label log-probs, KL): the fp32 rounding floor."""
    hf = logprob_metrics(truth.logits[0], hf32.logits[0], row.labels, row.loss_mask)
    meg = logprob_metrics(truth.logits[0], cand.logits[0], row.labels, row.loss_mask)
    return {"hf_fp32_vs_fp64_max_abs_logprob": hf["max_abs_logprob"], "hf_fp32_vs_fp64_mean_kl": hf["mean_kl"],
            "megatron_fp32_vs_fp64_max_abs_logprob": meg["max_abs_logprob"], "megatron_fp32_vs_fp64_mean_kl": meg["mean_kl"]}


def fp32_step(hf32: torch.nn.Module, hf64: torch.nn.Module, model: torch.nn.Module, row: PackedRow,
              backward: bool) -> tuple[dict[str, object], dict[str, object] | None]:
    """One fp32 parity step on `row`: HF fp32 with its own routing; HF fp64 and Megatron fp32 with HF fp32's expert
    choices imposed. Returns the forward metrics (with the fp32 floor) and, with `backward`, the loss and gradient
    metrics (gradients fp32 cannot resolve judged against fp64)."""
    ref = hf_side(hf32, row, backward)
    truth = hf_side(hf64, row, backward, replay=ref.routing)
    cand = megatron_side(model, row, backward, replay=ref.routing)
    fwd = {**forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN), **fp32_floor_metrics(truth, ref, cand, row)}
    if not backward:
        return fwd, None
    bwd = backward_metrics(ref, cand, truth, (HF_PARITY_GRAD_RESOLVED, HF_PARITY_GRAD_SMALL))
    return fwd, bwd


def fp32_gates(forward: Mapping[str, object], moe: bool, backward: bool = False) -> tuple[Gate, ...]:
    """The fp32 gates for measured forward metrics: log-probs relative to the fp32 floor, KL, routing on MoE models,
    and with `backward` the loss and gradient gates."""
    gates = hf_parity_forward_fp32(float(forward["hf_fp32_vs_fp64_max_abs_logprob"]))
    gates += HF_PARITY_ROUTER_FP32 if moe else ()
    return gates + (HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED if backward else ())


def low_precision_step(hf32: torch.nn.Module, hf_low: torch.nn.Module, model_low: torch.nn.Module, row: PackedRow,
                       tag: str = "bf16") -> dict[str, float]:
    """HF fp32 (the reference, its own routing), then HF and Megatron in low precision with its expert choices
    imposed: `low_precision_metrics`."""
    ref = hf_side(hf32, row, backward=False)
    hf = hf_side(hf_low, row, backward=False, replay=ref.routing)
    cand = megatron_side(model_low, row, backward=False, replay=ref.routing)
    return low_precision_metrics(ref, hf, cand, row, tag)


def low_precision_metrics(ref32: SideResult, hf_low: SideResult, cand_low: SideResult, row: PackedRow,
                          tag: str = "bf16") -> dict[str, float]:
    """Each low-precision side's distance from the fp32 reference (label log-prob mean-abs-% and KL), and the
    two sides' distance from each other."""
    out = {}
    for side, result in (("hf", hf_low), ("megatron", cand_low)):
        m = logprob_metrics(ref32.logits[0], result.logits[0], row.labels, row.loss_mask)
        out[f"{side}_{tag}_vs_fp32_mean_abs_pct"] = m["logprob_mean_abs_pct"]
        out[f"{side}_{tag}_vs_fp32_mean_kl"] = m["mean_kl"]
        out[f"{side}_{tag}_vs_fp32_max_abs_logprob"] = m["max_abs_logprob"]
    mutual = logprob_metrics(hf_low.logits[0], cand_low.logits[0], row.labels, row.loss_mask)
    out[f"megatron_vs_hf_{tag}_mean_abs_pct"] = mutual["logprob_mean_abs_pct"]
    out[f"megatron_vs_hf_{tag}_mean_kl"] = mutual["mean_kl"]
    return out
