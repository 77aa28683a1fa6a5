"""LoRA adapters out of the trainer and back: a PEFT adapter directory vLLM loads, and a merged HF checkpoint.

PEFT layout: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, no bias/DoRA/rsLoRA) and
`adapter_model.safetensors` with `base_model.model.<HF module>.lora_A.weight` [r, in] / `lora_B.weight`
[out, r] — module names as vLLM's Gemma 4 model expects (`model.layers.{i}.self_attn.q_proj`, …,
`model.layers.{i}.experts.{e}.gate_proj`; the multimodal wrapper's `model.language_model.` prefix, which vLLM
maps onto its text model). On K=V layers vLLM packs K into both the K and V slices of `qkv_proj` and applies a
LoRA per slice: the k_proj adapter is written again under v_proj, or V would stay unadapted there.

`read_adapter` refuses, one line each, every tensor vLLM would ignore or apply differently from the trainer: a
name outside the model (unknown module, layer or expert beyond the config), a shape that does not fit, a K=V
layer whose v_proj adapter is missing or differs from its k_proj adapter, a config field that changes the math
(PEFT's variants) or that this reader does not know, when it is set. `import_peft_adapter` takes an adapter PEFT
wrote for the HF model (no v_proj on K=V layers there: HF's V is the K projection, adapter included) and writes its
k_proj adapter again under v_proj; PEFT's adapters on HF's fused expert weights (`target_parameters`) become one
adapter per expert and projection.
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
from gemma4_support.errors import CheckpointError, short_repr
from gemma4_support.lora.adapter import ATTENTION_TARGETS, MLP_TARGETS, LoraAdapters, LoraConfig, lora_modules

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "save_adapter", "read_adapter", "load_adapter", "import_peft_adapter",
           "save_merged"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT = "base_model.model."
_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Written by save_adapter as off: settings vLLM's LoRA does not apply (and this trainer does not train).
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "layer_replication": None,
                "modules_to_save": None}
# adapter_config.json fields read here, and PEFT's fields that change nothing a trained adapter computes (metadata,
# initialisation, which modules got adapters — the tensors say that). Every other field must be absent or empty:
# PEFT's variants (alpha_pattern, rank_pattern, aLoRA, QALoRA, BD-LoRA, KaSA, Arrow, MonteCLoRA, trainable tokens,
# target_parameters, ...) and whatever a later PEFT adds are refused by name rather than silently read as plain LoRA.
_READ = {"peft_type", "r", "lora_alpha", "bias", "target_modules"}
_INERT = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
          "exclude_modules", "lora_dropout", "fan_in_fan_out", "init_lora_weights", "layers_to_transform",
          "layers_pattern", "megatron_config", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
          "corda_config", "lora_ga_config", "ensure_weight_tying"}
_EMPTY = (None, False, {}, [], "")


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


def _adapter_doc(cfg_file: Path) -> object:
    """The parsed adapter_config.json (refused in one line when it is not JSON)."""
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc})", "rewrite the adapter config") from None


def read_adapter(directory: str | Path, spec: ModelSpec) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read and validate a PEFT adapter for `spec`: its config and (A, B) per trained module (aliases dropped)."""
    path = Path(directory)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                              "export it with gemma4_support.lora.save_adapter")
    doc = _adapter_doc(cfg_file)
    if not isinstance(doc, dict) or doc.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_file}: peft_type is {doc.get('peft_type') if isinstance(doc, dict) else doc!r}, "
                              "not LORA", "export a LoRA adapter")
    for key, value in doc.items():
        if key in _READ or key in _INERT or value in _EMPTY:
            continue
        shown = short_repr(value)
        if key == "target_parameters":
            raise CheckpointError(f"{cfg_file}: {key} = {shown}: adapters on HF's fused parameters, which vLLM's LoRA "
                                  "and this trainer read per expert", "rewrite it with gemma4_support.lora."
                                  "import_peft_adapter (it splits PEFT's adapters on the routed experts)")
        what = "is not supported by vLLM's LoRA" if key in _UNSUPPORTED else \
            "changes what the adapter computes, and neither vLLM's LoRA nor this trainer applies it"
        raise CheckpointError(f"{cfg_file}: {key} = {shown} {what}", f"export a plain LoRA adapter (without {key})")
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
    if ("k_proj" in targets) != ("v_proj" in targets):
        have, lack = ("k_proj", "v_proj") if "k_proj" in targets else ("v_proj", "k_proj")
        raise CheckpointError(f"{weights} adapts {have} but not {lack}: on K=V layers V is the K projection, so this "
                              "trainer and vLLM adapt K and V together or neither",
                              "train the adapter with k_proj and v_proj both targeted, or neither")
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
                                  "export the k_proj adapter again under v_proj (save_adapter does; for an adapter "
                                  "PEFT wrote for the HF model, gemma4_support.lora.import_peft_adapter)")
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


_PEFT_EXPERTS = re.compile(r"^(?P<prefix>base_model\.model\..+\.experts)\.(?P<nest>(?:base_layer\.)*)"
                           r"lora_(?P<ab>[AB])\.weight$")
_EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")  # HF's fused expert weights, [E, out, in]


def _per_expert(tensors: dict[str, torch.Tensor], spec: ModelSpec, where: Path) -> dict[str, torch.Tensor]:
    """PEFT's adapters on HF's fused expert parameters (target_parameters: A [r·E, in], B [out, r·E] with the expert
    index fastest in B's columns) as one adapter per expert and projection, named as vLLM and this trainer name them."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in list(tensors):
        if match := _PEFT_EXPERTS.match(key):
            pairs.setdefault((match["prefix"], match["nest"]), {})[match["ab"]] = tensors.pop(key)
    if pairs and spec.moe is None:
        raise CheckpointError(f"{where} adapts routed experts but the model has none", "use the adapter's own model")
    out: dict[str, torch.Tensor] = {}
    for (prefix, _), ab in sorted(pairs.items()):
        experts, hidden, inter = spec.moe.num_experts, spec.hidden_size, spec.moe.expert_intermediate_size
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.shape[0] % experts or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{where}: {prefix} has no [r·{experts}, in] / [out, r·{experts}] lora_A / "
                                  "lora_B pair", "save the adapter with PEFT's save_pretrained, unchanged")
        rank = a.shape[0] // experts
        shape = (a.shape[1], b.shape[0])
        if shape not in ((hidden, 2 * inter), (inter, hidden)):
            raise CheckpointError(f"{where}: {prefix} adapts an expert weight of [in, out] {list(shape)}; this model's "
                                  f"are gate_up [{hidden}, {2 * inter}] and down [{inter}, {hidden}]",
                                  "import the adapter against the model it was trained on")
        # gate_up or down by the whole shape: distinct even where hidden equals the expert width
        rows = {"gate_proj": slice(0, inter), "up_proj": slice(inter, None)} if shape == (hidden, 2 * inter) \
            else {"down_proj": slice(None)}
        a_e, b_e = a.reshape(experts, rank, a.shape[1]), b.reshape(b.shape[0], rank, experts)
        for e in range(experts):
            for name, part in rows.items():
                out[f"{prefix}.{e}.{name}.lora_A.weight"] = a_e[e].clone()
                out[f"{prefix}.{e}.{name}.lora_B.weight"] = b_e[part, :, e].contiguous()
    return out


def import_peft_adapter(source: str | Path, spec: ModelSpec, directory: str | Path) -> Path:
    """An adapter PEFT wrote for the HF model, rewritten as vLLM and this trainer read it alike (atomically)."""
    src, out = Path(source), Path(directory)
    if not (src / ADAPTER_CONFIG).is_file() or not (src / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{src} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                              "point at the directory PeftModel.save_pretrained wrote")
    doc = _adapter_doc(src / ADAPTER_CONFIG)
    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = doc.get("target_parameters") if isinstance(doc, dict) else None
    if params:
        others = [p for p in params if not (isinstance(p, str) and p.endswith(_EXPERT_PARAMETERS))]
        if others:
            raise CheckpointError(f"{src / ADAPTER_CONFIG}: target_parameters {others[:3]} are not HF's routed-expert "
                                  f"weights {list(_EXPERT_PARAMETERS)}, the only parameters this import splits",
                                  "train those weights' adapters through target_modules instead")
        tensors.update(_per_expert(tensors, spec, src))
        doc["target_parameters"] = None
    prefixes = {_PEFT + m.name: _PEFT + m.alias_of for m in lora_modules(spec, LoraConfig(experts=False))
                if m.alias_of is not None}  # HF has no v_proj on K=V layers: its value is the K projection
    for v_prefix, k_prefix in prefixes.items():
        for ab in ("A", "B"):
            k_key, v_key = f"{k_prefix}.lora_{ab}.weight", f"{v_prefix}.lora_{ab}.weight"
            if k_key in tensors and v_key not in tensors:
                tensors[v_key] = tensors[k_key].clone()
    tmp = _atomic_dir(out)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True))
    try:
        read_adapter(tmp, spec)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CheckpointError):  # named after the source the user gave, not the staging folder
            raise CheckpointError(exc.problem.replace(str(tmp), str(src)), exc.fix) from None
        raise
    return _publish(tmp, out)


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
