"""Stage cp_masks, tensor and expert parallelism: TP = 2 and EP = 2, each in two real gloo processes, equal one
process (the CPU variants of issue 15's TP and EP gates), with sensitivity variants. One launch per layout serves
every check of it (validation/parallel_worker.py).

Models: the dense fixture (its global K=V layer has 2 kv heads) and the MoE fixture's shapes with 2 global kv heads
(the 26B-A4B's count; written by transformers), all 6 layers: every layer type, K=V, the tied vocabulary-parallel
embedding and output, routed experts split over expert-TP ranks (both expert paths). The MoE fixture itself (1 global
kv head) cannot be split over 2 ranks and is refused in one line. EP = 2: the MoE fixture (4 experts, 2 a rank), the
two ranks as data-parallel ranks with a row each (their gradients summed, as DDP does) against one process running
both rows; also with a routing imposed on every token (router replay) and on the per-expert path. Runs on one
intra-op thread, as the workers do.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fixtures.factory import fixture_config, fixture_dir
from fixtures.packings import ROW_A
from gemma4_support.config.spec import ModelSpec, load_spec
from gemma4_support.metrics import tensor_diff
from gemma4_support.model.build import load_model
from gemma4_support.packing import PackedRow, pack
from validation import thresholds as T
from validation.hf_checkpoints import save_random_checkpoint
from validation.parallel_worker import (BROKEN_VARIANTS, EP_BROKEN_VARIANTS, MOE_VARIANTS, equivalence_metrics,
                                       parallel_launch, probe)

pytestmark = [pytest.mark.stage_cp_masks, pytest.mark.xdist_group("tp_parallel"), pytest.mark.usefixtures("one_thread")]

CASES = {"dense": "dense", "moe": "moe", "moe_sequential_experts": "moe"}  # case -> model (TP = 1 reference)
VARIANT_MODEL = {v: "moe" if v in MOE_VARIANTS else "dense" for v in BROKEN_VARIANTS}  # K=V layers split: dense
TP = EP = 2
EP_CASES = {"ep_moe": ("A", "B"), "ep_moe_sequential_experts": ("A", "B"), "ep_moe_replayed_routing": ("A@r", "B@r")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gemma4_seed) -> dict[str, Path]:  # noqa: ANN001
    """The dense fixture, and the MoE fixture's config with 2 global kv heads saved by transformers."""
    moe = fixture_config("moe")
    moe.pop("per_layer_config")  # it repeats the global kv heads; transformers derives it again
    moe["num_global_key_value_heads"] = 2
    path = tmp_path_factory.mktemp("tp-moe-2-global-kv")
    return {"dense": fixture_dir("dense"), "moe": save_random_checkpoint(path, moe, gemma4_seed)}


def _tokens(offset: int) -> PackedRow:
    """ROW_A's packing (plain documents and shared-prefix branches, longer than the window around every boundary)
    with random tokens."""
    geometry = pack(ROW_A)
    vocab = fixture_config("dense")["vocab_size"]
    ids = torch.randint(0, vocab, (geometry.length,), generator=torch.Generator().manual_seed(offset))
    return geometry.with_tokens(ids)


def _moe_spec() -> ModelSpec:
    """The MoE fixture's spec."""
    return load_spec(fixture_config("moe"))


def _moe_layers() -> int:
    """How many of the MoE fixture's layers have routed experts."""
    return sum(layer.mlp == "moe" for layer in _moe_spec().layers)


@pytest.fixture(scope="module")
def row(gemma4_seed) -> PackedRow:  # noqa: ANN001
    """The TP row."""
    return _tokens(gemma4_seed + 15)


@pytest.fixture(scope="module")
def ep_rows(row, gemma4_seed) -> dict[str, PackedRow]:  # noqa: ANN001
    """A row per data-parallel rank, and both with an imposed routing (random distinct experts for every token)."""
    rows = {"A": row, "B": _tokens(gemma4_seed + 16)}
    moe, layers = _moe_spec().moe, _moe_layers()
    gen = torch.Generator().manual_seed(gemma4_seed + 17)
    for name in ("A", "B"):
        choice = torch.rand(rows[name].length, layers, moe.num_experts, generator=gen).argsort(-1)[..., :moe.top_k]
        rows[f"{name}@r"] = dataclasses.replace(rows[name], routed_experts=choice)
    return rows


@pytest.fixture(scope="module")
def tp1_reference(checkpoints, row, one_thread) -> dict:  # noqa: ANN001
    """TP = 1: each model's logits and HF-named gradients on the row (this process, world size 1)."""
    return {name: probe(load_model(path, attention="dense"), row) for name, path in checkpoints.items()}


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
    return parallel_launch({"tp": TP, "rows": {"A": row}, "runs": runs})


@pytest.fixture(scope="module")
def ep1_reference(ep_rows, one_thread) -> dict:  # noqa: ANN001
    """One process, the MoE fixture: each row's logits, and the gradients of the rows summed (the DP ranks' sum)."""
    model = load_model(fixture_dir("moe"), attention="dense")
    out = {}
    for rows in {names for names in EP_CASES.values()}:
        probes = [probe(model, ep_rows[name]) for name in rows]
        out[rows] = {"logits": [p["logits"] for p in probes],
                     "grads": {n: sum(p["grads"][n] for p in probes) for n in probes[0]["grads"]}}
    return out


@pytest.fixture(scope="module")
def ep2_runs(ep_rows) -> dict:  # noqa: ANN001
    """One EP = 2 launch (TP = 1, two data-parallel ranks): the MoE fixture on both expert paths, with a replayed
    routing, and the broken variants."""
    moe = str(fixture_dir("moe"))
    runs = [{"name": name, "model_dir": moe, "rows": list(rows), "variant": "none",
             **({"expert_path": "sequential"} if "sequential" in name else {})} for name, rows in EP_CASES.items()]
    runs += [{"name": v, "model_dir": moe, "rows": ["A", "B"], "variant": v} for v in EP_BROKEN_VARIANTS]
    runs.append({"name": "lora_on_split_experts", "model_dir": moe, "rows": [], "variant": "none",
                 "lora": {"rank": 4, "experts": True}, "expect_error": True})
    return parallel_launch({"tp": 1, "ep": EP, "rows": ep_rows, "runs": runs})


def _info(res: dict, launch: dict) -> dict:
    return {"tp": res["tp"], "ep": res["ep"], "local_experts": res["local_experts"], "seq_len": res["seq_len"], "broken_layers": res["broken_layers"],
            "step_seconds_rank0": res["step_seconds"], "launch": launch,
            "local_qkv_rows": {n: s[0] for n, s in res["local_qkv_shapes"].items()}}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tp2_equivalence(case, tp2_runs, tp1_reference, stage_report) -> None:  # noqa: ANN001
    """TP = 2 logits and every gradient gathered back to HF names equal TP = 1 (fp32), replicated grads equal per rank;
    the MoE model on both expert paths (grouped GEMMs, per-expert megatron MLPs) against TP = 1's grouped path."""
    res = tp2_runs[case]["A"]
    stage_report.check(f"tp2_vs_tp1_{case}", equivalence_metrics(tp1_reference[CASES[case]], res), T.CP_MASKS_TP_EQUIVALENCE_FP32,
                       **_info(res, tp2_runs["_launch"]))


@pytest.mark.slow
@pytest.mark.parametrize("variant", BROKEN_VARIANTS)
def test_tp2_sensitivity(variant, tp2_runs, tp1_reference, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: the K=V projection split on the wrong axis or before grouping, per-head norm gradients left
    unsummed, and expert outputs left unreduced each fail the TP gate."""
    res = tp2_runs[variant]["A"]
    assert res["broken_layers"] > 0, f"variant {variant} broke nothing"
    ref = tp1_reference[VARIANT_MODEL[variant]]
    stage_report.expect_caught(f"tp2_{variant}", equivalence_metrics(ref, res), T.CP_MASKS_TP_EQUIVALENCE_FP32,
                               broken=BROKEN_VARIANTS[variant], **_info(res, tp2_runs["_launch"]))


@pytest.mark.slow
def test_tp2_refuses_unsplittable_kv_heads(tp2_runs, stage_report) -> None:  # noqa: ANN001
    """A layer whose kv heads TP cannot split (the MoE fixture's single global kv head at TP = 2): one line, the fix."""
    message = tp2_runs["one_global_kv_head"]["error"]
    assert "\n" not in message
    assert "layer 5: 1 kv heads cannot be split over tensor parallel size 2" in message and "fix:" in message
    stage_report.record("tp2_unsplittable_kv_heads", message=message)


@pytest.mark.slow
@pytest.mark.parametrize("case", EP_CASES)
def test_ep2_equivalence(case, ep2_runs, ep1_reference, stage_report) -> None:  # noqa: ANN001
    """EP = 2 (each rank 2 of the 4 experts, a row per rank, tokens sent to their experts' rank and back) equals one
    process running both rows: each rank's logits, every gradient (experts gathered, the rest summed over ranks) —
    on both expert paths and with a routing imposed on every token (router replay)."""
    rows = EP_CASES[case]
    res = ep2_runs[case]["+".join(rows)]
    assert res["local_experts"] * EP == _moe_spec().moe.num_experts * _moe_layers(), "each rank must hold half the experts"
    extra = {}
    if rows != ("A", "B"):  # the imposed routing is followed: it moves the logits away from the router's own choice
        extra["replay_moves_logits_max_abs"] = max(tensor_diff(a, b)["max_abs"] for a, b in
                                                   zip(ep1_reference[rows]["logits"], ep1_reference[("A", "B")]["logits"]))
        assert extra["replay_moves_logits_max_abs"] > 1e-3, "the imposed routing changed nothing: replay not exercised"
    stage_report.check(f"ep2_vs_ep1_{case}", equivalence_metrics(ep1_reference[rows], res), T.CP_MASKS_TP_EQUIVALENCE_FP32,
                       **_info(res, ep2_runs["_launch"]), **extra)


@pytest.mark.slow
@pytest.mark.parametrize("variant", EP_BROKEN_VARIANTS)
def test_ep2_sensitivity(variant, ep2_runs, ep1_reference, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: an EP rank holding another rank's expert weights fails the EP gate."""
    res = ep2_runs[variant]["A+B"]
    assert res["broken_layers"] > 0, f"variant {variant} broke nothing"
    stage_report.expect_caught(f"ep2_{variant}", equivalence_metrics(ep1_reference[("A", "B")], res), T.CP_MASKS_TP_EQUIVALENCE_FP32,
                               broken=EP_BROKEN_VARIANTS[variant], **_info(res, ep2_runs["_launch"]))


@pytest.mark.slow
def test_ep2_refuses_lora_on_split_experts(ep2_runs, stage_report) -> None:  # noqa: ANN001
    """LoRA on routed experts split over EP ranks (not supported): one line naming the fix, not a deep traceback."""
    message = ep2_runs["lora_on_split_experts"]["error"]
    assert "\n" not in message and "expert parallelism" in message and "experts=False" in message and "fix:" in message
    stage_report.record("ep2_lora_on_split_experts", message=message)


@pytest.mark.slow
@pytest.mark.parametrize("layout,dtype", [("tp2", "bfloat16"), pytest.param("cp2", "float32", marks=pytest.mark.main_job)])
def test_torchrun_gate(layout, dtype, tmp_path, stage_report) -> None:  # noqa: ANN001
    """The GPU runners' command (validation/parallel_gate.py: one-device reference, then one torchrun launch of the
    workers) on gloo: the gate passes, the layout's broken variant fails it, the report is written."""
    from validation.parallel_gate import main

    assert main(["--layout", layout, "--device", "cpu", "--dtype", dtype, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(f"parallel_{layout}_{dtype}_*.json")
    report = json.loads(path.read_text())
    assert report["passed"] and report["sensitivity"]["caught"] and report["launch"]["world"] == 2
    stage_report.record(f"torchrun_{layout}_{dtype}", metrics=report["metrics"], gates=report["gates"],
                        sensitivity=report["sensitivity"]["metrics"], bf16_noise=report["bf16_vs_fp32_one_device"])


def test_torchrun_gate_bad_input(capsys) -> None:  # noqa: ANN001
    """A row length the CP chunks cannot split: exit 2 and one line naming the fix."""
    from validation.parallel_gate import main

    assert main(["--layout", "cp2", "--device", "cpu", "--tokens", "100", "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--tokens 100" in err and "fix:" in err
