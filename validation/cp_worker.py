"""Multi-process context-parallel harness: real `torch.distributed` runs (gloo on CPU) of the full model.

`launch(job)` starts `job["cp"]` processes (`python -m validation.cp_worker`), one CP group over all of them,
rendezvous on a free TCP port of 127.0.0.1, and returns what CP rank 0 reported (and every rank's
bookkeeping). Each process sets the runtime config's `cp` and builds its models through the library's real
path (`load_model`), which wraps the requested attention backend in context parallelism. `launch(job,
worker=MODULE)` starts another worker module the same way (`validation.parallel_worker`: tensor and expert parallelism).

A job is a dict saved with torch.save:
  model_dir, depth   the HF checkpoint directory and the depth to cut it to
  cp                 the CP size (= processes)
  rows               {name: PackedRow with input_ids}
  runs               [{"name", "rows": [row names], "variant", "backward", "kind", "block_size"}]
Variants: "none" (the real implementation) or one of BROKEN_VARIANTS (deliberately broken, for sensitivity).
`kind` "dense" (forward + backward on CPU) or "flex" (BlockMasks of `block_size`; forward only on CPU).
Backward probes the gradients with the summed next-token cross entropy of every token over the row length.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemma4_support.ports import free_port

REPO = Path(__file__).resolve().parents[1]
BROKEN_VARIANTS = {
    "drop_window": "CP masks built without the sliding window (keyed as if they had it)",
    "chunk_off_by_one": "each chunk's masks built for the query range shifted back by one token",
    "no_shared_prefix": "CP masks built without the shared-prefix (sibling) rule",
    "packed_positions": "position ids taken from packed indices (for RoPE and masks) instead of the row's ids",
}
VARIANTS = ("none", *BROKEN_VARIANTS)


def launch(job: dict, timeout_s: float = 300.0, worker: str = "validation.cp_worker", *,
           torchrun: list[str] | None = None) -> dict:
    """Run `job` on `job["world"]` (default `job["cp"]`) processes of the `worker` module; returns {run name:
    {row name: result}} merged from every rank, and launch timings. The processes are started here, one per rank
    (gloo on 127.0.0.1), or, given `torchrun` (its arguments before the module, e.g. ["--nproc-per-node", "2"]), by
    one `torchrun` command (the rendezvous is torchrun's; NCCL when the job's device is "cuda")."""
    world = job.get("world", job.get("cp"))
    with tempfile.TemporaryDirectory(prefix="gemma4-cp-") as tmp:
        tmp_path = Path(tmp)
        torch.save(job, tmp_path / "job.pt")
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("PYTEST_XDIST_WORKER", None)
        t0 = time.perf_counter()
        procs = []
        if torchrun is not None:
            log = open(tmp_path / "rank0.log", "w")  # noqa: SIM115 - closed below; torchrun prefixes each rank's lines
            cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", worker, "--job",
                   str(tmp_path / "job.pt"), "--out", tmp]
            procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for rank in range(world if torchrun is None else 0):
            log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
            cmd = [sys.executable, "-W", "ignore", "-m", worker, "--rank", str(rank),
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
            raise RuntimeError(f"{worker} worker(s) failed: {failed}\n{tails}")
        merged: dict = {"_launch": {"world": world, "wall_seconds": time.perf_counter() - t0}}
        for rank in range(world):
            if torchrun is not None and not (tmp_path / f"rank{rank}.pt").exists():
                continue  # a rank on another node (multi-node torchrun) saved its file there
            for name, by_row in torch.load(tmp_path / f"rank{rank}.pt", weights_only=False).items():
                merged.setdefault(name, {}).update(by_row)
        return merged


# ----------------------------------------------------------------------------------------------------
# worker side


def _inner_backend(run: dict, spec):  # noqa: ANN001, ANN202
    """The (possibly broken) backend CP wraps for this run, counting the masks it builds."""
    from gemma4_support.attention.backends import DenseBackend, FlexBackend
    from validation.mask_variants import BROKEN_MASKS, CountingBackend

    if run["kind"] == "flex":
        return CountingBackend(FlexBackend({layer.window: run["block_size"] for layer in spec.layers}))
    return CountingBackend(BROKEN_MASKS.get(run["variant"], DenseBackend)())


def _run_row(model, run: dict, row, rank: int) -> dict:  # noqa: ANN001
    import torch.distributed as dist

    from gemma4_support.loss import token_loss
    from gemma4_support.parallel import allreduce_grads, cp_forward
    from gemma4_support.parallel.cp_plan import CPMaskKey

    backend, counter = model.backend, model.backend.inner
    if run["variant"] == "packed_positions":
        row = dataclasses.replace(row, position_ids=torch.arange(row.length, device=row.input_ids.device))
    t0 = time.perf_counter()
    masks = backend.prepare_row(row, model.windows)
    plan_s = time.perf_counter() - t0
    plan = masks.plan
    model.zero_grad(set_to_none=True)
    builds_before = counter.builds
    t0 = time.perf_counter()
    with torch.set_grad_enabled(run["backward"]):
        logits = cp_forward(model, row, masks)
        forward_s = time.perf_counter() - t0
        builds_during = counter.builds - builds_before
        grads = None
        if run["backward"]:
            labels = plan.shard(torch.roll(row.input_ids, -1)[None], rank, dim=1)
            token_loss(logits, labels, denominator=row.length).backward()
            allreduce_grads(model, backend.group)
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    step_s = time.perf_counter() - t0
    local = logits.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(backend.cp_size)]
    dist.all_gather(parts, local, group=backend.group)
    expected_keys = sorted(repr(CPMaskKey(rank, c, w)) for c in (0, 1) for w in model.windows)
    return {
        "logits": plan.unshard(parts, dim=1), "grads": grads, "cp": backend.cp_size, "seq_len": row.length,
        "chunk_len": plan.chunk_len, "local_tokens": 2 * plan.chunk_len, "masks_prepared": len(masks.prepared),
        "mask_lookups": masks.lookups, "mask_keys": sorted(map(repr, masks.prepared.masks)),
        "expected_keys": expected_keys, "masks_built_during_forward": builds_during, "plan_seconds": plan_s,
        "forward_seconds": forward_s, "step_seconds": step_s, "layers": len(model.decoder.layers),
        "backend": backend.name,
    }


def worker_args(argv: list[str] | None = None) -> argparse.Namespace:
    """A launched worker's arguments (rank, world, port, job file, output folder), parsed as `launch` passes them;
    under torchrun rank and world come from its environment instead."""
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world", "--port"):
        parser.add_argument(name, type=int, default=None)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.torchrun = args.rank is None
    if args.torchrun:
        args.rank, args.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return args


def start_rank(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """A worker's start: its arguments, one intra-op thread, its rank in the process group (gloo on CPU, NCCL on
    CUDA with one GPU per local rank), the job it was given, and its device (`args.device`)."""
    import torch.distributed as dist

    args = worker_args(argv)
    job = torch.load(args.job, weights_only=False)
    torch.set_num_threads(1)
    cuda = job.get("device", "cpu") == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", args.rank)))
    args.device = torch.device(f"cuda:{torch.cuda.current_device()}") if cuda else torch.device("cpu")
    init = "env://" if args.torchrun else f"tcp://127.0.0.1:{args.port}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=args.rank, world_size=args.world)
    return args, job


def host(obj: object) -> object:
    """Tensors inside nested dicts/lists/tuples moved to the CPU (for torch.save and pickled collectives)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host(v) for v in obj)
    return obj


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: one CP rank of the job."""
    args, job = start_rank(argv)
    import torch.distributed as dist

    from gemma4_support.model.build import load_model, model_spec
    from gemma4_support.runtime import RuntimeConfig, set_runtime

    set_runtime(RuntimeConfig(cp=job["cp"]))
    spec = model_spec(job["model_dir"], job.get("depth"))
    results = {}
    for run in job["runs"]:
        model = load_model(job["model_dir"], depth=job.get("depth"), attention=_inner_backend(run, spec),
                           device=args.device, dtype=getattr(torch, job.get("dtype", "float32")))
        local = dist.get_rank(model.backend.group)
        by_row = {name: host(_run_row(model, run, job["rows"][name].to(args.device), local)) for name in run["rows"]}
        if local == 0:
            results[run["name"]] = by_row
        else:  # other ranks report only their bookkeeping
            results[f"{run['name']}@rank{local}"] = {
                name: {k: v for k, v in res.items() if k not in ("logits", "grads")} for name, res in by_row.items()}
    torch.save(results, Path(args.out) / f"rank{args.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
