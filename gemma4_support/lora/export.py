"""LoRA adapters out of the trainer and back: a PEFT adapter directory vLLM loads, and a merged HF checkpoint.

PEFT layout: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, no bias/DoRA/rsLoRA) and
`adapter_model.safetensors` with `base_model.model.<HF module>.lora_A.weight` [r, in] / `lora_B.weight`
[out, r] — module names as vLLM's Gemma 4 model expects (`model.layers.{i}.self_attn.q_proj`, …,
`model.layers.{i}.experts.{e}.gate_proj`; the multimodal wrapper's `model.language_model.` prefix, which vLLM
maps onto its text model). On K=V layers vLLM packs K into both the K and V slices of `qkv_proj` and applies a
LoRA per slice: the k_proj adapter is written again under v_proj, or V would stay unadapted there.

`read_adapter` refuses, one line each, every tensor vLLM would ignore or apply differently from the trainer: a
name outside the model (unknown module, layer or expert beyond the config), a shape that does not fit, a K=V
layer whose v_proj adapter is missing or differs from its k_proj adapter, an unsupported config field.
The merged checkpoint is the base checkpoint with `scaling · B @ A` added to each adapted weight (computed in
float64, rounded once to the checkpoint's dtype); everything else is copied bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemma4_support.config.spec import ModelSpec
from gemma4_support.convert.checkpoint import HFCheckpoint
from gemma4_support.errors import CheckpointError
from gemma4_support.lora.adapter import ATTENTION_TARGETS, MLP_TARGETS, LoraAdapters, LoraConfig, lora_modules

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "save_adapter", "read_adapter", "load_adapter", "save_merged"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT = "base_model.model."
_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "layer_replication": None,
                "modules_to_save": None}


def _atomic_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _publish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def save_adapter(adapters: LoraAdapters, directory: str | Path, *, base_model: str = "", tie_v: bool = True,
                 alpha: float | None = None) -> Path:
    """Write a PEFT adapter directory vLLM loads (atomically). `tie_v=False` leaves K=V layers' v_proj out and
    `alpha` overrides the written lora_alpha — both only to prove the mismatch gates catch such an adapter."""
    out = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in adapters.modules_by_name.items():
        if mod.alias_of is not None and not tie_v:
            continue
        a, b = adapters.pair(name)
        tensors[f"{_PEFT}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous().clone()
        tensors[f"{_PEFT}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous().clone()
    cfg = adapters.config
    doc = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank,
           "lora_alpha": cfg.alpha if alpha is None else alpha, "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": False, "init_lora_weights": cfg.init == "zero", "base_model_name_or_path": base_model,
           "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapters.modules_by_name}),
           **_UNSUPPORTED}
    tmp = _atomic_dir(out)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
    if tie_v and alpha is None:
        read_adapter(tmp, adapters.spec)  # what is published is exactly what vLLM and the trainer read alike
    return _publish(tmp, out)


def read_adapter(directory: str | Path, spec: ModelSpec) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read and validate a PEFT adapter for `spec`: its config and (A, B) per trained module (aliases dropped)."""
    path = Path(directory)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                              "export it with gemma4_support.lora.save_adapter")
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc})", "rewrite the adapter config") from None
    if not isinstance(doc, dict) or doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type is {doc.get('peft_type') if isinstance(doc, dict) else doc!r}, "
                              "not LORA", "export a LoRA adapter")
    for key, allowed in _UNSUPPORTED.items():
        if doc.get(key, allowed) not in (allowed, False, None, []):
            raise CheckpointError(f"{cfg_file}: {key} = {doc[key]!r} is not supported by vLLM's LoRA",
                                  f"export without {key}")
    if doc.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_file}: bias = {doc['bias']!r}", 'vLLM applies no adapter bias: use "none"')
    try:
        rank, alpha = int(doc["r"]), float(doc["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{cfg_file} lacks a numeric r / lora_alpha", "write both fields") from None
    with safe_open(str(weights), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    has_experts = any(".experts." in k for k in raw)
    targets = tuple(t for t in ATTENTION_TARGETS + MLP_TARGETS
                    if any(k.endswith(f".{t}.lora_A.weight") and ".experts." not in k for k in raw))
    config = LoraConfig(rank=rank, alpha=alpha, target_modules=targets, experts=has_experts and spec.moe is not None)
    known = {m.name: m for m in lora_modules(spec, LoraConfig(rank=rank, alpha=alpha, experts=spec.moe is not None))}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        match = _NAME.match(key)
        if match is None or match["module"] not in known:
            raise CheckpointError(f"adapter tensor {key} names no module of this Gemma 4 model; vLLM would ignore it",
                                  "write base_model.model.<HF module>.lora_{A,B}.weight for the model's own layers")
        mod = known[match["module"]]
        want = (rank, mod.in_features) if match["ab"] == "A" else (mod.out_features, rank)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, the model needs {want}",
                                  "export the adapter from a model of this config with this rank")
        found.setdefault(mod.name, {})[match["ab"]] = tensor
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter module {name} has lora_{''.join(ab)} only", "write both lora_A and lora_B")
        mod = known[name]
        if mod.alias_of is None:
            pairs[name] = (ab["A"], ab["B"])
    for name, mod in known.items():
        if mod.alias_of is None:
            continue
        k, v = found.get(mod.alias_of), found.get(name)
        if k is not None and v is None:
            raise CheckpointError(f"K=V layer {mod.layer.index}: the adapter has {mod.alias_of} but no {name}; vLLM "
                                  "would leave V unadapted while the trainer adapts it",
                                  "export the k_proj adapter again under v_proj (save_adapter does)")
        if v is not None and (k is None or not (torch.equal(k["A"], v["A"]) and torch.equal(k["B"], v["B"]))):
            raise CheckpointError(f"K=V layer {mod.layer.index}: {name} differs from {mod.alias_of}; V is the raw K "
                                  "projection there, so one adapter serves both", "write the k_proj adapter under v_proj")
    return config, pairs


def load_adapter(directory: str | Path, spec: ModelSpec, dtype: torch.dtype = torch.float32) -> LoraAdapters:
    """A PEFT adapter directory as LoraAdapters for `spec` (validated by `read_adapter`)."""
    config, pairs = read_adapter(directory, spec)
    adapters = LoraAdapters(spec, config, dtype=dtype)
    missing = sorted(set(adapters.trained_names()) - set(pairs))
    if missing:
        raise CheckpointError(f"the adapter lacks module(s) {missing[:4]} that its target_modules imply",
                              "export every targeted module (or narrow target_modules)")
    adapters.load_pairs(pairs)
    return adapters


def save_merged(adapters: LoraAdapters, base_dir: str | Path, directory: str | Path) -> Path:
    """The base HF checkpoint with every adapter delta merged in (float64 sum, one rounding), written with its
    config, tokenizer and template files (atomically)."""
    base, out = Path(base_dir), Path(directory)
    ckpt = HFCheckpoint(base)
    deltas: dict[str, list] = {}
    for name, mod in adapters.modules_by_name.items():
        if mod.alias_of is None:
            deltas.setdefault(mod.hf_tensor, []).append((mod, adapters.delta(name)))
    unknown = sorted(set(deltas) - set(ckpt.names()))
    if unknown:
        raise CheckpointError(f"the base checkpoint {base} has no tensor(s) {unknown[:4]} the adapter changes",
                              "merge into the checkpoint the adapter was trained on")
    tensors = {}
    for name in ckpt.names():
        tensor = ckpt.get(name)
        if name in deltas:
            merged = tensor.to(torch.float64)
            for mod, delta in deltas[name]:
                mod.weight_view(merged).add_(delta)
            tensor = merged.to(tensor.dtype)
        tensors[name] = tensor.contiguous()
    tmp = _atomic_dir(out)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for extra in sorted(base.iterdir()):
        if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name != "model.safetensors.index.json":
            shutil.copy2(extra, tmp / extra.name)
    return _publish(tmp, out)
