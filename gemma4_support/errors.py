"""Errors the suite raises for bad input: one readable line naming the problem and the fix."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar


class Gemma4Error(Exception):
    """Base error: `problem` says what is wrong, `fix` says what to do about it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} — fix: {fix}")


class ConfigError(Gemma4Error):
    """A Gemma 4 config is malformed, inconsistent or describes an unsupported variant."""


class UnsupportedVariantError(ConfigError):
    """The config is a Gemma 4 variant this suite does not support (PLE, KV sharing, bidirectional)."""


class CheckpointError(Gemma4Error):
    """A checkpoint has unknown, missing or mis-shaped tensors."""


class RuntimeConfigError(Gemma4Error):
    """The process-wide runtime config is unset, or set twice with different values."""


class MaskNotPreparedError(Gemma4Error):
    """An attention mask was looked up during forward without having been prepared ahead."""


class TokenizationError(Gemma4Error):
    """Trajectories or token ids from a server cannot be turned into training sequences."""


class ServerError(Gemma4Error):
    """A vLLM server failed to start, died, or returned something unusable."""


class PackingError(Gemma4Error):
    """A packed row's ids (positions, documents, branches) are inconsistent, or cannot be split as asked."""


def require_positive_ints(values: Mapping[str, object], error: type[Gemma4Error], what: str,
                          fix: str = "pass {name} >= 1") -> None:
    """Raise `error` naming the first of `values` that is not a positive integer (booleans are not integers)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise error(f"{what} {name}={value!r} is not a positive integer", fix.format(name=name))


E = TypeVar("E", bound=Gemma4Error)
SHOWN_PROBLEMS = 40  # listed one by one; any beyond are counted


def short_repr(value: object) -> str:
    """A value's repr for a one-line message, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def combined(problems: Sequence[Gemma4Error], error: type[E], where: str, *, one_line: bool) -> E:
    """One `error` naming `where` and every problem found there, each with its fix: joined on one line, or one
    line each (the problems stay on the error as `.problems`)."""
    if len(problems) == 1:
        out = error(f"{where}: {problems[0].problem}", problems[0].fix)
    else:
        sep = " — fix: " if not one_line else " (fix: "
        end = "" if not one_line else ")"
        lines = [f"{p.problem}{sep}{p.fix}{end}" if p.fix else p.problem for p in problems[:SHOWN_PROBLEMS]]
        if len(problems) > SHOWN_PROBLEMS:
            lines.append(f"... and {len(problems) - SHOWN_PROBLEMS} more")
        if one_line:
            out = error(f"{where} has {len(problems)} problems: " + "; ".join(lines), "correct each one named")
        else:
            out = error(f"{where} has {len(problems)} problems:" + "".join(f"\n  {line}" for line in lines))
    out.problems = list(problems)
    return out
