"""Stage tokenization, live, against the session's real vLLM server: every prompt vLLM reports equals the
library's render (system content sent as parts, a continued final message) + tokenize; a plain chat on an
append-only template collapses into one sequence; a 3-turn rollout with thinking and a tool call on the template
under test splits exactly where the template rewrites history, each split naming what changed, and its pieces
packed with their shared prefix once reproduce every sampled token; re-rendering instead of vLLM's ids is caught."""
from __future__ import annotations

import json
import math
import re

import pytest

from fixtures.chat_template import E2B_CHAT_TEMPLATE
from fixtures.factory import hf_tokenizer
from fixtures.tokenizer import TURN_END_ID, byte_alphabet
from gemma4_support.chat.template import render_prompt
from gemma4_support.chat.traits import characterise
from gemma4_support.rl.collapse import choice_reproduction, collapse_trajectories, first_mismatch
from gemma4_support.rl.rows import group_by_rollout, pack_sequences, rows_reproduction, tokens_over_shared_minimum
from gemma4_support.rl.trajectory import TrainingSequence, Trajectory
from gemma4_support.serving import VLLMServer
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


def _library_prompt_ids(tokenizer, messages, template, thinking: bool, tools, continue_final: bool) -> list[int]:  # noqa: ANN001
    """The prompt ids the library renders for a chat request (vLLM's preprocessing, transformers' continuation)."""
    text = render_prompt(messages, template=template, tools=tools, enable_thinking=thinking,
                         add_generation_prompt=not continue_final, continue_final_message=continue_final)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class _Session:
    """Model calls of one driven conversation: each checked against the library's render, recorded."""

    def __init__(self, client, tokenizer, template: str, thinking: bool, tools, allowed: list[int], seed: int) -> None:  # noqa: ANN001
        self.client, self.tokenizer, self.template, self.thinking, self.tools = client, tokenizer, template, thinking, tools
        self.allowed, self.seed, self.choices = allowed, seed, []
        self.info: dict = {"prompt_lengths": [], "completion_ids": [], "finish_reasons": [], "prompt_id_mismatches": 0,
                           "first_prompt_differences": []}

    def call(self, messages: list[dict], max_tokens: int, continue_final: bool = False, stop_allowed: bool = True) -> str:
        """One chat completion; returns the sampled text (the turn end removed)."""
        allow = self.allowed + ([TURN_END_ID] if stop_allowed else [])
        resp = self.client.chat(messages, tools=self.tools, enable_thinking=self.thinking, max_tokens=max_tokens,
                                seed=self.seed, continue_final_message=continue_final, allowed_token_ids=allow,
                                chat_template=self.template)
        choice = resp.choices[0]
        got = choice.model_extra["prompt_token_ids"]
        want = _library_prompt_ids(self.tokenizer, messages, self.template, self.thinking, self.tools, continue_final)
        if got != want:
            at = first_mismatch(got, want)
            self.info["prompt_id_mismatches"] += 1
            self.info["first_prompt_differences"].append(
                {"call": len(self.choices), "position": at, "vllm": self.tokenizer.decode(got[at:at + 12]),
                 "library": self.tokenizer.decode(want[at:at + 12])})
        self.info["prompt_lengths"].append(len(got))
        self.info["completion_ids"].append(choice.model_extra["token_ids"])
        self.info["finish_reasons"].append(choice.finish_reason)
        self.choices.append(choice)
        return self.tokenizer.decode([t for t in choice.model_extra["token_ids"] if t != TURN_END_ID],
                                     skip_special_tokens=False)


def _plain_chat(session: _Session) -> Trajectory:
    """Three exchanges without thoughts or tools: history only grows on an append-only template."""
    messages = [SYSTEM, USER1]
    for user in (USER2, {"role": "user", "content": "Thanks."}, None):
        messages.append({"role": "assistant", "content": session.call(messages, 5)})
        if user:
            messages.append(user)
    return Trajectory(messages=messages, choices=session.choices)


def _tool_rollout(session: _Session) -> Trajectory:
    """Turn 1: a prefilled thought and answer start (continue_final_message), the model continues; the message
    sent back adds a tool call (nested unicode arguments) and its response; turn 2: the model continues the open
    turn; turn 3: after a new user message."""
    prefill = {"role": "assistant", "reasoning_content": REASONING1, "content": PREFILL1}
    text1 = session.call([SYSTEM, USER1, prefill], 6, continue_final=True, stop_allowed=False)
    a1 = {"role": "assistant", "reasoning_content": REASONING1, "content": PREFILL1 + text1, "tool_calls": [CALL1]}
    a2 = {"role": "assistant", "content": session.call([SYSTEM, USER1, a1, TOOL1], 6)}
    a3 = {"role": "assistant", "content": session.call([SYSTEM, USER1, a1, TOOL1, a2, USER2], 4)}
    return Trajectory(messages=[SYSTEM, USER1, a1, TOOL1, a2, USER2, a3], choices=session.choices)


def _rows_metrics(traj: Trajectory, info: dict, tokenizer, vocab: int) -> tuple[dict, dict]:  # noqa: ANN001
    """Collapse (splits named by the text that changed) and pack a live rollout; (metrics, report facts)."""
    seqs, report = collapse_trajectories(traj, vocab_size=vocab, detokenize=lambda ids: tokenizer.decode(ids))
    groups = group_by_rollout(seqs)
    rows, docs = pack_sequences(groups, capacity=4096)
    metrics = {**rows_reproduction(traj, rows, docs), "prompt_id_mismatches": info["prompt_id_mismatches"],
               "sequences": report.sequences, "collapsed_trajectories": report.collapsed_trajectories,
               "splits": len(report.splits), "tokens_over_shared_minimum": tokens_over_shared_minimum(groups, docs)}
    return metrics, {"collapse": report.to_dict(), "documents": len(docs), "rows": len(rows)}


@pytest.mark.expected_seconds(57)
@pytest.mark.slow
def test_live_rollouts(vllm_server: VLLMServer, chat_template: str, stage_report) -> None:
    """Live rollouts against the real vLLM server, the conversation driven from outside (the model is random).

    Sampling is restricted (``allowed_token_ids``) to byte tokens that take part in no BPE merge and no special
    string (``<turn|>`` allowed where it ends a turn), so sampled text re-renders to exactly the sampled ids:
    a later prompt then extends an earlier prompt + completion *iff* the template keeps that history.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(vllm_server.model_dir)) if vllm_server.model_dir else hf_tokenizer()
    allowed = _canonical_token_ids(tokenizer)
    assert len(allowed) >= 8, f"only {len(allowed)} merge-free byte tokens in this tokenizer"
    client, vocab = vllm_server.client(), len(tokenizer)

    plain = _Session(client, tokenizer, E2B_CHAT_TEMPLATE, False, None, allowed, seed=11)
    traj = _plain_chat(plain)
    metrics, facts = _rows_metrics(traj, plain.info, tokenizer, vocab)
    stage_report.check("live_append_only_plain_chat", metrics, T.TOKENIZATION_LIVE_APPEND_ONLY,
                       server=vllm_server.base_url, model=vllm_server.model, allowed_token_ids=len(allowed),
                       template="fixtures E2B variant, thinking off", **facts, **plain.info)

    tooled = _Session(client, tokenizer, chat_template, True, TOOLS, allowed, seed=11)
    traj_t = _tool_rollout(tooled)
    metrics_t, facts_t = _rows_metrics(traj_t, tooled.info, tokenizer, vocab)
    changes = [s["change"] for s in facts_t["collapse"]["splits"]]
    stage_report.check("live_tool_rollout_template_under_test", metrics_t, T.TOKENIZATION_LIVE_REWRITING,
                       template_rewrites=characterise(chat_template).rewrites(), split_changes=changes,
                       **facts_t, **tooled.info)
    assert all(c and c["removed"] for c in changes), changes

    # Sensitivity: a trainer that re-renders the final conversation (and labels every model-turn token)
    # instead of using vLLM's ids.
    text = render_prompt(traj_t.messages, template=chat_template, tools=TOOLS, enable_thinking=True,
                         add_generation_prompt=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.end(), text.index("<turn|>", m.end()) + len("<turn|>")) for m in re.finditer(r"<\|turn>model\n", text)]
    responses = [(m.start(), m.end()) for m in _RESPONSE.finditer(text)]
    mask = [int(any(a <= o[0] < b for a, b in spans) and not any(a <= o[0] < b for a, b in responses))
            for o in enc["offset_mapping"]]
    ids = enc["input_ids"]
    naive = choice_reproduction(traj_t, [TrainingSequence(ids, mask, [0.0] * len(ids), 0, 0, [], [])],
                                logprob_tol=math.inf)
    stage_report.expect_caught("live_rerendered_history", naive, T.TOKENIZATION_REPRODUCTION,
                               broken="training ids from re-rendering the final conversation with the template "
                                      "under test instead of vLLM's prompt/completion ids")
