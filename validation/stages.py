"""The validation stages: one pytest marker each, in the order a run reports them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """A validation stage and what it proves."""

    name: str
    description: str

    @property
    def marker(self) -> str:
        """The pytest marker that selects this stage's tests."""
        return f"stage_{self.name}"


STAGES = (
    Stage("discovery", "config reading, layer families, covering depth, clear errors for bad configs"),
    Stage("hf_parity", "Megatron-core Gemma 4 vs HF transformers: log-probs, KL, loss and every gradient"),
    Stage("cp_masks", "sliding/document/shared-prefix masks, packing invariance, CP>1 equals CP=1"),
    Stage("tokenization", "Gemma 4 chat format, RL tokenization from vLLM ids, live vLLM server"),
    Stage("mismatch", "vLLM sampled-token log-probs vs the trainer's forward (train/inference mismatch)"),
    Stage("trainability", "an RL length task learns and the trained adapter is served by vLLM"),
    Stage("throughput", "trainer tokens/s against HF transformers on the same device"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
EXTRA_MARKERS = {
    "gpu": "needs CUDA; reported as skipped with the reason on CPU",
    "slow": "takes more than a few seconds on 2 CPU cores",
    "main_job": "runs in the main job (gemma4-validate) and when its stage is selected with -m, not in the default "
                "test run (pyproject's addopts deselect it to keep that under 15 minutes on 2 cores)",
}


def stage_of(keywords: object) -> str | None:
    """The stage name among a test's keywords/markers, if any."""
    for stage in STAGES:
        if stage.marker in keywords:  # type: ignore[operator]
            return stage.name
    return None
