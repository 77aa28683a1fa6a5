"""Stage tokenization, RL sequences from vLLM's own ids: collapse properties over synthetic id streams (sequences
concatenate exactly the ids given, masks and log-probs align token by token, one changed earlier token forces a
new sequence exactly there), bad choices refused naming them, and the client's wire format."""
from __future__ import annotations

import base64
import io
from collections import Counter

import numpy as np
import pytest
from hypothesis import strategies as st

from fixtures.tokenizer import VOCAB_SIZE
from gemma4_support.errors import ServerError, TokenizationError
from gemma4_support.rl.collapse import choice_reproduction, collapse_history, collapse_trajectories
from gemma4_support.rl.trajectory import SampledChoice, TrainingSequence, Trajectory
from gemma4_support.serving.wire import decode_routed_experts, normalize_choice
from validation import thresholds as T
from validation.properties import check_property

pytestmark = pytest.mark.stage_tokenization



# ---------------------------------------------------------------- collapse properties -------------

token_ids = st.integers(0, VOCAB_SIZE - 1)


@st.composite
def id_histories(draw, max_choices: int = 5):
    """An append-only history of choices over random ids: each prompt = previous prompt + completion + new suffix."""
    n = draw(st.integers(1, max_choices))
    buffer: list[int] = draw(st.lists(token_ids, min_size=1, max_size=8))
    choices = []
    for k in range(n):
        prompt = buffer if k == 0 else buffer + draw(st.lists(token_ids, max_size=6))
        completion = draw(st.lists(token_ids, max_size=6))
        lps = draw(st.lists(st.floats(-30.0, 0.0), min_size=len(completion), max_size=len(completion)))
        choices.append(SampledChoice(tuple(prompt), tuple(completion), tuple(lps)))
        buffer = list(prompt) + list(completion)
    return choices


def _as_form(choice: SampledChoice, form: int):
    """The same choice as vLLM JSON (dict), as an OpenAI-client Choice, or as a SampledChoice."""
    if form == 0:
        return choice
    raw = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": ""},
           "logprobs": {"content": [{"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                                    for t, lp in zip(choice.token_ids, choice.logprobs)]},
           "token_ids": list(choice.token_ids)}
    if form == 1:
        return normalize_choice(raw, list(choice.prompt_token_ids))
    from openai.types.chat.chat_completion import Choice

    return normalize_choice(Choice.model_validate(raw), list(choice.prompt_token_ids))


def _check_sequences_carry_choices(choices: list[SampledChoice], seqs: list[TrainingSequence]) -> None:
    """Masks and log-probs align token by token; mask-1 tokens are exactly the completions, in order."""
    trained, trained_lps = [], []
    for s in seqs:
        assert len(s.input_ids) == len(s.loss_mask) == len(s.logprobs)
        for t, m, lp in zip(s.input_ids, s.loss_mask, s.logprobs):
            if m:
                trained.append(t)
                trained_lps.append(lp)
            else:
                assert lp == 0.0
        for ci, (a, b) in zip(s.choice_indices, s.completion_spans):
            assert s.input_ids[a:b] == list(choices[ci].token_ids)
            assert s.logprobs[a:b] == list(choices[ci].logprobs)
            assert s.input_ids[:a] == list(choices[ci].prompt_token_ids)
    assert trained == [t for c in choices for t in c.token_ids]
    assert trained_lps == [lp for c in choices for lp in c.logprobs]


def test_collapse_append_only_histories_into_one_sequence(stage_report):
    """Append-only id streams collapse into one sequence that concatenates exactly the ids given."""
    stats = Counter()

    def body(args):
        choices, forms = args
        seqs, splits = collapse_history([_as_form(c, f) for c, f in zip(choices, forms)], vocab_size=VOCAB_SIZE)
        assert len(seqs) == 1 and not splits
        s = seqs[0]
        expected = list(choices[0].prompt_token_ids) + list(choices[0].token_ids)
        for prev, c in zip(choices, choices[1:]):
            expected += list(c.prompt_token_ids[len(prev.prompt_token_ids) + len(prev.token_ids):]) + list(c.token_ids)
        assert s.input_ids == expected == list(choices[-1].prompt_token_ids) + list(choices[-1].token_ids)
        _check_sequences_carry_choices(choices, seqs)
        traj = Trajectory(choices=choices)
        rep = choice_reproduction(traj, seqs)
        assert rep["choices_reproduced_frac"] == 1.0 and rep["untracked_trained_tokens"] == 0
        stats["choices"] += len(choices)
        stats["tokens"] += len(s)

    strategy = id_histories().flatmap(
        lambda cs: st.tuples(st.just(cs), st.lists(st.integers(0, 2), min_size=len(cs), max_size=len(cs))))
    check_property(stage_report, "collapse_append_only", strategy, body, stats, T.TOKENIZATION_PROPERTY)


def test_collapse_single_changed_token_forces_new_sequence(stage_report):
    """Changing one earlier token of a later prompt starts a new sequence exactly at that choice and position."""
    stats = Counter()

    @st.composite
    def mutated(draw):
        choices = draw(id_histories(max_choices=5).filter(lambda cs: len(cs) >= 2))
        j = draw(st.integers(1, len(choices) - 1))
        prev = choices[j - 1]
        buffer_len = len(prev.prompt_token_ids) + len(prev.token_ids)
        i = draw(st.integers(0, buffer_len - 1))
        old = choices[j].prompt_token_ids[i]
        new = draw(token_ids.filter(lambda t: t != old))
        prompt = list(choices[j].prompt_token_ids)
        prompt[i] = new
        choices = list(choices)
        choices[j] = SampledChoice(tuple(prompt), choices[j].token_ids, choices[j].logprobs)
        return choices, j, i

    def body(args):
        choices, j, i = args
        seqs, splits = collapse_history(choices, vocab_size=VOCAB_SIZE)
        assert splits and splits[0].choice_index == j and splits[0].first_mismatch == i
        assert len(seqs) == 1 + len(splits) >= 2
        assert seqs[0].choice_indices == list(range(j))
        _check_sequences_carry_choices(choices, seqs)
        rep = choice_reproduction(Trajectory(choices=choices), seqs)
        assert rep["choices_reproduced_frac"] == 1.0 and rep["untracked_trained_tokens"] == 0
        stats["splits"] += len(splits)
        stats["sequences"] += len(seqs)

    check_property(stage_report, "collapse_changed_token_splits", mutated(), body, stats,
                   T.TOKENIZATION_PROPERTY)


def test_collapse_report_counts_trajectories_and_histories(stage_report):
    """Several trajectories with additional histories: the report counts sequences and collapsed trajectories."""
    stats = Counter()

    @st.composite
    def batches(draw):
        trajs, expect_collapsed = [], 0
        for _ in range(draw(st.integers(1, 4))):
            main = draw(id_histories(max_choices=3))
            extra = draw(st.lists(id_histories(max_choices=2), max_size=2))
            broken = draw(st.booleans()) and len(main) >= 2
            if broken:  # rewrite the first prompt token of the second choice
                c = main[1]
                p = list(c.prompt_token_ids)
                p[0] = (p[0] + 1) % VOCAB_SIZE
                main = [main[0], SampledChoice(tuple(p), c.token_ids, c.logprobs), *main[2:]]
            expect_collapsed += 0 if broken else 1
            trajs.append(Trajectory(choices=main, additional_histories=extra))
        return trajs, expect_collapsed

    def body(args):
        trajs, expect_collapsed = args
        seqs, report = collapse_trajectories(trajs, vocab_size=VOCAB_SIZE)
        assert report.trajectories == len(trajs)
        assert report.histories == sum(1 + len(t.additional_histories) for t in trajs)
        assert report.sequences == len(seqs) == report.histories + len(report.splits)
        assert report.collapsed_trajectories == expect_collapsed
        assert report.completion_tokens == sum(len(c.token_ids) for t in trajs for h in t.histories() for c in h)
        rep = choice_reproduction(trajs, seqs)
        assert rep["choices_reproduced_frac"] == 1.0 and rep["untracked_trained_tokens"] == 0
        stats["trajectories"] += report.trajectories
        stats["collapsed_trajectories"] += report.collapsed_trajectories

    check_property(stage_report, "collapse_report_counts", batches(), body, stats, T.TOKENIZATION_PROPERTY)


def _good(prompt=(2, 5, 6), completion=(7, 8), lps=(-1.0, -2.0)) -> dict:
    return {"prompt_token_ids": list(prompt), "token_ids": list(completion),
            "logprobs": {"content": [{"token": "x", "logprob": lp} for lp in lps]}}


@pytest.mark.parametrize("bad, needle", [
    ({"prompt_token_ids": None}, "has no prompt_token_ids"),
    ({"token_ids": None}, "has no token_ids"),
    ({"logprobs": None}, "has no logprobs"),
    ({"logprobs": {"content": [{"token": "x", "logprob": -1.0}]}}, "has 1 logprobs for 2 completion tokens"),
    ({"token_ids": [7, VOCAB_SIZE]}, f"token id {VOCAB_SIZE} at completion position 1, outside the vocabulary"),
    ({"prompt_token_ids": [2, -1]}, "token id -1 at prompt position 1"),
    ({"token_ids": [7, "8"]}, "is not an integer token id"),
    ({"logprobs": {"content": [{"token": "x", "logprob": -1.0}, {"token": "y", "logprob": float("nan")}]}},
     "NaN logprob at completion position 1"),
])
def test_collapse_refuses_bad_choices_naming_them(bad, needle):
    """Missing ids, logprob count != completion length, ids outside the vocabulary: a clear error naming the choice."""
    trajs = [Trajectory(choices=[_good()]),
             Trajectory(choices=[_good(), _good((2, 5, 6, 7, 8, 9)), {**_good((2, 5, 6, 7, 8, 9, 7, 8, 1)), **bad}])]
    with pytest.raises(TokenizationError) as exc:
        collapse_trajectories(trajs, vocab_size=VOCAB_SIZE)
    msg = str(exc.value)
    assert "trajectory 1, choice 2" in msg and needle in msg and " — fix: " in msg


def test_client_normalises_ids_and_decodes_routed_experts():
    """Choices carry prompt/completion ids as int lists in model_extra; routed_experts (base64 .npy) is decoded."""
    from openai.types.chat.chat_completion import ChatCompletion

    routing = np.arange(3 * 3 * 2, dtype=np.int32).reshape(3, 3, 2)  # [prompt 3 + completion 1 - 1, layers, top_k]
    buf = io.BytesIO()
    np.save(buf, routing)
    raw = {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m",
           "prompt_token_ids": np.array([2, 105, 9]),
           "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "a"},
                        "token_ids": (7.0,), "routed_experts": base64.b64encode(buf.getvalue()).decode()}]}
    resp = ChatCompletion.model_validate({**raw, "prompt_token_ids": [2, 105, 9]})
    choice = normalize_choice(resp.choices[0], raw["prompt_token_ids"])
    assert choice.model_extra["prompt_token_ids"] == [2, 105, 9]
    assert choice.model_extra["token_ids"] == [7] and isinstance(choice.model_extra["token_ids"][0], int)
    np.testing.assert_array_equal(choice.model_extra["routed_experts"], routing)
    seqs, _ = collapse_history([choice], require_logprobs=False)
    np.testing.assert_array_equal(seqs[0].routed_experts, routing)  # covers prompt + completion - 1 tokens
    with pytest.raises(ServerError, match="base64"):
        decode_routed_experts("not base64 npy")
