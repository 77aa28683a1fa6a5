"""Stage hf_parity on checkpoints written by other transformers releases (validation/transformers_writers.py): Gemma
4's first release (5.5.0, which writes the full layers' width as global_head_dim / num_global_key_value_heads), 5.16.1
(per_layer_config) and the newest (5.25.0), each saving dense, MoE and multimodal-wrapper checkpoints with its own
`save_pretrained` and computing its own fp32 logits. For each: the pinned transformers reads it to the writer's
logits (the reference this suite compares against means what the writer meant), and this library passes the fp32
forward and backward gates on it. Sensitivity: a checkpoint whose config.json's window was edited one key wider no
longer reads to its writer's logits, and the gate says so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gemma4_support.config.families import discover
from gemma4_support.config.spec import load_spec
from gemma4_support.model.build import model_spec
from validation.hf_checkpoints import Subject, hf_model, megatron_model
from validation.parity import fp32_gates, fp32_step, load_hf_reference
from validation.thresholds import HF_PARITY_BACKWARD_FP32, HF_PARITY_BACKWARD_FP32_UNRESOLVED, HF_PARITY_WRITER_LOGITS
from validation.transformers_writers import CASES, WRITERS

pytestmark = [pytest.mark.stage_hf_parity, pytest.mark.xdist_group("transformers_writers")]


NEWEST = max(WRITERS, key=lambda v: tuple(map(int, v.split("."))))


def pinned_logits_metrics(path: Path, ids: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """The pinned transformers' fp32 logits of a checkpoint against the writer's own on the same ids."""
    hf = load_hf_reference(str(path), None, dtype=torch.float32)
    with torch.no_grad():
        ours = hf(input_ids=ids, use_cache=False).logits
    return {"logits_max_abs_diff_vs_writer": (ours - logits).abs().max().item(),
            "writer_logits_max_abs": logits.abs().max().item()}


def config_format(path: Path) -> str:
    """How the checkpoint's config.json spells the full layers' width."""
    raw = json.loads((path / "config.json").read_text())
    text = raw.get("text_config", raw)
    return "per_layer_config" if "per_layer_config" in text else "global_head_dim" if "global_head_dim" in text \
        else "neither"


@pytest.mark.expected_seconds(30)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("version", list(WRITERS))
def test_writer_checkpoint_reads_as_written(version: str, case: str, written_by, stage_report,  # noqa: ANN001
                                             gemma4_seed: int) -> None:
    """The pinned transformers computes the writer's logits; this library passes the fp32 gates on the checkpoint."""
    import transformers

    written = written_by(version)
    path = written.checkpoint(case)
    info = {"writer": written.version, "reader": transformers.__version__, "config_format": config_format(path),
            "saved_by": json.loads((path / "config.json").read_text()).get("transformers_version")}
    assert info["saved_by"] == written.version
    metrics = pinned_logits_metrics(path, *written.logits(case))
    stage_report.check(f"writers/{written.version}/{case}/pinned_reads_as_written", metrics, HF_PARITY_WRITER_LOGITS,
                       **info)
    depth = discover(load_spec(path)).truncation_depth
    subject = Subject(path, depth, model_spec(path, depth))
    row = subject.row("packed", gemma4_seed)
    fwd, bwd = fp32_step(hf_model(path, depth), hf_model(path, depth, torch.float64), megatron_model(subject), row,
                         backward=True)
    stage_report.check(f"writers/{written.version}/{case}/forward_fp32", fwd,
                       fp32_gates(fwd, subject.spec.moe is not None), **info, **subject.info(row))
    per_tensor = bwd.pop("per_tensor_rel_l2")
    stage_report.check(f"writers/{written.version}/{case}/backward_fp32", bwd,
                       HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED, tensors_compared=len(per_tensor),
                       **info)


def test_writer_gate_catches_an_edited_window(written_by, tmp_path: Path, stage_report) -> None:
    """The newest writer's MoE checkpoint with sliding_window one larger in its config.json: read by the pinned
    transformers, its logits are no longer the writer's."""
    written = written_by(NEWEST)
    path = tmp_path / "edited"
    shutil.copytree(written.checkpoint("moe"), path)
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] += 1
    (path / "config.json").write_text(json.dumps(config))
    stage_report.expect_caught(f"sensitivity/writers/{written.version}/window_edited",
                               pinned_logits_metrics(path, *written.logits("moe")), HF_PARITY_WRITER_LOGITS,
                               writer=written.version, sliding_window=config["sliding_window"])
