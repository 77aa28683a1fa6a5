"""Stage hf_parity on the multimodal `gemma4` wrapper: a checkpoint written by transformers' own
Gemma4ForConditionalGeneration (`model_type` "gemma4", the text config under `text_config`, weights under
`model.language_model.*`; with and without tiny vision/audio towers; tied and untied at the wrapper level). The HF
reference is transformers' own wrapper class, which reads the text model from `text_config`; the Megatron model is
built from the same text config and loaded through the wrapper's prefixes. fp32 gates, directly and through
`gemma4-validate run --stages hf_parity --model DIR`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.configs import tiny_text_config
from gemma4_support.config.families import discover
from gemma4_support.config.spec import FULL, SLIDING, load_spec
from gemma4_support.convert.checkpoint import HFCheckpoint, check_hf
from gemma4_support.model.build import model_spec
from validation.hf_checkpoints import (
    WRAPPED_TEXT, WRAPPERS, Subject, hf_model, megatron_model, run_stage_on_checkpoint, save_random_checkpoint,
)
from validation.parity import fp32_gates, fp32_step, placeholder_token_ids
from validation.thresholds import HF_PARITY_BACKWARD_FP32, HF_PARITY_BACKWARD_FP32_UNRESOLVED

pytestmark = pytest.mark.stage_hf_parity

S, F = SLIDING, FULL
TEXT = WRAPPED_TEXT  # the text model inside the wrapper: MoE top-2, K=V full layers, s, s, f, f


def wrapper_subject(path: Path, kind: str, seed: int) -> Subject:
    """Save a wrapper checkpoint of `kind` with transformers and resolve it like any --gemma4-model (covering cut)."""
    save_random_checkpoint(path, TEXT, seed, wrapper=WRAPPERS[kind])
    depth = discover(load_spec(path)).truncation_depth
    return Subject(path, depth, model_spec(path, depth))


@pytest.mark.parametrize("kind", list(WRAPPERS))
def test_wrapper_checkpoint_parity(kind: str, tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """One fp32 training step on a transformers-written wrapper checkpoint: forward and backward gates."""
    subject = wrapper_subject(tmp_path, kind, gemma4_seed)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gemma4" and subject.spec.wrapped
    assert subject.spec.tie_word_embeddings == (kind != "untied_at_wrapper_level")
    hf32 = hf_model(tmp_path, subject.depth)
    assert type(hf32).__name__ == "Gemma4ForConditionalGeneration"
    _, accounting = check_hf(HFCheckpoint(tmp_path), subject.spec)
    assert bool(accounting.non_text) == (kind == "with_vision_audio_towers")
    row = subject.row("packed", gemma4_seed)
    fwd, bwd = fp32_step(hf32, hf_model(tmp_path, subject.depth, torch.float64), megatron_model(subject), row,
                         backward=True)
    info = {**subject.info(row), "wrapper": kind, "non_text_tensors": len(accounting.non_text)}
    stage_report.check(f"wrapper/{kind}/forward_fp32", fwd, fp32_gates(fwd, True), **info)
    per_tensor = bwd.pop("per_tensor_rel_l2")
    stage_report.check(f"wrapper/{kind}/backward_fp32", bwd, HF_PARITY_BACKWARD_FP32 + HF_PARITY_BACKWARD_FP32_UNRESOLVED,
                       tensors_compared=len(per_tensor), **info)


def test_wrapper_rows_avoid_multimodal_placeholders(tmp_path: Path) -> None:
    """The wrapper's forward swaps image/video/audio placeholder ids for pad: input rows never contain them."""
    save_random_checkpoint(tmp_path, tiny_text_config(vocab_size=300), 0, wrapper={"image_token_id": 7,
                                                                                  "video_token_id": 8,
                                                                                  "audio_token_id": 9})
    assert placeholder_token_ids(tmp_path) == (7, 8, 9)
    subject = Subject(tmp_path, None, load_spec(tmp_path), 512)
    ids = subject.row("single", 0).input_ids
    assert not torch.isin(ids, torch.tensor([7, 8, 9])).any()


@pytest.mark.expected_seconds(25)
def test_cli_runs_the_stage_on_a_wrapper_checkpoint(tmp_path: Path, gemma4_seed: int) -> None:
    """`gemma4-validate run --stages hf_parity --model DIR` on a transformers-written wrapper checkpoint (with towers)
    runs the forward and backward parity of its text model and passes every gate."""
    wrapper_subject(tmp_path / "ckpt", "with_vision_audio_towers", gemma4_seed)
    cases = run_stage_on_checkpoint(tmp_path / "ckpt", tmp_path / "reports")
    info = cases["model/packed/forward_fp32"]["info"]
    assert info["wrapped"] and info["layer_types"] == [S, S, F]
