"""Multi-process tensor- and expert-parallel harness: real `torch.distributed` runs (gloo on CPU) of the full model.

`parallel_launch(job)` starts `job["tp"] * job["ep"]` processes of this module through `cp_worker.launch`. Each
process sets the runtime config's `tp` and `ep`, builds its model through the library's real path (`load_model`:
each rank loads its shard of every tensor, split as the weight table says, and at EP > 1 only its own experts),
runs packed rows forward and backward, and gathers the logits and every parameter's gradient back to HF names (the
table's splits, experts renumbered to their global index, `megatron_to_hf`).

At TP > 1 every rank of the TP group runs the same row. At EP > 1 the EP ranks are data-parallel ranks, as in
Megatron: data-parallel rank r runs `rows[r]`, its tokens go to the ranks holding their experts and back; the
gradients returned are summed over the data-parallel ranks (what DDP all-reduces), the logits are every rank's.

A job is a dict saved with torch.save:
  tp, ep  the TP and EP sizes (processes: tp * ep; ep defaults to 1)
  rows    {name: PackedRow with input_ids (and, to replay a routing, routed_experts)}
  runs    [{"name", "model_dir", "depth", "rows": [row names], "variant", "expert_path", "lora", "expect_error"}]
Variants: "none" (the real implementation) or one of BROKEN_VARIANTS (deliberately broken, for sensitivity);
`expert_path` (optional): the routed experts' path (`set_expert_path`: "grouped", the default, or "sequential").
`lora` (optional): LoraConfig keyword arguments, attached after loading.
A run with `expect_error` reports the one-line error its build raises (Gemma4Error) instead of failing the launch.
Backward probes the gradients with the summed next-token cross entropy of every token over the row length.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from validation.cp_worker import host, launch, start_rank

if TYPE_CHECKING:
    from gemma4_support.model.model import Gemma4Model
    from gemma4_support.packing import PackedRow

BROKEN_VARIANTS = {
    "kv_split_head_dim": "K=V layers' linear_qkv split along the head-dim axis instead of between whole kv groups",
    "kv_split_before_grouping": "K=V layers' [q; k] rows halved in HF order, before grouping q heads with their kv head",
    "qk_norm_grads_unsummed": "per-head q/k norm weights keep each rank's partial gradient (no all-reduce over TP)",
    "experts_unreduced": "each rank's routed-expert outputs (partial sums over its share of the expert width) not "
                         "all-reduced over expert-TP ranks",
}
EP_BROKEN_VARIANTS = {
    "expert_shards_swapped": "each EP rank loads the next rank's experts into its local experts",
}
MOE_VARIANTS = ("experts_unreduced",)  # need a model with routed experts
VARIANTS = ("none", *BROKEN_VARIANTS, *EP_BROKEN_VARIANTS)


def parallel_launch(job: dict, timeout_s: float = 300.0, torchrun: list[str] | None = None) -> dict:
    """Run `job` on `tp * ep` processes (gloo here, or through `torchrun` with its arguments); returns {run name:
    {row name: result}} and launch timings."""
    job = {"ep": 1, **job}
    return launch({**job, "world": job["tp"] * job["ep"]}, timeout_s, worker="validation.parallel_worker",
                  torchrun=torchrun)


def probe(model: Gemma4Model, row: PackedRow) -> dict:
    """One process's reference: the row's logits and every gradient (HF names) of the probe loss."""
    from gemma4_support.convert.checkpoint import megatron_to_hf

    model.zero_grad(set_to_none=True)
    logits = _forward_backward(model, row)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits, "grads": megatron_to_hf(grads, model.spec, allow_absent_rows=True)}


def equivalence_metrics(ref: dict, res: dict) -> dict:
    """The parallel gates' measurements against one process: logits (each data-parallel rank's row; the worst),
    the pooled and the worst HF-named gradient's rel-L2, and the replicated gradients' spread over TP ranks where the
    run measured it."""
    from gemma4_support.metrics import tensor_diff

    missing = sorted(set(ref["grads"]) ^ set(res["grads"]))
    assert not missing, f"gradient names differ between the parallel run and one process: {missing[:5]}"
    pair = [(ref["logits"], res["logits"])] if torch.is_tensor(ref["logits"]) else list(zip(ref["logits"], res["logits"]))
    logits = max((tensor_diff(a.float(), b.float()) for a, b in pair), key=lambda d: d["max_abs_rel"])
    names = sorted(ref["grads"])
    pooled = tensor_diff(torch.cat([ref["grads"][n].float().flatten() for n in names]),
                         torch.cat([res["grads"][n].float().flatten() for n in names]))
    per = {n: tensor_diff(ref["grads"][n].float(), res["grads"][n].float())["rel_l2"] for n in names}
    worst = max(per, key=per.get)
    out = {"logits_max_abs_rel": logits["max_abs_rel"], "logits_max_abs": logits["max_abs"],
           "grads_rel_l2": pooled["rel_l2"], "grads_max_abs": pooled["max_abs"],
           "grads_worst_rel_l2": per[worst], "grads_worst": worst, "grads_tensors": len(per)}
    if "replicated_grads_rank_spread" in res:
        out["replicated_grads_rank_spread"] = res["replicated_grads_rank_spread"]
    return out


# ----------------------------------------------------------------------------------------------------
# worker side


def _break(model, variant: str, model_dir: str, rank: int, tp: int) -> int:  # noqa: ANN001
    """Apply a broken variant to the loaded model (until `_unbreak`); returns how many layers it broke."""
    if variant == "expert_shards_swapped":
        return _load_other_experts(model, model_dir)
    if variant == "experts_unreduced":
        from gemma4_support.model import mlp

        mlp.reduce_from_tensor_model_parallel_region = lambda tensor, group: tensor
        return sum(layer.is_moe for layer in model.decoder.layers)
    if variant == "qk_norm_grads_unsummed":
        for layer in model.decoder.layers:
            layer.self_attention.q_layernorm.tp_group = layer.self_attention.k_layernorm.tp_group = None
        return len(model.decoder.layers)
    return _break_kv_split(model, variant, model_dir, rank, tp)


def _break_kv_split(model, variant: str, model_dir: str, rank: int, tp: int) -> int:  # noqa: ANN001
    """Reload every K=V layer's linear_qkv shard split the broken way; returns how many layers were broken."""
    from gemma4_support.convert.checkpoint import HFCheckpoint
    from gemma4_support.convert.mapping import QKV, hf_prefix

    spec, source = model.spec, HFCheckpoint(model_dir)
    broken = 0
    for layer in (layer for layer in spec.layers if layer.k_eq_v):
        name = f"{hf_prefix(spec)}layers.{layer.index}.self_attn."
        q_and_k = [source.get(name + "q_proj.weight"), source.get(name + "k_proj.weight")]
        target = model.decoder.layers[layer.index].self_attention.linear_qkv.weight
        if variant == "kv_split_head_dim":  # the grouped layout, split inside each head instead of between groups
            (qkv,) = QKV.to_megatron(q_and_k, spec, layer)
            grouped = qkv.view(layer.num_kv_heads, -1, layer.head_dim, qkv.shape[-1])
            shard = torch.chunk(grouped, tp, dim=2)[rank]
        else:  # HF's [q; k] rows halved, then read as if grouped
            shard = torch.chunk(torch.cat(q_and_k), tp, dim=0)[rank]
        with torch.no_grad():
            target.copy_(shard.reshape(target.shape))
        broken += 1
    return broken


def _load_other_experts(model, model_dir: str) -> int:  # noqa: ANN001
    """Load the next EP rank's experts into this rank's local experts; returns how many MoE layers it changed."""
    from megatron.core import parallel_state

    from gemma4_support.convert.checkpoint import HFCheckpoint, held_name, iter_hf_to_megatron, local_experts

    _, count = local_experts(model)
    other = (parallel_state.get_expert_model_parallel_rank() + 1) % parallel_state.get_expert_model_parallel_world_size()
    params = dict(model.named_parameters())
    layers = set()
    with torch.no_grad():
        for name, tensor in iter_hf_to_megatron(HFCheckpoint(model_dir), model.spec):
            local = held_name(name, other * count, count)  # the other rank's experts, under this rank's names
            if local is not None and ".local_experts." in name:
                params[local].copy_(tensor)
                layers.add(name.split(".mlp.")[0])
    return len(layers)


def _unbreak() -> None:
    """Undo what `_break` patched outside the model (the experts' all-reduce)."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    from gemma4_support.model import mlp

    mlp.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region


def _gather_grads(model, group, expert_group) -> tuple[dict[str, torch.Tensor], float]:  # noqa: ANN001
    """Every parameter's full gradient (Megatron names, experts numbered globally) from this rank's shards, summed
    over data-parallel ranks, and the largest difference between a replicated parameter's gradient here and on TP
    rank 0 (a partial gradient left unsummed shows up there)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gemma4_support.convert.checkpoint import local_experts, renumber_expert
    from gemma4_support.convert.mapping import entries

    split = {name: e.tp for e in entries(model.spec) for name in e.megatron}
    first, _ = local_experts(model) or (0, 0)
    ep_group, dp_group = ps.get_expert_model_parallel_group(), ps.get_data_parallel_group()
    full, spread, device = {}, 0.0, next(model.parameters()).device
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.detach().contiguous()
        expert = ".local_experts." in name
        if expert:
            name = renumber_expert(name, first)
        pg = expert_group if expert else group
        if split[name].axis is None:
            rank0 = grad.clone()
            dist.broadcast(rank0, src=dist.get_global_rank(pg, 0), group=pg)
            spread = max(spread, (grad - rank0).abs().max().item())
        else:
            parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(pg))]
            dist.all_gather(parts, grad, group=pg)
            grad = split[name].gather(parts)
        if not expert and dp_group.size() > 1:  # DDP's all-reduce (a sum here)
            dist.all_reduce(grad, group=dp_group)
        full[name] = grad
    if ep_group.size() > 1:  # each EP rank holds its own experts: gather them all (renumbered) on every rank
        held = [None] * ep_group.size()
        dist.all_gather_object(held, {n: g.cpu() for n, g in full.items() if ".local_experts." in n}, group=ep_group)
        for part in held:
            full.update({n: g.to(device) for n, g in part.items()})
    worst = torch.tensor([spread], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)  # rank 0 compares with itself: take every rank's
    return full, worst.item()


def _forward_backward(model, row) -> torch.Tensor:  # noqa: ANN001
    """The row's logits after a backward of the probe loss (the row's routing replayed when it carries one)."""
    from gemma4_support.loss import token_loss
    from gemma4_support.model.router_replay import replay_recorded

    with replay_recorded(model, row.routed_experts):
        logits = model(*row.model_inputs(), branch_ids=row.batched_branch_ids())
    token_loss(logits, torch.roll(row.input_ids, -1)[None], denominator=row.length).backward()
    return logits.detach()


def _run_rows(model, rows: list, group, expert_group) -> dict:  # noqa: ANN001
    """One step over this rank's rows: every rank's logits (by data-parallel rank), the gathered HF-named gradients."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gemma4_support.convert.checkpoint import megatron_to_hf

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = _forward_backward(model, rows[ps.get_data_parallel_rank()])
    step_s = time.perf_counter() - t0
    grads, spread = _gather_grads(model, group, expert_group)
    every = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(every, logits.cpu(), group=ps.get_data_parallel_group())
    local = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return {"logits": every if len(every) > 1 else logits, "grads": megatron_to_hf(grads, model.spec, allow_absent_rows=True),
            "replicated_grads_rank_spread": spread, "step_seconds": step_s, "seq_len": [r.length for r in rows],
            "local_qkv_shapes": {n: s for n, s in local.items() if n.endswith("linear_qkv.weight")},
            "local_experts": sum(".local_experts." in n and n.endswith("linear_fc1.weight") for n in local)}


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: one rank of the job."""
    args, job = start_rank(argv)
    import torch.distributed as dist
    from megatron.core import parallel_state

    from gemma4_support.errors import Gemma4Error
    from gemma4_support.model.build import load_model
    from gemma4_support.model.mlp import set_expert_path
    from gemma4_support.runtime import RuntimeConfig, set_runtime

    set_runtime(RuntimeConfig(tp=job["tp"], ep=job.get("ep", 1)))
    results = {}
    for run in job["runs"]:
        try:
            model = load_model(run["model_dir"], depth=run.get("depth"), attention="dense", device=args.device,
                               dtype=getattr(torch, job.get("dtype", "float32")))
            if run.get("lora"):  # LoRA attached with these options (a refusal is reported as the build's)
                from gemma4_support.lora import LoraConfig, attach_lora

                attach_lora(model, LoraConfig(**run["lora"]))
        except Gemma4Error as exc:
            if not run.get("expect_error"):
                raise
            results[run["name"]] = {"error": str(exc)}
            continue
        if run.get("expert_path"):
            set_expert_path(model, run["expert_path"])
        group = parallel_state.get_tensor_model_parallel_group()
        expert_group = parallel_state.get_expert_tensor_parallel_group()
        rank = dist.get_rank(group)
        broken = 0
        if run["variant"] != "none":
            broken = _break(model, run["variant"], run["model_dir"], rank, job["tp"])
        rows = [job["rows"][name].to(args.device) for name in run["rows"]]
        per_step = parallel_state.get_data_parallel_world_size()  # one row per data-parallel rank a step
        steps = {"+".join(run["rows"][i:i + per_step]): rows[i:i + per_step] for i in range(0, len(rows), per_step)}
        by_step = {key: {**host(_run_rows(model, part, group, expert_group)), "broken_layers": broken,
                         "tp": dist.get_world_size(group), "ep": parallel_state.get_expert_model_parallel_world_size()}
                   for key, part in steps.items()}
        _unbreak()
        if dist.get_rank() == 0:
            results[run["name"]] = by_step
    torch.save(results if args.rank == 0 else {}, Path(args.out) / f"rank{args.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
