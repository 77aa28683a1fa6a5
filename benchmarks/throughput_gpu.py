"""Benchmark (stage throughput, issue 12): our Megatron trainer against HF transformers on one GPU.

Default: `validation.throughput.run` on the 26B-A4B shapes cut to --layers (6: 5 sliding + 1 full), vocabulary
262,144, bf16, --tokens (8,192) a step as one packed row of two documents (HF: the same tokens as 2 x 4,096), random
weights drawn once: our train step (every parameter), scoring forward, LoRA r16 step and LoRA scoring against HF's
train step (sdpa, each experts implementation, the fastest kept) and forward; tok/s, peak memory, FLOPs per token,
MFU against a bf16 8192^3 matmul measured in the same run, the top 15 CUDA kernels of one train step, and the
stage's GPU gates (validation/thresholds.py) evaluated on the numbers.

--full-depth-lora: the whole 30-layer 26B-A4B shapes. Ours: LoRA r16 on every projection and every expert ("all") and
on PEFT's targets ("peft", the like-for-like comparison; --lora-targets), AdamW on the adapters, recomputation chosen
by --recompute-layers (default: every decoder layer; "N+experts": N layers whole, the other layers' routed experts),
one packed row of 16,384 tokens (four documents of 4,096).
HF + PEFT: LoRA r16 on q/k/v/o and the dense MLP (PEFT cannot adapt HF's fused expert tensors), gradient
checkpointing, AdamW, the same tokens as 4 x 4,096. tok/s and peak memory side by side; PEFT is imported lazily (a
machine without it records "peft not installed"). Same weights on both sides, one model on the GPU at a time.

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
  python3 benchmarks/throughput_gpu.py --out "$OUT"                       # one GPU
  python3 benchmarks/throughput_gpu.py --out "$OUT" --full-depth-lora     # ~47 GiB of bf16 weights: an H200
  .venv/bin/python benchmarks/throughput_gpu.py --small --out /tmp/tp     # CPU smoke run (tiny widths, fp32, 1 thread)
Writes throughput_gpu.{json,md} (or throughput_full_depth_lora.{json,md}) into --out and prints the table.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.lora import attach_lora, detach_lora  # noqa: E402
from gemma4_support.metrics import evaluate  # noqa: E402
from gemma4_support.model.model import set_recompute  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.throughput import (  # noqa: E402
    Workload, allocated_gib, cut_config, describe, expert_path, flop_per_token, free, hf_model, hf_train_step,
    lora_flop_per_token, lora_r16, matmul_ceiling, measure, megatron_model, packed_documents, random_state, run,
    set_hf_experts, train_step,
)
from validation.thresholds import throughput_gates  # noqa: E402

PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fmt(x: object, spec: str) -> str:
    """A number formatted, or "-"."""
    return "-" if x is None else format(x, spec)


def table(measurements: dict[str, dict]) -> str:
    """The markdown table of measurement records."""
    lines = ["| measurement | status | median s | tok/s | peak GiB | TFLOP/s | MFU | loss |", "|---" * 8 + "|"]
    for name, r in measurements.items():
        if r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status')}: {r.get('error', '')[:120]} | - | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | ok | {r['seconds']:.4f} | {r['tok_per_s']:,.0f} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{r['achieved_tflops']:.2f} | {fmt(r['mfu'], '.3f')} | {fmt(r.get('loss'), '.5f')} |")
    return "\n".join(lines)


def harness(args: argparse.Namespace, device: str) -> tuple[dict, str]:
    """The default mode: validation.throughput.run, its GPU gates, and the markdown."""
    small = args.small
    cfg = cut_config(args.layers, small=small)
    w = Workload(cfg, tokens=args.tokens or (256 if small else 8192), dtype="float32" if small else "bfloat16",
                 device=device, attention="dense" if small else args.attention, seed=args.seed,
                 warmup=1 if small else 2, reps=args.reps, chunk_tokens=128 if small else args.chunk_tokens,
                 score_chunk_tokens=128 if small else args.score_chunk_tokens,
                 ceiling_n=1024 if small else 8192, expert_path=args.expert_path, hf=not args.no_hf,
                 freeze_gc=not args.no_freeze_gc)
    result = run(w)
    if args.no_hf:  # our variants only: the measurement table
        return result, f"ours only (experts {result['ours']['expert_path']}, attention {w.attention})\n\n" + \
            table(result["measurements"]) + "\n"
    gates = evaluate({k: v for k, v in result["metrics"].items() if v is not None},
                     throughput_gates(w.dtype, cuda=device == "cuda"))
    result["gates"] = [g.to_dict() for g in gates]
    met, c = result["metrics"], result["ceiling"]
    ours = result["ours"]
    md = [f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}; model "
          f"{json.dumps(result['model'])}; {w.tokens} tokens a step ({result['documents']}), {w.dtype}; ours: "
          f"attention {w.attention}, experts {ours['expert_path']}, weights {fmt(ours['weights_gib'], '.2f')} GiB; "
          f"HF: sdpa, fastest experts implementation {result['hf']['experts_implementation']}; matmul ceiling "
          f"{c['n']}^3 {c['dtype']}: {c['tflops']:.1f} TFLOP/s", "", table(result["measurements"]), "",
          f"ratios (ours / HF tok/s): train {fmt(met['trainer_train_ratio_vs_hf'], '.3f')}, scoring vs HF forward "
          f"{fmt(met['trainer_score_ratio_vs_hf_forward'], '.3f')}, LoRA train vs HF full train "
          f"{fmt(met['trainer_lora_train_ratio_vs_hf_train'], '.3f')}; loss rel. diff vs HF "
          f"{fmt(met['train_loss_rel_diff_vs_hf'], '.2e')}", "",
          f"paired rounds ({result.get('paired', {}).get('status', 'not run')}; ours and HF's steps in turn, median of "
          f"the per-round ratios): train {fmt(met.get('trainer_train_ratio_vs_hf_paired'), '.3f')}, scoring vs HF "
          f"forward {fmt(met.get('trainer_score_ratio_vs_hf_forward_paired'), '.3f')}", "",
          *paired_rounds(result.get("paired", {})),
          f"paired LoRA rounds ({result.get('paired_lora', {}).get('status', 'not run')}): LoRA train vs HF full train "
          f"{fmt(met.get('trainer_lora_train_ratio_vs_hf_train_paired'), '.3f')}, LoRA scoring vs HF forward "
          f"{fmt(met.get('trainer_score_lora_ratio_vs_hf_forward_paired'), '.3f')}", "",
          *paired_rounds(result.get("paired_lora", {})),
          "FLOP/token (forward): " + ", ".join(f"{k} {v / 1e9:.4g} G" for k, v in result["flop_per_token"].items()), "",
          "gates: " + "; ".join(g.describe() for g in gates)]
    if result.get("top_kernels"):
        md += ["", "| top CUDA kernels of one train step | ms | calls |", "|---|---|---|"]
        md += [f"| `{k.get('name', k.get('error'))}` | {fmt(k.get('ms'), '.2f')} | {k.get('count', '-')} |"
               for k in result["top_kernels"]]
    return result, "\n".join(md) + "\n"


def paired_rounds(paired: dict) -> list[str]:
    """The paired rounds' seconds per step and round, with each call's host seconds, garbage-collector passes and
    caching-allocator events."""
    lines = []
    for name, seconds in paired.get("seconds", {}).items():
        events = paired.get("call_events", {}).get(name, [])
        lines.append(f"- {name}: " + ", ".join(f"{t:.4f} s" + call_events(e) for t, e in
                                              zip(seconds, events or [{}] * len(seconds))))
    return lines + [""] if lines else []


def call_events(e: dict) -> str:
    """One call's events in a few words (empty when none were recorded)."""
    if not e:
        return ""
    words = [f"host {e['host_s']:.4f} s"]
    if e.get("gc_passes"):
        words.append(f"{e['gc_passes']} gc ({e['gc_ms']:.1f} ms)")
    words += [f"{e[k]} {w}" for k, w in (("alloc_retries", "flushes"), ("device_allocs", "mallocs"),
                                         ("device_frees", "frees")) if e.get(k)]
    return f" ({', '.join(words)})"


def full_depth_lora(args: argparse.Namespace, device: str) -> tuple[dict, str]:
    """Our LoRA step at full depth vs HF + PEFT LoRA on the same weights and tokens: tok/s and peak memory."""
    small = args.small
    cfg = cut_config(6 if small else 30, small=small)
    dtype = torch.float32 if small else torch.bfloat16
    tokens = args.tokens or (256 if small else 16384)
    spec = load_spec(cfg)
    row = packed_documents(tokens, 4, spec.vocab_size, args.seed)  # on the host: each step plans and moves it
    ids = row.input_ids.view(4, -1).to(device)
    flops = flop_per_token(spec, tokens // 4)
    ceiling = matmul_ceiling(device, torch.bfloat16 if device == "cuda" else dtype, 1024 if small else 8192)
    go = functools.partial(measure, tokens=tokens, ceiling=ceiling["tflops"] * 1e12, device=device,
                           warmup=1, reps=args.reps, freeze_gc=not args.no_freeze_gc)
    names = {"all": "ours_lora_r16_all", "peft": "ours_lora_r16_peft_targets"}
    res = {"mode": "full_depth_lora", "model": describe(spec), "tokens": tokens, "documents": row.document_lengths(),
           "dtype": str(dtype), "ceiling": ceiling, "flop_per_token": flops, "measurements": {}}
    state = random_state(cfg, dtype, device, args.seed)

    model = megatron_model(spec, state, dtype, device, "dense" if small else args.attention)
    for targets in args.lora_targets.split(","):
        for choice in args.recompute_layers.split(","):
            count, experts = choice.removesuffix("+experts"), choice.endswith("+experts")
            set_recompute(model, None if count == "all" else int(count), experts=experts)
            name, config = names[targets], lora_r16(targets)
            name += "" if choice == "all" else f"_recompute{model.recompute_layers}{'_experts' if experts else ''}"
            adapters = attach_lora(model, config)
            opt = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
            rec = go(train_step(model, row, list(adapters.parameters()), 1024, opt),
                     flops=2 * flops["forward"] + 3 * lora_flop_per_token(spec, config))
            res["measurements"][name] = {
                **rec, "layout": f"one packed row of {tokens} ({row.document_lengths()})",
                "expert_path": expert_path(model), "trainable_params": sum(p.numel() for p in adapters.parameters()),
                "activation_checkpointing": f"{model.recompute_layers} of {spec.num_layers} layers recomputed"
                                           + (", the other layers' routed experts" if experts else "")}
            detach_lora(adapters)
            del adapters, opt
            free(device)
            print(table({name: res["measurements"][name]}).splitlines()[-1], flush=True)  # as it lands: a cut run keeps it
    del model
    free(device)

    try:
        import peft
    except ImportError:
        peft = None
    if args.no_hf or peft is None:
        res["measurements"]["hf_peft_lora_r16"] = {"status": "skipped",
                                                   "error": "--no-hf" if args.no_hf else "peft not installed"}
    else:
        hf = hf_model(cfg, dtype, device, state)
        set_hf_experts(hf, args.hf_experts)
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                          target_modules=list(PEFT_TARGETS)))
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        rec = go(hf_train_step(wrapped, ids, opt, args.hf_micro_batch),
                 flops=2 * flops["forward"] + 3 * lora_flop_per_token(spec, lora_r16("peft")))
        res["measurements"]["hf_peft_lora_r16"] = {
            **rec, "layout": f"{ids.shape[0]} x {ids.shape[1]}"
                             + (f", micro-batches of {args.hf_micro_batch} (gradients accumulated)" if args.hf_micro_batch
                                else ""),
            "experts_implementation": args.hf_experts,
            "trainable_params": sum(p.numel() for p in trainable), "peft": peft.__version__,
            "weights_gib": allocated_gib(device)}
        del hf, wrapped, opt
    free(device)
    md = (f"{json.dumps(res['model'])}, {tokens} tokens a step, {dtype}; ours: LoRA r16 on every projection and "
          f"expert (all) or on PEFT's targets, AdamW, recompute as named; HF + PEFT: LoRA r16 on q/k/v/o + dense MLP, "
          f"gradient checkpointing, AdamW\n\n" + table(res["measurements"]) + "\n")
    return res, md


def main() -> int:
    """Run the chosen mode, write its JSON and markdown into --out and print the table; 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny widths, fp32, dense attention")
    ap.add_argument("--tokens", type=int, default=None, help="tokens a step (default 8192; full-depth LoRA 16384)")
    ap.add_argument("--layers", type=int, default=6, help="layers of the 26B-A4B cut (default mode)")
    ap.add_argument("--full-depth-lora", action="store_true", help="30 layers, LoRA r16: ours vs HF + PEFT")
    ap.add_argument("--attention", default="auto", help='our attention backend on CUDA (default "auto")')
    ap.add_argument("--lora-targets", default="all,peft",
                    help="full-depth LoRA, ours: 'all' (every projection and expert), 'peft' (HF + PEFT's), or both")
    ap.add_argument("--recompute-layers", default="all",
                    help="full-depth LoRA, ours: decoder layers recomputed in backward, one run per value (all, N, or "
                         "N+experts: the other layers recompute their routed experts; e.g. all,20,0+experts)")
    ap.add_argument("--hf-experts", default="grouped_mm", help="HF experts implementation (full-depth LoRA mode)")
    ap.add_argument("--hf-micro-batch", type=int, default=None,
                    help="full-depth LoRA, HF + PEFT: rows per micro-batch, gradients accumulated (fits an 80 GB card)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--expert-path", default="grouped", choices=("grouped", "sequential"), help="our routed experts")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="positions per log-prob chunk (train steps)")
    ap.add_argument("--score-chunk-tokens", type=int, default=1024, help="positions per log-prob chunk (scoring)")
    ap.add_argument("--no-hf", action="store_true", help="our measurements only (compare our own variants)")
    ap.add_argument("--no-freeze-gc", action="store_true",
                    help="time with Python's collector traversing every object (default: frozen before timed calls)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # 2 threads on a shared 2-core machine swing timings by up to 100x
    set_runtime(RuntimeConfig(packing_capacity=args.tokens or 16384))
    t0 = time.perf_counter()
    result, md = (full_depth_lora if args.full_depth_lora else harness)(args, device)
    result["wall_s"] = time.perf_counter() - t0
    name = "throughput_full_depth_lora" if args.full_depth_lora else "throughput_gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / f"{name}.md").write_text(md)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
