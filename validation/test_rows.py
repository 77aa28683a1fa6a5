"""Stage tokenization, RL sequences into training rows: rollouts whose template rewrote history at random places
(hypothesis) split into sequences, and their sequences packed with the shared prefix once reproduce every
sampled choice, train nothing else and nothing twice; packing each piece alone is caught; an over-long
rollout is refused."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import strategies as st

from fixtures.tokenizer import VOCAB_SIZE
from gemma4_support.errors import PackingError
from gemma4_support.metrics import evaluate
from gemma4_support.rl.collapse import collapse_trajectories
from gemma4_support.rl.rows import group_by_rollout, pack_sequences, rows_reproduction, tokens_over_shared_minimum
from gemma4_support.rl.trajectory import SampledChoice, Trajectory
from validation import thresholds as T
from validation.properties import check_property

pytestmark = pytest.mark.stage_tokenization

CAPACITY = 256
token_ids = st.integers(0, VOCAB_SIZE - 1)


@st.composite
def rewriting_rollouts(draw):  # noqa: ANN001, ANN201
    """1-3 rollouts of 1-4 model calls; each later prompt extends the history so far, except that sometimes the
    template removed a stretch of it (as Gemma 4's drops a past thought or a generation prompt's empty thought)."""
    trajectories = []
    for _ in range(draw(st.integers(1, 3))):
        history: list[int] = draw(st.lists(token_ids, min_size=2, max_size=8))
        choices = []
        for k in range(draw(st.integers(1, 4))):
            prompt = list(history) + (draw(st.lists(token_ids, max_size=5)) if k else [])
            if k and draw(st.booleans()):
                a = draw(st.integers(1, len(history) - 1))
                b = draw(st.integers(a + 1, len(history)))
                prompt = prompt[:a] + prompt[b:]  # the re-render removed history[a:b]
            completion = draw(st.lists(token_ids, min_size=1, max_size=5))
            lps = draw(st.lists(st.floats(-20.0, 0.0), min_size=len(completion), max_size=len(completion)))
            choices.append(SampledChoice(tuple(prompt), tuple(completion), tuple(lps)))
            history = prompt + completion
        trajectories.append(Trajectory(choices=choices))
    return trajectories


def _rows_metrics(trajectories, pack_alone: bool = False) -> tuple[dict, dict]:  # noqa: ANN001
    seqs, report = collapse_trajectories(trajectories, vocab_size=VOCAB_SIZE)
    groups = group_by_rollout(seqs)
    rows, docs = pack_sequences([[s] for s in seqs] if pack_alone else groups, capacity=CAPACITY)
    metrics = {**rows_reproduction(trajectories, rows, docs),
               "tokens_over_shared_minimum": tokens_over_shared_minimum(groups, docs)}
    return metrics, {"rows": len(rows), "documents": len(docs), "sequences": len(seqs), "splits": len(report.splits)}


def test_rows_reproduce_every_choice_with_shared_prefixes(stage_report) -> None:
    stats = Counter()

    def body(trajectories) -> None:  # noqa: ANN001
        metrics, info = _rows_metrics(trajectories)
        bad = [r.describe() for r in evaluate(metrics, T.TOKENIZATION_ROWS) if not r.passed]
        assert not bad, f"gates fail: {bad}"
        assert info["documents"] == len(trajectories), "a rollout's sequences were not packed as one document"
        stats["choices"] += int(metrics["choices"])
        stats["splits"] += info["splits"]
        stats["rows"] += info["rows"]

    check_property(stage_report, "rows_properties", rewriting_rollouts(), body, stats, T.TOKENIZATION_PROPERTY)


SPLIT_ROLLOUT = [Trajectory(choices=[SampledChoice((2, 5, 6), (7, 8, 9), (-1.0, -2.0, -3.0)),
                                     SampledChoice((2, 5, 6, 7, 11, 12), (13, 14), (-4.0, -5.0)),
                                     SampledChoice((2, 5, 6, 7, 11, 12, 13, 14, 20), (21,), (-6.0,))])]


def test_a_split_rollout_packs_its_prefix_once(stage_report) -> None:
    metrics, info = _rows_metrics(SPLIT_ROLLOUT)
    stage_report.check("rows_split_rollout", metrics, T.TOKENIZATION_ROWS, **info)
    assert info == {"rows": 1, "documents": 1, "sequences": 2, "splits": 1}


def test_sensitivity_each_piece_packed_alone(stage_report) -> None:
    """Packing every piece of a split rollout as its own document repeats the shared prefix: caught."""
    metrics, info = _rows_metrics(SPLIT_ROLLOUT, pack_alone=True)
    stage_report.expect_caught("rows_pieces_packed_alone", metrics, T.TOKENIZATION_ROWS,
                               broken="each sequence of a split rollout packed as its own document", **info)


def test_sensitivity_shared_prompt_losses_dropped(stage_report) -> None:
    """A packer that trains nothing in the shared prompt loses the first call's sampled tokens: caught."""
    seqs, _ = collapse_trajectories(SPLIT_ROLLOUT)
    rows, docs = pack_sequences(group_by_rollout(seqs), capacity=CAPACITY)
    row = rows[0]
    row.loss_mask[row.branches() == 0] = False
    metrics = {**rows_reproduction(SPLIT_ROLLOUT, rows, docs), "tokens_over_shared_minimum": 0}
    stage_report.expect_caught("rows_shared_prompt_losses_dropped", metrics, T.TOKENIZATION_ROWS,
                               broken="loss mask cleared on the shared prompt of the packed rollout")


def test_a_rollout_longer_than_the_capacity_is_refused() -> None:
    seqs, _ = collapse_trajectories(SPLIT_ROLLOUT)
    with pytest.raises(PackingError, match=r"trajectory 0, history 0 take 13 tokens packed, more than the packing "
                                           r"capacity 8"):
        pack_sequences(group_by_rollout(seqs), capacity=8)
