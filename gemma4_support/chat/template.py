"""Render a chat template exactly as Hugging Face transformers and vLLM do (same Jinja settings and variables).

A Gemma 4 checkpoint brings its template (``chat_template.jinja`` / the tokenizer's ``chat_template``);
this module renders any such template outside transformers, so RL and SFT tokenization can check their
ids against the rendering.
"""
from __future__ import annotations

from typing import Any

__all__ = ["render"]


def _environment():  # noqa: ANN202
    # The same settings transformers and vLLM render chat templates with.
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):  # noqa: ANN202
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env


_COMPILED: dict[str, Any] = {}


def render(
    messages: list[dict],
    *,
    template: str,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
) -> str:
    """Render ``messages`` with ``template`` as ``tokenizer.apply_chat_template(..., tokenize=False)`` does."""
    compiled = _COMPILED.get(template)
    if compiled is None:
        compiled = _COMPILED[template] = _environment().from_string(template)
    return compiled.render(
        messages=messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        bos_token="<bos>",
        eos_token="<eos>",
    )
