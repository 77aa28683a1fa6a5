"""One layout's parallel gate, launched with torchrun: TP 2, EP 2 or CP 2 against one process, with its sensitivity.

    python -m validation.parallel_gate --layout ep2 --device cuda --out reports/parallel
    python -m validation.parallel_gate --layout cp2 --model 26b-cut --tokens 8192 --device cuda --out reports/parallel

This process computes the one-device reference (logits and every gradient, HF names), frees the device, then starts
the parallel run as one `torchrun` command (`--nproc-per-node` = the layout's world size; NCCL on CUDA, one GPU per
rank; gloo on CPU) running the harness workers (validation/parallel_worker.py for TP and EP, validation/cp_worker.py
for CP). Every rank builds its model through the library's real path. A multi-node run passes torchrun's rendezvous
flags through `--torchrun-args` ("--nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:PORT").

The gate (validation/thresholds.py: fp32 absolute; bf16 relative to what bf16 moves the one-device run from fp32,
measured in the same run) is applied to the real run; one broken variant per layout (the K=V
projection split inside each head, another rank's experts loaded, each CP chunk's masks built one token off) must
fail it. Writes `parallel_<layout>_<dtype>_<UTC time>.json` (never over an earlier run's) and exits 0 when the gate
passed and the broken variant was caught, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYOUTS = {  # layout -> (harness, world, sizes, the broken variant that must fail)
    "tp2": ("tp", 2, {"tp": 2}, "kv_split_head_dim"),
    "ep2": ("ep", 2, {"tp": 1, "ep": 2}, "expert_shards_swapped"),
    "cp2": ("cp", 2, {"cp": 2}, "chunk_off_by_one"),
}
MODELS = ("fixture-dense", "fixture-moe", "26b-cut")


def model_dir(name: str, work: Path, seed: int, layers: int, vocab: int) -> Path:
    """An HF checkpoint directory: a path, a project fixture, or the 26B-A4B cut to `layers` with random weights
    (written by transformers; `vocab` rows)."""
    from fixtures.factory import fixture_dir
    from validation.hf_checkpoints import save_random_checkpoint
    from validation.throughput import cut_config

    if name.startswith("fixture-"):
        return fixture_dir(name.removeprefix("fixture-"))
    if name == "26b-cut":
        return save_random_checkpoint(work / "26b-cut", cut_config(layers, vocab=vocab), seed)
    return Path(name)


def rows(vocab: int, tokens: int | None, seed: int) -> dict:
    """Two packed rows (plain documents and shared-prefix branches; the fixtures' row A geometry, or `tokens` long)."""
    from fixtures.packings import ROW_A
    from gemma4_support.packing import pack

    geometry = pack(ROW_A if tokens is None else [tokens // 2, (tokens // 4, [tokens // 8, tokens // 8])])
    gen = torch.Generator().manual_seed(seed)
    return {name: geometry.with_tokens(torch.randint(0, vocab, (geometry.length,), generator=gen)) for name in "AB"}


def reference(path: Path, harness: str, row_set: dict, device: str, dtype: torch.dtype) -> dict:
    """One process on one device: row A's (TP, CP) or rows A and B's (EP: logits each, gradients summed) probe."""
    from gemma4_support.model.build import load_model
    from gemma4_support.runtime import RuntimeConfig, set_runtime
    from validation.cp_worker import host
    from validation.parallel_worker import probe

    set_runtime(RuntimeConfig())
    model = load_model(path, attention="dense", device=device, dtype=dtype)
    names = ("A", "B") if harness == "ep" else ("A",)
    probes = [host(probe(model, row_set[n].to(device))) for n in names]
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    if harness != "ep":
        return probes[0]
    return {"logits": [p["logits"] for p in probes], "grads": {n: sum(p["grads"][n] for p in probes) for n in probes[0]["grads"]}}


def parallel(path: Path, layout: str, row_set: dict, device: str, dtype: str, torchrun: list[str],
             joined: bool = False) -> dict:
    """The layout's torchrun launch: the real run and the broken one; {"real"|"broken": result, "_launch": ...}
    (`joined`: this node holds no rank 0, its launch returns nothing to judge)."""
    from gemma4_support.convert.checkpoint import megatron_to_hf
    from gemma4_support.model.build import model_spec
    from validation.cp_worker import launch
    from validation.parallel_worker import parallel_launch

    harness, world, sizes, broken = LAYOUTS[layout]
    args = ["--nproc-per-node", str(world), *torchrun]
    common = {"device": device, "dtype": dtype, "rows": row_set}
    if harness == "cp":
        runs = [{"name": v, "rows": ["A"], "variant": v, "backward": True, "kind": "dense"} for v in ("none", broken)]
        out = launch({**common, **sizes, "model_dir": str(path), "runs": runs}, 1800, torchrun=args)
        if joined:
            return out
        spec = model_spec(path)
        for v in ("none", broken):
            out[v]["A"]["grads"] = megatron_to_hf(out[v]["A"]["grads"], spec, allow_absent_rows=True)
        return {"real": out["none"]["A"], "broken": out[broken]["A"], "_launch": out["_launch"]}
    names = ["A", "B"] if harness == "ep" else ["A"]
    runs = [{"name": v, "model_dir": str(path), "rows": names, "variant": v} for v in ("none", broken)]
    out = parallel_launch({**common, **sizes, "runs": runs}, 1800, torchrun=args)
    if joined:
        return out
    key = "+".join(names)
    return {"real": out["none"][key], "broken": out[broken][key], "_launch": out["_launch"]}


def main(argv: list[str] | None = None) -> int:
    """Run one layout's gate; 0 passed and sensitivity caught, 1 not, 2 bad input."""
    from gemma4_support.errors import Gemma4Error
    from gemma4_support.metrics import evaluate
    from gemma4_support.reports.files import write_json
    from validation import thresholds as T
    from validation.parallel_worker import equivalence_metrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    ap.add_argument("--model", default=None, help=f"{', '.join(MODELS)} or an HF checkpoint directory (default: the "
                                                   "MoE fixture for ep2, the dense fixture otherwise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--tokens", type=int, default=None, help="packed row length (default: the fixtures' row A)")
    ap.add_argument("--layers", type=int, default=6, help="layers of the 26B-A4B cut")
    ap.add_argument("--vocab", type=int, default=32768, help="vocabulary of the 26B-A4B cut")
    ap.add_argument("--torchrun-args", default="", help="extra torchrun flags (multi-node rendezvous)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    harness, world, sizes, broken = LAYOUTS[args.layout]
    if args.device == "cuda" and torch.cuda.device_count() < world and not args.torchrun_args:
        print(f"error: {args.layout} needs {world} GPUs on this node, {torch.cuda.device_count()} visible; fix: run on a "
              f"machine with {world} GPUs, or pass --torchrun-args for a multi-node rendezvous", file=sys.stderr)
        return 2
    if args.tokens is not None and args.tokens % 8:
        print(f"error: --tokens {args.tokens} is not a multiple of 8; fix: round it (two CP chunks per rank, the "
              "row's documents are eighths)", file=sys.stderr)
        return 2
    default = "fixture-moe" if harness == "ep" else "fixture-dense"
    extra = args.torchrun_args.split()
    node = int(extra[extra.index("--node-rank") + 1]) if "--node-rank" in extra else 0
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="gemma4-parallel-") as work:
            path = model_dir(args.model or default, Path(work), args.seed, args.layers, args.vocab)
            from gemma4_support.model.build import model_spec

            row_set = rows(model_spec(path).vocab_size, args.tokens, args.seed + 1)
            if node != 0:  # another node of a multi-node run: its ranks join the launch; node 0 judges and reports
                parallel(path, args.layout, row_set, args.device, args.dtype, extra, joined=True)
                print(f"{args.layout}: node {node} joined the run; node 0 writes the report")
                return 0
            ref = reference(path, harness, row_set, args.device, dtype)
            noise = None
            if dtype == torch.bfloat16:  # what bf16 itself moves the one-device run: the bf16 gate's scale
                noise = equivalence_metrics(reference(path, harness, row_set, args.device, torch.float32), ref)
            res = parallel(path, args.layout, row_set, args.device, args.dtype, extra)
    except Gemma4Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gates = T.parallel_equivalence_bf16(noise) if noise else T.CP_MASKS_TP_EQUIVALENCE_FP32
    real, fake = equivalence_metrics(ref, res["real"]), equivalence_metrics(ref, res["broken"])
    applied = [g for g in gates if g.metric in real]  # CP runs do not measure the TP ranks' replicated spread
    real_gates, fake_gates = evaluate(real, applied), evaluate(fake, applied)
    passed, caught = all(g.passed for g in real_gates), not all(g.passed for g in fake_gates)
    report = {"layout": args.layout, "sizes": sizes, "world": world, "device": args.device,
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": args.dtype,
              "torch": torch.__version__, "model": args.model or default, "tokens": row_set["A"].length,
              "bf16_vs_fp32_one_device": noise, "metrics": real, "gates": [g.to_dict() for g in real_gates],
              "sensitivity": {"variant": broken, "metrics": fake, "gates": [g.to_dict() for g in fake_gates],
                              "caught": caught},
              "launch": res["_launch"], "wall_seconds": time.perf_counter() - t0, "passed": passed and caught}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = write_json(args.out / f"parallel_{args.layout}_{args.dtype}_{stamp}.json", report)
    for g in real_gates:
        print(f"{args.layout} {args.dtype}: {g.describe()}")
    print(f"{args.layout} sensitivity ({broken}): {'caught' if caught else 'NOT caught'}; report {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
