"""vLLM serving: start/attach/stop a real OpenAI-compatible server (`vllm_server`, over the generic process
supervision of `process`), its wire format (`wire`), and a client that keeps vLLM's token ids (`client`)."""
from gemma4_support.serving.client import VLLMClient
from gemma4_support.serving.vllm_server import ServerArgs, VLLMServer, attach_server, start_server, vllm_distribution
from gemma4_support.serving.wire import (
    choice_logprobs,
    decode_routed_experts,
    normalize_choice,
    normalize_token_ids,
    template_messages,
)

__all__ = [
    "ServerArgs",
    "VLLMClient",
    "VLLMServer",
    "attach_server",
    "choice_logprobs",
    "decode_routed_experts",
    "normalize_choice",
    "normalize_token_ids",
    "start_server",
    "template_messages",
    "vllm_distribution",
]
