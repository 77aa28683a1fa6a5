"""RL tokenization: training sequences built from vLLM's own token ids, never from a re-rendered template.

For each history of a trajectory (the main one, then each additional one), in order:

* the first choice starts a running buffer: its prompt ids (mask 0), then its completion ids (mask 1,
  vLLM's log-probs);
* a later choice extends the buffer only if its prompt ids start with the **entire** buffer (earlier
  completions included); then only the new prompt suffix (mask 0) and its completion (mask 1) are
  appended;
* otherwise the buffer is flushed as its own sequence, the split is recorded (with the first position
  where the prompt and the buffer differ), and a new buffer starts from this choice.

So a multi-turn rollout whose template is append-only collapses into one sequence, and one whose
template rewrites history (e.g. drops earlier thoughts) is split exactly where it does, with every
sampled token trained in the context vLLM sampled it in. `choice_reproduction` checks that property
for any set of sequences (also ones built another way).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from gemma4_support.chat.traits import history_change
from gemma4_support.rl.trajectory import (
    ChoiceRef,
    CollapseReport,
    SampledChoice,
    SplitEvent,
    TrainingSequence,
    Trajectory,
    as_sequence_of_trajectories,
    read_choice,
)

__all__ = ["collapse_history", "collapse_trajectories", "choice_reproduction", "first_mismatch"]


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int:
    """First index where ``a`` and ``b`` differ, or the shorter length if one is a prefix of the other."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _Buffer:
    def __init__(self, choice: SampledChoice, index: int) -> None:
        self.ids: list[int] = list(choice.prompt_token_ids)
        self.mask: list[int] = [0] * len(self.ids)
        self.lps: list[float] = [0.0] * len(self.ids)
        self.choice_indices: list[int] = []
        self.spans: list[tuple[int, int]] = []
        self.routed: list[Any] = []
        self._append_completion(choice, index)

    def _append_completion(self, choice: SampledChoice, index: int) -> None:
        start = len(self.ids)
        self.ids.extend(choice.token_ids)
        self.mask.extend([1] * len(choice.token_ids))
        lps = choice.logprobs if choice.logprobs is not None else [0.0] * len(choice.token_ids)
        self.lps.extend(float(x) for x in lps)
        self.spans.append((start, len(self.ids)))
        self.choice_indices.append(index)
        self.routed.append(choice.routed_experts)

    def extends(self, choice: SampledChoice) -> bool:
        """True when the choice's prompt ids start with the whole buffer."""
        p = choice.prompt_token_ids
        return len(p) >= len(self.ids) and list(p[: len(self.ids)]) == self.ids

    def extend(self, choice: SampledChoice, index: int) -> None:
        """Append the prompt's new suffix (mask 0) and the completion (mask 1, vLLM's log-probs)."""
        suffix = choice.prompt_token_ids[len(self.ids):]
        self.ids.extend(suffix)
        self.mask.extend([0] * len(suffix))
        self.lps.extend([0.0] * len(suffix))
        self._append_completion(choice, index)

    def flush(self, trajectory_index: int, history_index: int) -> TrainingSequence:
        """The buffer as a finished training sequence."""
        routed = self.routed[-1] if self.routed and all(r is not None for r in self.routed) else None
        if routed is not None and getattr(routed, "shape", (None,))[0] != len(self.ids) - 1:
            routed = None  # partial routing (e.g. routed_experts_prompt_start > 0): not aligned with the row
        return TrainingSequence(self.ids, self.mask, self.lps, trajectory_index, history_index,
                                self.choice_indices, self.spans, routed)


def collapse_history(
    choices: Sequence[Any],
    *,
    vocab_size: int | None = None,
    trajectory_index: int = 0,
    history_index: int = 0,
    require_logprobs: bool = True,
    detokenize: Callable[[list[int]], str] | None = None,
) -> tuple[list[TrainingSequence], list[SplitEvent]]:
    """Collapse one ordered list of choices into training sequences; returns them and the splits (with
    `detokenize`, each split also says what text the template removed or rewrote there)."""
    sequences: list[TrainingSequence] = []
    splits: list[SplitEvent] = []
    buf: _Buffer | None = None
    for ci, raw in enumerate(choices):
        ch = read_choice(raw, ChoiceRef(trajectory_index, history_index, ci), vocab_size=vocab_size,
                         require_logprobs=require_logprobs)
        if buf is None:
            buf = _Buffer(ch, ci)
            continue
        if buf.extends(ch):
            buf.extend(ch, ci)
            continue
        mismatch = first_mismatch(buf.ids, ch.prompt_token_ids)
        if mismatch >= len(ch.prompt_token_ids):
            reason = "prompt is shorter than the buffer (it is a prefix of it)"
        elif mismatch >= buf.spans[-1][0]:
            reason = "prompt diverges inside the previous completion (re-tokenized or truncated sampled tokens)"
        else:
            reason = "prompt rewrites earlier context (template changed history)"
        change = None if detokenize is None else history_change(detokenize(buf.ids), detokenize(list(ch.prompt_token_ids)))
        splits.append(SplitEvent(trajectory_index, history_index, ci, len(buf.ids), len(ch.prompt_token_ids),
                                 mismatch, reason, change))
        sequences.append(buf.flush(trajectory_index, history_index))
        buf = _Buffer(ch, ci)
    if buf is not None:
        sequences.append(buf.flush(trajectory_index, history_index))
    return sequences, splits


def collapse_trajectories(
    trajectories: Sequence[Trajectory] | Trajectory,
    *,
    vocab_size: int | None = None,
    require_logprobs: bool = True,
    detokenize: Callable[[list[int]], str] | None = None,
) -> tuple[list[TrainingSequence], CollapseReport]:
    """Build training sequences from vLLM's ids for every history of every trajectory, with a report."""
    report = CollapseReport()
    out: list[TrainingSequence] = []
    for ti, traj in enumerate(as_sequence_of_trajectories(trajectories)):
        report.trajectories += 1
        every_history_one = True
        for hi, history in enumerate(traj.histories()):
            if hi > 0 and not history:
                continue
            report.histories += 1
            seqs, splits = collapse_history(history, vocab_size=vocab_size, trajectory_index=ti,
                                            history_index=hi, require_logprobs=require_logprobs, detokenize=detokenize)
            report.choices += len(history)
            report.splits.extend(splits)
            report.sequences += len(seqs)
            if len(seqs) == 1:
                report.single_sequence_histories += 1
            else:
                every_history_one = False
            for s in seqs:
                report.completion_tokens += sum(s.loss_mask)
                report.sequence_tokens += len(s)
            out.extend(seqs)
        for history in traj.histories():
            for raw in history:
                report.prompt_tokens_reported += len(read_choice(raw, "", require_logprobs=False).prompt_token_ids)
        if every_history_one and report.histories:
            report.collapsed_trajectories += 1
    return out, report


def choice_reproduction(
    trajectories: Sequence[Trajectory] | Trajectory,
    sequences: Sequence[TrainingSequence],
    *,
    logprob_tol: float = 0.0,
) -> dict[str, float]:
    """How faithfully ``sequences`` reproduce what vLLM sampled.

    A choice is reproduced when some sequence of its trajectory and history starts with exactly its
    prompt ids followed by its completion ids, with mask 1 and vLLM's log-probs (within
    ``logprob_tol``) on the completion and mask 0 on the prompt positions that are not an earlier
    choice's completion. Also counts trained (mask 1) tokens that belong to no sampled completion.
    """
    trajs = as_sequence_of_trajectories(trajectories)
    total = reproduced = 0
    covered: dict[int, set[int]] = {}
    worst_lp = 0.0
    for ti, traj in enumerate(trajs):
        for hi, history in enumerate(traj.histories()):
            mine = [(k, s) for k, s in enumerate(sequences) if s.trajectory_index == ti and s.history_index == hi]
            completions_before: list[tuple[int, int]] = []
            for ci, raw in enumerate(history):
                ch = read_choice(raw, ChoiceRef(ti, hi, ci), require_logprobs=False)
                total += 1
                p, c = list(ch.prompt_token_ids), list(ch.token_ids)
                n = len(p) + len(c)
                for k, s in mine:
                    if len(s.input_ids) < n or s.input_ids[:n] != p + c:
                        continue
                    if any(m != 1 for m in s.loss_mask[len(p):n]):
                        continue
                    if ch.logprobs is not None:
                        diffs = [abs(a - b) for a, b in zip(s.logprobs[len(p):n], ch.logprobs)]
                        d = max(diffs, default=0.0)
                        if math.isnan(d) or d > logprob_tol:
                            continue
                        worst_lp = max(worst_lp, d)
                    trained_prompt = {i for i in range(len(p)) if s.loss_mask[i] == 1}
                    allowed = {i for a, b in completions_before for i in range(a, b) if b <= len(p)}
                    if not trained_prompt <= allowed:
                        continue
                    reproduced += 1
                    covered.setdefault(k, set()).update(range(len(p), n))
                    completions_before.append((len(p), n))
                    break
    untracked = 0
    for k, s in enumerate(sequences):
        cov = covered.get(k, set())
        untracked += sum(1 for i, m in enumerate(s.loss_mask) if m == 1 and i not in cov)
    return {
        "choices": float(total),
        "choices_reproduced": float(reproduced),
        "choices_reproduced_frac": reproduced / total if total else 1.0,
        "untracked_trained_tokens": float(untracked),
        "max_abs_logprob_diff": worst_lp,
    }
