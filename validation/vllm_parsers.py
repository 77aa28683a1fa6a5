"""vLLM's own Gemma 4 reasoning and tool-call parsers (the ones its server registers as "gemma4"), to read
rendered text back the way vLLM does."""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def vllm_parsers() -> tuple[type, type, type]:
    """(reasoning parser class, tool-call parser class, ChatCompletionRequest) as vLLM registers them.

    Importing vLLM imports torch modules that emit DeprecationWarnings at import time (not our code): they are
    silenced for the import only, so ``-W error`` runs still see every warning of ours.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        return (ReasoningParserManager.get_reasoning_parser("gemma4"), ToolParserManager.get_tool_parser("gemma4"),
                ChatCompletionRequest)


def parse_model_text(tokenizer: Any, text: str, *, thinking: bool = True,
                     tools: list[dict] | None = None) -> tuple[str | None, str | None, list[tuple[str, Any]]]:
    """vLLM's reasoning parser, then its tool-call parser, on one model message's text:
    (reasoning, content, [(tool name, arguments)]), unstripped, as vLLM returns them."""
    reasoning_cls, tool_cls, request_cls = vllm_parsers()
    kwargs = {"chat_template_kwargs": {"enable_thinking": thinking}}
    request = request_cls(model="m", messages=[{"role": "user", "content": "x"}], tools=tools, **kwargs)
    reasoning, content = reasoning_cls(tokenizer, **kwargs).extract_reasoning(text, request)
    info = tool_cls(tokenizer, request.tools).extract_tool_calls(content or "", request)
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]
    return reasoning, (info.content if info.tools_called else content), calls
