"""vLLM serving: start/attach/stop a real OpenAI-compatible server, and a client that keeps vLLM's token ids."""
from gemma4_support.serving.client import (
    VLLMClient,
    choice_logprobs,
    decode_routed_experts,
    normalize_choice,
    normalize_token_ids,
    template_messages,
)
from gemma4_support.serving.vllm_server import VLLMServer, attach_server, free_port, start_server, vllm_distribution

__all__ = [
    "VLLMClient",
    "VLLMServer",
    "attach_server",
    "choice_logprobs",
    "decode_routed_experts",
    "free_port",
    "normalize_choice",
    "normalize_token_ids",
    "start_server",
    "template_messages",
    "vllm_distribution",
]
