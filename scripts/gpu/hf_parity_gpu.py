"""Stage hf_parity on a GPU: megatron-core Gemma 4 vs HF transformers, fp32 and bf16, at 4096 tokens, gated the way
the suite gates them (relative to HF's own precision).

Cases: the two tiny fixtures (moe, dense) and a random-weight model with the real 26B-A4B layer shapes cut
to 6 layers (5 sliding + 1 full: hidden 2816, 16 q heads, sliding 8 kv x 256, full 2 kv x 512 with K=V,
128 experts top-8, expert width 704, dense width 2112, window 1024), vocab cut to --vocab (default 32768)
to keep the [4096, vocab] float64 metric tensors small. Layouts: one 4096-token sequence and a packed row
of three documents.
  fp32: HF fp32 (its own routing), then HF fp64 (the same model cast, exactly) and Megatron fp32 with HF fp32's
        expert choices imposed; max |Δ log-prob| <= max(1e-4, 2 x HF fp32's distance from fp64), KL, routing,
        loss and every gradient (those fp32 cannot resolve judged against fp64) — `validation.parity.fp32_gates`.
  bf16: HF bf16 and Megatron bf16, both with the fp32 run's expert choices imposed; Megatron's distance from the
        HF fp32 reference (mean-abs-%, KL) <= 1.25 x HF bf16's, and <= 10 % / 0.05 — `hf_parity_forward_bf16`.

Runs standalone (no pytest); needs torch, transformers (>= 5.17) and megatron-core (carry its wheel):
  pip install --no-deps .whl/megatron_core-0.16.1-*.whl && python scripts/gpu/hf_parity_gpu.py --out "$OUT"
On CPU, `--small` runs the same code at 64 tokens with a 2-layer-wide toy cut (a smoke test).
Prints a markdown table and writes hf_parity_gpu.json / hf_parity_gpu.md into --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.metrics import evaluate  # noqa: E402
from gemma4_support.packing import PackedRow  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.hf_checkpoints import random_hf_model  # noqa: E402,F401 - also scripts/gpu/flex_vs_dense_gpu.py's
from validation.parity import (  # noqa: E402
    SideResult, backward_metrics, forward_metrics, fp32_floor_metrics, fp32_gates, hf_side, load_hf_reference,
    low_precision_metrics, megatron_side, packed_lengths, random_row,
)
from validation.throughput import cut_config, megatron_from  # noqa: E402
from validation.thresholds import (  # noqa: E402
    HF_PARITY_GRAD_RESOLVED, HF_PARITY_GRAD_SMALL, ROUTER_TIE_MARGIN, hf_parity_forward_bf16,
)


def cut_26b_config(vocab: int, small: bool) -> dict:
    """The 26B-A4B text config cut to 6 layers (5 sliding + 1 full); `small` shrinks widths for a CPU smoke run."""
    cfg = cut_config(small=small, vocab=vocab, window=8 if small else None)
    cfg.update(max_position_embeddings=8192, architectures=["Gemma4ForCausalLM"])
    return cfg


def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move a dict of tensors to host memory (frees GPU memory between sides)."""
    return {k: v.detach().to("cpu") for k, v in tensors.items()}


ATTENTION = "dense"  # --attention: the recorded table (docs/gpu_hf_parity.md) used the dense backend


def cast_hf_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the HF model in place the way `from_pretrained(dtype=...)` loads it: parameters and buffers in `dtype`,
    the rotary inverse frequencies kept in fp32 (a plain `.to(torch.bfloat16)` would round them to bf16 and give HF
    bf16 a RoPE no loaded checkpoint has). fp32 -> fp64 -> fp32 is exact."""
    keep = {name: buf.detach().clone() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(dtype)
    for name, saved in keep.items():
        owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(owner, attr, saved.to(torch.float32))
    return model


def _free(device: str) -> None:
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None


FP64_GRADS = True  # --no-fp64-grads: the fp64 run forward only (its backward does not fit at 26B-A4B shapes on one H200)


def fp32_case(hf_model: torch.nn.Module, batch: PackedRow,
              device: str) -> tuple[SideResult, dict[str, float], dict[str, object]]:
    """One fp32 training step on each side (Megatron replays HF's routing), then the same HF model cast to fp64 (an
    exact cast) with HF fp32's routing imposed: (ref, forward metrics, backward metrics). Without fp64 gradients,
    every gradient is held to the rel-L2 gate against HF fp32 (the gate as it was before the fp64 split). The HF
    model waits in host memory during Megatron's step (moves are exact), so the 26B-A4B cut's peak is one fp32 model
    with its gradients, or the fp64 model's forward: 37.2 GiB of parameters (5.0 B) before activations."""
    ref = hf_side(hf_model, batch, backward=True)
    ref.grads = to_cpu(ref.grads)
    hf_model.zero_grad(set_to_none=True)
    hf_model.to("cpu")  # host memory while Megatron's side runs: one fp32 model and its gradients on the card at a time
    _free(device)
    model = megatron_from(hf_model, torch.float32, device, ATTENTION)
    cand = megatron_side(model, batch, backward=True, replay=ref.routing)
    cand.grads = to_cpu(cand.grads)
    del model
    _free(device)
    hf_model.to(device)
    cast_hf_(hf_model, torch.float64)
    truth = hf_side(hf_model, batch, backward=FP64_GRADS, replay=ref.routing)
    truth.grads = to_cpu(truth.grads) if FP64_GRADS else None
    hf_model.zero_grad(set_to_none=True)
    cast_hf_(hf_model, torch.float32)
    _free(device)
    fwd = {**forward_metrics(ref, cand, batch, ROUTER_TIE_MARGIN), **fp32_floor_metrics(truth, ref, cand, batch)}
    bwd = backward_metrics(ref, cand, truth if FP64_GRADS else None, (HF_PARITY_GRAD_RESOLVED, HF_PARITY_GRAD_SMALL))
    bwd.pop("per_tensor_rel_l2")
    return ref, fwd, bwd


def bf16_case(hf_model: torch.nn.Module, ref: SideResult, batch: PackedRow, device: str) -> dict[str, float]:
    """HF bf16 (the same model cast) and Megatron bf16, both with the fp32 run's routing imposed, against `ref`."""
    with torch.no_grad():
        hf = hf_side(hf_model, batch, backward=False, replay=ref.routing)
        model = megatron_from(hf_model, torch.bfloat16, device, ATTENTION)
        cand = megatron_side(model, batch, backward=False, replay=ref.routing)
    del model
    _free(device)
    return low_precision_metrics(ref, hf, cand, batch, "bf16")


def run_case(name: str, hf_model: torch.nn.Module, seq: int, layouts: list[str], seed: int, device: str) -> list[dict]:
    """fp32 then bf16 for every layout of one model; rows for the table."""
    spec = load_spec(hf_model.config.to_dict())
    rows, refs = [], {}
    batches = {lay: random_row((seq,) if lay == "single" else packed_lengths(seq, spec.sliding_window),
                               spec.vocab_size, seed, pad_id=spec.pad_token_id).to(device) for lay in layouts}
    for layout, batch in batches.items():  # ---- fp32
        _reset_peak(device)
        t0 = time.time()
        ref, fwd, bwd = fp32_case(hf_model, batch, device)
        gates = fp32_gates(fwd, spec.moe is not None, True)
        gates = gates if FP64_GRADS else tuple(g for g in gates if g.metric != "unresolved_grad_vs_fp64_ratio")
        rows.append(_row(name, "fp32", layout, batch, {**fwd, **bwd}, gates, t0))
        ref.grads = None
        refs[layout] = ref
    cast_hf_(hf_model, torch.bfloat16)
    for layout, batch in batches.items():  # ---- bf16
        _reset_peak(device)
        t0 = time.time()
        m = bf16_case(hf_model, refs.pop(layout), batch, device)
        rows.append(_row(name, "bf16", layout, batch, m, hf_parity_forward_bf16(
            m["hf_bf16_vs_fp32_mean_abs_pct"], m["hf_bf16_vs_fp32_mean_kl"]), t0))
    return rows


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _row(name, dtype, layout, batch, metrics, gates, t0: float) -> dict:
    results = evaluate({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, gates)
    seconds = time.time() - t0
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if batch.input_ids.is_cuda else None
    failed = "; ".join(r.describe() for r in results if not r.passed)
    print(f"  {name} {dtype} {layout}: {'PASS' if not failed else 'FAIL ' + failed} ({seconds:.1f} s, "
          f"peak {peak} GiB)", flush=True)
    return {"case": name, "dtype": dtype, "layout": layout, "seq": batch.length,
            "doc_lengths": batch.document_lengths(), "metrics": metrics, "gates": [r.to_dict() for r in results],
            "passed": all(r.passed for r in results), "seconds": round(seconds, 2), "peak_gib": peak}


def markdown(rows: list[dict]) -> str:
    """The results tables: fp32 (with the fp64 floor and the gate it sets) and bf16 (each side's distance from fp32)."""
    fp32 = ["| case | layout | seq | max_abs_logprob | HF fp32 vs fp64 | Megatron fp32 vs fp64 | allowed | mean_kl | "
            "loss_rel_diff | worst grad rel-L2 (tensor) | unresolved grads (n, ratio) | routing flips (all / decisive) "
            "| gates |", "|" + "---|" * 13]
    bf16 = ["| case | layout | seq | HF bf16 vs fp32 mean-abs-% | Megatron bf16 vs fp32 mean-abs-% | HF bf16 KL | "
            "Megatron bf16 KL | Megatron vs HF bf16 mean-abs-% | gates |", "|" + "---|" * 9]
    for r in rows:
        m, g = r["metrics"], {x["metric"]: x["threshold"] for x in r["gates"]}
        verdict = "pass" if r["passed"] else "FAIL"
        if r["dtype"] == "fp32":
            route = (f"{m['router_token_mismatch_frac']:.2g} / {m['router_decisive_mismatch_frac']:.2g}"
                     if "router_token_mismatch_frac" in m else "-")
            fp32.append(
                f"| {r['case']} | {r['layout']} | {r['seq']} | {m['max_abs_logprob']:.3g} | "
                f"{m['hf_fp32_vs_fp64_max_abs_logprob']:.3g} | {m['megatron_fp32_vs_fp64_max_abs_logprob']:.3g} | "
                f"{g['max_abs_logprob']:.3g} | {m['mean_kl']:.3g} | {m['loss_rel_diff']:.3g} | {m['max_rel_l2']:.3g} "
                f"(`{m['worst']}`) | {m.get('unresolved_grad_tensors', '-')}, {m.get('unresolved_grad_vs_fp64_ratio', '-')} | "
                f"{route} | "
                f"{verdict} |")
        else:
            bf16.append(
                f"| {r['case']} | {r['layout']} | {r['seq']} | {m['hf_bf16_vs_fp32_mean_abs_pct']:.3g} | "
                f"{m['megatron_bf16_vs_fp32_mean_abs_pct']:.3g} | {m['hf_bf16_vs_fp32_mean_kl']:.3g} | "
                f"{m['megatron_bf16_vs_fp32_mean_kl']:.3g} | {m['megatron_vs_hf_bf16_mean_abs_pct']:.3g} | {verdict} |")
    return "\n".join(fp32) + "\n\n" + "\n".join(bf16)


def main() -> int:
    """Run every case and layout, print the tables, write the JSON and markdown; 0 if every row passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="directory for hf_parity_gpu.json / .md")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768, help="vocab of the 26B-A4B-shaped cut (real: 262144)")
    parser.add_argument("--layouts", default="single,packed")
    parser.add_argument("--cases", default="fixture-moe,fixture-dense,26B-A4B-cut6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: 64 tokens, shrunken 26B-A4B widths")
    parser.add_argument("--attention", default="dense", choices=("dense", "flex", "auto"), help="Megatron attention backend")
    parser.add_argument("--no-fp64-grads", action="store_true", help="fp64 run forward only (memory): gradients vs HF fp32")
    args = parser.parse_args()
    global ATTENTION, FP64_GRADS
    ATTENTION, FP64_GRADS = args.attention, not args.no_fp64_grads
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
           "vocab_26b_cut": vocab, "seq": seq, "fp64_grads": FP64_GRADS}
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
