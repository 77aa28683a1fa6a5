"""Stage hf_parity: the megatron-core Gemma 4 equals HF transformers' Gemma 4, forward and backward.

Models: both fixtures (MoE and dense), plus `--gemma4-model DIR` when given (cut to the depth covering every
layer family unless `--gemma4-full-depth`). Inputs: one sequence and one packed row of three documents, at
least 4 x the sliding window long (64 tokens = 8 windows on the fixtures), so sliding windows, document
boundaries inside windows, K=V and proportional RoPE on the full layer are all exercised. The HF reference
runs each document alone; Megatron runs the packed row once with position/document ids.
Sensitivity: each deliberately broken variant must fail the same forward gate.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from gemma4_support.attention.backends import DenseBackend
from gemma4_support.config.families import discover
from gemma4_support.config.spec import FULL, SLIDING, ModelSpec, load_spec
from gemma4_support.convert.checkpoint import HFCheckpoint, load_hf_weights
from gemma4_support.errors import MaskNotPreparedError
from gemma4_support.metrics import evaluate
from gemma4_support.model import rope as rope_module
from gemma4_support.model import router as router_module
from gemma4_support.model.attention import Gemma4Attention
from gemma4_support.model.build import build_model, model_spec
from gemma4_support.packing import PackedRow
from validation.parity import (
    backward_metrics, forward_metrics, hf_side, load_hf_reference, megatron_side, packed_lengths, random_row,
)
from validation.thresholds import (
    HF_PARITY_BACKWARD_FP32, HF_PARITY_FORWARD_BF16, HF_PARITY_FORWARD_FP32, HF_PARITY_ROUTER_FP32, ROUTER_TIE_MARGIN,
)

pytestmark = pytest.mark.stage_hf_parity

MIN_TOKENS = 64
LAYOUTS = ("single", "packed")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_id" in metafunc.fixturenames:
        ids = ["fixture-moe", "fixture-dense"]
        if metafunc.config.getoption("--gemma4-model"):
            ids.append("model")
        metafunc.parametrize("model_id", ids)


@dataclasses.dataclass(frozen=True)
class Subject:
    """A checkpoint under test, the depth it is cut to, and its (cut) spec."""

    hf_dir: Path
    depth: int | None
    spec: ModelSpec

    @property
    def seq_len(self) -> int:
        """At least 4 sliding windows and at least MIN_TOKENS."""
        return max(MIN_TOKENS, 4 * self.spec.sliding_window)

    def row(self, layout: str, seed: int) -> PackedRow:
        """The single-sequence or packed input row."""
        n, w = self.seq_len, self.spec.sliding_window
        lengths = (n,) if layout == "single" else packed_lengths(n, w)
        return random_row(lengths, self.spec.vocab_size, seed, pad_id=self.spec.pad_token_id)

    def info(self, row: PackedRow) -> dict:
        """Facts recorded next to the metrics."""
        return {"model_dir": str(self.hf_dir), "depth": self.spec.num_layers, "layer_types": self.spec.layer_types,
                "window": self.spec.sliding_window, "seq_len": row.length,
                "doc_lengths": row.document_lengths(), "windows_per_sequence": row.length / self.spec.sliding_window,
                "mlp": self.spec.layers[0].mlp, "k_eq_v_layers": [l.index for l in self.spec.layers if l.k_eq_v]}


def subject_for(model_id: str, config: pytest.Config) -> Subject:
    """Resolve a model id to its checkpoint and depth (the user's model is cut to its covering depth)."""
    if model_id.startswith("fixture-"):
        from fixtures.factory import fixture_dir

        hf_dir = fixture_dir(model_id.removeprefix("fixture-"))
        return Subject(hf_dir, None, load_spec(hf_dir))
    hf_dir = Path(config.getoption("--gemma4-model")).resolve()
    full = load_spec(hf_dir)
    depth = None if config.getoption("--gemma4-full-depth") else discover(full).truncation_depth
    return Subject(hf_dir, depth, model_spec(hf_dir, depth))


@functools.lru_cache(maxsize=4)
def hf_reference(hf_dir: Path, depth: int | None) -> torch.nn.Module:
    """The HF reference model, loaded once per process."""
    return load_hf_reference(str(hf_dir), depth)


@functools.lru_cache(maxsize=16)
def hf_forward(hf_dir: Path, depth: int | None, layout: str, seed: int, seq_len: int):
    """HF logits for one input (cached: sensitivity tests reuse them)."""
    subject = Subject(hf_dir, depth, model_spec(hf_dir, depth))
    row = subject.row(layout, seed)
    return row, hf_side(hf_reference(hf_dir, depth), row, backward=False)


def forward_gates(spec: ModelSpec) -> tuple:
    """fp32 forward gates: log-probs and KL, plus routing agreement on MoE models."""
    return HF_PARITY_FORWARD_FP32 + (HF_PARITY_ROUTER_FP32 if spec.moe else ())


def megatron_for(subject: Subject, spec: ModelSpec | None = None) -> torch.nn.Module:
    """The megatron-core model built for `spec` (default: the subject's) with the subject's weights."""
    model = build_model(spec or subject.spec)
    load_hf_weights(model, HFCheckpoint(subject.hf_dir))
    return model


# ---------------------------------------------------------------- parity, fp32 (CPU and GPU)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_parity(model_id: str, layout: str, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """Log-probs at every labelled position: max/mean abs difference, mean-abs-% and KL(HF || Megatron)."""
    subject = subject_for(model_id, pytestconfig)
    row, ref = hf_forward(subject.hf_dir, subject.depth, layout, gemma4_seed, subject.seq_len)
    cand = megatron_side(megatron_for(subject), row, backward=False, replay=ref.routing)
    stage_report.check(f"{model_id}/{layout}/forward_fp32", forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN),
                       forward_gates(subject.spec), **subject.info(row))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_parity(model_id: str, layout: str, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """One training step's loss and every parameter's gradient (rel-L2 per tensor, worst named)."""
    subject = subject_for(model_id, pytestconfig)
    row = subject.row(layout, gemma4_seed)
    ref = hf_side(hf_reference(subject.hf_dir, subject.depth), row, backward=True)
    cand = megatron_side(megatron_for(subject), row, backward=True, replay=ref.routing)
    metrics = backward_metrics(ref, cand)
    per_tensor = metrics.pop("per_tensor_rel_l2")
    stage_report.check(f"{model_id}/{layout}/backward_fp32", metrics, HF_PARITY_BACKWARD_FP32,
                       per_tensor_rel_l2=per_tensor, tensors_compared=len(per_tensor), **subject.info(row))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_parity_bf16(model_id: str, layout: str, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """bf16 on CUDA: Megatron bf16 vs HF bf16 on the same inputs."""
    subject = subject_for(model_id, pytestconfig)
    row = subject.row(layout, gemma4_seed).to("cuda")
    hf = load_hf_reference(str(subject.hf_dir), subject.depth, dtype=torch.bfloat16, device="cuda")
    ref = hf_side(hf, row, backward=False)
    del hf
    model = build_model(subject.spec, dtype=torch.bfloat16, device="cuda")
    load_hf_weights(model, HFCheckpoint(subject.hf_dir))
    cand = megatron_side(model, row, backward=False, replay=ref.routing)
    stage_report.check(f"{model_id}/{layout}/forward_bf16", forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN), HF_PARITY_FORWARD_BF16,
                       **subject.info(row))


# ---------------------------------------------------------------- a checkpoint saved by transformers itself


def save_with_transformers(path: Path, seed: int) -> Path:
    """Write a Gemma 4 checkpoint with `save_pretrained` (not the fixture factory): non-periodic layer types,
    v_proj on full layers (no K=V), untied lm_head, every ones-initialised scale moved away from 1."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, global_head_dim=128, sliding_window=6, hidden_size_per_layer_input=0,
        layer_types=[SLIDING, SLIDING, FULL, FULL, SLIDING], attention_k_eq_v=False, tie_word_embeddings=False,
        enable_moe_block=True, num_experts=3, top_k_experts=2, moe_intermediate_size=32, final_logit_softcapping=30.0,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(config)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("norm.weight", "layernorm.weight", "scale", "layer_scalar")) or "layernorm" in name:
                tensor.mul_(torch.empty_like(tensor).uniform_(0.6, 1.4))
    model.save_pretrained(path)
    return path


def test_transformers_saved_checkpoint(tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """A directory written by transformers itself, cut to its covering depth like any --gemma4-model."""
    save_with_transformers(tmp_path, gemma4_seed)
    spec_full = load_spec(tmp_path)
    depth = discover(spec_full).truncation_depth
    subject = Subject(tmp_path, depth, model_spec(tmp_path, depth))
    assert subject.spec.layer_types == [SLIDING, SLIDING, FULL] and spec_full.layer_types[-1] == FULL
    row = subject.row("packed", gemma4_seed)
    ref = hf_side(load_hf_reference(str(tmp_path), depth), row, backward=True)
    cand = megatron_side(megatron_for(subject), row, backward=True, replay=ref.routing)
    stage_report.check("transformers-saved/packed/forward_fp32", forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN),
                       forward_gates(subject.spec), **subject.info(row))
    metrics = backward_metrics(ref, cand)
    metrics.pop("per_tensor_rel_l2")
    stage_report.check("transformers-saved/packed/backward_fp32", metrics, HF_PARITY_BACKWARD_FP32, **subject.info(row))


def test_masks_are_prepared_before_the_layers() -> None:
    """A forward given masks without the global window raises instead of building one on the fly."""
    from fixtures.factory import fixture_dir

    subject = Subject(fixture_dir("dense"), None, load_spec(fixture_dir("dense")))
    row = subject.row("packed", 0)
    model = megatron_for(subject)
    ids, pos, doc = row.model_inputs()
    only_sliding = DenseBackend().prepare(pos, doc, [subject.spec.sliding_window])
    with pytest.raises(MaskNotPreparedError, match="None"):
        model(ids, pos, doc, masks=only_sliding)


# ---------------------------------------------------------------- sensitivity: broken variants must fail the gate


def _off_by_one_window(spec: ModelSpec) -> ModelSpec:
    layers = tuple(dataclasses.replace(l, window=l.window + 1) if l.window else l for l in spec.layers)
    return dataclasses.replace(spec, layers=layers)


def _full_as_sliding(spec: ModelSpec) -> ModelSpec:
    layers = tuple(dataclasses.replace(l, window=spec.sliding_window) if l.layer_type == FULL else l for l in spec.layers)
    return dataclasses.replace(spec, layers=layers)


def _partial_rope(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proportional RoPE built as ordinary partial RoPE (Megatron's rotary_percent): only the first
    factor*head_dim lanes rotate, with denominator factor*head_dim and pairing inside those lanes."""
    original_inv, original_apply = rope_module.inverse_frequencies, rope_module.apply_rotary

    def inverse_frequencies(rope, head_dim):
        if rope.rope_type != "proportional":
            return original_inv(rope, head_dim)
        rot = int(head_dim * rope.partial_rotary_factor)
        return 1.0 / (rope.theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))

    def apply_rotary(x, cos, sin):
        rot = cos.shape[-1]
        if rot == x.shape[-1]:
            return original_apply(x, cos, sin)
        return torch.cat((original_apply(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)

    monkeypatch.setattr(rope_module, "inverse_frequencies", inverse_frequencies)
    monkeypatch.setattr(rope_module, "apply_rotary", apply_rotary)


def _v_after_k_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Gemma4Attention.split_qkv

    def split_qkv(self, mixed):
        query, key, value = original(self, mixed)
        return (query, key, self.k_layernorm(key)) if self.k_eq_v else (query, key, value)

    monkeypatch.setattr(Gemma4Attention, "split_qkv", split_qkv)


def _router_without_renormalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    def route(logits, top_k, per_expert_scale, replay=None):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, k=top_k, dim=-1) if replay is None else (probs.gather(-1, replay), replay)
        return weights * per_expert_scale[indices], indices

    monkeypatch.setattr(router_module, "route", route)


def _router_without_expert_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    def route(logits, top_k, per_expert_scale, replay=None):
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, k=top_k, dim=-1) if replay is None else (probs.gather(-1, replay), replay)
        return weights / weights.sum(-1, keepdim=True), indices

    monkeypatch.setattr(router_module, "route", route)


SPEC_BREAKS = {"window_off_by_one": _off_by_one_window, "full_layer_as_sliding": _full_as_sliding}
PATCH_BREAKS = {
    "proportional_rope_as_partial": _partial_rope,
    "v_after_k_norm": _v_after_k_norm,
    "router_without_renormalisation": _router_without_renormalisation,
    "router_without_per_expert_scale": _router_without_expert_scale,
}


@pytest.mark.parametrize("variant", [*SPEC_BREAKS, *PATCH_BREAKS, "embedding_scale_dropped"])
def test_sensitivity(variant: str, monkeypatch: pytest.MonkeyPatch, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """Break one thing on purpose (MoE fixture: K=V full layer, routed experts, 8 windows, packed row): the
    forward fp32 gates must fail. (No top-k renormalisation is invisible in the logits — the per-token weight
    sum cancels in post_feedforward_layernorm_2 — and is caught by the routing gate only; recorded.)"""
    subject = subject_for("fixture-moe", pytestconfig)
    row, ref = hf_forward(subject.hf_dir, subject.depth, "packed", gemma4_seed, subject.seq_len)
    spec = SPEC_BREAKS[variant](subject.spec) if variant in SPEC_BREAKS else subject.spec
    if variant in PATCH_BREAKS:
        PATCH_BREAKS[variant](monkeypatch)
    model = megatron_for(subject, spec)
    if variant == "embedding_scale_dropped":
        model.embedding.scale = 1.0
    cand = megatron_side(model, row, backward=False, replay=ref.routing)
    metrics = forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN)
    by_logprobs = not all(r.passed for r in evaluate(metrics, HF_PARITY_FORWARD_FP32))
    stage_report.expect_caught(f"sensitivity/{variant}", metrics, forward_gates(subject.spec),
                               caught_by_logprob_gates=by_logprobs, **subject.info(row))


def test_sensitivity_pad_row_trained_through_lookups(stage_report, pytestconfig, gemma4_seed: int) -> None:
    """HF's embedding has padding_idx = pad_token_id: the pad row gets no gradient from lookups. A model that
    trains it anyway (found on the H200 at 4096 tokens, where the pad id appears by chance) must fail the
    gradient gate; the row always plants one pad token."""
    subject = subject_for("fixture-dense", pytestconfig)
    row = subject.row("packed", gemma4_seed)
    ref = hf_side(hf_reference(subject.hf_dir, subject.depth), row, backward=True)
    model = megatron_for(subject)
    model.embedding.pad_token_id = None
    metrics = backward_metrics(ref, megatron_side(model, row, backward=True))
    metrics.pop("per_tensor_rel_l2")
    stage_report.expect_caught("sensitivity/pad_row_trained_through_lookups", metrics, HF_PARITY_BACKWARD_FP32,
                               **subject.info(row))


def test_router_replay_refuses_bad_choices() -> None:
    """Replayed expert choices must cover every MoE layer with one top-k row per token, inside the expert range."""
    from gemma4_support.errors import Gemma4Error
    from gemma4_support.model.router_replay import replay_routing, routers_by_layer

    subject = subject_for("fixture-moe", None)
    model = megatron_for(subject)
    k, experts = subject.spec.moe.top_k, subject.spec.moe.num_experts
    good = {layer: torch.zeros(10, k, dtype=torch.long) for layer in routers_by_layer(model)}
    with pytest.raises(Gemma4Error, match=r"no expert choices for MoE layer\(s\) \[0\]"):
        with replay_routing(model, {l: v for l, v in good.items() if l != 0}, 10):
            pass
    with pytest.raises(Gemma4Error, match=r"shape \(10, 2\), expected \(12, 2\)"):
        with replay_routing(model, good, 12):
            pass
    with pytest.raises(Gemma4Error, match="outside"):
        with replay_routing(model, {**good, 1: torch.full((10, k), experts)}, 10):
            pass
    with replay_routing(model, good, 10):
        assert all(r.replay is not None for r in routers_by_layer(model).values())
    assert all(r.replay is None for r in routers_by_layer(model).values())


def test_cli_runs_the_stage_on_a_transformers_checkpoint(tmp_path: Path, gemma4_seed: int) -> None:
    """`gemma4-validate run --stages hf_parity --model DIR` on a directory saved by transformers writes the stage
    JSON with forward and backward metrics for that model (cut to 3 layers: s, s, f)."""
    import json
    import subprocess
    import sys

    model_dir = save_with_transformers(tmp_path / "ckpt", gemma4_seed)
    reports = tmp_path / "reports"
    out = subprocess.run(
        [sys.executable, "-m", "validation.cli", "run", "--stages", "hf_parity", "--model", str(model_dir),
         "--report-dir", str(reports), "--workers", "0", "--", "-k", "model and parity and not fixture and not bf16"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    (run,) = [p for p in reports.iterdir() if p.is_dir()]
    doc = json.loads((run / "hf_parity.json").read_text())
    cases = {r["case"]: r for t in doc["tests"] for r in t["records"]}
    assert {"model/single/forward_fp32", "model/packed/forward_fp32", "model/packed/backward_fp32"} <= set(cases)
    assert all(r["passed"] for r in cases.values() if r["kind"] == "gate")
    assert cases["model/packed/forward_fp32"]["info"]["layer_types"] == [SLIDING, SLIDING, FULL]
    assert doc["provenance"]["model"]["path"] == str(model_dir)
