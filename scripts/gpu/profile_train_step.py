"""Where our train step's GPU time goes (issue 12): the throughput stage's train step on the 26B-A4B shapes cut to 6
layers (8,192 tokens, bf16, every parameter trainable), profiled once — the top operators by self CUDA time with
their input shapes — and timed at several log-prob chunk sizes (the chunk count is how many times the tied
embedding's gradient is accumulated and how large the fp32 log-softmax block is). `--host-calls N` also profiles
the host side of N calls (cProfile): the Python functions and torch calls the host spends the step in, per call —
where a step whose device waits on its host (host seconds near the step's) loses its time.

  python3 scripts/gpu/profile_train_step.py --out "$OUT"                 # on the GPU
  .venv/bin/python scripts/gpu/profile_train_step.py --small --out /tmp/x  # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.lora import attach_lora  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.throughput import (cut_config, host_syncs, lora_r16, megatron_model, packed_documents,  # noqa: E402
                                   random_state, score_step, sync, timed, train_step)


def top_ops(step: Callable[[], object], count: int, prefix: str = "aten::") -> tuple[list[dict], float]:
    """The `count` operators with the most self CUDA time in one profiled step, grouped by input shapes, and the
    step's summed kernel time in ms."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    rows, busy = [], 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        us = getattr(e, "self_device_time_total", 0)
        busy += us if "CUDA" in str(getattr(e, "device_type", "")) else 0  # the kernels themselves
        if us > 0 and e.key.startswith(prefix):
            rows.append({"op": e.key, "shapes": str(e.input_shapes)[:200], "ms": round(us / 1e3, 3), "calls": e.count})
    return sorted(rows, key=lambda r: -r["ms"])[:count], busy / 1e3


def host_functions(step: Callable[[], object], calls: int, count: int,
                   device: str) -> tuple[dict[str, list[dict]], float]:
    """The `count` functions with the most host time over `calls` calls of `step` (cProfile; per call, in ms): by own
    time, and this project's by cumulative time; and the host's seconds per call (until the step returned)."""
    import cProfile
    import pstats
    import time

    sync(device)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    host = (time.perf_counter() - t0) / calls
    sync(device)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows = [{"function": f"{Path(f).name}:{line}({name})", "own_ms": own * 1e3 / calls, "cum_ms": cum * 1e3 / calls,
             "calls": n / calls, "ours": "gemma4_support" in f} for (f, line, name), (_, n, own, cum, _) in stats.items()]
    return {"own": sorted(rows, key=lambda r: -r["own_ms"])[:count],
            "ours_cumulative": sorted((r for r in rows if r["ours"]), key=lambda r: -r["cum_ms"])[:count]}, host


def main() -> int:
    """Time the step at each chunk size, profile it (GPU ops and syncs; host calls if asked), write the JSON; 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--chunks", default="1024,2048,4096,8192")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--step", default="train", choices=("train", "score", "lora_train", "score_lora"),
                    help="the train step, the scoring forward, the LoRA r16 step (base frozen), or scoring with it")
    ap.add_argument("--host-calls", type=int, default=0, help="also profile the host side of this many calls")
    ap.add_argument("--lora-targets", default="all", choices=("all", "peft"),
                    help="LoRA steps: every projection and expert, or PEFT's (q/k/v/o + dense MLP)")
    args = ap.parse_args()
    device = "cpu" if args.small else "cuda"
    tokens = 256 if args.small else 8192
    set_runtime(RuntimeConfig(packing_capacity=tokens))
    cfg = cut_config(6, small=args.small)
    dtype = torch.float32 if args.small else torch.bfloat16
    spec = load_spec(cfg)
    model = megatron_model(spec, random_state(cfg, dtype, device, 0), dtype, device, "dense" if args.small else "auto")
    row = packed_documents(tokens, 2, spec.vocab_size, 0)  # on the host, as the benchmark's steps take it
    params = list(model.parameters())
    if args.step in ("lora_train", "score_lora"):
        params = list(attach_lora(model, lora_r16(args.lora_targets)).parameters())
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "tokens": tokens,
                    "chunk_tokens": {}}
    def step(chunk: int):  # noqa: ANN202
        return score_step(model, row, chunk) if args.step.startswith("score") else train_step(model, row, params, chunk)

    result["step"] = f"{args.step} ({args.lora_targets} targets)" if "lora" in args.step else args.step
    for chunk in [int(c) for c in args.chunks.split(",")]:
        rec, _ = timed(step(chunk), device, warmup=1, reps=3)
        result["chunk_tokens"][chunk] = {"seconds": rec["seconds"], "tok_per_s": tokens / rec["seconds"],
                                         "peak_gib": rec.get("peak_gib")}
        print(f"chunk {chunk}: {rec['seconds']:.4f} s, {tokens / rec['seconds']:,.0f} tok/s, peak {rec.get('peak_gib')}",
              flush=True)
    if device == "cuda":
        result["top_ops"], result["busy_ms"] = top_ops(step(1024), args.top)
        print(f"GPU busy {result['busy_ms']:.1f} ms in one step (every kernel's self time)")
        result["host_syncs"] = host_syncs(step(1024))
        print(f"host synchronisations in one step: {len(result['host_syncs'])}", *result["host_syncs"][:12], sep="\n  ")
        for r in result["top_ops"]:
            print(f"{r['ms']:8.2f} ms {r['calls']:5d}  {r['op']:<36} {r['shapes'][:120]}")
    if args.host_calls:
        result["host_functions"], host = host_functions(step(1024), args.host_calls, args.top, device)
        result["host_seconds_profiled"] = host
        print(f"host {host * 1e3:.1f} ms per call under cProfile; per call, by own time, then ours by cumulative:")
        for key in ("own", "ours_cumulative"):
            for r in result["host_functions"][key]:
                print(f"{r['own_ms']:8.3f} ms {r['cum_ms']:8.2f} cum {r['calls']:7.1f}x  {r['function'][:110]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{args.step}_step.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
