"""Stage hf_parity: the megatron-core Gemma 4 equals HF transformers' Gemma 4, forward and backward.

Models: both fixtures (MoE and dense), plus `--gemma4-model DIR` when given (cut to the depth covering every
layer family unless `--gemma4-full-depth`). Inputs: one sequence and one packed row of three documents, at
least 4 x the sliding window long (64 tokens = 8 windows on the fixtures), so sliding windows, document
boundaries inside windows, K=V and proportional RoPE on the full layer are all exercised. The HF reference
runs each document alone; Megatron runs the packed row once with position/document ids.
fp32 log-probs are gated relative to HF fp32's own distance from an fp64 run (routing replayed on the HF side);
Sensitivity: each deliberately broken variant must fail the same forward gate.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from fixtures.configs import TINY_MOE, tiny_text_config
from gemma4_support.attention.backends import DenseBackend
from gemma4_support.config.families import discover
from gemma4_support.config.spec import FULL, SLIDING, ModelSpec, load_spec
from gemma4_support.errors import MaskNotPreparedError
from gemma4_support.lora import LoraConfig, attach_lora, detach_lora
from gemma4_support.metrics import Gate, evaluate, max_ulps, named_tensor_metrics, tensor_diff
from gemma4_support.model import attention as layer_attention
from gemma4_support.model import layer as layer_module
from gemma4_support.model import mlp as mlp_module
from gemma4_support.model import rope as rope_module
from gemma4_support.model import router as router_module
from gemma4_support.model.attention import Gemma4Attention
from gemma4_support.model.build import model_spec
from validation.hf_checkpoints import (LAYOUTS, Subject, bf16_step, hf_model, megatron_model, run_stage_on_checkpoint,
                                      save_random_checkpoint)
from validation.parity import (
    backward_metrics, forward_metrics, fp32_floor_metrics, fp32_gates, fp32_step, hf_side, megatron_side,
)
from validation.thresholds import (
    FUSED_REGIONS_BF16, HF_PARITY_BACKWARD_FP32, HF_PARITY_BACKWARD_FP32_UNRESOLVED, ROUTER_TIE_MARGIN,
    hf_parity_forward_bf16,
)

pytestmark = pytest.mark.stage_hf_parity


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_id" in metafunc.fixturenames:
        ids = ["fixture-moe", "fixture-dense"]
        if metafunc.config.getoption("--gemma4-model"):
            ids.append("model")
        metafunc.parametrize("model_id", ids)


def subject_for(model_id: str, config: pytest.Config | None) -> Subject:
    """Resolve a model id to its checkpoint and depth (the user's model is cut to its covering depth)."""
    if model_id.startswith("fixture-"):
        from fixtures.factory import fixture_dir

        hf_dir = fixture_dir(model_id.removeprefix("fixture-"))
        return Subject(hf_dir, None, load_spec(hf_dir))
    hf_dir = Path(config.getoption("--gemma4-model")).resolve()
    full = load_spec(hf_dir)
    depth = None if config.getoption("--gemma4-full-depth") else discover(full).truncation_depth
    return Subject(hf_dir, depth, model_spec(hf_dir, depth))


@functools.lru_cache(maxsize=16)
def hf_runs(hf_dir: Path, depth: int | None, layout: str, seed: int):
    """One input row, HF fp32's forward on it (its own routing) and HF fp64's (fp32's expert choices imposed),
    cached: sensitivity tests reuse them."""
    subject = Subject(hf_dir, depth, model_spec(hf_dir, depth))
    row = subject.row(layout, seed)
    ref = hf_side(hf_model(hf_dir, depth), row, backward=False)
    truth = hf_side(hf_model(hf_dir, depth, torch.float64), row, backward=False, replay=ref.routing)
    return row, ref, truth


def forward_case(model: torch.nn.Module, row, ref, truth) -> dict:
    """Megatron's forward on the row (HF fp32's routing replayed) against HF fp32, with the fp32 floor."""
    cand = megatron_side(model, row, backward=False, replay=ref.routing)
    return {**forward_metrics(ref, cand, row, ROUTER_TIE_MARGIN), **fp32_floor_metrics(truth, ref, cand, row)}


# ---------------------------------------------------------------- parity, fp32 (CPU and GPU)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_parity(model_id: str, layout: str, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """Log-probs at every labelled position: max/mean abs difference, mean-abs-% and KL(HF || Megatron); the
    max |Δ log-prob| gate is relative to HF fp32's own distance from an fp64 run (both distances recorded)."""
    subject = subject_for(model_id, pytestconfig)
    row, ref, truth = hf_runs(subject.hf_dir, subject.depth, layout, gemma4_seed)
    metrics = forward_case(megatron_model(subject), row, ref, truth)
    stage_report.check(f"{model_id}/{layout}/forward_fp32", metrics, fp32_gates(metrics, subject.spec.moe is not None),
                       **subject.info(row))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_parity(model_id: str, layout: str, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """One training step's loss and every parameter's gradient (rel-L2 per tensor, worst named); gradients fp32
    cannot resolve (HF fp32 itself > 5e-5 from fp64) are judged against the fp64 run instead."""
    subject = subject_for(model_id, pytestconfig)
    row = subject.row(layout, gemma4_seed)
    fwd, bwd = fp32_step(hf_model(subject.hf_dir, subject.depth), hf_model(subject.hf_dir, subject.depth, torch.float64),
                         megatron_model(subject), row, backward=True)
    per_tensor = bwd.pop("per_tensor_rel_l2")
    stage_report.check(f"{model_id}/{layout}/backward_fp32", bwd, HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED,
                       per_tensor_rel_l2=per_tensor, tensors_compared=len(per_tensor),
                       hf_fp32_vs_fp64_max_abs_logprob=fwd["hf_fp32_vs_fp64_max_abs_logprob"], **subject.info(row))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_parity_bf16(model_id: str, layout: str, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """bf16 on CUDA: Megatron bf16's distance from the HF fp32 reference (label log-prob mean-abs-%, KL) within 1.25 x
    HF bf16's distance from it and under the absolute ceiling; both bf16 runs replay the fp32 run's expert choices.
    (The same code runs on CPU in test_hf_parity_precision.py.)"""
    subject = subject_for(model_id, pytestconfig)
    metrics, row = bf16_step(subject, layout, gemma4_seed, "cuda")
    stage_report.check(f"{model_id}/{layout}/forward_bf16", metrics, bf16_gates(metrics), **subject.info(row))


def bf16_gates(metrics: dict) -> tuple:
    """The bf16 gates for measured bf16 metrics (relative to HF bf16's own distance from fp32, plus the ceiling)."""
    return hf_parity_forward_bf16(metrics["hf_bf16_vs_fp32_mean_abs_pct"], metrics["hf_bf16_vs_fp32_mean_kl"])


# ---------------------------------------------------------------- a checkpoint saved by transformers itself


def save_with_transformers(path: Path, seed: int) -> Path:
    """Write a Gemma 4 checkpoint with `save_pretrained` (not the fixture factory): non-periodic layer types,
    v_proj on full layers (no K=V), untied lm_head, every ones-initialised scale moved away from 1."""
    config = tiny_text_config(
        vocab_size=384, num_hidden_layers=5, layer_types=[SLIDING, SLIDING, FULL, FULL, SLIDING], sliding_window=6,
        attention_k_eq_v=False, tie_word_embeddings=False, max_position_embeddings=256,
        **{**TINY_MOE, "num_experts": 3})
    return save_random_checkpoint(path, config, seed)


def test_transformers_saved_checkpoint(tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """A directory written by transformers itself, cut to its covering depth like any --gemma4-model."""
    save_with_transformers(tmp_path, gemma4_seed)
    spec_full = load_spec(tmp_path)
    depth = discover(spec_full).truncation_depth
    subject = Subject(tmp_path, depth, model_spec(tmp_path, depth))
    assert subject.spec.layer_types == [SLIDING, SLIDING, FULL] and spec_full.layer_types[-1] == FULL
    row = subject.row("packed", gemma4_seed)
    fwd, bwd = fp32_step(hf_model(tmp_path, depth), hf_model(tmp_path, depth, torch.float64), megatron_model(subject),
                         row, backward=True)
    stage_report.check("transformers-saved/packed/forward_fp32", fwd, fp32_gates(fwd, True), **subject.info(row))
    bwd.pop("per_tensor_rel_l2")
    stage_report.check("transformers-saved/packed/backward_fp32", bwd,
                       HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED, **subject.info(row))


def test_masks_are_prepared_before_the_layers() -> None:
    """A forward given masks without the global window raises instead of building one on the fly."""
    subject = subject_for("fixture-dense", None)
    row = subject.row("packed", 0)
    model = megatron_model(subject)
    ids, pos, doc = row.model_inputs()
    only_sliding = DenseBackend().prepare(pos, doc, [subject.spec.sliding_window])
    with pytest.raises(MaskNotPreparedError, match="None"):
        model(ids, pos, doc, masks=only_sliding)


# ---------------------------------------------------------------- the expert paths: grouped (default) = sequential


def test_expert_paths_agree(stage_report, pytestconfig, gemma4_seed: int) -> None:
    """The grouped expert GEMMs (the default path, which every gate above runs) equal one megatron MLP call per
    expert: logits, every base gradient, and with LoRA on every expert (grouped LoRA vs per-expert hooks) every
    adapter gradient — MoE fixture, fp32, packed row."""
    subject = subject_for("fixture-moe", pytestconfig)
    row = subject.row("packed", gemma4_seed)
    model = megatron_model(subject)

    def run(path: str, lora: bool) -> tuple[torch.Tensor, dict, dict]:
        mlp_module.set_expert_path(model, path)
        model.zero_grad(set_to_none=True)
        adapters = attach_lora(model, LoraConfig(rank=4, init="random"), freeze_base=False) if lora else None
        logits = model(*row.model_inputs())
        logits.float().log_softmax(-1).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        lora_grads = {n: p.grad.clone() for n, p in adapters.named_parameters()} if adapters else {}
        if adapters is not None:
            detach_lora(adapters)
        return logits.detach(), grads, lora_grads

    metrics: dict[str, float] = {}
    for lora in (False, True):
        seq, grp = run("sequential", lora), run("grouped", lora)
        tag = "lora_" if lora else ""
        metrics[f"{tag}logits_max_abs"] = tensor_diff(seq[0], grp[0])["max_abs"]
        metrics[f"{tag}grad_max_rel_l2"] = float(named_tensor_metrics(seq[1], grp[1])["max_rel_l2"])
        if lora:
            metrics["lora_adapter_grad_max_rel_l2"] = float(named_tensor_metrics(seq[2], grp[2])["max_rel_l2"])
    mlp_module.set_expert_path(model, "grouped")
    # fp32 on one device: the same products summed in the same order (measured 0.0 on CPU); 1e-6 leaves room for a
    # GEMM library that blocks the grouped products differently
    gates = tuple(Gate(m, "<=", 1e-6) for m in metrics)
    stage_report.check("expert paths: grouped vs sequential", metrics, gates, **subject.info(row))


def test_recompute_equals_stored_activations(stage_report, pytestconfig, gemma4_seed: int) -> None:
    """Recomputing in backward (`set_recompute`: whole decoder layers, or only the routed experts) changes memory, not
    numbers: with LoRA on every projection and expert (the full-depth LoRA benchmark's setting), logits and every
    adapter gradient equal the run that stores each layer's activations — MoE fixture, fp32, packed row. A count
    outside 0..layers is refused."""
    from gemma4_support.errors import ConfigError
    from gemma4_support.model.model import set_recompute

    subject = subject_for("fixture-moe", pytestconfig)
    row = subject.row("packed", gemma4_seed)
    model = megatron_model(subject)
    adapters = attach_lora(model, LoraConfig(rank=4, init="random"))
    runs = []
    for layers, experts in ((0, False), (None, False), (1, True)):
        set_recompute(model, layers, experts=experts)
        adapters.zero_grad(set_to_none=True)
        logits = model(*row.model_inputs())
        logits.float().log_softmax(-1).mean().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in adapters.named_parameters()}))
    detach_lora(adapters)
    set_recompute(model, 0)
    with pytest.raises(ConfigError) as err:
        set_recompute(model, len(model.decoder.layers) + 1)
    assert "\n" not in str(err.value) and "choose 0.." in str(err.value)
    metrics = {}
    for tag, (logits, grads) in zip(("layers", "experts"), runs[1:]):
        metrics[f"recompute_{tag}_logits_max_abs"] = tensor_diff(runs[0][0], logits)["max_abs"]
        metrics[f"recompute_{tag}_lora_grad_max_rel_l2"] = float(named_tensor_metrics(runs[0][1], grads)["max_rel_l2"])
    stage_report.check("recompute vs stored activations", metrics, tuple(Gate(m, "<=", 1e-6) for m in metrics),
                       **subject.info(row))


def _replayed_gradients(model: torch.nn.Module, row, routes: torch.Tensor, later: torch.Tensor,  # noqa: ANN001
                        params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """Label log-probs of `row` scored under `routes`, and every gradient of their mean — the backward run while the
    next row's routes (`later`) are being replayed, as a trainer accumulating several rows does."""
    from gemma4_support.logprobs import score_row
    from gemma4_support.model.router_replay import replay_recorded

    for p in params:
        p.grad = None
    lp = score_row(model, dataclasses.replace(row, routed_experts=routes)).logprobs
    with replay_recorded(model, later):
        lp.mean().backward()
    return lp.detach(), torch.cat([p.grad.flatten() for p in params])


def test_recompute_keeps_the_replayed_routes(stage_report, pytestconfig, gemma4_seed: int, monkeypatch) -> None:
    """Router replay under recompute: a recomputed layer routes as its forward did (the replay in force then), not as
    whatever is replayed when backward runs — gradients equal the stored-activations run (MoE fixture, fp32, packed
    row, random recorded routes that differ from the router's own). Sensitivity: layers checkpointed without the
    forward's replay recompute with the later row's experts and the gradient gate fails."""
    from gemma4_support.model.layer import Gemma4DecoderLayer
    from gemma4_support.model.model import set_recompute
    from torch.utils.checkpoint import checkpoint

    subject = subject_for("fixture-moe", pytestconfig)
    row = subject.row("packed", gemma4_seed)
    model = megatron_model(subject)
    params = [p for p in model.parameters() if p.requires_grad]
    moe = [layer.moe.router for layer in model.decoder.layers if layer.is_moe]
    experts, top_k = moe[0].per_expert_scale.numel(), moe[0].top_k
    gen = torch.Generator().manual_seed(gemma4_seed)
    routes, later = (torch.rand(row.length, len(moe), experts, generator=gen).argsort(-1)[..., :top_k] for _ in "ab")

    def run(layers: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        set_recompute(model, layers)
        try:
            return _replayed_gradients(model, row, routes, later, params)
        finally:
            set_recompute(model, 0)

    stored, recomputed = run(0), run(None)
    with monkeypatch.context() as m:  # the layer checkpointed as it is: the recompute reads the replay of backward time
        m.setattr(Gemma4DecoderLayer, "recomputed", lambda self, *a: checkpoint(self, *a, use_reentrant=False))
        broken = run(None)
    gates = (Gate("recompute_replay_logprob_max_abs", "<=", 1e-6), Gate("recompute_replay_grad_rel_l2", "<=", 1e-5))

    def compare(candidate: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        return {"recompute_replay_logprob_max_abs": tensor_diff(stored[0], candidate[0])["max_abs"],
                "recompute_replay_grad_rel_l2": tensor_diff(stored[1], candidate[1])["rel_l2"]}

    stage_report.check("recompute under router replay", compare(recomputed), gates, **subject.info(row))
    stage_report.expect_caught("sensitivity/recompute_without_the_forward_replay", compare(broken), gates,
                               **subject.info(row))


def _fused_region_metrics(emulate_precision_casts: bool = True) -> dict[str, float]:
    """Each region compiled as on CUDA (here on the CPU) against its eager body, on bf16 inputs."""
    from gemma4_support.fused import compile_region
    from gemma4_support.logprobs import _head_chunk
    from gemma4_support.model.norm import rms_norm

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    def diff(fn, *args, measure=lambda a, b: (a.float() - b.float()).abs().max().item()) -> list[float]:  # noqa: ANN001
        eager = fn.eager(*args)
        compiled = compile_region(fn, emulate_precision_casts=emulate_precision_casts)(*args)
        pairs = zip(eager, compiled) if isinstance(eager, tuple) else [(eager, compiled)]
        return [measure(a, b) for a, b in pairs]

    def diff_grad(fn, *args, measures=(lambda a, b: (a.float() - b.float()).abs().max().item(),)) -> list[float]:  # noqa: ANN001
        """The gradients of sum(output * g) over every output, for every floating-point tensor argument, eagerly and
        compiled (the region's compiled backward): per measure(eager, compiled), the largest over the gradients."""
        def outputs(out) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
            return out if isinstance(out, tuple) else (out,)

        gs = [rand(*o.shape) for o in outputs(fn.eager(*args))]
        grads = []
        for run in (fn.eager, compile_region(fn, emulate_precision_casts=emulate_precision_casts)):
            leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in args]
            torch.autograd.backward(outputs(run(*leaves)), gs)
            grads.append([leaf.grad for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.grad is not None])
        return [max(measure(a, b) for a, b in zip(*grads)) for measure in measures]

    outputs, rows, weights = rand(512, 96), torch.randperm(512, generator=gen).view(64, 8), torch.rand(64, 8, generator=gen)
    logits = rand(16, 512) * 20
    gelu_tanh, mid = functools.partial(torch.nn.functional.gelu, approximate="tanh"), rand(64, 1, 192) * 3
    head = diff(_head_chunk, logits, torch.randint(0, 512, (16,), generator=gen), 30.0, True)
    # the decoder layer's regions at a K=V layer's shapes (V = raw K) and an MoE layer's arity
    cos, sin = rand(64, 1, 1, 32, dtype=torch.float32), rand(64, 1, 1, 32, dtype=torch.float32)
    raw_q, raw_k = rand(64, 1, 4, 32) * 3, rand(64, 1, 1, 32) * 3
    qkv = (raw_q, raw_k, raw_k, rand(32), rand(32), cos, sin, 1e-6)
    residual, branch = rand(64, 1, 96) * 4, rand(64, 1, 96) * 2
    norms = [rand(96) for _ in range(4)]
    after_attention = (residual, branch, 1e-6, norms[0], norms[1], norms[2], norms[3], 96 ** -0.5)
    tail = (residual, branch, 1e-6, norms[0], rand(1), norms[1], rand(64, 1, 96), norms[2])
    layer_regions = {"qkv": (layer_attention.normed_rotary_qkv, qkv),
                     "attention_residual": (layer_module.attention_residual, after_attention),
                     "ffn_residual": (layer_module.ffn_residual, tail)}
    relative = lambda a, b: tensor_diff(a, b)["max_abs_rel"]  # noqa: E731
    layer_grads = [diff_grad(fn, *args, measures=(max_ulps, relative)) for fn, args in layer_regions.values()]
    return {"rms_norm_max_abs": diff(rms_norm, rand(64, 96), rand(96), 1e-6)[0],
            "rope_max_abs": diff(rope_module.apply_rotary, rand(64, 1, 4, 32), rand(64, 1, 1, 32, dtype=torch.float32),
                                 rand(64, 1, 1, 32, dtype=torch.float32))[0],
            "weighted_sum_max_abs": max(diff(mlp_module.weighted_sum, outputs, rows, weights)
                                        + diff(mlp_module._weighted_sum_grads, rand(64, 96), outputs, rows, weights)[:1]),
            "gated_activation_max_abs": diff(mlp_module.gated_activation, mid, gelu_tanh)[0],
            "gated_activation_grad_max_abs": diff_grad(mlp_module.gated_activation, mid, gelu_tanh)[0],
            "head_logprob_max_abs": head[0], "head_grad_max_abs": head[1],
            **{f"{name}_max_ulps": max(diff(fn, *args, measure=max_ulps)) for name, (fn, args) in layer_regions.items()},
            "layer_regions_grad_max_ulps": max(g[0] for g in layer_grads),
            "layer_regions_grad_max_abs_rel": max(g[1] for g in layer_grads),
            "routing_plan_mismatches": _routing_plan_mismatches(compile_region(mlp_module.routing_plan,
                                                                               emulate_precision_casts=emulate_precision_casts))}


def _routing_plan_mismatches(compiled) -> int:  # noqa: ANN001
    """Elements of the routing plan (300 tokens choosing 4 of 16 experts) where `compiled` differs from the eager plan."""
    gen = torch.Generator().manual_seed(0)
    choices = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(300)])
    return sum(int((a != b).sum()) for a, b in zip(mlp_module.routing_plan.eager(choices, 16), compiled(choices, 16)))


@pytest.mark.slow
def test_fused_regions_equal_eager(stage_report) -> None:
    """The regions the model runs compiled on CUDA (RMSNorm, RoPE, the experts' weighted sum, the gated GELU, the
    layer's norm/residual/RoPE regions, the head's log-prob chunk) equal their eager bodies: compiled with the same
    options on the CPU, bf16 inputs."""
    stage_report.check("fused regions: compiled vs eager (bf16)", _fused_region_metrics(), FUSED_REGIONS_BF16)


@pytest.mark.slow
def test_fused_regions_sensitivity_precision_casts_off(stage_report) -> None:
    """Sensitivity: compiled without keeping eager's bf16 roundings (inductor's default), the regions differ."""
    stage_report.expect_caught("fused regions without emulate_precision_casts",
                               _fused_region_metrics(emulate_precision_casts=False), FUSED_REGIONS_BF16)


@pytest.mark.slow
def test_gated_activation_sensitivity_erf_gelu(stage_report) -> None:
    """Sensitivity: the gated activation compiled with the erf GELU in place of Gemma 4's tanh approximation differs
    from its eager body by more than the GELU-tanh gate's one-unit allowance."""
    from gemma4_support.fused import compile_region

    mid = torch.randn(64, 1, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    eager = mlp_module.gated_activation.eager(mid, functools.partial(torch.nn.functional.gelu, approximate="tanh"))
    broken = compile_region(mlp_module.gated_activation)(mid, torch.nn.functional.gelu)
    gate = [g for g in FUSED_REGIONS_BF16 if g.metric == "gated_activation_max_abs"]
    stage_report.expect_caught("sensitivity/gated_activation_erf_gelu",
                               {"gated_activation_max_abs": tensor_diff(eager, broken)["max_abs"]}, gate)


@pytest.mark.slow
def test_routing_plan_sensitivity_counts_off_by_one(stage_report, monkeypatch) -> None:
    """Sensitivity: the routing plan compiled with each expert's count cut on the wrong side of its boundary
    (`searchsorted(right=True)`: the grouped GEMMs' offsets one expert off) differs from the eager plan."""
    import torch._dynamo

    from gemma4_support.fused import compile_region

    searchsorted = torch.searchsorted

    def right_of_boundary(sorted_sequence: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return searchsorted(sorted_sequence, values, right=True)

    def off_by_one(*args):  # noqa: ANN002, ANN202
        with monkeypatch.context() as m:
            m.setattr(torch, "searchsorted", right_of_boundary)
            return compile_region(mlp_module.routing_plan)(*args)

    torch._dynamo.reset()  # a plan compiled earlier in this process must not be reused for the patched one
    try:
        broken = _routing_plan_mismatches(off_by_one)
    finally:
        torch._dynamo.reset()
    gate = [g for g in FUSED_REGIONS_BF16 if g.metric == "routing_plan_mismatches"]
    stage_report.expect_caught("sensitivity/routing_plan_counts_off_by_one", {"routing_plan_mismatches": broken}, gate)


def test_packed_expert_weights_stay_the_parameters(pytestconfig) -> None:
    """The grouped path reads each linear's experts as one packed tensor whose views are the parameters: loading,
    an optimizer step and the gradient all go through the views; a parameter re-seated elsewhere (e.g. by
    `.to()`) makes the path stack a copy instead of reading stale storage."""
    subject = subject_for("fixture-moe", pytestconfig)
    row = subject.row("packed", 0)
    model = megatron_model(subject)
    experts = next(m for m in model.modules() if isinstance(m, mlp_module.Gemma4Experts))
    params = [e.linear_fc1.weight for e in experts.local_experts]
    base = experts._packed["linear_fc1"]
    assert mlp_module._views_of(base, params)
    model(*row.model_inputs()).float().logsumexp(-1).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(base[1], params[1]) and params[1].grad is not None
    reference = model(*row.model_inputs()).detach()
    params[2].data = params[2].data.clone() + 1.0  # no longer a view of the packed storage
    assert not mlp_module._views_of(base, params)
    moved = model(*row.model_inputs()).detach()
    mlp_module.set_expert_path(model, "sequential")
    assert torch.equal(moved, model(*row.model_inputs()).detach()) and not torch.equal(moved, reference)


def test_grouped_experts_refuse_per_expert_hooks_and_skip_gradient_routing(pytestconfig) -> None:
    """The grouped path reads the packed storage itself when no gradient flows (no per-expert gradient Function) and
    routes the gradient per expert when one does; a forward hook on one expert's linear, which that path never calls,
    is refused with an error naming the fix instead of being silently skipped."""
    from gemma4_support.errors import ConfigError

    subject = subject_for("fixture-moe", pytestconfig)
    model = megatron_model(subject)
    experts = next(m for m in model.modules() if isinstance(m, mlp_module.Gemma4Experts))
    base = experts._packed["linear_fc1"]
    with torch.no_grad():
        assert experts.stacked("linear_fc1") is base
    routed = experts.stacked("linear_fc1")
    assert routed is not base and routed.grad_fn is not None and torch.equal(routed, base)
    handle = experts.local_experts[3].linear_fc1.register_forward_hook(lambda *_: None)
    row = subject.row("packed", 0)
    with pytest.raises(ConfigError, match="forward hook is registered on a per-expert linear") as err:
        model(*row.model_inputs())
    assert "sequential" in str(err.value)
    handle.remove()
    model(*row.model_inputs())


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


def _experts_gate_up_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped expert path reads its fused [gate; up] output the wrong way round."""
    monkeypatch.setattr(mlp_module, "gated_activation", lambda mid, act: act(mid.chunk(2, -1)[1]) * mid.chunk(2, -1)[0])


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
    "grouped_experts_gate_up_swapped": _experts_gate_up_swapped,
}


EMBEDDING_BREAKS = {
    "embedding_scale_dropped": lambda scale: 1.0,
    # subtle: sqrt(hidden) rounded to bf16 (11.3137 -> 11.3125, 1e-4 relative) in an fp32 model; only the
    # fp32 log-prob gate relative to HF's own fp64 distance sees it
    "embedding_scale_rounded_to_bf16": lambda scale: float(torch.tensor(scale).to(torch.bfloat16)),
}


@pytest.mark.parametrize("variant", [*SPEC_BREAKS, *PATCH_BREAKS, *EMBEDDING_BREAKS])
def test_sensitivity(variant: str, monkeypatch: pytest.MonkeyPatch, stage_report, pytestconfig, gemma4_seed: int) -> None:
    """Break one thing on purpose (MoE fixture: K=V full layer, routed experts, 8 windows, packed row): the
    forward fp32 gates (log-probs relative to the fp32 floor, KL, routing) must fail. (No top-k renormalisation
    is invisible in the logits — the per-token weight sum cancels in post_feedforward_layernorm_2 — and is caught
    by the routing gate only; recorded.)"""
    subject = subject_for("fixture-moe", pytestconfig)
    row, ref, truth = hf_runs(subject.hf_dir, subject.depth, "packed", gemma4_seed)
    spec = SPEC_BREAKS[variant](subject.spec) if variant in SPEC_BREAKS else subject.spec
    if variant in PATCH_BREAKS:
        PATCH_BREAKS[variant](monkeypatch)
    model = megatron_model(subject, spec)
    if variant in EMBEDDING_BREAKS:
        model.embedding.scale = EMBEDDING_BREAKS[variant](model.embedding.scale)
    metrics = forward_case(model, row, ref, truth)
    gates = fp32_gates(metrics, True)
    by_logprobs = not all(r.passed for r in evaluate(metrics, gates[:1]))
    stage_report.expect_caught(f"sensitivity/{variant}", metrics, gates, caught_by_logprob_gate=by_logprobs,
                               **subject.info(row))


def test_sensitivity_pad_row_trained_through_lookups(stage_report, pytestconfig, gemma4_seed: int) -> None:
    """HF's embedding has padding_idx = pad_token_id: the pad row gets no gradient from lookups. A model that
    trains it anyway (found on the H200 at 4096 tokens, where the pad id appears by chance) must fail the
    gradient gate; the row always plants one pad token."""
    subject = subject_for("fixture-dense", pytestconfig)
    row = subject.row("packed", gemma4_seed)
    ref = hf_side(hf_model(subject.hf_dir, subject.depth), row, backward=True)
    model = megatron_model(subject)
    model.embedding.pad_token_id = None
    metrics = backward_metrics(ref, megatron_side(model, row, backward=True))
    metrics.pop("per_tensor_rel_l2")
    stage_report.expect_caught("sensitivity/pad_row_trained_through_lookups", metrics, HF_PARITY_BACKWARD_FP32,
                               **subject.info(row))


def test_router_replay_refuses_bad_choices() -> None:
    """Replayed expert choices must cover every MoE layer with one top-k row per token, inside the expert range; a
    nested replay restores the outer one."""
    from gemma4_support.errors import Gemma4Error
    from gemma4_support.model.router_replay import replay_routing, routers_by_layer

    subject = subject_for("fixture-moe", None)
    model = megatron_model(subject)
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
    other = {layer: torch.ones(10, k, dtype=torch.long) for layer in good}
    with replay_routing(model, good, 10):
        assert all(r.replay is not None for r in routers_by_layer(model).values())
        with replay_routing(model, other, 10):  # a nested block imposes its own, then gives the outer one back
            assert all(int(r.replay[0, 0]) == 1 for r in routers_by_layer(model).values())
        assert all(int(r.replay[0, 0]) == 0 for r in routers_by_layer(model).values())
    assert all(r.replay is None for r in routers_by_layer(model).values())


@pytest.mark.expected_seconds(50)
def test_cli_runs_the_stage_on_a_transformers_checkpoint(tmp_path: Path, gemma4_seed: int) -> None:
    """`gemma4-validate run --stages hf_parity --model DIR` on a directory saved by transformers writes the stage
    JSON with forward and backward metrics for that model (cut to 3 layers: s, s, f)."""
    model_dir = save_with_transformers(tmp_path / "ckpt", gemma4_seed)
    cases = run_stage_on_checkpoint(model_dir, tmp_path / "reports")
    assert cases["model/packed/forward_fp32"]["info"]["layer_types"] == [SLIDING, SLIDING, FULL]
