"""The trainer half of the trainability loop on a GPU: one LoRA policy-gradient step (forward with chunked,
checkpointed log-probs, GRPO-clip loss against sampler log-probs, backward into the adapters only, Adam step) on
the 26B-A4B layer shapes cut to 6 layers (real vocabulary 262,144), bf16 weights, fp32 LoRA (rank 16 on every
projection and every expert), packed rows of 8,192 tokens with GRPO groups as shared-prefix branches.

Measured: step seconds (median of 3 after a warm-up), tokens/s, peak memory, the number of trainable parameters,
that only adapter tensors received gradients, and that the step changed the adapter. Model construction is shared
with scripts/gpu/scoring_memory.py (same cut, same random weights).

  pip install --no-deps --target /tmp/site .whl/megatron_core-*.whl && PYTHONPATH=/tmp/site \\
      python scripts/gpu/lora_train_step.py --out "$OUT"          # on the H200
  .venv/bin/python scripts/gpu/lora_train_step.py --small --out /tmp/x   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "gpu"))

import torch  # noqa: E402

from gemma4_support.logprobs import score_row  # noqa: E402
from gemma4_support.loss import policy_loss  # noqa: E402
from gemma4_support.packing import pack  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from scoring_memory import GiB, build, measure  # noqa: E402
from validation.throughput import cut_config  # noqa: E402

FULL_ROW = [(1024, [768] * 4), (1024, [704] * 4), 256]  # two GRPO groups of 4 completions + one document: 8,192
SMALL_ROW = [(64, [48] * 4), (64, [48] * 4), 64]  # 576 tokens


def main() -> int:
    """Time one LoRA GRPO-clip step on the cut, check only the adapters trained, write and print the JSON; 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--attention", default=None, help='default: "auto" on cuda, "dense" with --small')
    args = ap.parse_args()
    device = "cpu" if args.small else "cuda"
    layout = SMALL_ROW if args.small else FULL_ROW
    geometry = pack(layout)
    set_runtime(RuntimeConfig(packing_capacity=geometry.length))
    cfg = cut_config(small=args.small)
    attention = args.attention or ("dense" if args.small else "auto")
    model, adapters = build(cfg, attention, device, seed=0)
    model.train()
    with torch.no_grad():
        for name, p in adapters.named_parameters():
            if name.startswith("lora_B"):
                p.zero_()  # PEFT's init: the step starts from the base model
    gen = torch.Generator().manual_seed(0)
    row = geometry.with_tokens(torch.randint(5, cfg["vocab_size"], (geometry.length,), generator=gen))
    row = row.to(device)
    mask = row.loss_mask & (row.branches() > 0)  # train the completions only, as the RL rows do
    sampler = torch.full((row.length,), -8.0, device=device, dtype=torch.float64)
    advantages = torch.randn(row.length, generator=gen).to(device)
    opt = torch.optim.Adam(adapters.parameters(), lr=1e-4)
    before = {n: p.detach().clone() for n, p in adapters.named_parameters()}

    def step():  # noqa: ANN202
        opt.zero_grad(set_to_none=True)
        lp = score_row(model, row, chunk_tokens=args.chunk_tokens).logprobs
        loss, _ = policy_loss(lp, sampler, advantages, mask)
        loss.backward()
        opt.step()
        return float(loss.detach())

    rec, loss = measure(step, device)
    base_grads = sum(1 for p in model.parameters() if p.grad is not None)
    moved = sum(1 for n, p in adapters.named_parameters() if not torch.equal(before[n], p.detach()))
    result = {
        "what": "one LoRA GRPO-clip step: chunked checkpointed log-probs, backward into the adapters, Adam",
        "config": "26B-A4B cut to 6 layers" + (" (small)" if args.small else ""), "vocab": cfg["vocab_size"],
        "tokens": row.length, "trained_tokens": int(mask.sum()), "layout": str(layout), "dtype": "bfloat16",
        "lora": {"rank": 16, "alpha": 32, "pairs": len(adapters.trained_names()),
                 "trainable_params": sum(p.numel() for p in adapters.parameters())},
        "attention": attention, "chunk_tokens": args.chunk_tokens, "loss": loss,
        "step_seconds": rec["seconds"], "step_seconds_all": rec["seconds_all"],
        "tokens_per_s": row.length / rec["seconds"], "peak_gib": rec["peak_gib"],
        "weights_gib": torch.cuda.memory_allocated() / GiB if device == "cuda" else None,
        "base_params_with_grad": base_grads, "adapter_tensors_moved": moved,
        "adapter_tensors": len(before), "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lora_train_step_{attention}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
