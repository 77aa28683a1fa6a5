"""Stage hf_parity, the gates relative to HF's own precision, and what they stand on.

* Router replay on the HF side (`HFRoutingReplay`): replaying HF's own choices changes nothing, bit for bit;
  replaying other choices changes the output; a record that does not fit the run is refused. The routing gate
  matches weights expert by expert (the same experts in another slot order must pass).
* bf16 (the GPU test's code path, run here on CPU): Megatron bf16's distance from the HF fp32 reference within 1.25 x
  HF bf16's and under the absolute ceiling; a Megatron that computes RMSNorm in bf16 (Gemma computes it in fp32) fails
  the relative gates, one without the embedding scale the ceiling too.
* Gradients fp32 cannot resolve (top-1 routing) are judged against fp64; a router that renormalises after the
  per-expert scale (which top-1 hides from the logits) fails that gate.
The fp32 log-prob gate's own sensitivity (sqrt(hidden) rounded to bf16) is in test_hf_parity.py::test_sensitivity."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.configs import TINY_MOE, tiny_text_config
from gemma4_support.config.spec import load_spec
from gemma4_support.metrics import evaluate
from gemma4_support.model import norm as norm_module
from gemma4_support.model import router as router_module
from validation.hf_checkpoints import Subject, bf16_step, hf_model, megatron_model, save_random_checkpoint
from validation.parity import (
    HFRoutingReplay, forward_metrics, fp32_floor_metrics, fp32_gates, fp32_step, hf_side, megatron_side,
)
from validation.test_hf_parity import bf16_gates, forward_case, hf_runs, subject_for
from validation.thresholds import HF_PARITY_BACKWARD_FP32, HF_PARITY_BACKWARD_FP32_UNRESOLVED, ROUTER_TIE_MARGIN

pytestmark = pytest.mark.stage_hf_parity


def _documents(model: torch.nn.Module, row) -> torch.Tensor:
    """The model's logits on each document of the row alone, concatenated (what hf_side runs)."""
    starts = [0, *torch.tensor(row.document_lengths()).cumsum(0).tolist()]
    return torch.cat([model(input_ids=row.input_ids[None, a:b], use_cache=False).logits for a, b in zip(starts, starts[1:])],
                     dim=1)


@torch.no_grad()
def test_hf_routing_replay_is_exact_and_takes_effect(stage_report, gemma4_seed: int) -> None:
    """HF fp32 replaying its own expert choices reproduces its logits bit for bit; replaying other experts changes
    them; the fp64 run consumes exactly the recorded rows; a short record is refused."""
    subject = subject_for("fixture-moe", None)
    hf32 = hf_model(subject.hf_dir, None)
    row = subject.row("packed", gemma4_seed)
    own = hf_side(hf32, row, backward=False)
    again = hf_side(hf32, row, backward=False, replay=own.routing)
    experts = subject.spec.moe.num_experts
    with HFRoutingReplay(hf32, {layer: (idx + 1) % experts for layer, idx in own.routing.indices().items()}):
        other = _documents(hf32, row)
    assert torch.equal(again.logits, own.logits)
    moved = (other - own.logits).abs().max().item()
    assert moved > 1e-2
    replay = HFRoutingReplay(hf_model(subject.hf_dir, None, torch.float64), own.routing.indices())
    with replay:
        _documents(replay.model, row)
    assert replay.used == {layer: row.length for layer in own.routing.indices()}
    with pytest.raises(ValueError, match="ran out of recorded tokens"):
        with HFRoutingReplay(hf32, {layer: idx[:3] for layer, idx in own.routing.indices().items()}):
            hf32(input_ids=row.input_ids[None, :8], use_cache=False)
    stage_report.record("hf_routing_replay", own_replay_bitwise_equal=True, shifted_replay_max_abs_logit_change=moved,
                        fp64_rows_consumed=replay.used)


class _SlotsReversed:
    """A recorded routing with every token's top-k slots in reverse order (the same experts)."""

    def __init__(self, capture) -> None:
        self.calls = capture.calls
        self._indices = {layer: idx.flip(-1) for layer, idx in capture.indices().items()}

    def indices(self) -> dict:
        """{layer: reversed indices [T, k]}."""
        return self._indices


def test_routing_gate_matches_weights_expert_by_expert(stage_report, gemma4_seed: int) -> None:
    """Replaying HF's choices with each token's slots reversed (the same experts in another order, which near-equal
    probabilities produce) must leave the routing gates passing: weights are compared expert by expert. Found on the
    H200 (26B-A4B shapes, 4096 tokens): one token's swapped slots compared two experts' weights (5.5e-3)."""
    subject = subject_for("fixture-moe", None)
    row, ref, truth = hf_runs(subject.hf_dir, subject.depth, "packed", gemma4_seed)
    straight = forward_case(megatron_model(subject), row, ref, truth)
    cand = megatron_side(megatron_model(subject), row, backward=False, replay=_SlotsReversed(ref.routing))
    metrics = {**forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN), **fp32_floor_metrics(truth, ref, cand, row)}
    stage_report.check("routing/slots_reversed_replay", metrics, fp32_gates(metrics, True),
                       router_weight_max_abs_straight=straight["router_weight_max_abs"], **subject.info(row))


@pytest.mark.parametrize("variant", ["moe", "dense"])
def test_bf16_gates_on_cpu(variant: str, stage_report, gemma4_seed: int) -> None:
    """The GPU bf16 test's code path on CPU (fixtures, packed row): both bf16 distances from fp32 recorded, gated."""
    subject = subject_for(f"fixture-{variant}", None)
    metrics, row = bf16_step(subject, "packed", gemma4_seed, "cpu")
    stage_report.check(f"fixture-{variant}/packed/forward_bf16_cpu", metrics, bf16_gates(metrics), **subject.info(row))


def _norm_in_bf16(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm without the fp32 upcast (Gemma computes its norms in fp32)."""
    out = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return out if weight is None else out * weight


_norm_in_bf16.eager = _norm_in_bf16  # every norm: the modules' and those inlined in the layer's fused regions


def _embedding_scale_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """No sqrt(hidden) embedding scale: far beyond bf16 rounding, so the absolute ceiling fails too."""
    from gemma4_support.model.model import Gemma4Embedding

    original = Gemma4Embedding.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.scale = 1.0

    monkeypatch.setattr(Gemma4Embedding, "__init__", init)


BF16_BREAKS = {
    "norm_without_fp32": lambda mp: mp.setattr(norm_module, "rms_norm", _norm_in_bf16),
    "embedding_scale_dropped": _embedding_scale_dropped,
}


@pytest.mark.parametrize("variant", list(BF16_BREAKS))
def test_sensitivity_bf16(variant: str, monkeypatch: pytest.MonkeyPatch, stage_report, gemma4_seed: int) -> None:
    """Megatron's RMSNorm computed in bf16 (Gemma computes it in fp32): its distance from fp32 grows past 1.25 x HF
    bf16's (dense fixture). The embedding scale dropped: past the absolute ceiling as well."""
    subject = subject_for("fixture-dense", None)
    BF16_BREAKS[variant](monkeypatch)
    metrics, row = bf16_step(subject, "packed", gemma4_seed, "cpu")
    gates = bf16_gates(metrics)
    ceiling = [r.describe() for r in evaluate(metrics, gates[2:]) if not r.passed]
    stage_report.expect_caught(f"sensitivity/bf16_{variant}", metrics, gates, ceiling_failed=ceiling,
                               **subject.info(row))
    assert bool(ceiling) == (variant == "embedding_scale_dropped")  # the ceiling itself can fail


def _renormalise_after_scale(logits, top_k, per_expert_scale, replay=None):
    """The router with per_expert_scale applied BEFORE the top-k renormalisation (it then cancels on top-1)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, k=top_k, dim=-1) if replay is None else (probs.gather(-1, replay), replay)
    weights = weights * per_expert_scale[indices]
    return weights / weights.sum(dim=-1, keepdim=True), indices


def top1_subject(path: Path, seed: int) -> Subject:
    """A transformers-written top-1 MoE checkpoint (4 experts)."""
    save_random_checkpoint(path, tiny_text_config(**{**TINY_MOE, "top_k_experts": 1}), seed)
    return Subject(path, None, load_spec(path))


def test_sensitivity_unresolved_gradient_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_report,
                                             gemma4_seed: int) -> None:
    """Top-1 routing: the router's and per_expert_scale's gradients are below fp32 resolution (judged against fp64).
    Renormalising after the per-expert scale makes per_expert_scale inert — invisible in the logits and in the
    routing weights' gate on top-1 (both sides' weights are then per-token constants the post-norm cancels) — and
    must fail the gradient gate measured against fp64."""
    subject = top1_subject(tmp_path, gemma4_seed)
    monkeypatch.setattr(router_module, "route", _renormalise_after_scale)
    row = subject.row("packed", gemma4_seed)
    _, bwd = fp32_step(hf_model(tmp_path, None), hf_model(tmp_path, None, torch.float64), megatron_model(subject), row,
                       backward=True)
    bwd.pop("per_tensor_rel_l2")
    stage_report.expect_caught("sensitivity/renormalise_after_per_expert_scale_top1", bwd,
                               HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED, **subject.info(row))
    assert bwd["max_rel_l2"] <= HF_PARITY_BACKWARD_FP32[1].threshold  # only the fp64-relative gate sees it
