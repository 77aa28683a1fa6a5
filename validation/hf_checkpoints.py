"""Checkpoints under test for hf_parity: a `Subject` (directory, depth, spec, its input rows), the two sides
loaded from it, and random Gemma 4 checkpoints written by transformers itself (the HF model built from a config
dict, text or the multimodal wrapper around it, weights moved far from their init defaults, `save_pretrained`)."""
from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from fixtures.configs import TINY_MOE, tiny_text_config
from gemma4_support.config.spec import FULL, SLIDING, ModelSpec
from gemma4_support.convert.checkpoint import HFCheckpoint, load_hf_weights
from gemma4_support.convert.mapping import NON_TEXT_PREFIXES
from gemma4_support.model.build import build_model
from gemma4_support.packing import PackedRow
from validation.parity import load_hf_reference, low_precision_step, packed_lengths, placeholder_token_ids, random_row

MIN_TOKENS = 64
LAYOUTS = ("single", "packed")
# The multimodal wrapper's pieces for checkpoints transformers writes: the text model inside (MoE top-2, K=V full
# layers, 4 layers s, s, f, f — cut to 3 like any real model) and tiny vision / audio towers.
WRAPPED_TEXT = tiny_text_config(num_hidden_layers=4, layer_types=[SLIDING, SLIDING, FULL, FULL], **TINY_MOE)
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 2, "head_dim": 16, "patch_size": 4, "position_embedding_size": 64,
               "pooling_kernel_size": 2}
TINY_AUDIO = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "subsampling_conv_channels": [8, 4],
              "output_proj_dims": 32, "conv_kernel_size": 3}
WRAPPERS = {
    "text_only": {},
    "untied_at_wrapper_level": {"tie_word_embeddings": False},  # text_config keeps its default tie: true
    "with_vision_audio_towers": {"vision_config": TINY_VISION, "audio_config": TINY_AUDIO},
}


@dataclasses.dataclass(frozen=True)
class Subject:
    """A checkpoint under test, the depth it is cut to, and its (cut) spec."""

    hf_dir: Path
    depth: int | None
    spec: ModelSpec
    tokens: int | None = None  # a fixed row length (a window longer than any row we run: say so where it is used)

    @property
    def seq_len(self) -> int:
        """`tokens` if given, else at least 4 sliding windows and at least MIN_TOKENS."""
        return self.tokens or max(MIN_TOKENS, 4 * self.spec.sliding_window)

    def row(self, layout: str, seed: int) -> PackedRow:
        """The single-sequence or packed input row (never a wrapper's multimodal placeholder id)."""
        n, w = self.seq_len, self.spec.sliding_window
        lengths = (n,) if layout == "single" else packed_lengths(n, w)
        return random_row(lengths, self.spec.vocab_size, seed, pad_id=self.spec.pad_token_id,
                          exclude=placeholder_token_ids(self.hf_dir))

    def info(self, row: PackedRow) -> dict:
        """Facts recorded next to the metrics."""
        spec = self.spec
        return {"model_dir": str(self.hf_dir), "depth": spec.num_layers, "layer_types": spec.layer_types,
                "window": spec.sliding_window, "seq_len": row.length, "doc_lengths": row.document_lengths(),
                "windows_per_sequence": row.length / spec.sliding_window, "mlp": spec.layers[0].mlp,
                "top_k": spec.moe.top_k if spec.moe else None, "experts": spec.moe.num_experts if spec.moe else None,
                "k_eq_v_layers": [layer.index for layer in spec.layers if layer.k_eq_v],
                "head_dims": sorted({layer.head_dim for layer in spec.layers}), "wrapped": spec.wrapped,
                "tied": spec.tie_word_embeddings, "softcap": spec.final_logit_softcapping}


@functools.lru_cache(maxsize=8)
def hf_model(hf_dir: Path, depth: int | None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF reference of a checkpoint in `dtype` (fp32, or fp64 for the rounding floor), loaded once per process."""
    return load_hf_reference(str(hf_dir), depth, dtype=dtype)


def megatron_model(subject: Subject, spec: ModelSpec | None = None, dtype: torch.dtype = torch.float32,
                   device: str = "cpu") -> torch.nn.Module:
    """The megatron-core model built for `spec` (default: the subject's) with the subject's weights, on the dense
    reference attention (parity is about the model's numbers; flex vs dense is the cp_masks stage's comparison,
    and compiled flex fails on the H200 for the MoE fixture's 64-token rows: docs/gpu_hf_parity.md)."""
    model = build_model(spec or subject.spec, dtype=dtype, device=device, attention="dense")
    load_hf_weights(model, HFCheckpoint(subject.hf_dir))
    return model


def bf16_step(subject: Subject, layout: str, seed: int, device: str) -> tuple[dict[str, float], PackedRow]:
    """HF fp32 (the reference), HF bf16 and Megatron bf16 of the subject on `device`, both bf16 runs with the fp32
    run's expert choices imposed: each one's distance from the fp32 reference (`low_precision_metrics`)."""
    row = subject.row(layout, seed).to(device)
    hf32 = load_hf_reference(str(subject.hf_dir), subject.depth, dtype=torch.float32, device=device)
    hf16 = load_hf_reference(str(subject.hf_dir), subject.depth, dtype=torch.bfloat16, device=device)
    model = megatron_model(subject, dtype=torch.bfloat16, device=device)
    return low_precision_step(hf32, hf16, model, row, "bf16"), row


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random HF weights far from the init defaults: every learned scale away from 1, peaky routing, O(1) logits."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_((torch.randn(t.shape, generator=gen) * std + mean).to(t.device, t.dtype))

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(NON_TEXT_PREFIXES):
            continue
        if name.endswith("embed_tokens.weight"):
            normal(t, 0.0, 0.1)
        elif name.endswith("router.proj.weight"):
            normal(t, 0.0, 1.5)
        elif name.endswith(("proj.weight", "gate_up_proj", "down_proj", "lm_head.weight")):
            normal(t, 0.0, 1.0 / t.shape[-1] ** 0.5)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            normal(t, 0.5, 0.08)
        elif name.endswith("model.norm.weight"):  # the final norm (also language_model.norm in the wrapper)
            normal(t, 2.5, 0.3)
        elif name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight",
                            "post_feedforward_layernorm_1.weight", "post_feedforward_layernorm_2.weight")):
            normal(t, 1.6, 0.2)
        elif name.endswith(("layernorm.weight", "router.scale")):
            normal(t, 1.0, 0.15)
        elif name.endswith("layer_scalar"):
            t.copy_((torch.rand(t.shape, generator=gen) * 0.6 + 0.7).to(t.device, t.dtype))
        elif name.endswith("per_expert_scale"):
            t.copy_((torch.rand(t.shape, generator=gen) + 0.5).to(t.device, t.dtype))


def hf_config(text: Mapping, wrapper: Mapping | None = None) -> "transformers.PretrainedConfig":  # noqa: F821
    """transformers' config object for a text config dict (or, with `wrapper` fields, the multimodal Gemma4Config
    around it, e.g. {"vision_config": {...}, "tie_word_embeddings": False})."""
    from transformers import Gemma4Config, Gemma4TextConfig

    fields = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "dtype")}
    if wrapper is None:
        return Gemma4TextConfig(**fields)
    return Gemma4Config(text_config=fields, **dict(wrapper))


def random_hf_model(text: Mapping, seed: int, device: str | torch.device = "cpu",
                    wrapper: Mapping | None = None) -> torch.nn.Module:
    """HF Gemma4ForCausalLM (or, with `wrapper`, Gemma4ForConditionalGeneration) in fp32 with eager attention and
    experts and `randomize_` weights, in training mode."""
    import transformers
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    transformers.utils.logging.disable_progress_bar()
    config = hf_config(text, wrapper)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    with torch.device(device):
        model = (Gemma4ForCausalLM if wrapper is None else Gemma4ForConditionalGeneration)(config)
    randomize_(model, seed)
    return model.train()


def save_random_checkpoint(path: str | Path, text: Mapping, seed: int, wrapper: Mapping | None = None, *,
                           dtype: torch.dtype | None = None, max_shard_size: str | None = None) -> Path:
    """Write `random_hf_model(text, seed, wrapper=...)` with transformers' own `save_pretrained` (stored in `dtype`,
    sharded at `max_shard_size` when given); returns the path."""
    path = Path(path)
    model = random_hf_model(text, seed, wrapper=wrapper)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def saved_config(model: torch.nn.Module) -> dict:
    """The config.json transformers' `save_pretrained` would write for `model` (the diff against defaults)."""
    return json.loads(model.config.to_json_string(use_diff=True))


def run_stage_on_checkpoint(model_dir: Path, reports: Path) -> dict[str, dict]:
    """`gemma4-validate run --stages hf_parity --model DIR` (fp32 model cases only) as a user runs it; the records
    of the stage JSON it wrote, by case, after checking it exited 0, wrote one run, and every gate passed."""
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
    assert doc["provenance"]["model"]["path"] == str(model_dir)
    return cases
