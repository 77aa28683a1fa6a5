"""RL tokenization from vLLM's own token ids (collapse) and SFT tokenization through the chat template."""
from gemma4_support.rl.collapse import choice_reproduction, collapse_history, collapse_trajectories, first_mismatch
from gemma4_support.rl.sft import SFTExample, SFTReport, assistant_char_spans, sft_tokenize
from gemma4_support.rl.trajectory import (
    ChoiceRef,
    CollapseReport,
    SampledChoice,
    SplitEvent,
    TrainingSequence,
    Trajectory,
    read_choice,
)

__all__ = [
    "ChoiceRef",
    "CollapseReport",
    "SFTExample",
    "SFTReport",
    "SampledChoice",
    "SplitEvent",
    "TrainingSequence",
    "Trajectory",
    "assistant_char_spans",
    "choice_reproduction",
    "collapse_history",
    "collapse_trajectories",
    "first_mismatch",
    "read_choice",
    "sft_tokenize",
]
