"""Stage hf_parity on a GPU: megatron-core Gemma 4 vs HF transformers, fp32 and bf16, at 4096 tokens.

Cases: the two tiny fixtures (moe, dense) and a random-weight model with the real 26B-A4B layer shapes cut
to 6 layers (5 sliding + 1 full: hidden 2816, 16 q heads, sliding 8 kv x 256, full 2 kv x 512 with K=V,
128 experts top-8, expert width 704, dense width 2112, window 1024), vocab cut to --vocab (default 32768)
to keep the [4096, vocab] float64 metric tensors small. Layouts: one 4096-token sequence and a packed row
of three documents. fp32: forward gates, loss and every gradient. bf16: Megatron bf16 vs HF bf16 (gated),
and each against HF fp32 (recorded: the bf16 noise floor).

Runs standalone (no pytest); needs torch, transformers (>= 5.17) and megatron-core (carry its wheel):
  pip install --no-deps .whl/megatron_core-0.16.1-*.whl && python scripts/gpu/hf_parity_gpu.py --out "$OUT"
On CPU, `--small` runs the same code at 64 tokens with a 2-layer-wide toy cut (a smoke test).
Prints a markdown table and writes hf_parity_gpu.json / hf_parity_gpu.md into --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemma4_support.config.families import truncate_config  # noqa: E402
from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.convert.checkpoint import TensorDict, load_hf_weights  # noqa: E402
from gemma4_support.metrics import evaluate  # noqa: E402
from gemma4_support.model.build import build_model  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.parity import (  # noqa: E402
    SideResult, backward_metrics, forward_metrics, hf_side, load_hf_reference, megatron_side, packed_lengths, random_row,
)
from validation.thresholds import (  # noqa: E402
    HF_PARITY_BACKWARD_FP32, HF_PARITY_FORWARD_BF16, HF_PARITY_FORWARD_FP32, HF_PARITY_ROUTER_FP32, ROUTER_TIE_MARGIN,
)


def cut_26b_config(vocab: int, small: bool) -> dict:
    """The 26B-A4B text config cut to 6 layers (5 sliding + 1 full); `small` shrinks widths for a CPU smoke run."""
    from fixtures.configs import real_config

    cfg = truncate_config(real_config("26B-A4B"), 6)
    cfg.update(vocab_size=vocab, max_position_embeddings=8192, architectures=["Gemma4ForCausalLM"])
    if small:
        cfg.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1,
                   head_dim=64, global_head_dim=128, intermediate_size=96, num_experts=16, top_k_experts=4,
                   moe_intermediate_size=32, sliding_window=8)
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights far from the init defaults: every learned scale away from 1, peaky routing, O(1) logits."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_((torch.randn(t.shape, generator=gen) * std + mean).to(t.device, t.dtype))

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("embed_tokens.weight"):
            normal(t, 0.0, 0.1)
        elif name.endswith("router.proj.weight"):
            normal(t, 0.0, 1.5)
        elif name.endswith(("proj.weight", "gate_up_proj", "down_proj")):
            normal(t, 0.0, 1.0 / math.sqrt(t.shape[-1]))
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            normal(t, 0.5, 0.08)
        elif name.endswith("model.norm.weight"):
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


def random_hf_model(cfg: dict, seed: int, device: str) -> torch.nn.Module:
    """HF Gemma4ForCausalLM (eager attention and experts, fp32) with `randomize_` weights."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig.from_dict(cfg)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    with torch.device(device):
        model = Gemma4ForCausalLM(config)
    randomize_(model, seed)
    return model.train()


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move a dict of tensors to host memory (frees GPU memory between sides)."""
    return {k: v.detach().to("cpu") for k, v in tensors.items()}


ATTENTION = "dense"  # --attention: the recorded table (docs/gpu_hf_parity.md) used the dense backend


def megatron_from(hf_model: torch.nn.Module, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Build the megatron-core model for the HF model's config and stream its weights in through the table."""
    cfg = hf_model.config.to_dict()
    spec = load_spec(cfg)
    model = build_model(spec, dtype=dtype, device=device, attention=ATTENTION)
    load_hf_weights(model, TensorDict(dict(hf_model.state_dict())))
    return model


def compare(hf_model: torch.nn.Module, batch, dtype: torch.dtype, device: str):
    """One training step on both sides in `dtype` (Megatron replays HF's routing): (ref, cand, fwd, bwd)."""
    ref = hf_side(hf_model, batch, backward=True)
    ref.grads = to_cpu(ref.grads)
    hf_model.zero_grad(set_to_none=True)
    model = megatron_from(hf_model, dtype, device)
    cand = megatron_side(model, batch, backward=True, replay=ref.routing)
    cand.grads = to_cpu(cand.grads)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    bwd = backward_metrics(ref, cand)
    bwd.pop("per_tensor_rel_l2")
    return ref, cand, forward_metrics(ref, cand, batch, ROUTER_TIE_MARGIN), bwd


def run_case(name: str, hf_model: torch.nn.Module, seq: int, layouts: list[str], seed: int, device: str) -> list[dict]:
    """fp32 then bf16 for every layout of one model; rows for the table."""
    spec = load_spec(hf_model.config.to_dict())
    rows = []
    batches = {lay: random_row((seq,) if lay == "single" else packed_lengths(seq, spec.sliding_window),
                               spec.vocab_size, seed, pad_id=spec.pad_token_id).to(device) for lay in layouts}
    fp32_logits = {}
    fp32_gates = HF_PARITY_FORWARD_FP32 + HF_PARITY_BACKWARD_FP32 + (HF_PARITY_ROUTER_FP32 if spec.moe else ())
    for layout, batch in batches.items():  # ---- fp32
        t0 = time.time()
        ref, cand, fwd, bwd = compare(hf_model, batch, torch.float32, device)
        row = _row(name, "fp32", layout, batch, fwd, bwd, fp32_gates, time.time() - t0)
        hf_model.to(torch.float64)  # fp32 -> fp64 -> fp32 is exact: the fp64 run is the rounding-free truth
        truth = hf_side(hf_model, batch, backward=False).logits
        hf_model.to(torch.float32)
        row["vs_hf_fp64"] = _floor(truth, ref, cand, batch, device)
        rows.append(row)
        fp32_logits[layout] = ref.logits.to("cpu")
        del ref, cand, truth
    hf_model.to(torch.bfloat16)
    for layout, batch in batches.items():  # ---- bf16
        t0 = time.time()
        ref, cand, fwd, bwd = compare(hf_model, batch, torch.bfloat16, device)
        floor_ref = forward_metrics(_logits(fp32_logits[layout], device), ref, batch)
        floor_cand = forward_metrics(_logits(fp32_logits[layout], device), cand, batch)
        row = _row(name, "bf16", layout, batch, fwd, bwd, HF_PARITY_FORWARD_BF16, time.time() - t0)
        row["vs_hf_fp32"] = {"hf_bf16_mean_abs_pct": floor_ref["logprob_mean_abs_pct"],
                             "megatron_bf16_mean_abs_pct": floor_cand["logprob_mean_abs_pct"],
                             "hf_bf16_mean_kl": floor_ref["mean_kl"], "megatron_bf16_mean_kl": floor_cand["mean_kl"]}
        rows.append(row)
        del ref, cand
    return rows


def _floor(truth: torch.Tensor, ref, cand, batch, device: str) -> dict:
    """How far HF fp32 and Megatron fp32 each are from the fp64 truth: the fp32 rounding floor at this size."""
    t = _logits(truth, device)
    hf, meg = forward_metrics(t, ref, batch), forward_metrics(t, cand, batch)
    return {"hf_fp32_max_abs_logprob": hf["max_abs_logprob"], "megatron_fp32_max_abs_logprob": meg["max_abs_logprob"],
            "hf_fp32_mean_kl": hf["mean_kl"], "megatron_fp32_mean_kl": meg["mean_kl"]}


def _logits(logits: torch.Tensor, device: str):
    return SideResult(logits.to(device))


def _row(name, dtype, layout, batch, fwd, bwd, gates, seconds) -> dict:
    metrics = {**fwd, **bwd}
    results = evaluate({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, gates)
    print(f"  {name} {dtype} {layout}: {'PASS' if all(r.passed for r in results) else 'FAIL'} ({seconds:.1f} s)", flush=True)
    return {"case": name, "dtype": dtype, "layout": layout, "seq": batch.length,
            "doc_lengths": batch.document_lengths(), "metrics": metrics, "gates": [r.to_dict() for r in results],
            "passed": all(r.passed for r in results), "seconds": round(seconds, 2)}


def markdown(rows: list[dict]) -> str:
    """The results table."""
    head = ("| case | dtype | layout | seq | max_abs_logprob | mean_abs_logprob | mean_abs_pct | mean_kl | "
            "loss_rel_diff | worst grad rel-L2 (tensor) | routing flips (all / decisive) | gates |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        m = r["metrics"]
        route = (f"{m['router_token_mismatch_frac']:.2g} / {m['router_decisive_mismatch_frac']:.2g}"
                 if "router_token_mismatch_frac" in m else "-")
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['layout']} | {r['seq']} | {m['max_abs_logprob']:.3g} | "
            f"{m['mean_abs_logprob']:.3g} | {m['logprob_mean_abs_pct']:.3g} | {m['mean_kl']:.3g} | "
            f"{m['loss_rel_diff']:.3g} | {m['max_rel_l2']:.3g} (`{m['worst']}`) | {route} | "
            f"{'pass' if r['passed'] else 'FAIL'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for hf_parity_gpu.json / .md")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768, help="vocab of the 26B-A4B-shaped cut (real: 262144)")
    parser.add_argument("--layouts", default="single,packed")
    parser.add_argument("--cases", default="fixture-moe,fixture-dense,26B-A4B-cut6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: 64 tokens, shrunken 26B-A4B widths")
    parser.add_argument("--attention", default="dense", choices=("dense", "flex", "auto"), help="Megatron attention backend")
    args = parser.parse_args()
    global ATTENTION
    ATTENTION = args.attention
    set_runtime(RuntimeConfig())
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    seq = 64 if args.small else args.seq
    vocab = 512 if args.small else args.vocab
    layouts = args.layouts.split(",")
    rows = []
    for case in args.cases.split(","):
        print(f"{case}:", flush=True)
        if case.startswith("fixture-"):
            from fixtures.factory import fixture_dir

            hf_model = load_hf_reference(str(fixture_dir(case.removeprefix("fixture-"))), device=device)
        else:
            hf_model = random_hf_model(cut_26b_config(vocab, args.small), args.seed, device)
        rows += run_case(case, hf_model, seq, layouts, args.seed, device)
        del hf_model
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
    table = markdown(rows)
    print(table)
    import transformers

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "vocab_26b_cut": vocab, "seq": seq}
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception:  # pragma: no cover
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_parity_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2, default=str))
    (out / "hf_parity_gpu.md").write_text(table + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
