"""Stage tokenization, live: a 3-turn rollout with thinking and a tool call against the session's real vLLM
server; every prompt vLLM reports equals the library's render + tokenize; the rollout collapses into one
sequence (append-only template) or splits where history changed (thought-stripping template); re-rendering
instead of using vLLM's ids is caught."""
from __future__ import annotations

import json
import math
import re

import pytest

from fixtures.chat_template import CHAT_TEMPLATE, STRIP_THOUGHTS_TEMPLATE
from fixtures.factory import hf_tokenizer
from fixtures.tokenizer import TURN_END_ID, byte_alphabet
from gemma4_support.chat.template import render
from gemma4_support.rl.collapse import choice_reproduction, collapse_trajectories
from gemma4_support.rl.trajectory import TrainingSequence, Trajectory
from gemma4_support.serving import VLLMServer
from gemma4_support.serving.wire import template_messages
from validation import thresholds as T

pytestmark = [pytest.mark.stage_tokenization, pytest.mark.xdist_group("vllm")]  # the session's vLLM server

_RESPONSE = re.compile(r"<\|tool_response>(.*?)<tool_response\|>", re.S)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "units": {"type": "object"}}, "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are a terse weather assistant."}
USER1 = {"role": "user", "content": "What's the weather in Zürich? Think first."}
USER2 = {"role": "user", "content": "And tomorrow — 明日は?"}
REASONING1 = "The user wants Zürich's weather; I should call get_weather."
PREFILL1 = "Calling the tool: "
CALL1 = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(
    {"city": "Zürich", "days": 2, "units": {"temp": "°C", "wind": ["km/h", "Bft"]}}, ensure_ascii=False)}}
TOOL1 = {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 °C ☀ and a light breeze"}
_MARK = "\x00CONTINUE\x00"


def _canonical_token_ids(tokenizer) -> list[int]:
    """Byte tokens whose character takes part in no BPE merge and no special string: any sequence of
    them decodes to text that re-encodes to exactly the same ids, so re-rendering sampled text is exact."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    in_merges = set()
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        in_merges.update((a, b))
    alphabet = byte_alphabet()
    ids = []
    for byte in range(0x21, 0x7F):
        ch, sym = chr(byte), alphabet[byte]
        if sym not in in_merges and ch not in "<|>" and sym in model["vocab"]:
            ids.append(model["vocab"][sym])
    return ids


def _library_prompt_ids(tokenizer, messages, template, continue_final: bool) -> list[int]:
    """The prompt ids the library's template + tokenizer give for a request (continue_final_message as transformers does)."""
    msgs = template_messages(messages)
    if continue_final:
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + _MARK}
        text = render(msgs, tools=TOOLS, add_generation_prompt=False, enable_thinking=True, template=template)
        text = text[: text.rindex(_MARK)]
    else:
        text = render(msgs, tools=TOOLS, add_generation_prompt=True, enable_thinking=True, template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _rollout(client, tokenizer, template: str, allowed: list[int], seed: int) -> tuple[Trajectory, dict]:
    """Three model calls of one conversation (see test_live_rollout_collapses_to_vllm_ids)."""
    per_request = {} if template == CHAT_TEMPLATE else {"chat_template": template}
    info: dict = {"response_ids": [], "prompt_lengths": [], "completion_ids": [], "finish_reasons": []}
    mismatches = 0
    choices = []

    def call(messages, continue_final, allow, max_tokens):
        nonlocal mismatches
        resp = client.chat(messages, tools=TOOLS, enable_thinking=True, max_tokens=max_tokens, seed=seed,
                           continue_final_message=continue_final, allowed_token_ids=allow, **per_request)
        choice = resp.choices[0]
        expected = _library_prompt_ids(tokenizer, messages, template, continue_final)
        mismatches += int(choice.model_extra["prompt_token_ids"] != expected)
        info["response_ids"].append(resp.id)
        info["prompt_lengths"].append(len(choice.model_extra["prompt_token_ids"]))
        info["completion_ids"].append(choice.model_extra["token_ids"])
        info["finish_reasons"].append(choice.finish_reason)
        choices.append(choice)
        ids = [t for t in choice.model_extra["token_ids"] if t != TURN_END_ID]
        return tokenizer.decode(ids, skip_special_tokens=False)

    # Turn 1: the model continues the assistant's answer after a fixed thought (prefill, prompt side).
    prefill = {"role": "assistant", "reasoning_content": REASONING1, "content": PREFILL1}
    text1 = call([SYSTEM, USER1, prefill], True, allowed, 6)
    a1 = {"role": "assistant", "reasoning_content": REASONING1, "content": PREFILL1 + text1, "tool_calls": [CALL1]}
    # Turn 2: after the tool response the model turn is still open; the model writes the answer.
    text2 = call([SYSTEM, USER1, a1, TOOL1], False, allowed + [TURN_END_ID], 6)
    a2 = {"role": "assistant", "content": text2}
    # Turn 3: a new user turn; under the thought-stripping template a1's thought disappears here.
    text3 = call([SYSTEM, USER1, a1, TOOL1, a2, USER2], False, allowed + [TURN_END_ID], 4)
    messages = [SYSTEM, USER1, a1, TOOL1, a2, USER2, {"role": "assistant", "content": text3}]
    info["prompt_id_mismatches"] = mismatches
    return Trajectory(messages=messages, choices=choices), info


def _collapse_metrics(traj, info: dict, vocab: int):  # noqa: ANN001, ANN202
    """Collapse a live rollout; (sequences, report, metrics: reproduction, prompt mismatches, collapse counts)."""
    seqs, report = collapse_trajectories(traj, vocab_size=vocab)
    metrics = {**choice_reproduction(traj, seqs), "prompt_id_mismatches": info["prompt_id_mismatches"],
               "sequences": report.sequences, "collapsed_trajectories": report.collapsed_trajectories,
               "splits": len(report.splits)}
    return seqs, report, metrics


@pytest.mark.slow
def test_live_rollout_collapses_to_vllm_ids(vllm_server: VLLMServer, stage_report):
    """A 3-turn rollout with thinking and a tool call against the real vLLM server.

    Design (the model is random, so the conversation is driven from outside, and every claim is exact):
    turn 1 sends system + user + an assistant *prefill* (a fixed thought and the start of the answer,
    ``continue_final_message``); the model samples the rest of the answer. The history sent back for turn 2
    is that assistant message with its thought, the prefill plus the *decoded sampled text*, and a tool
    call with nested unicode arguments, then a tool response; the turn stays open and the model samples
    the answer; turn 3 adds a new user message. Sampling is restricted (``allowed_token_ids``) to byte tokens
    that take part in no BPE merge and no special string (``<turn|>`` allowed where it ends a turn), so the
    sampled text re-renders to exactly the sampled ids: re-rendering the history then extends each earlier
    prompt + completion *iff* the template is append-only, which is the property under test.

    Checks: every turn's ``prompt_token_ids`` from vLLM equal the library's template + tokenizer; with the
    main template the rollout collapses into one sequence reproducing every choice (ids, mask, vLLM's
    log-probs); with the thought-stripping template the same rollout splits at turn 3 and the report says
    so, still reproducing every choice; and (sensitivity) re-rendering the history instead of using vLLM's
    ids is caught on the thought-stripping template.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(vllm_server.model_dir)) if vllm_server.model_dir else hf_tokenizer()
    allowed = _canonical_token_ids(tokenizer)
    assert len(allowed) >= 8, f"only {len(allowed)} merge-free byte tokens in this tokenizer"
    client = vllm_server.client()
    vocab = len(tokenizer)

    # Append-only template: one sequence.
    traj, info = _rollout(client, tokenizer, CHAT_TEMPLATE, allowed, seed=11)
    seqs, report, metrics = _collapse_metrics(traj, info, vocab)
    stage_report.check("live_append_only_template", metrics, T.TOKENIZATION_LIVE_APPEND_ONLY,
                       collapse=report.to_dict(), server=vllm_server.base_url, model=vllm_server.model,
                       allowed_token_ids=len(allowed), **info)
    assert seqs[0].input_ids == traj.choices[-1].model_extra["prompt_token_ids"] + traj.choices[-1].model_extra["token_ids"]

    # Thought-stripping template: the same rollout splits where history changed.
    traj_s, info_s = _rollout(client, tokenizer, STRIP_THOUGHTS_TEMPLATE, allowed, seed=11)
    seqs_s, report_s, metrics_s = _collapse_metrics(traj_s, info_s, vocab)
    stage_report.check("live_thought_stripping_template", metrics_s, T.TOKENIZATION_LIVE_STRIPPED,
                       collapse=report_s.to_dict(), **info_s)
    assert [s.choice_index for s in report_s.splits] == [2], report_s.splits
    assert report_s.splits[0].reason.startswith("prompt rewrites earlier context")
    assert report_s.collapsed_trajectories == 0 and report_s.sequences == 2

    # Sensitivity: a trainer that re-renders the final conversation (and labels every model-turn token)
    # instead of using vLLM's ids.
    def rerendered(t: Trajectory, template: str) -> list[TrainingSequence]:
        text = render(template_messages(t.messages), tools=TOOLS, enable_thinking=True, template=template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(m.end(), text.index("<turn|>", m.end()) + len("<turn|>"))
                 for m in re.finditer(r"<\|turn>model\n", text)]
        responses = [(m.start(), m.end()) for m in _RESPONSE.finditer(text)]
        mask = [int(any(a <= o[0] < b for a, b in spans) and not any(a <= o[0] < b for a, b in responses))
                for o in enc["offset_mapping"]]
        ids = enc["input_ids"]
        return [TrainingSequence(ids, mask, [0.0] * len(ids), 0, 0, [], [])]

    naive = choice_reproduction(traj_s, rerendered(traj_s, STRIP_THOUGHTS_TEMPLATE), logprob_tol=math.inf)
    stage_report.expect_caught("live_rerendered_history_on_stripping_template", naive, T.TOKENIZATION_REPRODUCTION,
                               mutation="training ids from re-rendering the final conversation with the "
                                        "thought-stripping template instead of vLLM's prompt/completion ids")
    control = choice_reproduction(traj, rerendered(traj, CHAT_TEMPLATE), logprob_tol=math.inf)
    stage_report.record("live_rerendered_history_on_append_only_template", **control)
