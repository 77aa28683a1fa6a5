"""Scoring at real scale on one GPU: time and peak memory of the chunked log-prob forward
(`gemma4_support.logprobs.score_row`) against an unchunked reference that materialises the full logits.

Model: random weights with the real 26B-A4B layer shapes cut to 6 layers (5 sliding + 1 full: hidden 2816,
16 q heads, sliding 8 kv x 256, full 2 kv x 512 with K=V, 128 experts top-8, expert width 704, dense width 2112,
window 1024) and the **real vocabulary, 262,144** (tied embeddings, softcap 30), bf16, attention "auto" (flex on
CUDA, the 512-wide global heads on dense; falls back to "dense" for the whole model if flex fails, recorded).
Every 2-D weight ~ N(0, 0.02²), every 1-D weight (norms, router scales) 1, `layer_scalar` buffers 1. A LoRA adapter
(rank 16, alpha 32, random B with std 0.01, the routed experts adapted too) is attached by its forward hooks.
Row: one packed row of 16,384 tokens — a 2048-token prompt shared by completions of 3072, 3072 and 2048 tokens
(shared-prefix packing) then a 6144-token document — with random token ids.

Measured under torch.no_grad, each after one warm-up, seconds = median of 3, peak = torch.cuda.max_memory_allocated
over the 3 (reset before each):
  hidden      `model.hidden_states(...)` alone: what every scorer pays before the vocabulary;
  chunked_N   `score_row(model, row, top_k=20, chunk_tokens=N)` for N = 1024 and 4096: label log-probs + top-20,
              logits made N positions at a time (peak = hidden + one [N, vocab] chunk in bf16 and fp32);
  unchunked   `model(...)` -> [1, L, vocab] logits, then `log_softmax(logits.float())`, gather, topk(20): the
              full fp32 logits materialised (an OutOfMemoryError is caught and recorded with what it tried).
  head_*      the vocabulary stage alone, from hidden states already computed (peak over weights + hidden): the
              same chunked / unchunked log-probs. Added after the recorded run (docs/gpu_scoring.md): at 16,384
              tokens the whole-forward peak is the full layer's dense attention, which hides the logits' cost.
Also: max |Δ| of the label log-probs (and top-20 log-probs, top-20 id agreement) chunked vs unchunked.

Runs standalone (no pytest); needs torch and megatron-core (carry its wheel in .whl/, see docs/gpu_scoring.md):
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
  python3 scripts/gpu/scoring_memory.py --out "$OUT"
On CPU, `--small` runs the same code on a narrow toy cut (vocab 4096, 512 tokens, chunks of 128 and 256, dense
attention): a smoke test.
Prints a markdown table and writes scoring_memory.json / scoring_memory.md into --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.logprobs import chunked_logprobs, score_row  # noqa: E402
from gemma4_support.lora import LoraConfig, attach_lora  # noqa: E402
from gemma4_support.model.build import build_model  # noqa: E402
from gemma4_support.packing import PackedRow, pack  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.throughput import cut_config, free, normal_init_, sync  # noqa: E402

GiB = 2 ** 30
TOP_K = 20
REPS = 3
FULL_ROW = [(2048, [3072, 3072, 2048]), 6144]  # 16,384 tokens
SMALL_ROW = [(64, [96, 96, 64]), 192]  # 512 tokens


def measure(fn: Callable[[], object], device: str, over: str = "weights") -> tuple[dict, object]:
    """One warm-up, then REPS timed runs: median seconds, peak memory over the runs (GiB, also less what was allocated
    at the start, named `peak_over_<over>_gib`), the last run's output."""
    out = fn()
    del out
    free(device)
    times, peaks = [], []
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    out = None
    for _ in range(REPS):
        out = None
        free(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        peaks.append(torch.cuda.max_memory_allocated() if device == "cuda" else 0)
    sec = statistics.median(times)
    rec = {"seconds": sec, "seconds_all": times, "peak_gib": max(peaks) / GiB if device == "cuda" else None,
           f"peak_over_{over}_gib": (max(peaks) - base) / GiB if device == "cuda" else None}
    return rec, out


def oom_record(exc: BaseException, device: str) -> dict:
    """What an OutOfMemoryError tried: the allocation its message names and the peak reached before it."""
    msg = str(exc)
    tried = re.search(r"Tried to allocate ([\d.]+ [GMK]iB)", msg)
    return {"status": "OOM", "tried_to_allocate": tried.group(1) if tried else None,
            "peak_before_oom_gib": torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None,
            "error": msg.splitlines()[0][:400]}


def build(cfg: dict, attention: str, device: str, seed: int) -> tuple[torch.nn.Module, object]:
    """The bf16 model with random weights and a random LoRA attached (eval mode)."""
    spec = load_spec(cfg)
    model = build_model(spec, dtype=torch.bfloat16, device=device, attention=attention)
    normal_init_(model, seed)
    model.eval()
    adapters = attach_lora(model, LoraConfig(rank=16, alpha=32, init="random", b_std=0.01))
    return model, adapters


def run_all(model: torch.nn.Module, row: PackedRow, device: str, chunks: list[int]) -> dict:
    """Every measurement on one model and row."""
    inputs, branches = row.model_inputs(), row.batched_branch_ids()
    res: dict = {}
    with torch.no_grad():
        rec, hidden = measure(lambda: model.hidden_states(*inputs, branch_ids=branches), device)
        res["hidden"] = {"status": "ok", **rec, "shape": list(hidden.shape)}
        print(f"hidden: {rec['seconds']:.3f} s, peak {rec['peak_gib']} GiB", flush=True)
        # The vocabulary stage alone, from the hidden states above (kept allocated): in the whole forward the
        # body's own peak (the dense attention of the full layers) can hide what the logits add.
        h = hidden[:, 0]
        for n in chunks:
            rec, out = measure(lambda n=n: chunked_logprobs(h, model.logits, row.labels, top_k=TOP_K, chunk_tokens=n),
                               device, over="hidden")
            res[f"head_chunked_{n}"] = {"status": "ok", **rec, "chunk_tokens": n}
            print(f"head_chunked_{n}: {rec['seconds']:.3f} s, peak {rec['peak_gib']} GiB", flush=True)
            del out

        def head_unchunked():
            logp = torch.log_softmax(model.logits(h).float(), dim=-1)  # [L, vocab] bf16 logits, then fp32
            return logp.gather(-1, row.labels[:, None])[:, 0], logp.topk(TOP_K, dim=-1)

        try:
            rec, out = measure(head_unchunked, device, over="hidden")
            res["head_unchunked"] = {"status": "ok", **rec}
            print(f"head_unchunked: {rec['seconds']:.3f} s, peak {rec['peak_gib']} GiB", flush=True)
            del out
        except torch.cuda.OutOfMemoryError as exc:
            res["head_unchunked"] = oom_record(exc, device)
            print(f"head_unchunked: OOM ({res['head_unchunked']['tried_to_allocate']})", flush=True)
        del h, hidden
        free(device)
        chunked = {}
        for n in chunks:
            rec, out = measure(lambda n=n: score_row(model, row, top_k=TOP_K, chunk_tokens=n), device)
            res[f"chunked_{n}"] = {"status": "ok", **rec, "chunk_tokens": n}
            print(f"chunked_{n}: {rec['seconds']:.3f} s, peak {rec['peak_gib']} GiB", flush=True)
            chunked[n] = {"logprobs": out.logprobs.float().cpu(), "top_ids": out.top_ids.cpu(),
                          "top_logprobs": out.top_logprobs.float().cpu()}
            del out
            free(device)

        def unchunked():
            logits = model(*inputs, branch_ids=branches)  # [1, L, vocab] in bf16
            logp = torch.log_softmax(logits.float(), dim=-1)[0]
            del logits
            picked = logp.gather(-1, row.labels[:, None])[:, 0]
            top = logp.topk(TOP_K, dim=-1)
            return picked, top.indices, top.values

        try:
            rec, out = measure(unchunked, device)
            res["unchunked"] = {"status": "ok", **rec}
            print(f"unchunked: {rec['seconds']:.3f} s, peak {rec['peak_gib']} GiB", flush=True)
            ref = {"logprobs": out[0].float().cpu(), "top_ids": out[1].cpu(), "top_logprobs": out[2].float().cpu()}
            del out
        except torch.cuda.OutOfMemoryError as exc:
            res["unchunked"] = oom_record(exc, device)
            print(f"unchunked: OOM ({res['unchunked']['tried_to_allocate']})", flush=True)
            ref = None
        free(device)
    if ref is not None:
        mask = row.loss_mask.cpu()
        for n, c in chunked.items():
            d = (c["logprobs"] - ref["logprobs"]).abs()
            res[f"chunked_{n}"]["vs_unchunked"] = {
                "label_logprob_max_abs": float(d.max()),
                "label_logprob_max_abs_masked": float(d[mask].max()),
                "top_logprob_max_abs": float((c["top_logprobs"] - ref["top_logprobs"]).abs().max()),
                "top_ids_agree": float((c["top_ids"] == ref["top_ids"]).float().mean()),
            }
    return res


def table(result: dict) -> str:
    """The markdown table of one result."""
    L = result["tokens"]
    lines = ["| what | status | median s (3 runs) | tokens/s | peak GiB | peak over start GiB | "
             "label log-prob max abs vs unchunked | top-20 ids agree |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for name, r in result["measurements"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} (tried {r.get('tried_to_allocate')}) | - | - | "
                         f"{fmt(r.get('peak_before_oom_gib'), '.2f')} (before OOM) | - | - | - |")
            continue
        vs = r.get("vs_unchunked", {})
        lines.append(f"| {name} | ok | {r['seconds']:.3f} | {L / r['seconds']:,.0f} | {fmt(r['peak_gib'], '.2f')} | "
                     f"{fmt(r.get('peak_over_weights_gib', r.get('peak_over_hidden_gib')), '.2f')} | {fmt(vs.get('label_logprob_max_abs'), '.3g')} | "
                     f"{fmt(vs.get('top_ids_agree'), '.4f')} |")
    return "\n".join(lines)


def main() -> int:
    """Build the cut (another attention backend if one fails), measure, write the JSON and markdown; 0 if measured."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--small", action="store_true", help="CPU smoke run at tiny sizes")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    ap.add_argument("--attention", default=None, help='default: "auto" on cuda, "dense" on cpu')
    ap.add_argument("--chunks", default=None, help="chunk_tokens to measure (default 1024,4096; --small: 128,256)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = args.device or ("cpu" if args.small else "cuda")
    attention = args.attention or ("auto" if device == "cuda" else "dense")
    chunks = [int(c) for c in (args.chunks or ("128,256" if args.small else "1024,4096")).split(",")]
    cfg = cut_config(small=args.small)
    geometry = pack(SMALL_ROW if args.small else FULL_ROW)
    L = geometry.length
    if not args.small and L != 16384:
        raise SystemExit(f"packed row has {L} tokens, expected 16384")
    set_runtime(RuntimeConfig(packing_capacity=L))
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, cfg["vocab_size"], (L,), generator=gen)
    row = geometry.with_tokens(ids).to(device)

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "small": args.small,
              "model": "26B-A4B cut to 6 layers" + (" (small widths)" if args.small else ""),
              "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"], "dtype": "bfloat16",
              "lora": {"rank": 16, "alpha": 32, "init": "random", "b_std": 0.01, "experts": True},
              "row": {"documents": SMALL_ROW if args.small else FULL_ROW, "tokens": L}, "tokens": L, "top_k": TOP_K,
              "full_fp32_logits_gib": L * cfg["vocab_size"] * 4 / GiB,
              "full_bf16_logits_gib": L * cfg["vocab_size"] * 2 / GiB}
    try:
        from importlib.metadata import version
        result["megatron_core"] = version("megatron-core")
    except Exception:  # noqa: BLE001
        result["megatron_core"] = None

    tried = [attention] + (["dense"] if attention != "dense" else [])
    for att in tried:
        model = adapters = None
        try:
            t0 = time.perf_counter()
            model, adapters = build(cfg, att, device, args.seed)
            result["build_s"] = time.perf_counter() - t0
            result["weights_gib"] = torch.cuda.memory_allocated() / GiB if device == "cuda" else None
            result["lora_tensors"] = len(adapters.lora_A)
            result["attention"] = att
            print(f"built ({att}) in {result['build_s']:.1f} s; weights {result['weights_gib']} GiB", flush=True)
            result["measurements"] = run_all(model, row, device, chunks)
            break
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing backend: record it and try the next
            result.setdefault("attention_failures", []).append(
                {"attention": att, "error": f"{type(exc).__name__}: {exc}"[:600], "trace": traceback.format_exc()[-1500:]})
            print(f"attention={att} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            del model, adapters
            free(device)
    else:
        print("every attention backend failed", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scoring_memory.json").write_text(json.dumps(result, indent=2))
    md = ""
    if "measurements" in result:
        md = (f"{result['model']}, vocab {result['vocab_size']}, {L} tokens, bf16, attention {result['attention']}, "
              f"{result['device']}, torch {result['torch']}; weights {result['weights_gib']} GiB; "
              f"full fp32 logits would be {result['full_fp32_logits_gib']:.2f} GiB\n\n" + table(result) + "\n")
        print(md, flush=True)
    (args.out / "scoring_memory.md").write_text(md)
    return 0 if "measurements" in result else 1


if __name__ == "__main__":
    sys.exit(main())
