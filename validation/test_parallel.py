"""Stage cp_masks, tensor parallelism: TP = 2 in two real gloo processes equals TP = 1 (the CPU variant of issue 15's
TP gate), with sensitivity variants. One launch serves every check here (validation/tp_worker.py).

Models: the dense fixture (its global K=V layer has 2 kv heads) and the MoE fixture's shapes with 2 global kv heads
(the 26B-A4B's count; written by transformers), all 6 layers: every layer type, K=V, the tied vocabulary-parallel
embedding and output, routed experts split over expert-TP ranks (both expert paths). The MoE fixture itself (1 global
kv head) cannot be split over 2 ranks and is refused in one line. Runs on one intra-op thread, as the workers do.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.factory import fixture_config, fixture_dir
from fixtures.packings import ROW_A
from gemma4_support.convert.checkpoint import megatron_to_hf
from gemma4_support.loss import token_loss
from gemma4_support.metrics import tensor_diff
from gemma4_support.model.build import load_model
from gemma4_support.packing import PackedRow, pack
from validation import thresholds as T
from validation.hf_checkpoints import save_random_checkpoint
from validation.tp_worker import BROKEN_VARIANTS, MOE_VARIANTS, tp_launch

pytestmark = [pytest.mark.stage_cp_masks, pytest.mark.xdist_group("tp_parallel"), pytest.mark.usefixtures("one_thread")]  # one launch, one worker

CASES = {"dense": "dense", "moe": "moe", "moe_sequential_experts": "moe"}  # case -> model (TP = 1 reference)
VARIANT_MODEL = {v: "moe" if v in MOE_VARIANTS else "dense" for v in BROKEN_VARIANTS}  # K=V layers split: dense
TP = 2


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gemma4_seed) -> dict[str, Path]:  # noqa: ANN001
    """The dense fixture, and the MoE fixture's config with 2 global kv heads saved by transformers."""
    moe = fixture_config("moe")
    moe.pop("per_layer_config")  # it repeats the global kv heads; transformers derives it again
    moe["num_global_key_value_heads"] = 2
    path = tmp_path_factory.mktemp("tp-moe-2-global-kv")
    return {"dense": fixture_dir("dense"), "moe": save_random_checkpoint(path, moe, gemma4_seed)}


@pytest.fixture(scope="module")
def row(gemma4_seed) -> PackedRow:  # noqa: ANN001
    """A packed row of plain documents and shared-prefix branches, longer than the window around every boundary."""
    geometry = pack(ROW_A)
    vocab = fixture_config("dense")["vocab_size"]
    ids = torch.randint(0, vocab, (geometry.length,), generator=torch.Generator().manual_seed(gemma4_seed + 15))
    return geometry.with_tokens(ids)


def _probe(model, row: PackedRow) -> dict:  # noqa: ANN001
    """Logits and every gradient (HF names) of the probe loss: next-token cross entropy over the row length."""
    model.zero_grad(set_to_none=True)
    logits = model(*row.model_inputs(), branch_ids=row.batched_branch_ids())
    token_loss(logits, torch.roll(row.input_ids, -1)[None], denominator=row.length).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "grads": megatron_to_hf(grads, model.spec, allow_absent_rows=True)}


@pytest.fixture(scope="module")
def tp1_reference(checkpoints, row, one_thread) -> dict:  # noqa: ANN001
    """TP = 1: each model's logits and HF-named gradients on the row (this process, world size 1)."""
    return {name: _probe(load_model(path, attention="dense"), row) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def tp2_runs(checkpoints, row) -> dict:  # noqa: ANN001
    """One TP = 2 launch: both models (the MoE one on both expert paths), the broken variants, and the MoE fixture
    (1 global kv head) whose build must refuse."""
    runs = [{"name": name, "model_dir": str(path), "rows": ["A"], "variant": "none"} for name, path in checkpoints.items()]
    runs.append({"name": "moe_sequential_experts", "model_dir": str(checkpoints["moe"]), "rows": ["A"], "variant": "none",
                 "expert_path": "sequential"})
    runs += [{"name": v, "model_dir": str(checkpoints[m]), "rows": ["A"], "variant": v} for v, m in VARIANT_MODEL.items()]
    runs.append({"name": "one_global_kv_head", "model_dir": str(fixture_dir("moe")), "rows": [], "variant": "none",
                 "expect_error": True})
    return tp_launch({"tp": TP, "rows": {"A": row}, "runs": runs})


def _metrics(ref: dict, res: dict) -> dict:
    """The TP gate's measurements: logits, each HF-named gradient's rel-L2 (worst named), the replicated spread."""
    missing = sorted(set(ref["grads"]) ^ set(res["grads"]))
    assert not missing, f"gradient names differ between TP = 1 and TP = {TP}: {missing[:5]}"
    logits = tensor_diff(ref["logits"], res["logits"])
    names = sorted(ref["grads"])
    pooled = tensor_diff(torch.cat([ref["grads"][n].flatten() for n in names]),
                         torch.cat([res["grads"][n].flatten() for n in names]))
    per = {n: tensor_diff(ref["grads"][n], res["grads"][n])["rel_l2"] for n in names}
    worst = max(per, key=per.get)
    return {"logits_max_abs_rel": logits["max_abs_rel"], "logits_max_abs": logits["max_abs"],
            "grads_rel_l2": pooled["rel_l2"], "grads_max_abs": pooled["max_abs"],
            "grads_worst_rel_l2": per[worst], "grads_worst": worst, "grads_tensors": len(per),
            "replicated_grads_rank_spread": res["replicated_grads_rank_spread"]}


def _info(res: dict, launch: dict) -> dict:
    return {"tp": res["tp"], "seq_len": res["seq_len"], "broken_layers": res["broken_layers"],
            "step_seconds_rank0": res["step_seconds"], "launch": launch,
            "local_qkv_rows": {n: s[0] for n, s in res["local_qkv_shapes"].items()}}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tp2_equivalence(case, tp2_runs, tp1_reference, stage_report) -> None:  # noqa: ANN001
    """TP = 2 logits and every gradient gathered back to HF names equal TP = 1 (fp32), replicated grads equal per rank;
    the MoE model on both expert paths (grouped GEMMs, per-expert megatron MLPs) against TP = 1's grouped path."""
    res = tp2_runs[case]["A"]
    stage_report.check(f"tp2_vs_tp1_{case}", _metrics(tp1_reference[CASES[case]], res), T.CP_MASKS_TP_EQUIVALENCE_FP32,
                       **_info(res, tp2_runs["_launch"]))


@pytest.mark.slow
@pytest.mark.parametrize("variant", BROKEN_VARIANTS)
def test_tp2_sensitivity(variant, tp2_runs, tp1_reference, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: the K=V projection split on the wrong axis or before grouping, per-head norm gradients left
    unsummed, and expert outputs left unreduced each fail the TP gate."""
    res = tp2_runs[variant]["A"]
    assert res["broken_layers"] > 0, f"variant {variant} broke nothing"
    ref = tp1_reference[VARIANT_MODEL[variant]]
    stage_report.expect_caught(f"tp2_{variant}", _metrics(ref, res), T.CP_MASKS_TP_EQUIVALENCE_FP32,
                               broken=BROKEN_VARIANTS[variant], **_info(res, tp2_runs["_launch"]))


@pytest.mark.slow
def test_tp2_refuses_unsplittable_kv_heads(tp2_runs, stage_report) -> None:  # noqa: ANN001
    """A layer whose kv heads TP cannot split (the MoE fixture's single global kv head at TP = 2): one line, the fix."""
    message = tp2_runs["one_global_kv_head"]["error"]
    assert "\n" not in message
    assert "layer 5: 1 kv heads cannot be split over tensor parallel size 2" in message and "fix:" in message
    stage_report.record("tp2_unsplittable_kv_heads", message=message)
