"""Client side of a vLLM OpenAI server: requests that return token ids, normalised onto each choice, and the
probes of a server's state (``/health``, ``/v1/models``, whether a local process holds its port).

Every request asks for ``return_token_ids`` (and ``logprobs``; ``skip_special_tokens`` off by default); the
answer's ids are stored on each choice (`gemma4_support.serving.wire.normalize_choice`), so a choice is
self-contained for RL tokenization: ``choice.model_extra["prompt_token_ids"]``, ``choice.model_extra["token_ids"]``.
"""
from __future__ import annotations

import errno
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from gemma4_support.errors import ServerError
from gemma4_support.serving.wire import extra_fields, normalize_choice, normalize_token_ids

__all__ = ["VLLMClient", "health_ok", "health_status", "port_held_here", "served_models"]


def _request(model: str, *, max_tokens: int, temperature: float, n: int, seed: int | None,
             skip_special_tokens: bool, vllm_fields: Mapping[str, Any], extra_body: Mapping[str, Any] | None,
             **fields: Any) -> dict[str, Any]:
    """The OpenAI-client arguments of one request: the standard fields, then vLLM's own in ``extra_body``."""
    body: dict[str, Any] = {"return_token_ids": True, "skip_special_tokens": skip_special_tokens, **vllm_fields}
    if extra_body:
        body.update(extra_body)
    args: dict[str, Any] = dict(model=model, max_tokens=max_tokens, temperature=temperature, n=n, extra_body=body)
    if seed is not None:
        args["seed"] = seed
    args.update({k: v for k, v in fields.items() if v is not None})
    return args


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
        model: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """One chat completion with ``return_token_ids``; each choice carries ``prompt_token_ids`` and ``token_ids``."""
        vllm_fields: dict[str, Any] = {}
        if enable_thinking is not None:
            vllm_fields["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
        if chat_template is not None:
            vllm_fields["chat_template"] = chat_template
        if continue_final_message:
            vllm_fields.update(continue_final_message=True, add_generation_prompt=False)
        if allowed_token_ids is not None:
            vllm_fields["allowed_token_ids"] = list(allowed_token_ids)
        args = _request(model or self.model, max_tokens=max_tokens, temperature=temperature, n=n, seed=seed,
                        skip_special_tokens=skip_special_tokens, vllm_fields=vllm_fields, extra_body=extra_body,
                        messages=list(messages), logprobs=logprobs, top_logprobs=top_logprobs,
                        tools=list(tools) if tools else None, **kwargs)
        response = self._call(self.openai.chat.completions.create, **args)
        prompt = (response.model_extra or {}).get("prompt_token_ids")
        if prompt is None:
            raise ServerError("the chat response has no prompt_token_ids",
                              "use a vLLM server (>= 0.10) that supports return_token_ids")
        extra_fields(response)["prompt_token_ids"] = normalize_token_ids(prompt, "response prompt_token_ids")
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
        model: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """One completion (text or token-id prompt) with ``return_token_ids``; ids normalised on each choice."""
        args = _request(model or self.model, max_tokens=max_tokens, temperature=temperature, n=n, seed=seed,
                        skip_special_tokens=skip_special_tokens, vllm_fields={}, extra_body=extra_body,
                        prompt=prompt if isinstance(prompt, str) else list(prompt), logprobs=logprobs, **kwargs)
        response = self._call(self.openai.completions.create, **args)
        for choice in response.choices:
            normalize_choice(choice)
        return response

    def load_lora_adapter(self, name: str, path: str) -> None:
        """Load (or replace) a LoRA adapter in the running server under `name` (vLLM's runtime LoRA loading)."""
        self._lora_route("unload_lora_adapter", {"lora_name": name}, f"unload adapter {name}")  # absent: nothing to do
        resp = self._lora_route("load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, f"load adapter {name}")
        if resp.status_code == 404:
            raise ServerError(f"vLLM at {self.base_url} has no /v1/load_lora_adapter route",
                              "start it with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
        if resp.status_code != 200:
            raise ServerError(f"vLLM refused LoRA adapter {name} from {path} ({resp.status_code}): {resp.text[:500]}",
                              "check the adapter (module names, rank <= --max-lora-rank) and the server's flags")

    def unload_lora_adapter(self, name: str) -> None:
        """Unload a LoRA adapter from the running server (vLLM's runtime LoRA unloading)."""
        resp = self._lora_route("unload_lora_adapter", {"lora_name": name}, f"unload adapter {name}")
        if resp.status_code != 200:
            raise ServerError(f"vLLM refused to unload LoRA adapter {name} ({resp.status_code}): {resp.text[:300]}",
                              "unload only adapters this client loaded")

    def _lora_route(self, route: str, body: dict, what: str):  # noqa: ANN202 - an httpx.Response
        """POST one of vLLM's runtime-LoRA routes; an unreachable server is one ServerError line."""
        import httpx

        try:
            return httpx.post(f"{self.base_url}/v1/{route}", json=body, timeout=120.0)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach vLLM at {self.base_url} to {what}: {exc}",
                              "check that the server is running") from None

    def _call(self, fn, **args: Any):  # noqa: ANN001, ANN202
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


def health_ok(base_url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET /health`` answers 200."""
    return health_status(base_url, timeout) == 200


def health_status(base_url: str, timeout: float) -> int | str:
    """``GET /health``'s status code; "refused" when nothing accepted the connection, "no answer" otherwise."""
    import requests

    try:
        return requests.get(base_url.rstrip("/") + "/health", timeout=timeout).status_code
    except requests.ConnectionError as exc:
        return "no answer" if isinstance(exc, requests.Timeout) else "refused"
    except requests.RequestException:
        return "no answer"


def served_models(base_url: str, timeout: float = 10.0) -> list[str]:
    """The model names a server lists under ``/v1/models``."""
    import requests

    r = requests.get(base_url.rstrip("/") + "/v1/models", timeout=timeout)
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]


def port_held_here(base_url: str) -> bool:
    """Whether a process on this host holds the URL's loopback port (vLLM binds it before loading the model and
    listens only after)."""
    parts = urlsplit(base_url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return False
    family = socket.AF_INET6 if parts.hostname == "::1" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # no SO_REUSEADDR: any bound socket makes bind fail
        try:
            probe.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", parts.port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False
