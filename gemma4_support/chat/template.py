"""The Gemma 4 chat template shipped with every fixture (Jinja, Hugging Face chat-template conventions).

Variables: ``messages``, ``tools``, ``add_generation_prompt``, ``enable_thinking``. Rendered format
(REFERENCE §3)::

    <bos><|turn>system\\n[<|think|>]SYSTEM TEXT[<|tool>declaration:NAME{description:<|"|>…<|"|>,parameters:{…}}<tool|>…]<turn|>\\n
    <|turn>user\\nTEXT<turn|>\\n
    <|turn>model\\n[<|channel>thought\\nREASONING<channel|>]TEXT<turn|>\\n
    <|turn>model\\n<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|><|tool_response>response:NAME{…}<tool_response|>TEXT<turn|>\\n

* ``<bos>`` is written by the template (the tokenizer never adds it, see ``tokenizer.py``).
* The system turn appears when there is a leading ``system``/``developer`` message, tools, or
  ``enable_thinking``; ``<|think|>`` opens it when ``enable_thinking`` is true.
* ``assistant`` (or ``model``) messages render as the ``model`` role; ``reasoning_content`` (or
  ``reasoning``) becomes ``<|channel>thought\\n…<channel|>`` before the content.
* ``tool_calls`` render ``<|tool_call>call:NAME{…}<tool_call|>``: strings inside ``<|"|>``, keys
  unquoted, dicts/lists nested, numbers as Python prints them, ``true``/``false``/``null``. Arguments
  must be dicts (an OpenAI JSON string is pasted verbatim between the braces: decode it first).
* A model turn that issues tool calls stays **open**: each following ``tool`` message renders
  ``<|tool_response>response:NAME{…}<tool_response|>`` inside that same turn (NAME from the message's
  ``name``, else from the matching ``tool_call_id``, else positionally), and the next assistant message
  continues the turn without a new ``<|turn>model\\n``. This is what the real Gemma 4 models do: they stop
  on ``<|tool_response>`` (one of the generation EOS ids) and continue after ``<tool_response|>``. A
  dict tool content renders as-is; a string renders ``{value:<|"|>…<|"|>}``.
* ``add_generation_prompt`` appends ``<|turn>model\\n`` unless a model turn is already open.
* Content strings are not trimmed: text round-trips exactly.

Append-only: with the same ``tools`` and ``enable_thinking``, rendering ``messages[:k+1]`` *without* a
generation prompt is always a string prefix of rendering ``messages``; *with* a generation prompt it
is a prefix whenever ``messages[k+1]`` is an assistant message (the only place a generation prompt is
used in a rollout), including after tool messages (the turn is open, the prompt adds nothing). It is
not a prefix when ``messages[k+1]`` is a user/system message (the dangling ``<|turn>model\\n`` is not in
the longer render) nor when the system message, tools or ``enable_thinking`` change. The main template
keeps the thought channel of every model turn, so history never changes.

``STRIP_THOUGHTS_TEMPLATE`` is the same template except that it drops the thought channel of model
turns before the last user message (only the last model turn, which may span several assistant/tool
messages, keeps it), as many public chat templates do: re-rendering a multi-turn conversation then
no longer extends the previous prompt, which breaks append-only RL tokenization on purpose.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CHAT_TEMPLATE", "STRIP_THOUGHTS_TEMPLATE", "TEMPLATE_FILE", "render"]

TEMPLATE_FILE = Path(__file__).with_name("gemma4_chat_template.jinja")

_SOURCE = TEMPLATE_FILE.read_text(encoding="utf-8")
CHAT_TEMPLATE: str = _SOURCE.replace("__STRIP_THOUGHTS__", "false")
STRIP_THOUGHTS_TEMPLATE: str = _SOURCE.replace("__STRIP_THOUGHTS__", "true")


def _environment():
    # The same settings transformers and vLLM render chat templates with.
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env


_COMPILED: dict[str, Any] = {}


def render(
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    template: str = CHAT_TEMPLATE,
) -> str:
    """Render ``messages`` with ``template`` exactly as ``tokenizer.apply_chat_template(...,
    tokenize=False)`` does (same Jinja settings, same variables)."""
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
