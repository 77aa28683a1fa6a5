"""The train/inference mismatch harness: vLLM samples GRPO groups with the adapter, vLLM re-scores them (the floor),
and the Megatron model with the same adapter scores vLLM's sampled tokens through the real RL path (vLLM ids ->
collapse -> group_by_prompt -> pack_sequences -> masks -> model, routes replayed)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from gemma4_support.logprobs import score_row
from gemma4_support.metrics import sampled_logprob_metrics
from gemma4_support.packing import PackedRow
from gemma4_support.rl.collapse import collapse_trajectories
from gemma4_support.rl.rows import group_by_prompt, pack_sequences
from gemma4_support.rl.trajectory import SampledChoice, Trajectory, read_choice
from gemma4_support.serving.wire import choice_top_logprobs, prompt_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from gemma4_support.serving.client import VLLMClient

TOP_K = 20
_WORDS = ("river stone lantern orbit meadow copper signal harbor violet engine quiet summit paper thunder "
          "garden pixel falcon marble winter cobalt ember canyon velvet rocket island mosaic").split()


def prompts(count: int, min_words: int, seed: int) -> list[list[dict]]:
    """`count` single-user-turn conversations of shuffled filler words (long enough for several sliding windows)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        words = rng.choice(_WORDS, size=min_words + 7 * i).tolist()
        out.append([{"role": "user", "content": f"Note {i}: " + " ".join(words)}])
    return out


@dataclass
class Sample:
    """One vLLM choice: its ids and sampled log-probs (a SampledChoice), and its top-k per sampled token."""

    choice: SampledChoice
    messages: list[dict]
    top_ids: torch.Tensor  # [n, k]
    top_logprobs: torch.Tensor  # [n, k]


@dataclass
class Scores:
    """Log-probs of each sample's sampled tokens ([n] per sample) and the top-k there."""

    logprobs: list[torch.Tensor]
    top_ids: list[torch.Tensor | None] = field(default_factory=list)
    top_logprobs: list[torch.Tensor | None] = field(default_factory=list)


def sample(client: VLLMClient, model: str, conversations: list[list[dict]], *, n: int, max_tokens: int, min_tokens: int,
           temperature: float, seed: int) -> list[Sample]:
    """GRPO groups from vLLM: `n` completions per conversation with sampled-token and top-k log-probs."""
    out = []
    for c, messages in enumerate(conversations):
        resp = client.chat(messages, model=model, n=n, max_tokens=max_tokens, temperature=temperature, seed=seed + c,
                           logprobs=True, top_logprobs=TOP_K,
                           extra_body={"min_tokens": min_tokens, "return_tokens_as_token_ids": True})
        for j, raw in enumerate(resp.choices):
            where = f"conversation {c}, choice {j}"
            choice = read_choice(raw, where)
            tops = choice_top_logprobs(raw, where)
            out.append(Sample(choice, messages, torch.tensor([[i for i, _ in t] for t in tops]),
                              torch.tensor([[lp for _, lp in t] for t in tops], dtype=torch.float64)))
    return out


def rescore(client: VLLMClient, model: str, samples: list[Sample]) -> Scores:
    """vLLM's own re-scoring of the sampled sequences (prompt_logprobs over prompt + completion)."""
    out = Scores([])
    for s, smp in enumerate(samples):
        ids = list(smp.choice.prompt_token_ids) + list(smp.choice.token_ids)
        resp = client.complete(ids, model=model, max_tokens=1, temperature=0.0, logprobs=None,
                               extra_body={"prompt_logprobs": TOP_K})
        per = prompt_logprobs(resp.choices[0], ids, TOP_K, f"sample {s}")[len(smp.choice.prompt_token_ids):]
        out.logprobs.append(torch.tensor([p[0] for p in per], dtype=torch.float64))
        k = min(len(p[1]) for p in per)
        out.top_ids.append(torch.tensor([[i for i, _ in p[1][:k]] for p in per]))
        out.top_logprobs.append(torch.tensor([[lp for _, lp in p[1][:k]] for p in per], dtype=torch.float64))
    return out


def with_routes(samples: list[Sample], routes: list[np.ndarray]) -> list[Sample]:
    """The samples with recorded routing ([prompt + completion - 1, moe_layers, k] each) on their choices."""
    return [dataclasses.replace(s, choice=dataclasses.replace(s.choice, routed_experts=r)) for s, r in zip(samples, routes)]


def packed(samples: list[Sample], capacity: int, vocab_size: int) -> tuple[list[PackedRow], list[list[tuple]]]:
    """The samples as the trainer packs them (one trajectory per choice, one document per prompt group), and where
    each sample's sampled tokens are trained: per sample a list of (row, position) in completion order."""
    trajectories = [Trajectory(messages=s.messages, choices=[s.choice]) for s in samples]
    sequences, _ = collapse_trajectories(trajectories, vocab_size=vocab_size)
    rows, documents = pack_sequences(group_by_prompt(sequences), capacity=capacity)
    where: list[list[tuple]] = [[] for _ in samples]
    paths = {r: row.standalone_sequences() for r, row in enumerate(rows)}
    segments = {r: row.segment_ids() for r, row in enumerate(rows)}
    for doc in documents:
        mine = [p for p in paths[doc.row] if int(segments[doc.row][p[0]]) == doc.document]
        for seq, path in zip(doc.sequences, mine):
            tokens = rows[doc.row].input_ids[path].tolist()
            if tokens != seq.input_ids:
                raise AssertionError(f"packed path of trajectory {seq.trajectory_index} does not hold its sequence")
            start, end = seq.completion_spans[0]
            where[seq.trajectory_index] = [(doc.row, int(path[t - 1])) for t in range(start, end)]
    return rows, where


def trainer_scores(model: torch.nn.Module, rows: list[PackedRow], where: list[list[tuple]], *,
                   replay: bool = True, top_k: int = TOP_K) -> Scores:
    """The Megatron model's log-probs (and top-k) of every sample's sampled tokens, row by row."""
    with torch.no_grad():
        scored = [score_row(model, row, top_k=top_k, replay=replay) for row in rows]
    out = Scores([])
    for places in where:
        out.logprobs.append(at_places(scored, places).double())
        out.top_ids.append(at_places(scored, places, "top_ids") if top_k else None)
        out.top_logprobs.append(at_places(scored, places, "top_logprobs").double() if top_k else None)
    return out


def at_places(scored: list, places: list[tuple], field: str = "logprobs") -> torch.Tensor:
    """One sample's values of a TokenLogprobs field, stacked from its (row, position) places (as `packed` gives)."""
    return torch.stack([getattr(scored[r], field)[i] for r, i in places])


def compare(samples: list[Sample], cand: Scores, tops: bool = True) -> dict[str, float]:
    """The mismatch metrics of candidate scores against what vLLM sampled with (all samples' tokens together)."""
    ref = torch.cat([torch.tensor(s.choice.logprobs, dtype=torch.float64) for s in samples])
    got = torch.cat(cand.logprobs)
    if not tops or cand.top_ids[0] is None:
        return sampled_logprob_metrics(ref, got)
    k = min(min(t.shape[1] for t in cand.top_ids), samples[0].top_ids.shape[1])
    ref_top = (torch.cat([s.top_ids[:, :k] for s in samples]), torch.cat([s.top_logprobs[:, :k] for s in samples]))
    cand_top = (torch.cat([t[:, :k] for t in cand.top_ids]), torch.cat([t[:, :k] for t in cand.top_logprobs]))
    return sampled_logprob_metrics(ref, got, ref_top, cand_top)


def routes_from_hf(hf_model: torch.nn.Module, samples: list[Sample]) -> list[np.ndarray]:
    """The CPU tier's routing source: HF's expert choices for each sample's tokens, in vLLM's layout
    [prompt + completion - 1, moe_layers, top_k]."""
    from validation.parity import RoutingCapture

    out = []
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([list(s.choice.prompt_token_ids) + list(s.choice.token_ids)])
            with RoutingCapture(hf_model) as cap:
                hf_model(input_ids=ids)
            per = cap.indices()
            out.append(np.stack([per[layer].numpy() for layer in sorted(per)], axis=1)[:-1])
    return out


def rerendered(samples: list[Sample], tokenizer: PreTrainedTokenizerBase, template: str) -> list[Sample]:
    """Sensitivity: each sample rebuilt from text (the local render of its messages + the re-encoded completion text),
    vLLM's log-probs laid on by position: what a stack that re-tokenizes instead of keeping vLLM's ids trains on."""
    from gemma4_support.chat.template import render_prompt

    out = []
    for s in samples:
        prompt = tokenizer(render_prompt(s.messages, template=template, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        completion = tokenizer(tokenizer.decode(list(s.choice.token_ids)), add_special_tokens=False)["input_ids"]
        n = min(len(completion), len(s.choice.token_ids))
        choice = SampledChoice(tuple(prompt), tuple(completion[:n]), s.choice.logprobs[:n])
        out.append(Sample(choice, s.messages, s.top_ids[:n], s.top_logprobs[:n]))
    return out


def positions_not_restarted(rows: list[PackedRow]) -> list[PackedRow]:
    """Sensitivity: the rows with positions counting through the whole row instead of restarting per document."""
    return [dataclasses.replace(r, position_ids=torch.arange(r.length)) for r in rows]
