"""Render a chat template exactly as Hugging Face transformers and vLLM do (same Jinja settings and variables).

A Gemma 4 checkpoint brings its template (``chat_template.jinja``, ``additional_chat_templates/``, or the
tokenizer config's ``chat_template``: a string or a list of named templates).
`render` renders messages as given; `render_prompt` renders what vLLM renders for a chat request: its message
preprocessing first (`gemma4_support.serving.wire.template_messages`, content as parts when the template
iterates over content, a ``developer`` role turned into ``system`` when the template never names it), and a
continued final message cut the way transformers cuts it. A template that cannot render a conversation raises
one line naming the first message it fails on.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from gemma4_support.errors import TokenizationError
from gemma4_support.serving.wire import template_messages

__all__ = ["checkpoint_template", "checkpoint_templates", "content_format", "render", "render_prompt"]

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # what transformers appends to the message it continues


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


def checkpoint_templates(model_dir: str | Path) -> dict[str, str]:
    """Every named chat template a checkpoint directory brings, where transformers' AutoTokenizer reads them, and
    the processor's legacy ``chat_template.json`` as "processor" (vLLM renders requests without tools with it)."""
    path = Path(model_dir)
    config = path / "tokenizer_config.json"
    raw = _json_field(config, "chat_template")
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # the older multi-template form: [{"name": ..., "template": ...}, ...]
        for entry in raw:
            named = isinstance(entry, dict) and isinstance(entry.get("name"), str)
            if not (named and isinstance(entry.get("template"), str)):
                raise TokenizationError(f"{config}: chat_template entry {str(entry)[:80]} is not a name and a template",
                                        'write chat_template as a string, or a list of {"name", "template"} objects')
            templates[entry["name"]] = entry["template"]
    own, extra = path / "chat_template.jinja", path / "additional_chat_templates"
    if own.is_file() or extra.is_dir():  # the separate files take priority over the tokenizer config's entries
        templates = {"default": own.read_text(encoding="utf-8")} if own.is_file() else {}
        for file in sorted(extra.glob("*.jinja")) if extra.is_dir() else ():
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    legacy = path / "chat_template.json"  # a processor's (multimodal) template: transformers' processor prefers it
    processor = _json_field(legacy, "chat_template")
    if isinstance(processor, str):
        templates["processor"] = processor
        templates.setdefault("default", processor)
    return templates


def _json_field(file: Path, key: str) -> object:
    """`key` of the JSON object in `file` (None when the file or the key is absent; one line when unreadable)."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")).get(key)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise TokenizationError(f"{file} is not a readable JSON object ({exc})", "repair or re-save it") from None


def checkpoint_template(model_dir: str | Path) -> str | None:
    """The chat template a checkpoint's tokenizer renders every conversation with (None when it brings none);
    refused when its named templates would render some conversations differently (a distinct `tool_use` one)."""
    templates = checkpoint_templates(model_dir)
    if not templates:
        return None
    if "default" not in templates:
        raise TokenizationError(f"{model_dir} brings chat templates {sorted(templates)} and none named 'default' "
                                "(transformers refuses to choose one too)",
                                "pass the one under test with --gemma4-chat-template FILE")
    default = templates["default"]
    if templates.get("tool_use", default) != default:
        raise TokenizationError(f"{model_dir} brings a 'tool_use' chat template beside its default: transformers and "
                                "vLLM render requests with tools through the one, without through the other, and "
                                "this suite checks one template at a time",
                                "run the stage once per template with --gemma4-chat-template FILE")
    if templates.get("processor", default) != default:
        raise TokenizationError(f"{model_dir}/chat_template.json (the processor's) differs from the tokenizer's chat "
                                "template: vLLM renders requests without tools through the processor's, with tools "
                                "through the tokenizer's, and this suite checks one template at a time",
                                "run the stage once per template with --gemma4-chat-template FILE")
    return default


def _compiled(template: str) -> Any:
    compiled = _COMPILED.get(template)
    if compiled is None:
        compiled = _COMPILED[template] = _environment().from_string(template)
    return compiled


def render(
    messages: list[dict],
    *,
    template: str,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = False,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template`` as ``tokenizer.apply_chat_template(..., tokenize=False)`` does."""
    return _compiled(template).render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                      enable_thinking=enable_thinking, bos_token="<bos>", eos_token="<eos>", **kwargs)


def _names_content(node: Any) -> bool:
    """Whether an expression is some ``x['content']`` / ``x.content`` (through filters, tests and slices)."""
    import jinja2.nodes

    while isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test, jinja2.nodes.Getitem, jinja2.nodes.Getattr)):
        if isinstance(node, jinja2.nodes.Getattr) and node.attr == "content":
            return True
        if (isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const)
                and node.arg.value == "content"):
            return True
        node = node.node
    return False


@functools.lru_cache(maxsize=64)  # one parse per template: render_prompt asks on every call
def content_format(template: str) -> Literal["string", "openai"]:
    """"openai" when the template iterates over a message's ``content`` (it expects a list of content parts, and
    vLLM then sends every content as parts), else "string" — vLLM's detection rule: a loop over ``x['content']``,
    or over a macro parameter some call passes ``x['content']`` to."""
    import jinja2.nodes

    tree = _environment().parse(template)
    bound: dict[str, set[str]] = {}  # macro name -> its parameters that receive a content expression
    macros = {m.name: [a.name for a in m.args] for m in tree.find_all(jinja2.nodes.Macro)}
    for call in tree.find_all(jinja2.nodes.Call):
        name = getattr(call.node, "name", None)
        if name in macros:
            params = macros[name]
            hits = {params[i] for i, a in enumerate(call.args) if i < len(params) and _names_content(a)}
            hits |= {k.key for k in call.kwargs if _names_content(k.value)}
            bound.setdefault(name, set()).update(hits)
    for macro in tree.find_all(jinja2.nodes.Macro):
        for loop in macro.find_all(jinja2.nodes.For):
            if isinstance(loop.iter, jinja2.nodes.Name) and loop.iter.name in bound.get(macro.name, ()):
                return "openai"
    return "openai" if any(_names_content(loop.iter) for loop in tree.find_all(jinja2.nodes.For)) else "string"


def _developer_as_system(messages: list[dict]) -> list[dict]:
    """vLLM, for a template that never names the developer role: developer -> system, system turns merged first."""
    if not any(m.get("role") == "developer" for m in messages):
        return messages
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    texts = [m["content"] if isinstance(m["content"], str) else "\n".join(p.get("text", "") for p in m["content"])
             for m in system]
    merged = {"role": "system", "content": "\n\n".join(t for t in texts if t)}
    return [merged, *(m for m in messages if m.get("role") not in ("system", "developer"))]


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    template: str,
    tools: list[dict] | None = None,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """The prompt text vLLM renders for a chat request with these messages and template."""
    msgs = template_messages(messages, content_format(template))
    if "'developer'" not in template and '"developer"' not in template:
        msgs = _developer_as_system(msgs)
    final = None
    if continue_final_message:
        final, add_generation_prompt = _tag_final_message(msgs), False
    options = dict(template=template, tools=tools, add_generation_prompt=add_generation_prompt,
                   enable_thinking=enable_thinking, **kwargs)
    try:
        text = render(msgs, **options)
    except Exception as exc:  # noqa: BLE001 - a template error, named with the message that causes it
        raise _render_error(msgs, options, exc) from None
    if final is None:
        return text
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0 or final.strip() not in text:
        raise TokenizationError("the chat template drops the final message that continue_final_message continues",
                                "continue a message the template renders, or send it without continue_final_message")
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _tag_final_message(msgs: list[dict]) -> str:
    """Append transformers' continuation tag to the final message's (last) text; returns that text."""
    content = msgs[-1].get("content")
    if isinstance(content, str):
        msgs[-1]["content"] = content + _CONTINUE_TAG
        return content
    for part in reversed(content or []):
        if "text" in part:
            text = part["text"]
            part["text"] = text + _CONTINUE_TAG
            return text
    raise TokenizationError("continue_final_message is set but the final message has no text to continue",
                            "give the final message text content")


def _render_error(msgs: list[dict], options: dict, exc: Exception) -> TokenizationError:
    """One line naming the first message the template cannot render, and the template's own words."""
    bad = len(msgs) - 1
    for k in range(1, len(msgs) + 1):
        try:
            render(msgs[:k], **{**options, "add_generation_prompt": False})
        except Exception:  # noqa: BLE001
            bad = k - 1
            break
    m = msgs[bad] if msgs else {}
    construct = ("its tool calls" if m.get("tool_calls") else f"its {type(m.get('content')).__name__} content")
    return TokenizationError(f"the chat template cannot render message {bad} ({m.get('role')}, {construct}): "
                             f"{type(exc).__name__}: {str(exc)[:300]}",
                             "change that message to a form the template renders (see the template's error above)")
