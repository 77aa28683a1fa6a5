"""Data types of RL tokenization: trajectories as sampled, the training sequences built from them, the report.

A `Trajectory` is what a rollout produced: the conversation ``messages`` (for reference and SFT; never
re-rendered for RL), the ordered ``choices`` of the main history (one per model call), and any
``additional_histories`` (further ordered choice lists of the same rollout, e.g. a sub-agent's or a
summariser's calls). A choice is whatever the client returned: an OpenAI-client ``Choice`` whose
``model_extra`` carries ``prompt_token_ids`` / ``token_ids`` (what `gemma4_support.serving.wire`
produces), the same as a plain dict, or a `SampledChoice`. `read_choice` turns any of them into a
validated `SampledChoice`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gemma4_support.errors import ServerError, TokenizationError
from gemma4_support.serving.wire import choice_logprobs, decode_routed_experts, normalize_token_ids

__all__ = [
    "SampledChoice",
    "Trajectory",
    "TrainingSequence",
    "SplitEvent",
    "CollapseReport",
    "ChoiceRef",
    "read_choice",
]


@dataclass(frozen=True)
class ChoiceRef:
    """Where a choice sits: trajectory index, history index (0 = main history), choice index in that history."""

    trajectory: int = 0
    history: int = 0
    choice: int = 0

    def __str__(self) -> str:
        where = f"trajectory {self.trajectory}, choice {self.choice}"
        return where if self.history == 0 else f"trajectory {self.trajectory}, history {self.history}, choice {self.choice}"


@dataclass(frozen=True)
class SampledChoice:
    """One model call as vLLM reported it: prompt ids, sampled ids, their log-probs, optional MoE routing."""

    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    finish_reason: str | None = None
    routed_experts: Any = None  # numpy array [prompt + completion - 1, layers, top_k] when the server returned it


@dataclass
class Trajectory:
    """A rollout: its messages (reference only), the main history's choices in order, and additional histories."""

    messages: list[dict] = field(default_factory=list)
    choices: list[Any] = field(default_factory=list)
    additional_histories: list[list[Any]] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def histories(self) -> list[list[Any]]:
        """All choice lists: the main history first, then the additional ones."""
        return [list(self.choices), *[list(h) for h in self.additional_histories]]


@dataclass
class TrainingSequence:
    """One training row built only from vLLM's ids: completion tokens have mask 1 and vLLM's log-probs."""

    input_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]  # vLLM's sampled-token log-prob where loss_mask is 1, 0.0 elsewhere
    trajectory_index: int
    history_index: int
    choice_indices: list[int]
    completion_spans: list[tuple[int, int]]  # [start, end) of each choice's completion in input_ids
    routed_experts: Any = None  # the last choice's routing, covering input_ids[:-1], when every choice had it

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class SplitEvent:
    """A choice whose prompt did not extend the running buffer, so a new sequence started there."""

    trajectory_index: int
    history_index: int
    choice_index: int
    buffer_length: int
    prompt_length: int
    first_mismatch: int  # first position where prompt and buffer differ (== prompt_length if the prompt is shorter)
    reason: str
    change: dict | None = None  # with a detokenizer: the text the prompt removed from (or rewrote in) the buffer


@dataclass
class CollapseReport:
    """What collapsing did: counts, how many trajectories became one sequence per history, every split."""

    trajectories: int = 0
    histories: int = 0
    choices: int = 0
    sequences: int = 0
    collapsed_trajectories: int = 0  # trajectories whose every history became exactly one sequence
    single_sequence_histories: int = 0
    prompt_tokens_reported: int = 0  # sum of every choice's prompt length as vLLM reported it
    completion_tokens: int = 0
    sequence_tokens: int = 0  # tokens in the built sequences (prompts shared across turns counted once)
    splits: list[SplitEvent] = field(default_factory=list)

    @property
    def split_trajectories(self) -> int:
        """Trajectories with at least one history that needed more than one sequence."""
        return self.trajectories - self.collapsed_trajectories

    def to_dict(self) -> dict:
        """JSON-ready form (for the stage report)."""
        d = asdict(self)
        d["split_trajectories"] = self.split_trajectories
        return d

    def summary(self) -> str:
        """One line for logs and test messages."""
        return (f"{self.trajectories} trajectories / {self.choices} choices -> {self.sequences} sequences; "
                f"{self.collapsed_trajectories} collapsed to one sequence per history, {len(self.splits)} splits")


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    extra = getattr(obj, "model_extra", None) or {}
    if name in extra:
        return extra[name]
    return getattr(obj, name, None)


def read_choice(obj: Any, where: ChoiceRef | str, *, vocab_size: int | None = None,
                require_logprobs: bool = True) -> SampledChoice:
    """Validate one choice (OpenAI-client object, dict or `SampledChoice`) into a `SampledChoice`.

    Raises `TokenizationError` naming ``where`` when prompt or completion ids are missing, the
    log-prob count differs from the completion length, a log-prob is NaN, or an id is outside
    ``[0, vocab_size)``.
    """
    if isinstance(obj, SampledChoice):
        prompt, completion, lps = list(obj.prompt_token_ids), list(obj.token_ids), obj.logprobs
        finish, routed = obj.finish_reason, obj.routed_experts
    else:
        try:
            prompt = normalize_token_ids(_get(obj, "prompt_token_ids"), f"{where} prompt_token_ids")
            completion = normalize_token_ids(_get(obj, "token_ids"), f"{where} token_ids")
            routed = decode_routed_experts(_get(obj, "routed_experts"))
        except ServerError as err:
            raise TokenizationError(err.problem, err.fix) from None
        lps = choice_logprobs(obj)
        finish = _get(obj, "finish_reason")
    if not prompt:
        raise TokenizationError(
            f"{where} has no prompt_token_ids",
            "request with return_token_ids=true and keep the response's prompt_token_ids on each choice "
            "(gemma4_support.serving.VLLMClient does); never re-tokenize the prompt",
        )
    if completion is None:
        raise TokenizationError(
            f"{where} has no token_ids (the sampled completion ids)",
            "request with return_token_ids=true from vLLM and keep choice.token_ids",
        )
    if lps is None:
        if require_logprobs:
            raise TokenizationError(f"{where} has no logprobs for its {len(completion)} completion tokens",
                                    "request with logprobs=true (or collapse with require_logprobs=False)")
    else:
        lps = [float(x) for x in lps]
        if len(lps) != len(completion):
            raise TokenizationError(
                f"{where} has {len(lps)} logprobs for {len(completion)} completion tokens",
                "pass the choice exactly as vLLM returned it (logprobs=true, no truncation or merging)",
            )
        bad = [i for i, x in enumerate(lps) if math.isnan(x)]
        if bad:
            raise TokenizationError(f"{where} has a NaN logprob at completion position {bad[0]}",
                                    "check the sampler output; NaN log-probs cannot be trained on")
    if vocab_size is not None:
        for part, ids in (("prompt", prompt), ("completion", completion)):
            for pos, t in enumerate(ids):
                if not 0 <= t < vocab_size:
                    raise TokenizationError(
                        f"{where} has token id {t} at {part} position {pos}, outside the vocabulary [0, {vocab_size})",
                        "collapse with the served model's vocab_size; the ids come from another model or are corrupt",
                    )
    return SampledChoice(tuple(prompt), tuple(completion), None if lps is None else tuple(lps), finish, routed)


def as_sequence_of_trajectories(trajectories: Sequence[Trajectory] | Trajectory) -> list[Trajectory]:
    """Accept one trajectory or many."""
    return [trajectories] if isinstance(trajectories, Trajectory) else list(trajectories)
