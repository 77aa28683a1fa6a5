"""Hypothesis properties whose example and failure counts go into the stage reports (a property that ran no
examples cannot pass its gate, and every failing example is counted, not only the first)."""
from __future__ import annotations

import reprlib
import traceback
from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import UnsatisfiedAssumption

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FIRST_FAILURES = 3  # failing examples described in the report
_TEXT_LIMIT = 1000  # characters per described failure
_EXAMPLE_REPR = reprlib.Repr()
_EXAMPLE_REPR.maxlist = _EXAMPLE_REPR.maxtuple = 8
_EXAMPLE_REPR.maxstring = _EXAMPLE_REPR.maxother = 60


def counted_property(strategy: st.SearchStrategy, body: Callable[[object], None], stats: Counter,
                     max_examples: int | None = None) -> list[str]:
    """Run `body` over `strategy`, counting examples in stats["examples"] and failing ones in stats["failures"];
    hypothesis runs every example (a failure does not stop it); returns the first three failures described."""
    failures: list[str] = []
    chosen = PROPERTY_SETTINGS if max_examples is None else settings(PROPERTY_SETTINGS, max_examples=max_examples)

    @chosen
    @given(strategy)
    def run(example: object) -> None:
        try:
            body(example)
        except UnsatisfiedAssumption:  # hypothesis' own control flow: the example is discarded, not run
            raise
        except Exception as exc:  # noqa: BLE001 - every failing example is counted and described
            stats["failures"] += 1
            if len(failures) < FIRST_FAILURES:
                failures.append(describe_failure(exc, example))
        stats["examples"] += 1

    stats.setdefault("examples", 0)  # both keys exist even when nothing ran
    stats.setdefault("failures", 0)
    run()
    return failures


def describe_failure(exc: BaseException, example: object) -> str:
    """One failing example: the error's first line, where it was raised, and a short repr of the example (≤ 1000
    chars)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
    lines = str(exc).strip().splitlines()  # the first line: pytest's assertion rewriting appends the operands
    error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500] + where
    text = f"{error} — example: {_EXAMPLE_REPR.repr(example)}"
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT - 1] + "…"


def check_property(stage_report: object, case: str, strategy: st.SearchStrategy, body: Callable[[object], None],
                   stats: Counter, gates: tuple, **info: object) -> None:
    """Run a counted property and judge its example and failure counts against `gates` in the stage report, with
    the first failures and every other count `body` kept in `stats`."""
    first = counted_property(strategy, body, stats)
    counts = {k: v for k, v in stats.items() if k not in ("examples", "failures")}
    stage_report.check(case, {"examples": stats["examples"], "failures": stats["failures"]}, gates,
                       first_failures=first, **counts, **info)
