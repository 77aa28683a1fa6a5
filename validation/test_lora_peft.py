"""Stage mismatch, offline: LoRA adapters between this trainer and HF PEFT (the library users train SFT warm-starts
and evaluate with). Both directions on the dense and MoE fixtures (fp32, attention and dense-MLP targets; PEFT -> ours
also on the multimodal wrapper, and with the routed experts adapted through PEFT's target_parameters):

* ours -> PEFT: an adapter `save_adapter` wrote, loaded by `PeftModel.from_pretrained` on HF's model, computes our
  model's logits with the adapter attached (PEFT reports only the K=V layers' v_proj tensors as unexpected: HF has no
  v_proj there, its V is the K projection, adapter included).
* PEFT -> ours: an adapter PEFT's `save_pretrained` wrote is refused by `load_adapter` (no v_proj on K=V layers: vLLM
  would leave V unadapted) with a line naming `import_peft_adapter`, which rewrites it (and splits adapters on HF's
  fused expert weights into one per expert); then our logits equal PEFT's.
* PEFT's variants that change the math (rsLoRA, alpha_pattern, rank_pattern, DoRA, aLoRA, adapter bias, trainable
  tokens), as PEFT writes them: refused in one line naming the field. Sensitivity: alpha_pattern read as plain LoRA
  (the field check bypassed), and expert adapters given to the wrong experts, fail the logits gate against PEFT.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch

from fixtures.factory import fixture_dir
from gemma4_support.errors import CheckpointError
from gemma4_support.lora import LoraAdapters, LoraConfig, attach_lora, import_peft_adapter, load_adapter, save_adapter
from gemma4_support.lora import export as export_module
from gemma4_support.metrics import tensor_diff
from gemma4_support.model.build import load_model, model_spec
from gemma4_support.packing import pack
from validation.parity import load_hf_reference
from validation.thresholds import LORA_PEFT_INTEROP

pytestmark = pytest.mark.stage_mismatch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDS = torch.randint(5, 250, (1, 40), generator=torch.Generator().manual_seed(1))  # inside every vocabulary here


def ours_logits(base: Path, adapters: LoraAdapters) -> torch.Tensor:
    """Our fp32 model of `base` with `adapters` attached: logits [n, vocab] of IDS."""
    model = load_model(base, attention="dense")
    attach_lora(model, adapters.config, adapters=adapters)
    row = pack([IDS.shape[1]]).with_tokens(IDS[0])
    with torch.no_grad():
        return model(*row.model_inputs())[0].reshape(IDS.shape[1], -1)


def peft_logits(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A PeftModel's logits [n, vocab] of IDS with its adapter, and without it."""
    with torch.no_grad():
        on = model(input_ids=IDS, use_cache=False).logits[0]
        with model.disable_adapter():
            off = model(input_ids=IDS, use_cache=False).logits[0]
    return on, off


def interop_metrics(ours: torch.Tensor, peft_on: torch.Tensor, peft_off: torch.Tensor) -> dict[str, float]:
    """Our logits against PEFT's, and how far PEFT's adapter moves its logits (the comparison is not vacuous)."""
    return {"logits_max_abs_rel_vs_peft": tensor_diff(peft_on, ours)["max_abs_rel"],
            "adapter_effect_max_abs_rel": tensor_diff(peft_off, peft_on)["max_abs_rel"]}


def peft_written(base: Path, out: Path, seed: int, **config: object) -> tuple[Path, torch.nn.Module]:
    """A random-B adapter PEFT writes for HF's model of `base` (rank 4, alpha 8, TARGETS unless overridden)."""
    hf = load_hf_reference(str(base), None, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS), "task_type": "CAUSAL_LM", **config}
    model = peft.get_peft_model(hf, peft.LoraConfig(**settings))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(out))
    return out, model.eval()


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_our_adapter_in_peft(variant: str, tmp_path: Path, stage_report) -> None:
    """save_adapter's directory, loaded by PEFT onto HF's model, computes our logits (fp32)."""
    base = fixture_dir(variant)
    spec = model_spec(base)
    adapters = LoraAdapters(spec, LoraConfig(rank=4, alpha=8.0, init="random", b_std=0.05, seed=3, experts=False))
    out = save_adapter(adapters, tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(load_hf_reference(str(base), None, dtype=torch.float32), str(out)).eval()
    unexpected = [str(w.message) for w in caught if "unexpected adapter keys" in str(w.message)]
    k_eq_v = [layer.index for layer in spec.layers if layer.k_eq_v]
    assert all(f"layers.{i}.self_attn.v_proj.lora_A" in " ".join(unexpected) for i in k_eq_v), unexpected
    assert " ".join(unexpected).count("lora_A") == len(k_eq_v), unexpected  # nothing else left unread
    metrics = interop_metrics(ours_logits(base, adapters), *peft_logits(model))
    stage_report.check(f"lora_peft/ours_to_peft/{variant}", metrics, LORA_PEFT_INTEROP,
                       k_eq_v_layers=k_eq_v, peft=peft.__version__, unexpected_keys_warning=unexpected[:1])


def wrapper_checkpoint(path: Path, seed: int) -> Path:
    """A multimodal-wrapper checkpoint (MoE text model, vision and audio towers) written by transformers."""
    from validation.hf_checkpoints import WRAPPED_TEXT, WRAPPERS, save_random_checkpoint

    return save_random_checkpoint(path, WRAPPED_TEXT, seed, wrapper=WRAPPERS["with_vision_audio_towers"])


EXPERT_PARAMETERS = {"target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}


@pytest.mark.parametrize("variant", ["dense", "moe", "wrapper", "moe_experts", "square_experts"])
def test_peft_adapter_imported(variant: str, tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """PEFT's own adapter: refused as it is (K=V layers lack v_proj), imported by import_peft_adapter, then our logits
    equal PEFT's (fp32). On the multimodal wrapper PEFT must be told to leave the towers alone (their projections
    are not nn.Linear), as users do: a target regex on the language model. With the routed experts adapted too
    (PEFT's target_parameters on HF's fused expert weights), the import splits them into one adapter per expert."""
    if variant == "wrapper":
        base = wrapper_checkpoint(tmp_path / "ckpt", gemma4_seed)
        targets = {"target_modules": rf".*language_model.*\.({'|'.join(TARGETS)})"}
    elif variant == "square_experts":  # expert width = hidden: gate_up and down told apart by their whole shapes
        from fixtures.configs import TINY_MOE, tiny_text_config
        from validation.hf_checkpoints import save_random_checkpoint

        config = tiny_text_config(**{**TINY_MOE, "moe_intermediate_size": 64})
        base, targets = save_random_checkpoint(tmp_path / "ckpt", config, gemma4_seed), EXPERT_PARAMETERS
    else:
        base, targets = fixture_dir(variant.removesuffix("_experts")), {}
    if variant == "moe_experts":
        targets = EXPERT_PARAMETERS
    spec = model_spec(base)
    written, model = peft_written(base, tmp_path / "peft", gemma4_seed, **targets)
    with pytest.raises(CheckpointError, match="import_peft_adapter") as err:
        load_adapter(written, spec)
    assert "\n" not in str(err.value)
    imported = import_peft_adapter(written, spec, tmp_path / "imported")
    adapters = load_adapter(imported, spec)
    assert set(adapters.config.target_modules) == set(TARGETS)
    assert adapters.config.experts == variant.endswith("_experts")
    metrics = interop_metrics(ours_logits(base, adapters), *peft_logits(model))
    stage_report.check(f"lora_peft/peft_to_ours/{variant}", metrics, LORA_PEFT_INTEROP, peft=peft.__version__,
                       refused_as_written=str(err.value))


# PEFT settings that change what an adapter computes, or that K=V layers cannot carry:
# (LoraConfig fields, what the refusal names)
VARIANTS = {
    "rslora": ({"use_rslora": True}, "use_rslora"),
    "alpha_pattern": ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
    "rank_pattern": ({"rank_pattern": {"o_proj": 8}}, "rank_pattern"),
    "dora": ({"use_dora": True}, "use_dora"),
    "alora": ({"alora_invocation_tokens": [7, 8]}, "alora_invocation_tokens"),
    "adapter_bias": ({"lora_bias": True}, "lora_bias"),
    "trainable_tokens": ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
    # the classic q/v targets: V adapted on the sliding layers only (HF's K=V layers have no v_proj)
    "v_without_k": ({"target_modules": ["q_proj", "v_proj"]}, "adapts v_proj but not k_proj"),
}


_QUIET = {"adapter_bias": pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")}  # PEFT: nothing to merge


@pytest.mark.parametrize("variant", [pytest.param(v, marks=_QUIET.get(v, ())) for v in VARIANTS])
def test_peft_variants_are_refused(variant: str, tmp_path: Path, gemma4_seed: int) -> None:
    """An adapter PEFT wrote with a setting that changes its math: import and load refuse it, naming the field."""
    base = fixture_dir("dense")
    config, field = VARIANTS[variant]
    written, _ = peft_written(base, tmp_path / "peft", gemma4_seed, **config)
    for read in (lambda: import_peft_adapter(written, model_spec(base), tmp_path / "imported"),
                 lambda: load_adapter(written, model_spec(base))):
        with pytest.raises(CheckpointError) as err:
            read()
        assert field in str(err.value) and "fix:" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "imported").exists() and not list(tmp_path.glob(".imported.*"))  # nothing half-written


def test_alpha_pattern_read_as_plain_lora_fails_the_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          stage_report, gemma4_seed: int) -> None:
    """Sensitivity: with the config-field check bypassed, an adapter whose q_proj has its own alpha (PEFT's
    alpha_pattern) imports as plain LoRA at the global alpha — its logits no longer equal PEFT's."""
    base = fixture_dir("dense")
    spec = model_spec(base)
    written, model = peft_written(base, tmp_path / "peft", gemma4_seed, alpha_pattern={"q_proj": 32})
    monkeypatch.setattr(export_module, "_INERT", export_module._INERT | {"alpha_pattern"})
    adapters = load_adapter(import_peft_adapter(written, spec, tmp_path / "imported"), spec)
    metrics = interop_metrics(ours_logits(base, adapters), *peft_logits(model))
    stage_report.expect_caught("sensitivity/lora_peft/alpha_pattern_read_as_plain_lora", metrics, LORA_PEFT_INTEROP,
                               alpha=adapters.config.alpha, q_proj_alpha=32)


def test_experts_imported_to_the_wrong_expert_fail_the_gate(tmp_path: Path, stage_report, gemma4_seed: int) -> None:
    """Sensitivity: PEFT's expert adapters imported with experts 0 and 1 exchanged (an index order misread) no
    longer compute PEFT's logits."""
    from safetensors.torch import load_file, save_file

    from gemma4_support.lora.export import ADAPTER_WEIGHTS

    base = fixture_dir("moe")
    spec = model_spec(base)
    written, model = peft_written(base, tmp_path / "peft", gemma4_seed, **EXPERT_PARAMETERS)
    imported = import_peft_adapter(written, spec, tmp_path / "imported")
    tensors = load_file(imported / ADAPTER_WEIGHTS)
    swap = {".experts.0.": ".experts.1.", ".experts.1.": ".experts.0."}
    renamed = {next((k.replace(a, b) for a, b in swap.items() if a in k), k): v for k, v in tensors.items()}
    save_file(renamed, str(imported / ADAPTER_WEIGHTS))
    metrics = interop_metrics(ours_logits(base, load_adapter(imported, spec)), *peft_logits(model))
    stage_report.expect_caught("sensitivity/lora_peft/experts_exchanged", metrics, LORA_PEFT_INTEROP)
