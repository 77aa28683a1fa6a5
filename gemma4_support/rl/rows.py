"""RL training sequences packed into training rows: shared prefixes once, every sampled token trained once.

Sequences that share a prefix — the pieces one rollout split into where the chat template rewrote history, or a
GRPO group's completions of one prompt — become one document: the prefix they all share once (branch 0) and
each sequence's remainder as its own branch, positions continuing from the prefix (shared-prefix packing,
`gemma4_support.packing`). The last shared token is repeated at the start of every branch so that each branch
predicts its own next token from it; every other shared token appears once. Labels are aligned with positions
(position p predicts label p): a token sampled by vLLM (loss mask 1 in its `TrainingSequence`) is trained at the
position before it, with vLLM's log-prob, exactly once. Documents fill rows of `capacity` tokens (default: the
runtime config's packing capacity) in order, each row padded to the capacity with a pad document (no loss); a
sequence longer than the capacity is refused naming it (or, where the caller asks, each of its group's sequences
is cut to the capacity and packed alone). A GRPO group — several completions of one prompt — is one group
(`group_by_prompt`). Where every sequence carries the sampler's MoE routing (vLLM's `routed_experts`, covering
all tokens but the last), the rows carry it per token (`PackedRow.routed_experts`, -1 for pad and last tokens).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gemma4_support.errors import PackingError
from gemma4_support.packing import PackedRow
from gemma4_support.rl.trajectory import TrainingSequence

__all__ = ["PackedDocument", "group_by_prompt", "group_by_rollout", "pack_sequences", "rows_reproduction",
           "shared_prefix_length", "tokens_over_shared_minimum"]


def shared_prefix_length(sequences: Sequence[TrainingSequence]) -> int:
    """Tokens every sequence of the group starts with."""
    first, n = sequences[0].input_ids, min(len(s) for s in sequences)
    for i in range(n):
        if any(s.input_ids[i] != first[i] for s in sequences[1:]):
            return i
    return n


def group_by_rollout(sequences: Sequence[TrainingSequence]) -> list[list[TrainingSequence]]:
    """The sequences of one rollout history together (the pieces a split left), in order of first appearance."""
    groups: dict[tuple[int, int], list[TrainingSequence]] = {}
    for s in sequences:
        groups.setdefault((s.trajectory_index, s.history_index), []).append(s)
    return list(groups.values())


def group_by_prompt(sequences: Sequence[TrainingSequence]) -> list[list[TrainingSequence]]:
    """Sequences with identical prompt ids (before their first completion) together: a GRPO group per prompt."""
    groups: dict[tuple[int, ...], list[TrainingSequence]] = {}
    for s in sequences:
        start = s.completion_spans[0][0] if s.completion_spans else len(s.input_ids)
        groups.setdefault(tuple(s.input_ids[:start]), []).append(s)
    return list(groups.values())


def _routes(s: TrainingSequence) -> np.ndarray | None:
    """A sequence's routing [len - 1, layers, k], checked against its length."""
    routed = s.routed_experts
    if routed is None:
        return None
    shape = tuple(getattr(routed, "shape", ()))
    if len(shape) != 3 or shape[0] != len(s) - 1:
        raise PackingError(f"routed_experts of trajectory {s.trajectory_index}, history {s.history_index} has shape "
                           f"{shape}, expected [{len(s) - 1} (tokens - 1), moe_layers, top_k]",
                           "pass vLLM's routed_experts of the sequence's last choice unchanged")
    return routed


@dataclass
class PackedDocument:
    """Where a group of sequences went: the row, the document id in it, its prompt length and one branch per sequence."""

    row: int
    document: int
    prompt_tokens: int
    sequences: list[TrainingSequence] = field(default_factory=list)


def _document(group: Sequence[TrainingSequence]) -> tuple[list, ...]:
    """(input ids, branch ids, labels, loss mask, logprobs, positions, routes) of one group's document."""
    prompt = _prompt_length(group)
    ids, br, pos, labels, mask, lps, routes = [], [], [], [], [], [], []
    recorded = {id(s): _routes(s) for s in group}

    def add(token: int, branch: int, position: int, nxt: int | None, seqs: Sequence[TrainingSequence], t: int) -> None:
        r = recorded[id(seqs[0])]  # prompt tokens: the first sequence's routing (the prompt ran once)
        routes.append(r[t] if r is not None and t < len(r) else None)
        ids.append(token)
        br.append(branch)
        pos.append(position)
        trained = [s for s in seqs if nxt is not None and s.loss_mask[t + 1]]
        labels.append(nxt if nxt is not None else 0)
        mask.append(1 if trained else 0)
        lps.append(trained[0].logprobs[t + 1] if trained else 0.0)

    lead = group[0].input_ids
    for t in range(prompt):
        add(lead[t], 0, t, lead[t + 1], group, t)
    for k, s in enumerate(group, start=1 if len(group) > 1 else 0):
        for t in range(prompt, len(s)):
            nxt = s.input_ids[t + 1] if t + 1 < len(s) else None
            add(s.input_ids[t], k, t, nxt, [s], t)
    return ids, br, labels, mask, lps, pos, routes


def pack_sequences(groups: Sequence[Sequence[TrainingSequence]], *, capacity: int | None = None,
                   pad_token_id: int = 0, truncate: bool = False) -> tuple[list[PackedRow], list[PackedDocument]]:
    """Pack groups of sequences (each group one shared-prefix document) into rows of `capacity` tokens; a group
    over the capacity is refused, or with `truncate` split into its sequences, each cut to the capacity."""
    if capacity is None:
        from gemma4_support.runtime import get_runtime

        capacity = get_runtime().packing_capacity
    rows: list[list[tuple]] = [[]]
    used = [0]
    placed: list[PackedDocument] = []
    pending = [list(g) for g in groups]
    while pending:
        group = pending.pop(0)
        doc = _document(group)
        if len(doc[0]) > capacity and truncate:
            pending[:0] = [[_truncated(s, capacity)] for s in group]
            continue
        if len(doc[0]) > capacity:
            s = group[0]
            raise PackingError(f"the sequences of trajectory {s.trajectory_index}, history {s.history_index} take "
                               f"{len(doc[0])} tokens packed, more than the packing capacity {capacity}",
                               "raise RuntimeConfig.packing_capacity, shorten the rollout (max_tokens) or pack "
                               "with truncate=True")
        if used[-1] + len(doc[0]) > capacity:
            rows.append([])
            used.append(0)
        placed.append(PackedDocument(len(rows) - 1, len(rows[-1]), sum(1 for b in doc[1] if b == 0)
                                     if len(group) > 1 else 0, list(group)))
        rows[-1].append(doc)
        used[-1] += len(doc[0])
    return [_row(docs, capacity, pad_token_id) for docs in rows if docs], placed


def _truncated(s: TrainingSequence, capacity: int) -> TrainingSequence:
    """The sequence cut to its first `capacity` tokens (completion spans and routing cut with it)."""
    if len(s) <= capacity:
        return s
    routed = s.routed_experts[: capacity - 1] if s.routed_experts is not None else None
    spans = [(a, min(b, capacity)) for a, b in s.completion_spans if a < capacity]
    return dataclasses.replace(s, input_ids=s.input_ids[:capacity], loss_mask=s.loss_mask[:capacity],
                               logprobs=s.logprobs[:capacity], completion_spans=spans, routed_experts=routed)


def _row(docs: list[tuple], capacity: int, pad_token_id: int) -> PackedRow:
    cols: list[list] = [[], [], [], [], [], [], [], []]  # ids, branches, labels, mask, logprobs, positions, routes, docs
    for d, doc in enumerate(docs):
        for col, values in zip(cols, doc):
            col.extend(values)
        cols[7].extend([d] * len(doc[0]))
    pad = capacity - len(cols[0])
    ids, br, labels, mask, lps, pos, routes, doc_ids = cols
    if pad:  # one pad document: pad ids, no loss, positions from 0, no recorded routing
        for col, value in ((ids, pad_token_id), (br, 0), (labels, 0), (mask, 0), (lps, 0.0), (routes, None),
                           (doc_ids, len(docs))):
            col.extend([value] * pad)
        pos.extend(range(pad))
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedRow(long(pos), long(doc_ids), long(br), long(ids), long(labels), torch.tensor(mask, dtype=torch.bool),
                     torch.tensor(lps, dtype=torch.float64),  # exactly what the sampler reported
                     routed_experts=_route_tensor(routes))


def _route_tensor(routes: list) -> torch.Tensor | None:
    """Per-token routing rows as [L, layers, k] (-1 where none), or None when no token has one."""
    known = [r for r in routes if r is not None]
    if not known:
        return None
    shape = {tuple(np.shape(r)) for r in known}
    if len(shape) != 1:
        raise PackingError(f"routed_experts of the packed sequences disagree in [moe_layers, top_k]: {sorted(shape)}",
                           "pack rollouts of one model only, each with vLLM's routed_experts unchanged")
    out = torch.full((len(routes), *shape.pop()), -1, dtype=torch.long)
    for i, r in enumerate(routes):
        if r is not None:
            out[i] = torch.as_tensor(np.asarray(r), dtype=torch.long)
    return out


def _prompt_length(group: Sequence[TrainingSequence]) -> int:
    return max(shared_prefix_length(group) - 1, 0) if len(group) > 1 else 0


def tokens_over_shared_minimum(groups: Sequence[Sequence[TrainingSequence]], documents: Sequence[PackedDocument]) -> int:
    """Tokens the packed documents hold beyond what the groups need with each common prefix once (one repeated
    token per extra branch): 0 for `pack_sequences` of those groups."""
    packed = sum(sum(len(s) for s in d.sequences) - (len(d.sequences) - 1) * d.prompt_tokens for d in documents)
    return packed - sum(_prompt_length(g) + sum(len(s) - _prompt_length(g) for s in g) for g in groups)


def rows_reproduction(trajectories: Sequence, rows: Sequence[PackedRow], documents: Sequence[PackedDocument], *,
                      logprob_tol: float = 0.0) -> dict[str, float]:
    """How faithfully packed rows reproduce what vLLM sampled: a choice is reproduced when a path of its rollout's
    document starts with its prompt and completion ids, every completion token trained at the position before it
    with vLLM's log-prob; also counts trained positions that belong to no sampled completion, and completion
    tokens trained at more than one place."""
    from gemma4_support.rl.trajectory import ChoiceRef, as_sequence_of_trajectories, read_choice

    owner = {(d.row, d.document): {(s.trajectory_index, s.history_index) for s in d.sequences} for d in documents}
    segments = [row.segment_ids().tolist() for row in rows]
    paths = [(r, p, owner.get((r, segments[r][p[0]]), set())) for r, row in enumerate(rows)
             for p in (idx.tolist() for idx in row.standalone_sequences())]
    tokens = [row.input_ids.tolist() for row in rows]
    masks = [row.loss_mask.tolist() for row in rows]
    lps = [row.logprobs.tolist() for row in rows]
    total = reproduced = duplicated = 0
    worst = 0.0
    trained_by_choice: set[tuple[int, int]] = set()
    for ti, traj in enumerate(as_sequence_of_trajectories(trajectories)):
        for hi, history in enumerate(traj.histories()):
            for ci, raw in enumerate(history):
                ch = read_choice(raw, ChoiceRef(ti, hi, ci), require_logprobs=False)
                want = list(ch.prompt_token_ids) + list(ch.token_ids)
                start, total = len(ch.prompt_token_ids), total + 1
                places = set()
                for r, path, keys in paths:
                    if (ti, hi) not in keys or len(path) < len(want) or [tokens[r][i] for i in path[: len(want)]] != want:
                        continue
                    before = [path[j - 1] for j in range(start, len(want))]  # where each completion token is trained
                    if not all(masks[r][i] for i in before):
                        continue
                    if ch.logprobs is not None:
                        diff = max((abs(lps[r][i] - lp) for i, lp in zip(before, ch.logprobs)), default=0.0)
                        if diff > logprob_tol:
                            continue
                        worst = max(worst, diff)
                    places.add(tuple((r, i) for i in before))
                reproduced += bool(places)
                duplicated += len(ch.token_ids) * max(len(places) - 1, 0)
                for place in places:
                    trained_by_choice.update(place)
    trained = {(r, i) for r, m in enumerate(masks) for i, flag in enumerate(m) if flag}
    return {"choices": float(total), "choices_reproduced": float(reproduced),
            "choices_reproduced_frac": reproduced / total if total else 1.0,
            "untracked_trained_tokens": float(len(trained - trained_by_choice)),
            "duplicated_trained_tokens": float(duplicated), "max_abs_logprob_diff": worst}
