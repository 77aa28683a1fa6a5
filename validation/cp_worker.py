"""Multi-process context-parallel harness: real `torch.distributed` runs (gloo on CPU) of the full model.

`launch(job, world)` starts `world` processes (`python -m validation.cp_worker`), rendezvous on a free TCP
port of 127.0.0.1, and returns what every group's CP rank 0 reported. One launch serves several CP sizes:
for each CP size c the world is cut into world/c groups of c consecutive ranks, each group running its
own row, so CP=4 (one group) and CP=2 (two groups, two rows) share one process start.

A job is a dict saved with torch.save:
  model_dir  the HF checkpoint directory
  rows       {name: {"input_ids": [1, L], "position_ids": [L], "document_ids": [L], "branch_ids": [L] | None}}
  runs       [{"name", "cp", "rows": [row name per group], "variant", "backward", "kind"}]
Variants (deliberately broken CP implementations, for sensitivity):
  none               the real implementation
  drop_window        CP masks built without the sliding window (keyed as if they had it)
  chunk_off_by_one   each chunk's masks built for the query range shifted back by one token
  no_shared_prefix   CP masks built without the shared-prefix (sibling) rule
  packed_positions   position ids taken from packed indices (for RoPE and masks) instead of the row's ids
`kind` "dense" (forward + backward on CPU) or "block" (flex BlockMasks; forward only on CPU).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemma4_support.ports import free_port

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "drop_window", "chunk_off_by_one", "no_shared_prefix", "packed_positions")


def launch(job: dict, world: int, timeout_s: float = 300.0) -> dict:
    """Run `job` on `world` gloo processes; returns {run name: {group index: result}} and launch timings."""
    with tempfile.TemporaryDirectory(prefix="gemma4-cp-") as tmp:
        tmp_path = Path(tmp)
        torch.save(job, tmp_path / "job.pt")
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("PYTEST_XDIST_WORKER", None)
        t0 = time.perf_counter()
        procs = []
        for rank in range(world):
            log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
            cmd = [sys.executable, "-W", "ignore", "-m", "validation.cp_worker", "--rank", str(rank),
                   "--world", str(world), "--port", str(port), "--job", str(tmp_path / "job.pt"), "--out", tmp]
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout_s
        failed = []
        for rank, (proc, log) in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            log.close()
            if rc != 0:
                failed.append((rank, rc))
        if failed:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
            tails = "\n".join(
                f"--- rank {r} (exit {rc}) ---\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r, rc in failed
            )
            raise RuntimeError(f"CP worker(s) failed: {failed}\n{tails}")
        wall = time.perf_counter() - t0
        merged: dict = {"_launch": {"world": world, "wall_seconds": wall}}
        for rank in range(world):
            for name, res in torch.load(tmp_path / f"rank{rank}.pt", weights_only=False).items():
                merged.setdefault(name, {})[res["group"]] = res
        return merged


# ----------------------------------------------------------------------------------------------------
# worker side


def _variant_masks(variant: str, plan, packing, windows, rank: int):  # noqa: ANN001, ANN202
    from gemma4_support.attention.masks import PreparedMasks, allowed, packing_dense_mask
    from gemma4_support.parallel.cp_plan import CPMaskKey, prepare_cp_masks

    if variant in ("none", "packed_positions"):
        return prepare_cp_masks(plan, packing, windows, ranks=[rank])
    if variant == "drop_window":
        def no_window(qp, kp, qd, kd, window, qb=None, kb=None):  # noqa: ANN001, ANN202
            return allowed(qp, kp, qd, kd, None, qb, kb)
        return prepare_cp_masks(plan, packing, windows, ranks=[rank], predicate=no_window)
    if variant == "no_shared_prefix":
        def no_branches(qp, kp, qd, kd, window, qb=None, kb=None):  # noqa: ANN001, ANN202
            return allowed(qp, kp, qd, kd, window)
        return prepare_cp_masks(plan, packing, windows, ranks=[rank], predicate=no_branches)
    if variant == "chunk_off_by_one":
        masks = {}
        for chunk in (0, 1):
            start, end = plan.chunk_range(rank, chunk)
            shifted = (start - 1, end - 1) if start > 0 else (start, end)
            for w in set(windows):
                masks[CPMaskKey(rank, chunk, w)] = packing_dense_mask(packing, w, shifted).unsqueeze(0)
        return PreparedMasks(masks)
    raise ValueError(f"unknown CP variant {variant!r}; known: {VARIANTS}")


def _run(model, run: dict, row: dict, rank_in_group: int, group) -> dict:  # noqa: ANN001
    import torch.distributed as dist

    from gemma4_support.attention.masks import Packing, mask_builds
    from gemma4_support.parallel import allreduce_grads, cp_forward, plan_cp, prepare_cp_masks
    from gemma4_support.parallel.cp_plan import CPMaskKey

    cp = run["cp"]
    ids = row["input_ids"]
    L = ids.shape[1]
    pos = torch.arange(L) if run["variant"] == "packed_positions" else row["position_ids"]
    packing = Packing(pos, row["document_ids"], row["branch_ids"])
    plan = plan_cp(L, cp)
    t0 = time.perf_counter()
    if run["kind"] == "block":
        bs = {w: run.get("block_size", 8) for w in model.windows}
        masks = prepare_cp_masks(plan, packing, model.windows, ranks=[rank_in_group], kind="block", block_size=bs)
    else:
        masks = _variant_masks(run["variant"], plan, packing, model.windows, rank_in_group)
    plan_s = time.perf_counter() - t0
    prepared = len(masks)
    model.zero_grad(set_to_none=True)
    builds_before = mask_builds()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(run["backward"]):
        logits = cp_forward(model, plan, rank_in_group, ids, pos[None], packing.document_ids[None], masks, group)
        forward_s = time.perf_counter() - t0
        builds_during = mask_builds() - builds_before
        grads = None
        if run["backward"]:
            labels = plan.shard(torch.roll(ids, -1, dims=1), rank_in_group, dim=1)
            loss = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum") / L
            loss.backward()
            allreduce_grads(model, group)
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    step_s = time.perf_counter() - t0
    local = logits.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local, group=group)
    full = plan.unshard(parts, dim=1)
    expected_keys = sorted(repr(CPMaskKey(rank_in_group, c, w)) for c in (0, 1) for w in model.windows)
    return {
        "logits": full, "grads": grads, "cp": cp, "seq_len": L, "chunk_len": plan.chunk_len,
        "local_tokens": 2 * plan.chunk_len, "masks_prepared": prepared, "mask_lookups": masks.lookups,
        "mask_keys": sorted(map(repr, masks.masks)), "expected_keys": expected_keys,
        "masks_built_during_forward": builds_during, "plan_seconds": plan_s,
        "forward_seconds": forward_s, "step_seconds": step_s, "layers": len(model.decoder.layers),
    }


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: one CP rank of the job."""
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    from gemma4_support.model.build import load_model

    job = torch.load(args.job, weights_only=False)
    model = load_model(job["model_dir"], depth=job.get("depth"))
    cps = sorted({run["cp"] for run in job["runs"]})
    groups = {}
    for cp in cps:  # every rank creates every group, in the same order
        if args.world % cp:
            raise ValueError(f"world {args.world} is not divisible by cp {cp}")
        groups[cp] = [dist.new_group(list(range(g * cp, (g + 1) * cp))) for g in range(args.world // cp)]
    results = {}
    for run in job["runs"]:
        cp = run["cp"]
        g, local = divmod(args.rank, cp)
        res = _run(model, run, job["rows"][run["rows"][g]], local, groups[cp][g])
        res["group"], res["row"] = g, run["rows"][g]
        if local == 0:
            results[run["name"]] = res
        else:  # other ranks report only their bookkeeping
            results[f"{run['name']}@rank{local}"] = {k: v for k, v in res.items() if k not in ("logits", "grads")}
    torch.save(results, Path(args.out) / f"rank{args.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
