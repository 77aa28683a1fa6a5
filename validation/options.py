"""The suite's command-line options and the restart that joins a path option's separate value to its flag.

`OPTIONS` lists the suite's options (`add_options` adds them for `pytest_addoption`). pytest decides its rootdir, ini
file and first conftests before any plugin option is known, so `--opt PATH` outside the repository makes it take PATH
for a test path (no pyproject.toml found, no conftest, "unrecognized arguments"): `SUITE_OPTION_VALUES` (entry point
`pytest11: gemma4-suite-options`, through validation.plugin) restarts pytest once with `--opt=PATH` instead.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

_RESTARTED = "GEMMA4_SUITE_OPTIONS_JOINED"  # set for the one re-execution with joined option values
# The suite's options: (flag, addoption keywords).
OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--gemma4-model", dict(default=None, metavar="DIR",
                            help="HF Gemma 4 checkpoint directory to validate (default: the embedded tiny MoE fixture)")),
    ("--report-dir", dict(default=None, metavar="DIR",
                          help="where run folders with the stage JSONs are written (default: reports/ in the current "
                               "directory)")),
    ("--gemma4-seed", dict(type=int, default=0, help="seed for every random input of the suite")),
    ("--gemma4-full-depth", dict(action="store_true",
                                 help="do not truncate --gemma4-model to the depth that covers every layer family")),
    ("--gemma4-chat-template", dict(default=None, metavar="FILE",
                                    help="a Gemma 4 chat template (Jinja) to run the tokenization stage with; default: "
                                         "the model's own, else the fixtures' template")),
    ("--gemma4-dtype", dict(default=None, choices=("float32", "bfloat16"),
                            help="precision of the mismatch stage against --vllm-url (the server's --dtype; default "
                                 "bfloat16); without --vllm-url the stage runs float32 and bfloat16 on the fixtures")),
    ("--trainability-publish", dict(default="auto", choices=("auto", "lora", "merged"),
                                    help="how the trainability loop serves each step's policy: vLLM runtime LoRA "
                                         "loading, or merged weights reloaded in place / restarted (default auto: lora "
                                         "for dense, merged for MoE)")),
    ("--gemma4-run-dir-file", dict(default=None, metavar="FILE",
                                   help="write this run's report folder to FILE when the session ends "
                                        "(gemma4-validate reads it)")),
    ("--gemma4-stage-run", dict(default=None, metavar="DIR",
                                help="write the selected stages' JSONs into this existing run folder, no INCOMPLETE "
                                     "marker or LATEST, and a summary and page only when the session does not "
                                     "complete: gemma4-validate's workflow runs each stage so and writes the run's "
                                     "summary, page and LATEST once at the end (replacing such a summary)")),
    ("--throughput-tokens", dict(type=int, default=8192, metavar="N",
                                 help="tokens per step of the GPU throughput test (one packed row of two documents; "
                                      "HF: 2 x N/2)")),
    ("--throughput-layers", dict(type=int, default=6, metavar="N",
                                 help="layers of the GPU throughput test's model (the 26B-A4B shapes, or "
                                      "--gemma4-model's config, cut to N; it must end on a full layer)")),
)
_VALUE_OPTIONS = frozenset(flag for flag, kw in OPTIONS if kw.get("action") != "store_true")


def add_options(parser: pytest.Parser) -> None:
    """Add the suite's options (`OPTIONS`) to pytest's parser, in their own group."""
    group = parser.getgroup("gemma4", "gemma4-support validation")
    for flag, keywords in OPTIONS:
        group.addoption(flag, **keywords)


def join_option_values(args: Sequence[str], taken_as_paths: Sequence[str]) -> list[str]:
    """`args` with each suite option whose separate value pytest took for a test path written `--opt=VALUE`."""
    paths, out, i = set(map(str, taken_as_paths)), [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + list(args[i:])
        if arg in _VALUE_OPTIONS and i + 1 < len(args) and args[i + 1] in paths:
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


class _SuiteOptionValues:
    """Early plugin (entry point): restarts pytest once with `--opt=PATH` where pytest's early parsing took the PATH
    of a suite option for a test path; where it cannot restart (pytest.main in a process), one usage-error line."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_load_initial_conftests(self, early_config: pytest.Config) -> Iterator[None]:
        """Restart once with `--opt=PATH` where a suite option's PATH was parsed as a test path (or a usage error)."""
        restarted = os.environ.pop(_RESTARTED, None)
        raw = list(early_config.invocation_params.args)
        fixed = join_option_values(raw, early_config.known_args_namespace.file_or_dir or [])
        if fixed != raw and any(_exists(early_config.invocation_params.dir, a.partition("=")[2])
                                for a in set(fixed) - set(raw)):
            if restarted or sys.argv[1:] != raw:
                joined = ", ".join(sorted(set(fixed) - set(raw)))
                raise pytest.UsageError(f"pytest took the value of a suite option for a test path — fix: write it "
                                        f"joined with '=': {joined}")
            prefix = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [*prefix, *fixed], {**os.environ, _RESTARTED: "1"})
        return (yield)


SUITE_OPTION_VALUES = _SuiteOptionValues()


def _exists(base: Path, value: str) -> bool:
    try:
        return (Path(base) / value).exists()
    except (OSError, ValueError):
        return False
