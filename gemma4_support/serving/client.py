"""Client side of a vLLM OpenAI server: requests that return token ids, normalised onto each choice.

Every chat completion is requested with ``return_token_ids`` (and ``logprobs``, ``skip_special_tokens``
off by default). vLLM answers with the prompt ids at the top level of a chat response and the sampled
ids on each choice; `VLLMClient.chat` stores both **on each choice** (in the OpenAI client's
``model_extra``, as vLLM's own extra fields arrive there), as plain ``list[int]``, so a `Choice` is
self-contained for RL tokenization: ``choice.model_extra["prompt_token_ids"]``,
``choice.model_extra["token_ids"]``. When the server returns MoE routing (``routed_experts``, base64
``.npy``), it is decoded in place into a numpy array of shape ``[tokens - 1, layers, top_k]``.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from gemma4_support.errors import ServerError

__all__ = [
    "VLLMClient",
    "normalize_token_ids",
    "decode_routed_experts",
    "normalize_choice",
    "choice_logprobs",
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


def _extra(obj: Any) -> dict:
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
        store = _extra(choice)
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


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Messages as vLLM hands them to the chat template: OpenAI JSON-string tool arguments decoded to dicts."""
    out = []
    for m in messages:
        m = json.loads(json.dumps(m))  # deep copy, plain types
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            args = fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args else {}
                except json.JSONDecodeError:
                    args = {}
                fn["arguments"] = args if isinstance(args, dict) else {}
            elif not args:
                fn["arguments"] = {}
        if "tool_calls" in m and not m["tool_calls"]:
            m.pop("tool_calls")
        out.append(m)
    return out


class VLLMClient:
    """Chat/completions against a vLLM OpenAI server, returning OpenAI-client objects whose choices carry token ids."""

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", timeout: float = 300.0) -> None:
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.openai = OpenAI(base_url=self.base_url + "/v1", api_key=api_key, timeout=timeout, max_retries=0)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        n: int = 1,
        logprobs: bool = True,
        top_logprobs: int | None = None,
        enable_thinking: bool | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        allowed_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One chat completion with ``return_token_ids``; each choice carries ``prompt_token_ids`` and ``token_ids``."""
        body: dict[str, Any] = {"return_token_ids": True, "skip_special_tokens": skip_special_tokens}
        if enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
        if chat_template is not None:
            body["chat_template"] = chat_template
        if continue_final_message:
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if allowed_token_ids is not None:
            body["allowed_token_ids"] = list(allowed_token_ids)
        if extra_body:
            body.update(extra_body)
        args: dict[str, Any] = dict(model=self.model, messages=list(messages), max_tokens=max_tokens,
                                    temperature=temperature, n=n, logprobs=logprobs, extra_body=body)
        if top_logprobs is not None:
            args["top_logprobs"] = top_logprobs
        if seed is not None:
            args["seed"] = seed
        if tools:
            args["tools"] = list(tools)
        args.update(kwargs)
        response = self._call(self.openai.chat.completions.create, **args)
        prompt = (response.model_extra or {}).get("prompt_token_ids")
        if prompt is None:
            raise ServerError("the chat response has no prompt_token_ids",
                              "use a vLLM server (>= 0.10) that supports return_token_ids")
        _extra(response)["prompt_token_ids"] = normalize_token_ids(prompt, "response prompt_token_ids")
        for choice in response.choices:
            normalize_choice(choice, prompt)
        return response

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        n: int = 1,
        logprobs: int | None = 0,
        skip_special_tokens: bool = False,
        extra_body: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """One completion (text or token-id prompt) with ``return_token_ids``; ids normalised on each choice."""
        body: dict[str, Any] = {"return_token_ids": True, "skip_special_tokens": skip_special_tokens}
        if extra_body:
            body.update(extra_body)
        args: dict[str, Any] = dict(model=self.model, prompt=prompt if isinstance(prompt, str) else list(prompt),
                                    max_tokens=max_tokens, temperature=temperature, n=n, extra_body=body)
        if logprobs is not None:
            args["logprobs"] = logprobs
        if seed is not None:
            args["seed"] = seed
        args.update(kwargs)
        response = self._call(self.openai.completions.create, **args)
        for choice in response.choices:
            normalize_choice(choice)
        return response

    def _call(self, fn, **args: Any):
        import openai

        try:
            return fn(**args)
        except openai.APIStatusError as exc:
            raise ServerError(f"vLLM at {self.base_url} refused the request ({exc.status_code}): {_message(exc)}",
                              "fix the request fields named above") from None
        except openai.APIConnectionError as exc:
            raise ServerError(f"cannot reach vLLM at {self.base_url}: {exc}",
                              "check that the server is running (its log says why it stopped)") from None


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:1000]
    return str(exc)[:1000]
