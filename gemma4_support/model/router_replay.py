"""Router replay: impose recorded expert choices (from vLLM's rollout, or from a reference model) on the
Megatron model's routers, so training sees exactly the experts inference used."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

import torch

from gemma4_support.errors import Gemma4Error
from gemma4_support.model.router import Gemma4Router


def routers_by_layer(model: torch.nn.Module) -> dict[int, Gemma4Router]:
    """The model's routers keyed by decoder layer index."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Gemma4Router):
            out[int(name.split("layers.")[1].split(".")[0])] = module
    return out


@contextmanager
def replay_routing(model: torch.nn.Module, indices: Mapping[int, torch.Tensor], tokens: int) -> Iterator[None]:
    """Within the block, every MoE layer routes its `tokens` tokens to `indices[layer]` ([tokens, top_k]; a row of
    -1 lets that token route freely: a packed row's pad and last tokens, which vLLM never routed)."""
    routers = routers_by_layer(model)
    missing = sorted(set(routers) - set(indices))
    if missing:
        raise Gemma4Error(f"router replay has no expert choices for MoE layer(s) {missing}",
                          "record routed experts for every MoE layer (vLLM: enable_return_routed_experts)")
    for layer, router in routers.items():
        got = tuple(indices[layer].shape)
        if got != (tokens, router.top_k):
            raise Gemma4Error(f"router replay for layer {layer} has shape {got}, expected ({tokens}, {router.top_k})",
                              "pass one row of top-k expert ids per token of the packed row")
        ids = indices[layer]
        free = ids < 0
        if int(ids.min()) < -1 or int(ids.max()) >= router.per_expert_scale.numel() or bool((free.any(-1) != free.all(-1)).any()):
            raise Gemma4Error(f"router replay for layer {layer} names experts outside 0..{router.per_expert_scale.numel() - 1} "
                              "(or a token mixes recorded experts with -1)",
                              "check that the replayed ids come from the same model; -1 rows mark tokens without a record")
    with ExitStack() as stack:  # each router's previous setting comes back after (nested blocks restore the outer)
        for layer, router in routers.items():
            stack.enter_context(router.replaying(indices[layer].to(router.weight.device, torch.long)))
        yield


def recorded_routing(model: torch.nn.Module, routed_experts: torch.Tensor) -> dict[int, torch.Tensor]:
    """A packed row's recorded routing ([L, moe_layers, top_k], vLLM's layer axis = the MoE layers in order) as the
    per-layer replay `replay_routing` takes; a layer-count or top-k disagreement raises naming both."""
    routers = routers_by_layer(model)
    if routed_experts.dim() != 3:
        raise Gemma4Error(f"routed_experts has shape {tuple(routed_experts.shape)}, expected [tokens, moe_layers, top_k]",
                          "pass PackedRow.routed_experts built from vLLM's routed_experts")
    tokens, layers, top_k = routed_experts.shape
    want_k = {r.top_k for r in routers.values()}
    if layers != len(routers) or (routers and {top_k} != want_k):
        raise Gemma4Error(f"routed_experts records {layers} MoE layers x top-{top_k}; the model has {len(routers)} MoE "
                          f"layers x top-{sorted(want_k)}",
                          "replay routes recorded by a server running this model at this depth (vLLM's layer axis "
                          "counts MoE layers only)")
    return {layer: routed_experts[:, j] for j, layer in enumerate(sorted(routers))}


def replay_recorded(model: torch.nn.Module, routed_experts: torch.Tensor | None) -> AbstractContextManager:
    """Within the block, the model routes as a packed row's recorded routing says ([tokens, moe_layers, top_k], as
    `PackedRow.routed_experts`); None: the routers choose freely."""
    if routed_experts is None:
        return nullcontext()
    return replay_routing(model, recorded_routing(model, routed_experts), routed_experts.shape[0])
