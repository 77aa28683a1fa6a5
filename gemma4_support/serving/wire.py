"""vLLM's OpenAI wire format, in one place: choice fields normalised (token ids, log-probs, MoE routing) and
messages turned into what vLLM hands the chat template.

vLLM answers a chat request made with ``return_token_ids`` with the prompt ids at the top level and the
sampled ids on each choice; `normalize_choice` stores both **on each choice** (in the OpenAI client's
``model_extra``, where vLLM's extra fields arrive), as plain ``list[int]``, so a choice is self-contained
for RL tokenization. MoE routing (``routed_experts``, base64 ``.npy``) is decoded in place into a numpy
array of shape ``[tokens - 1, layers, top_k]``.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from gemma4_support.errors import ServerError, TokenizationError

__all__ = [
    "choice_logprobs",
    "choice_top_logprobs",
    "prompt_logprobs",
    "decode_routed_experts",
    "extra_fields",
    "normalize_choice",
    "normalize_token_ids",
    "template_messages",
]


def normalize_token_ids(value: Any, what: str) -> list[int] | None:
    """``value`` (list of ints, numpy array, tuple, None) as a plain ``list[int]``; rejects anything else."""
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ServerError(f"{what} is {type(value).__name__}, not a list of token ids",
                          "request return_token_ids=True from a vLLM server")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise ServerError(f"{what}[{i}] = {v!r} is not an integer token id",
                                  "pass the ids exactly as vLLM returned them")
        out.append(int(v))
    return out


def decode_routed_experts(value: Any) -> "np.ndarray | None":
    """vLLM's ``routed_experts`` (base64 ``.npy``) as a numpy array ``[tokens - 1, layers, top_k]``; arrays pass through."""
    import numpy as np

    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if not isinstance(value, str):
        raise ServerError(f"routed_experts is {type(value).__name__}, expected a base64 .npy string",
                          "use a vLLM server started with enable_return_routed_experts")
    try:
        arr = np.load(io.BytesIO(base64.b64decode(value)), allow_pickle=False)
    except Exception as exc:
        raise ServerError(f"routed_experts could not be decoded as base64 .npy ({exc})",
                          "check the vLLM version; routed_experts must be base64-encoded numpy bytes") from None
    if arr.ndim != 3:
        raise ServerError(f"routed_experts has shape {arr.shape}, expected [tokens - 1, layers, top_k]",
                          "check the vLLM version's routed_experts layout")
    return arr


def extra_fields(obj: Any) -> dict:
    """The dict holding vLLM's extra fields of an OpenAI-client object (its ``model_extra``)."""
    extra = getattr(obj, "__pydantic_extra__", None)
    if extra is None:
        object.__setattr__(obj, "__pydantic_extra__", {})
        extra = obj.__pydantic_extra__
    return extra


def normalize_choice(choice: Any, prompt_token_ids: Any = None) -> Any:
    """Store ``prompt_token_ids`` / ``token_ids`` on ``choice`` as int lists and decode ``routed_experts`` (in place)."""
    if isinstance(choice, dict):
        store = choice
    else:
        store = extra_fields(choice)
    idx = store.get("index", getattr(choice, "index", "?"))
    prompt = store.get("prompt_token_ids", prompt_token_ids)
    if prompt is None:
        prompt = prompt_token_ids
    store["prompt_token_ids"] = normalize_token_ids(prompt, f"choice {idx} prompt_token_ids")
    store["token_ids"] = normalize_token_ids(store.get("token_ids"), f"choice {idx} token_ids")
    if store.get("routed_experts") is not None:
        store["routed_experts"] = decode_routed_experts(store["routed_experts"])
    return choice


def choice_logprobs(choice: Any) -> list[float] | None:
    """The sampled tokens' log-probs of a chat or completions choice (object or dict); None when absent."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else getattr(choice, "logprobs", None)
    if lp is None:
        return None
    content = lp.get("content") if isinstance(lp, dict) else getattr(lp, "content", None)
    if content is not None:  # chat: list of {token, logprob, ...}
        return [float(c["logprob"] if isinstance(c, dict) else c.logprob) for c in content]
    tokens = lp.get("token_logprobs") if isinstance(lp, dict) else getattr(lp, "token_logprobs", None)
    if tokens is not None:  # completions
        return [float(x) for x in tokens]
    return None


def _token_id(token: str, where: str) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise ServerError(f"{where}: top-logprob token {token!r} is not 'token_id:N'",
                          "request with return_tokens_as_token_ids=true")
    return int(token.split(":", 1)[1])


def choice_top_logprobs(choice: Any, where: str = "choice") -> list[list[tuple[int, float]]]:
    """Per sampled token of a chat choice, its top log-probs as (token id, log-prob), most likely first (the request
    must ask for top_logprobs and return_tokens_as_token_ids)."""
    lp = choice.get("logprobs") if isinstance(choice, dict) else getattr(choice, "logprobs", None)
    content = None if lp is None else (lp.get("content") if isinstance(lp, dict) else getattr(lp, "content", None))
    if content is None:
        raise ServerError(f"{where} has no logprobs content", "request with logprobs=true and top_logprobs=K")
    out = []
    for t, c in enumerate(content):
        tops = c.get("top_logprobs") if isinstance(c, dict) else getattr(c, "top_logprobs", None)
        if not tops:
            raise ServerError(f"{where} token {t} has no top_logprobs", "request with top_logprobs=K (K >= 1)")
        pairs = [(_token_id(x["token"] if isinstance(x, dict) else x.token, f"{where} token {t}"),
                  float(x["logprob"] if isinstance(x, dict) else x.logprob)) for x in tops]
        out.append(sorted(pairs, key=lambda p: -p[1]))
    return out


def prompt_logprobs(choice: Any, ids: Sequence[int], top_k: int, where: str = "choice"
                    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """vLLM's ``prompt_logprobs`` of a completions choice scored over `ids`: per position (None for the first), the
    log-prob of the token there and the top-`top_k` (token id, log-prob) by rank."""
    raw = extra_fields(choice).get("prompt_logprobs") if not isinstance(choice, dict) else choice.get("prompt_logprobs")
    if raw is None or len(raw) != len(ids):
        raise ServerError(f"{where} has {'no' if raw is None else len(raw)} prompt_logprobs for {len(ids)} prompt tokens",
                          "request the completion with prompt_logprobs=K from a vLLM server")
    out: list = [None]
    for p in range(1, len(ids)):
        entry = {int(k): v for k, v in raw[p].items()}
        if ids[p] not in entry:
            raise ServerError(f"{where} prompt_logprobs at position {p} lacks the token there ({ids[p]})",
                              "check that the scored ids are the ones sent")
        ranked = sorted(((k, float(v["logprob"])) for k, v in entry.items() if v.get("rank", top_k + 1) <= top_k),
                        key=lambda kv: -kv[1])
        out.append((float(entry[ids[p]]["logprob"]), ranked[:top_k]))
    return out


def _text_parts(content: Any, where: str) -> list[dict]:
    """Content as OpenAI content parts (a string is one text part; None is no part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, Sequence) and all(isinstance(p, Mapping) for p in content):
        return [dict(p) for p in content]
    raise TokenizationError(f"{where} content is a {type(content).__name__}, not a string or a list of content parts",
                            "send text content as a string (tool results too: serialise a mapping to JSON text)")


def _arguments(args: Any, where: str) -> dict:
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise TokenizationError(f"{where} arguments are not valid JSON ({exc.msg})",
                                    "pass the arguments as a JSON object (a mapping or its JSON text)") from None
    if not isinstance(args, Mapping):
        raise TokenizationError(f"{where} arguments are a JSON {type(args).__name__}, not an object",
                                "pass the arguments as a JSON object (a mapping or its JSON text)")
    return json.loads(json.dumps(args))


def template_messages(messages: Sequence[Mapping[str, Any]], content_format: str = "string") -> list[dict]:
    """Messages as vLLM hands them to a chat template: ``reasoning_content`` also under ``reasoning``; content as
    OpenAI text parts (``content_format="openai"``: a template that iterates over content) or one string; tool
    contents as strings; JSON-string tool arguments decoded. What vLLM would coerce silently is refused instead,
    naming the message: arguments that are not a JSON object, a tool content that is a mapping."""
    out = []
    for i, raw in enumerate(messages):
        m = json.loads(json.dumps(raw))  # deep copy, plain types
        role, where = m.get("role"), f"message {i} ({m.get('role')})"
        reasoning = m.get("reasoning", m.get("reasoning_content"))
        if reasoning is not None:
            m["reasoning"] = m["reasoning_content"] = reasoning
        parts = _text_parts(m.get("content"), where)
        texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
        if role == "tool" and len(texts) == len(parts):
            m["content"] = "\n".join(texts)
        else:
            m["content"] = parts if content_format == "openai" else "\n".join(texts)
        for k, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function", call)
            fn["arguments"] = _arguments(fn.get("arguments"), f"{where} tool call {k}")
        if "tool_calls" in m and not m["tool_calls"]:
            m.pop("tool_calls")
        out.append(m)
    return out
