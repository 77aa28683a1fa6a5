"""Router replay: impose recorded expert choices (from vLLM's rollout, or from a reference model) on the
Megatron model's routers, so training sees exactly the experts inference used."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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
    """Within the block, every MoE layer routes its `tokens` tokens to `indices[layer]` ([tokens, top_k])."""
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
        if int(indices[layer].min()) < 0 or int(indices[layer].max()) >= router.per_expert_scale.numel():
            raise Gemma4Error(f"router replay for layer {layer} names experts outside 0..{router.per_expert_scale.numel() - 1}",
                              "check that the replayed ids come from the same model")
    try:
        for layer, router in routers.items():
            router.replay = indices[layer].to(router.weight.device, torch.long)
        yield
    finally:
        for router in routers.values():
            router.replay = None
