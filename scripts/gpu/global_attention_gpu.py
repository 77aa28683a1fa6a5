"""Kernels for Gemma 4's 512-wide global attention heads on a GPU: which exact kernel attends fastest.

The global layers of the 26B-A4B (16 query heads, 2 kv heads, head dim 512, scale 1.0) on one packed row of
8,192 tokens (two 4,096-token documents, causal within each): the dense reference (`core.attend`: scores
materialised), SDPA with the boolean mask (torch's choice, and each backend forced), and flex_attention with
planned BlockMasks and smaller kernel tiles (the default tiles need more shared memory than Hopper has at head dim
512). Per candidate: forward and forward + backward time (median of 5 after 2 warm-ups), peak memory, and the
distance of its output and gradients from an fp32 dense run of the same bf16 inputs.

  python scripts/gpu/global_attention_gpu.py --out "$OUT"                      # on the GPU
  .venv/bin/python scripts/gpu/global_attention_gpu.py --small --out /tmp/x    # CPU smoke run (dense, sdpa)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from gemma4_support.attention import core  # noqa: E402
from gemma4_support.attention.block_masks import WIDE_HEAD_KERNEL_OPTIONS, build_block_mask  # noqa: E402
from gemma4_support.attention.masks import packing_dense_mask  # noqa: E402
from gemma4_support.metrics import tensor_diff  # noqa: E402
from gemma4_support.packing import PackedRow  # noqa: E402
from validation.throughput import timed  # noqa: E402

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

FLEX_TILES = {  # kernel_options tried for head dim 512 (forward BLOCK_M/N; backward M1/N1/M2/N2)
    "flex_t32": {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4,
                 "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16},
    "flex_t64x32": {"BLOCK_M": 64, "BLOCK_N": 32, "num_stages": 1, "num_warps": 8,
                    "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16},
    "flex_t16": {"BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 1, "num_warps": 4,
                 "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16},
}
MODEL_TILES = WIDE_HEAD_KERNEL_OPTIONS[torch.bfloat16]  # the model's choice: forward 32 x 32, backward 16 x 16
FLEX_TILES |= {  # backward tiles around it
    "flex_model": MODEL_TILES,
    "flex_b16x32_w8": {**MODEL_TILES, "num_warps": 8, "BLOCK_N1": 32, "BLOCK_M2": 32},
    "flex_b32_w8": {**MODEL_TILES, "num_warps": 8, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 32},
    "flex_b16_s2": {**MODEL_TILES, "num_stages": 2},
}


def row_of(tokens: int, documents: int, device: str) -> PackedRow:
    """One packed row of equal documents, positions restarting per document."""
    per = tokens // documents
    pos = torch.arange(tokens) % per
    doc = torch.arange(tokens) // per
    return PackedRow(pos.to(device), doc.to(device))


def sdpa(backend: SDPBackend | None,
         expand: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """SDPA with the boolean mask, scale 1.0 (a forced backend, or torch's choice)."""
    def attend(q, k, v, mask):  # noqa: ANN001, ANN202
        groups = q.shape[1] // k.shape[1]
        if expand:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        kwargs = {} if expand else {"enable_gqa": groups > 1}
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=1.0, **kwargs)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=1.0, **kwargs)
    return attend


def flex(options: dict) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockMask], torch.Tensor]:
    """Compiled flex_attention with a BlockMask and these kernel options (tiles), scale 1.0, GQA when needed."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def attend(q, k, v, block_mask):  # noqa: ANN001, ANN202
        return compiled(q, k, v, block_mask=block_mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1],
                        kernel_options=options)
    return attend


def main() -> None:
    """Time every candidate and its distance from fp32 dense attention; writes global_attention_gpu.json into --out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="CPU smoke shapes")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--documents", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated candidate names to run (default: all)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heads, kv, dim, tokens = (4, 1, 64, 256) if args.small else (16, 2, 512, args.tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, tokens, dim, device=device, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(1, kv, tokens, dim, device=device, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(1, kv, tokens, dim, device=device, generator=gen, dtype=torch.bfloat16)
    q, k = q / dim ** 0.25, k / dim ** 0.25  # scores of unit scale (scale 1.0: the norms do the scaling in Gemma 4)
    grad_out = torch.randn(1, heads, tokens, dim, device=device, generator=gen, dtype=torch.bfloat16)
    row = row_of(tokens, args.documents, device)
    mask = packing_dense_mask(row, None).unsqueeze(0).to(device)

    def run(attend, m, dtype):  # noqa: ANN001, ANN202
        qi, ki, vi = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        out = attend(qi, ki, vi, m)
        out.backward(grad_out.to(dtype))
        return out.detach().float(), [t.grad.float() for t in (qi, ki, vi)]

    ref_out, ref_grads = run(core.attend, mask, torch.float32)
    candidates = {"dense": (core.attend, mask), "sdpa_auto": (sdpa(None, False), mask),
                  "sdpa_efficient": (sdpa(SDPBackend.EFFICIENT_ATTENTION, True), mask),
                  "sdpa_cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION, True), mask),
                  "sdpa_flash": (sdpa(SDPBackend.FLASH_ATTENTION, False), mask)}
    if device == "cuda":
        masks = {block: build_block_mask(row, None, block, device=device) for block in (64, 128)}
        for name, block in (("flex_t32", 128), ("flex_t64x32", 128), ("flex_t16", 64), ("flex_model", 64),
                            ("flex_b16x32_w8", 64), ("flex_b32_w8", 64), ("flex_b16_s2", 64)):
            candidates[f"{name}_mask{block}"] = (flex(FLEX_TILES[name]), masks[block])
    if args.only:
        candidates = {n: c for n, c in candidates.items() if n in args.only.split(",")}
    results = {}
    for name, (attend, m) in candidates.items():
        entry: dict = {}
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
            out, grads = run(attend, m, torch.bfloat16)
            entry["out"] = tensor_diff(ref_out, out)
            entry["grads"] = {g: tensor_diff(b, a) for g, a, b in zip("qkv", grads, ref_grads)}
            qi, ki, vi = (t.detach().requires_grad_(True) for t in (q, k, v))
            with torch.no_grad():
                forward, _ = timed(lambda: attend(q, k, v, m), device, warmup=2, reps=5)
            train, _ = timed(lambda: attend(qi, ki, vi, m).backward(grad_out), device, warmup=2, reps=5)
            entry["forward_ms"], entry["train_ms"] = 1e3 * forward["seconds"], 1e3 * train["seconds"]
            if device == "cuda":
                entry["peak_gib"] = train["peak_gib"]  # the forward + backward's own peak
        except Exception as exc:  # a kernel that cannot run these shapes is a result, not a crash
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        results[name] = entry
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()
                     if k in ("forward_ms", "train_ms", "peak_gib", "error")},
              "out max_abs", entry.get("out", {}).get("max_abs"), flush=True)
    doc = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
           "shapes": {"heads": heads, "kv_heads": kv, "head_dim": dim, "tokens": tokens, "documents": args.documents},
           "reference": "dense attention in fp32 on the same bf16 inputs", "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "global_attention_gpu.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
