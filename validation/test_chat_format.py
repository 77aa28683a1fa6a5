"""Stage tokenization, the chat template under test (`--gemma4-chat-template`, else the model's own, else the
fixtures') over generated conversations (hypothesis: system / developer / user / model turns, thinking on and off,
tool calls with nested unicode arguments given as mappings or JSON text, tool results, content parts, empty
contents): its characterisation is reported; render -> tokenize -> decode is the rendered text and transformers
renders the same; the rendering reads back, item by item, with vLLM's own Gemma 4 reasoning and tool-call parsers;
every place where a later prompt does not extend an earlier one is a rewrite the characterisation names;
malformed conversations get one error naming the message."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from fixtures.conversations import conversations, malformed_conversations
from fixtures.factory import hf_tokenizer
from fixtures.tokenizer import decode, encode
from gemma4_support.chat.template import content_format, render_prompt
from gemma4_support.chat.traits import characterise, history_change
from gemma4_support.errors import TokenizationError
from gemma4_support.serving.wire import template_messages
from validation import thresholds as T
from validation.properties import check_property
from validation.transformers_writers import WRITERS
from validation.vllm_parsers import parse_model_text

pytestmark = pytest.mark.stage_tokenization

_TURN = re.compile(r"<\|turn>(system|user|model|developer)\n")
_ITEM = re.compile(r"<\|channel>thought\n(.*?)\n<channel\|>|<\|tool_call>(.*?)<tool_call\|>|"
                   r"<\|tool_response>(.*?)<tool_response\|>", re.S)
_DECL = re.compile(r"<\|tool>declaration:(\w+)\{.*?<tool\|>", re.S)


def _render(template: str, conv: dict, messages: list | None = None, gen: bool = False) -> str:
    return render_prompt(conv["messages"] if messages is None else messages, template=template, tools=conv["tools"],
                         enable_thinking=conv["enable_thinking"], add_generation_prompt=gen)


def test_template_characterisation(chat_template_origin: tuple[str, str], stage_report) -> None:
    """What the template under test does to history (reported; the properties below check it holds), and where the
    template came from."""
    import hashlib

    template, origin = chat_template_origin
    traits = characterise(template)
    stage_report.record("template_characterisation", **traits.to_dict(), template_origin=origin,
                        template_sha256=hashlib.sha256(template.encode()).hexdigest()[:12])


def test_chat_format_roundtrip_and_transformers_render(chat_template: str, stage_report) -> None:
    """render -> tokenize -> decode is the rendered text; transformers renders the same messages identically."""
    stats, hf = Counter(), hf_tokenizer()

    def body(conv: dict) -> None:
        text = _render(chat_template, conv)
        ids = encode(text)
        assert decode(ids) == text
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        msgs = template_messages(conv["messages"], content_format(chat_template))
        assert hf.apply_chat_template(msgs, tools=conv["tools"], tokenize=False, chat_template=chat_template,
                                      enable_thinking=conv["enable_thinking"]) == text
        stats["tokens"] += len(ids)
        stats["tool_calls"] += sum(len(m.get("tool_calls") or []) for m in conv["messages"])

    check_property(stage_report, "chat_format_roundtrip", conversations(), body, stats, T.TOKENIZATION_PROPERTY)


# ---------------------------------------------------------------- read back, item by item ----------

def _scalar_text(v) -> object:  # noqa: ANN001
    """Non-string scalars as the Gemma 4 format writes them (vLLM's argument parser returns that text)."""
    if isinstance(v, dict):
        return {k: _scalar_text(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_scalar_text(x) for x in v]
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else v if isinstance(v, str) else str(v)


def _text(content: object) -> str:
    parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or []]
    return "".join(p.strip() for p in parts)


def _expected_items(conv: dict) -> list[tuple]:
    """The conversation as the format renders it, item by item (turns, thoughts, calls, responses, texts)."""
    msgs = template_messages(conv["messages"], "openai")
    loop = msgs[1:] if msgs and msgs[0]["role"] in ("system", "developer") else msgs
    last_user = max((i for i, m in enumerate(loop) if m["role"] == "user"), default=-1)
    items: list[tuple] = []
    for i, m in enumerate(loop):
        if m["role"] in ("user", "developer", "system"):
            items.append(("turn", m["role"], _text(m["content"])))
        elif m["role"] == "assistant":
            if m.get("reasoning") and i > last_user:
                items.append(("thought", m["reasoning"].strip()))
            calls = m.get("tool_calls") or []
            items += [("call", c["function"]["name"], _scalar_text(c["function"]["arguments"])) for c in calls]
            names = {c.get("id"): c["function"]["name"] for c in calls}
            for follow in loop[i + 1:] if calls else []:
                if follow["role"] != "tool":
                    break
                name = names.get(follow.get("tool_call_id"), follow.get("name") or "unknown")
                items.append(("response", name, {"value": follow["content"]}))
            if _text(m["content"]):  # texts of one model turn that meet render as one
                joined = items.pop()[1] if items and items[-1][0] == "text" else ""
                items.append(("text", joined + _text(m["content"])))
    return items


def _parsed_items(text: str, thinking: bool) -> tuple[list[tuple], list[str], bool]:
    """Rendered text -> (items, declared tool names, thinking flag); model text read by vLLM's parsers."""
    tokenizer = hf_tokenizer()
    body = text.removeprefix("<bos>")
    items, declared, think = [], [], False
    for role, turn in zip(*[iter(_TURN.split(body)[1:])] * 2):
        turn = turn.removesuffix("\n").removesuffix("<turn|>")
        if role == "system":
            think, turn = turn.startswith("<|think|>\n"), turn.removeprefix("<|think|>\n")
            declared, turn = _DECL.findall(turn), _DECL.sub("", turn)
        if role != "model":
            items.append(("turn", role, turn.strip()))
            continue
        pos = 0
        for m in _ITEM.finditer(turn):
            if turn[pos:m.start()].strip():
                items.append(("text", turn[pos:m.start()].strip()))
            pos = m.end()
            if m.group(1) is not None:
                reasoning = parse_model_text(tokenizer, m.group(0), thinking=thinking)[0]
                items.append(("thought", (reasoning or "").strip()))
            else:
                call = m.group(2) if m.group(2) is not None else "call:" + m.group(3).removeprefix("response:")
                (name, args), = parse_model_text(tokenizer, f"<|tool_call>{call}<tool_call|>", thinking=thinking)[2]
                items.append(("call" if m.group(2) is not None else "response", name, args))
        if turn[pos:].strip():
            items.append(("text", turn[pos:].strip()))
    return items, declared, think


def test_chat_format_reads_back_with_vllm_parsers(chat_template: str, stage_report) -> None:
    """Every turn, thought, tool call, tool response and text reads back in order with vLLM's Gemma 4 parsers."""
    stats = Counter()

    def body(conv: dict) -> None:
        items, declared, think = _parsed_items(_render(chat_template, conv), conv["enable_thinking"])
        expected = _expected_items(conv)
        if conv["messages"][0]["role"] in ("system", "developer") or conv["enable_thinking"] or conv["tools"]:
            lead = conv["messages"][0]
            system = _text(lead["content"]) + " " if lead["role"] in ("system", "developer") else ""
            expected = [("turn", "system", system.strip()), *expected]
        assert items == expected
        assert declared == [t["function"]["name"] for t in conv["tools"] or []] and think == conv["enable_thinking"]
        stats["items"] += len(items)

    check_property(stage_report, "chat_format_reads_back_vllm", conversations(), body, stats,
                   T.TOKENIZATION_PROPERTY)


def test_history_rewrites_are_the_characterised_ones(chat_template: str, stage_report) -> None:
    """Wherever the prompt before an assistant message is not a prefix of the final rendering, what the final
    rendering lacks is a thought (the template drops past thoughts) or (part of) text the characterisation found
    the template's prompts add and its history lacks, never anything else."""
    stats = Counter()
    traits = characterise(chat_template)
    prompt_only = {v for v in (*traits.generation_prompt_not_in_history.values(),
                               *traits.continuation_prompt_not_in_history.values()) if v}

    def body(conv: dict) -> None:
        final = _render(chat_template, conv)
        for k, m in enumerate(conv["messages"]):
            if m["role"] != "assistant":
                continue
            prompt = _render(chat_template, conv, conv["messages"][:k], gen=True)
            stats["prompts"] += 1
            if final.startswith(prompt):
                continue
            for piece in history_change(prompt, final)["removed"]:
                thought = piece.startswith("<|channel>thought\n") and piece.endswith("\n<channel|>")
                # part of a prompt-only text: the history keeps the rest (a thought fills an empty-thought prompt)
                assert thought or any(piece in text for text in prompt_only), f"message {k}: the history lost {piece!r}"
                assert not thought or traits.drops_past_thoughts, f"message {k}: a thought dropped unannounced"
                stats["dropped_thoughts" if thought else "generation_prompt_texts"] += 1

    check_property(stage_report, "history_rewrites_characterised", conversations(), body, stats,
                   T.TOKENIZATION_PROPERTY, rewrites=traits.rewrites())


def test_malformed_conversations_get_one_error_naming_the_message(chat_template: str, stage_report) -> None:
    stats = Counter()

    def body(case: tuple) -> None:
        conv, bad, defect = case
        with pytest.raises(TokenizationError) as err:
            _render(chat_template, conv)
        line = str(err.value)
        assert "\n" not in line and f"message {bad} (" in line, (defect, line)
        stats[defect] += 1

    check_property(stage_report, "malformed_refused", malformed_conversations(), body, stats, T.TOKENIZATION_PROPERTY)


def test_checkpoint_template_is_the_one_transformers_reads(tmp_path) -> None:  # noqa: ANN001
    """`checkpoint_template` finds the template where transformers does: the fixture checkpoint's equals
    AutoTokenizer's `chat_template`; chat_template.jinja wins over tokenizer_config.json; none gives None."""
    import json

    from fixtures.factory import fixture_dir
    from gemma4_support.chat.template import checkpoint_template

    assert checkpoint_template(fixture_dir("moe")) == hf_tokenizer().chat_template
    assert checkpoint_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from the config"}))
    assert checkpoint_template(tmp_path) == "from the config"
    (tmp_path / "chat_template.jinja").write_text("from the file")
    assert checkpoint_template(tmp_path) == "from the file"


# named templates as transformers' save_pretrained writes them ("FIXTURE": the fixtures' template):
# case -> (templates, whether transformers has a default, what our refusal names — None: ours is that default)
NAMED_TEMPLATES = {
    "default_and_rag": ({"default": "FIXTURE", "rag": "RAG"}, True, None),
    "distinct_tool_use": ({"default": "FIXTURE", "tool_use": "TOOLS"}, True, "'tool_use' chat template"),
    "no_default": ({"rag": "RAG"}, False, "none named 'default'"),
}


@pytest.mark.parametrize("case", list(NAMED_TEMPLATES))
def test_named_checkpoint_templates_as_transformers_writes_them(case: str, tmp_path) -> None:  # noqa: ANN001
    """A tokenizer with several named templates, saved by transformers (chat_template.jinja and
    additional_chat_templates/), and the same in the older list form of tokenizer_config.json: ours is transformers'
    default where that is the only template a request can get; a distinct `tool_use` template (transformers and vLLM
    pick it when tools are passed) or no default is refused in one line — never a silent fall back to another."""
    import json

    from transformers import AutoTokenizer

    from fixtures.factory import fixture_dir
    from gemma4_support.chat.template import checkpoint_template

    named, has_default, refusal = NAMED_TEMPLATES[case]
    templates = {k: hf_tokenizer().chat_template if v == "FIXTURE" else v for k, v in named.items()}
    tok = AutoTokenizer.from_pretrained(fixture_dir("moe"))
    tok.chat_template = templates
    tok.save_pretrained(tmp_path / "files")
    assert (tmp_path / "files" / "additional_chat_templates").is_dir()
    legacy = tmp_path / "list"
    tok.save_pretrained(legacy)
    for leftover in [legacy / "chat_template.jinja", *legacy.glob("additional_chat_templates/*")]:
        leftover.unlink(missing_ok=True)
    (legacy / "additional_chat_templates").rmdir()
    config = json.loads((legacy / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
    (legacy / "tokenizer_config.json").write_text(json.dumps(config))
    for folder in (tmp_path / "files", legacy):
        hf = AutoTokenizer.from_pretrained(folder)
        if has_default:
            assert hf.get_chat_template() == templates["default"]
        else:
            with pytest.raises(ValueError):
                hf.get_chat_template()
        if refusal is None:
            assert checkpoint_template(folder) == hf.get_chat_template()
        else:
            with pytest.raises(TokenizationError) as err:
                checkpoint_template(folder)
            refusal_text = str(err.value)
            assert refusal in refusal_text and "--gemma4-chat-template" in refusal_text and "\n" not in refusal_text


def test_processor_chat_template_json(tmp_path) -> None:  # noqa: ANN001
    """A multimodal checkpoint's legacy chat_template.json (its processor reads it before chat_template.jinja, and
    vLLM prefers the processor's template for requests without tools): the checkpoint's template when it brings no
    other; refused in one line when it differs from the tokenizer's (from tokenizer_config.json or the .jinja)."""
    import json

    from gemma4_support.chat.template import checkpoint_template

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "processor's"}))
    assert checkpoint_template(tmp_path) == "processor's"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "tokenizer's"}))
    with pytest.raises(TokenizationError, match="differs from the tokenizer's") as err:
        checkpoint_template(tmp_path)
    assert "--gemma4-chat-template" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "chat_template.jinja").write_text("the file's")
    with pytest.raises(TokenizationError, match="differs from the tokenizer's"):
        checkpoint_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("processor's")
    assert checkpoint_template(tmp_path) == "processor's"


@pytest.mark.xdist_group("transformers_writers")
@pytest.mark.parametrize("version", list(WRITERS))
def test_tokenizer_written_by_other_transformers(version: str, written_by, stage_report) -> None:  # noqa: ANN001
    """The fixtures' tokenizer re-saved by another transformers release (validation/transformers_writers.py): its
    template is read back unchanged, and the pinned transformers tokenizes a rendered tool conversation with thinking
    to the same ids, the Gemma 4 special strings to the same single ids."""
    from transformers import AutoTokenizer

    from fixtures.conversations import weather_conversation, weather_tools
    from fixtures.tokenizer import SPECIAL_TOKENS
    from gemma4_support.chat.template import checkpoint_template, render

    written = written_by(version)
    template = checkpoint_template(written.tokenizer)
    reread, reference = AutoTokenizer.from_pretrained(written.tokenizer), hf_tokenizer()
    text = render(weather_conversation(), template=template, tools=weather_tools(), enable_thinking=True)
    ids, want = reread(text)["input_ids"], reference(text)["input_ids"]
    specials = [t for t in SPECIAL_TOKENS if reread.convert_tokens_to_ids(t) != reference.convert_tokens_to_ids(t)]
    stage_report.record(f"tokenizer_written_by/{version}", tokens=len(ids), files=sorted(
        p.name for p in written.tokenizer.iterdir()))
    assert template == reference.chat_template
    assert ids == want and len(want) > 100
    assert not specials, specials
