"""The routed experts' two paths on a GPU: grouped GEMMs (`torch._grouped_mm`, the default) against one megatron
MLP call per expert (`sequential`): agreement (logits and gradients, fp32 and bf16, with and without LoRA on every
expert) on the 26B-A4B shapes cut to one MoE layer (128 experts top-8, width 704, hidden 2816), and the time of the
MoE block's forward + backward on 8,192 tokens in bf16.

  python scripts/gpu/expert_paths_gpu.py --out "$OUT"          # on the H200 (megatron-core from .whl/)
  .venv/bin/python scripts/gpu/expert_paths_gpu.py --small --out /tmp/x   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemma4_support.config.families import truncate_config  # noqa: E402
from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.lora import LoraConfig, attach_lora, detach_lora  # noqa: E402
from gemma4_support.metrics import named_tensor_metrics, tensor_diff  # noqa: E402
from gemma4_support.model.build import build_model  # noqa: E402
from gemma4_support.model.mlp import Gemma4MoE, set_expert_path  # noqa: E402
from gemma4_support.model.model import Gemma4Model  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.throughput import timed  # noqa: E402


def moe_block(small: bool, dtype: torch.dtype, device: str) -> tuple[Gemma4Model, Gemma4MoE]:
    """A 26B-A4B model cut to one layer, random weights, and that layer's routed half."""
    from fixtures.configs import real_config

    cfg = truncate_config(real_config("26B-A4B"), 6)
    cfg.update(vocab_size=256, num_hidden_layers=1, layer_types=["full_attention"])
    if small:
        cfg.update(hidden_size=128, num_experts=16, top_k_experts=4, moe_intermediate_size=32, intermediate_size=96)
    model = build_model(load_spec(cfg), dtype=dtype, device=device, attention="dense")
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
    block = next(m for m in model.modules() if isinstance(m, Gemma4MoE))
    block.spec = model.spec  # attach_lora reads the spec off the model it is given
    return model, block


def run(model: Gemma4Model, block: Gemma4MoE, x: torch.Tensor, path: str,
        lora: bool) -> tuple[torch.Tensor, dict, dict]:
    """The block's output, its gradients (parameters and input) and, with LoRA, the adapters' gradients on `path`."""
    set_expert_path(model, path)
    model.zero_grad(set_to_none=True)
    adapters = attach_lora(model, LoraConfig(rank=16, init="random", b_std=0.01), freeze_base=False) if lora else None
    xi = x.detach().clone().requires_grad_(True)
    out = block(xi, xi)
    out.float().square().mean().backward()
    grads = {n: p.grad.float().clone() for n, p in block.named_parameters() if p.grad is not None}
    grads["input"] = xi.grad.float().clone()
    lora_grads = {n: p.grad.float().clone() for n, p in adapters.named_parameters() if p.grad is not None} if lora else {}
    if adapters is not None:
        detach_lora(adapters)
    return out.detach().float(), grads, lora_grads


def agreement(small: bool, dtype: torch.dtype, device: str, tokens: int) -> dict:
    """Grouped against sequential in `dtype`, with and without LoRA: output and gradient differences."""
    model, block = moe_block(small, dtype, device)
    x = torch.randn(tokens, 1, model.spec.hidden_size, device=device, dtype=dtype,
                    generator=torch.Generator(device=device).manual_seed(1))
    out = {}
    for lora in (False, True):
        seq, grp = run(model, block, x, "sequential", lora), run(model, block, x, "grouped", lora)
        tag = "lora_" if lora else ""
        out[f"{tag}out_max_abs_rel"] = tensor_diff(seq[0], grp[0])["max_abs_rel"]
        out[f"{tag}grad_max_rel_l2"] = named_tensor_metrics(seq[1], grp[1])["max_rel_l2"]
        if lora:
            out["lora_adapter_grad_max_rel_l2"] = named_tensor_metrics(seq[2], grp[2])["max_rel_l2"]
    return out


def timing(small: bool, device: str, tokens: int, reps: int = 5) -> dict:
    """Seconds and tokens/s of the bf16 block's forward + backward on each path, and the grouped speedup."""
    model, block = moe_block(small, torch.bfloat16, device)
    x = torch.randn(tokens, 1, model.spec.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = {}
    for path in ("sequential", "grouped"):
        set_expert_path(model, path)

        def step() -> None:
            block(x, x).float().square().mean().backward()

        rec, _ = timed(step, device, warmup=1, reps=reps)
        out[path] = {"seconds": rec["seconds"], "tok_per_s": tokens / rec["seconds"]}
    out["grouped_speedup"] = out["sequential"]["seconds"] / out["grouped"]["seconds"]
    return out


def main() -> int:
    """Measure both dtypes' agreement and the bf16 timing, write expert_paths.json into --out and print it; 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    device = "cpu" if args.small else "cuda"
    set_runtime(RuntimeConfig())
    tokens = 256 if args.small else 8192
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "tokens": tokens}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        try:
            result[f"agreement_{name}"] = agreement(args.small, dtype, device, min(tokens, 2048))
        except Exception as exc:  # noqa: BLE001 - recorded: which dtype the grouped kernel refuses
            result[f"agreement_{name}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    try:
        result["timing_bf16"] = timing(args.small, device, tokens)
    except Exception as exc:  # noqa: BLE001
        result["timing_bf16"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expert_paths.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
