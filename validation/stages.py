"""The validation stages: one pytest marker each, in the order a run reports them; a test's outcome and a stage's
status from what pytest reported."""
from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
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
    "expected_seconds": "the test's measured duration on the 2-core CI machine (its argument): modules holding the "
                        "longest tests start first, so no long test is left to run alone at the end",
    "main_job": "runs in the main job (gemma4-validate) and when its stage is selected with -m, not in the default "
                "test run (pyproject's addopts deselect it to keep that under 15 minutes on 2 cores)",
}


def stage_of(keywords: object) -> str | None:
    """The stage name among a test's keywords/markers, if any."""
    for stage in STAGES:
        if stage.marker in keywords:  # type: ignore[operator]
            return stage.name
    return None
# A test's outcome: pytest's category of its worst report, `interrupted` when it started but did not run to its end,
# `not_run` when it ended without a report pytest counts (--setup-only). Counts: pytest's categories + interrupted.
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "interrupted")


def outcome_of(counted: Sequence[str], finished: bool) -> str:
    """A test's outcome from pytest's categories of its reports (as its summary line counts them) and whether it ran
    to its end: a failure or error stands, else an unfinished test is `interrupted`, never passed, and a test is
    passed only when pytest counted it passed."""
    for worst in ("failed", "error"):
        if worst in counted:
            return worst
    if not finished:
        return "interrupted"
    kept = next((c for c in ("passed", "xpassed", "xfailed", "skipped") if c in counted), None)
    return kept or (counted[0] if counted else "not_run")


def count_outcomes(tests: Iterable[Mapping]) -> dict[str, int]:
    """pytest's own tally of the tests' reports (one per report category, as its summary line counts them), plus the
    tests that started but did not run to their end (`interrupted`, which pytest does not count)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for test in tests:
        for category in test["counted"]:
            counts[category] = counts.get(category, 0) + 1
        counts["interrupted"] += test["outcome"] == "interrupted"
    return counts


def stage_status(outcomes: Collection[str], run_state: str, selected: bool) -> str:
    """A stage's status: the run's state (`interrupted` / `error`) when the run did not complete and the stage ran
    tests or was selected; else not_run (no tests), failed, skipped (all skipped) or passed."""
    if run_state != "complete" and (outcomes or selected):
        return run_state
    if not outcomes:
        return "not_run"
    if set(outcomes) & {"failed", "error", "interrupted"}:
        return "failed" if set(outcomes) & {"failed", "error"} else "interrupted"
    return "skipped" if set(outcomes) <= {"skipped", "xfailed", "not_run"} else "passed"


def selected_stages(markexpr: str | None) -> set[str]:
    """The stages a `-m` expression can select (a test of that stage, other markers present or absent); every stage
    when there is no expression or pytest's expression grammar is unavailable."""
    if not markexpr:
        return set(STAGE_NAMES)
    try:
        from _pytest.mark.expression import Expression  # pytest's own -m grammar (no public equivalent)

        expression = Expression.compile(markexpr)
    except Exception:  # noqa: BLE001 - unknown grammar: assume every stage may run
        return set(STAGE_NAMES)
    markers = {s.marker for s in STAGES}

    def can_select(marker: str) -> bool:
        return any(expression.evaluate(lambda name, /, **_: name == marker or (other and name not in markers))
                   for other in (False, True))

    return {s.name for s in STAGES if can_select(s.marker)}


# A transient start-up failure: a server that could not start or be reached before any comparison began (retried by
# gemma4-validate's workflow); anything else is a real failure. Matched on the library's own ServerError lines.
TRANSIENT_START = (
    ("address already in use", "port in use"),
    ("was not healthy after", "vLLM engine start timeout"),
    ("nothing is listening at", "connection refused"),
)


def transient_start_failure(exc: BaseException | None, when: str) -> str | None:
    """Why `exc` (raised in a test's phase `when`) is a transient start-up failure, or None when it is a real one:
    a ServerError of a start that failed by port, time-out or refusal (anywhere in the exception's chain), or a refused
    connection / port in use while the test was being set up."""
    import errno

    from gemma4_support.errors import ServerError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ServerError):
            text = str(exc).lower()
            return next((f"{kind}: {str(exc).splitlines()[0][:300]}" for pattern, kind in TRANSIENT_START
                         if pattern in text), None)
        if when == "setup" and isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.ECONNREFUSED):
            return f"{'port in use' if exc.errno == errno.EADDRINUSE else 'connection refused'}: {exc}"
        exc = exc.__cause__ or exc.__context__
    return None
