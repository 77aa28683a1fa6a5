"""gemma4-validate: make fixtures, discover a model's layer families, run the validation stages.

`run` runs the selected stages in workflow order, each in its own pytest session with its own time limit
(--stage-timeout), into one run folder (validation/workflow.py); a stage after a failed one is blocked unless
--keep-going, and transient start-up failures are retried (--retries). It exits 0 when every selected stage passed,
1 when a stage failed, timed out or did not complete (crashed, stopped by pytest, collection or internal error), 2 on
a usage error, 3 when a stage was blocked or a selected stage ran no tests (status not_run; unless --allow-not-run),
and 128 + the signal's number (130 SIGINT, 143 SIGTERM) when it was interrupted: the signal is forwarded to the
running stage (pytest, its workers, the vLLM servers they started), which writes its reports as interrupted and
stops; no later stage starts, and the run also dies with this process."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from gemma4_support.errors import Gemma4Error
from validation import compare_cli

SUITE = Path(__file__).resolve().parent  # the installed (or checked-out) validation package: the tests live here
# What pyproject.toml's addopts give a run from the checkout; the CLI runs without any ini file.
SUITE_OPTIONS = ("--strict-markers", "--dist", "loadgroup", "-p", "validation.plugin", "-p", "validation.conftest_vllm")
_FORWARDED = (signal.SIGINT, signal.SIGTERM)
_STOP_AFTER_SIGNAL_S = 120.0  # after a forwarded signal: time for the run to write its reports and stop its servers


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from fixtures.factory import VARIANTS, write_fixture

    variants = args.variant.split(",") if args.variant else list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise Gemma4Error(f"unknown fixture variant(s) {unknown}", f"choose from {sorted(VARIANTS)}")
    for variant in variants:
        path = write_fixture(variant, Path(args.out) / variant, seed=args.seed)
        print(f"{variant}: {path}")
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from gemma4_support.config.families import discover
    from gemma4_support.convert.preflight import preflight

    checked = preflight(args.model, weights=None)  # the run's door: config fields, and the weights when present
    spec = checked.spec
    found = discover(spec)
    if args.json:
        print(json.dumps({"model": str(args.model), "spec": spec.to_dict(), **found.to_dict(),
                          "checkpoint": checked.checkpoint, "warnings": list(checked.warnings)}, indent=2))
        return 0
    print(f"model: {args.model}  ({'multimodal wrapper, text_config' if spec.wrapped else 'gemma4_text'})")
    print(f"hidden {spec.hidden_size}, {spec.num_attention_heads} q heads, vocab {spec.vocab_size}, "
          f"window {spec.sliding_window}, max sequence length {spec.max_sequence_length}, "
          f"softcap {spec.final_logit_softcapping}")
    if spec.moe:
        print(f"MoE: {spec.moe.num_experts} experts, top-{spec.moe.top_k}, expert width "
              f"{spec.moe.expert_intermediate_size}; dense MLP width {spec.intermediate_size}")
    print(f"{'layer':>5}  {'type':<17} {'window':>6} {'head':>4} {'kv':>3} {'K=V':>3}  {'rope':<24} mlp")
    for layer in spec.layers:
        rope = f"{layer.rope.rope_type} θ={layer.rope.theta:g} p={layer.rope.partial_rotary_factor:g}"
        print(f"{layer.index:>5}  {layer.layer_type:<17} {str(layer.window or '-'):>6} {layer.head_dim:>4} "
              f"{layer.num_kv_heads:>3} {'yes' if layer.k_eq_v else 'no':>3}  {rope:<24} {layer.mlp}")
    for fam in found.families:
        print(f"family {fam.name:<17} first layer {fam.first_index:>3}  ({len(fam.indices)} layers)")
    print(f"covering depth {found.covering_depth}; truncation depth {found.truncation_depth} (ends on a full layer)")
    for note in (*spec.notes, *checked.warnings):
        print(f"note: {note}")
    return 0


def _selected_stages(args: argparse.Namespace) -> list[str]:
    """The stages `--stages` names (default: all), refusing empty, duplicate and unknown names."""
    from validation.stages import STAGE_NAMES

    if args.stages is None:
        return list(STAGE_NAMES)
    stages = [s.strip() for s in args.stages.split(",")]
    choose = f"name stages separated by commas, from {', '.join(STAGE_NAMES)} (leave --stages out for all)"
    if not any(stages) or "" in stages:
        raise Gemma4Error(f"--stages {args.stages!r} has an empty stage name", choose)
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise Gemma4Error(f"unknown stage(s) {unknown}", f"choose from {', '.join(STAGE_NAMES)}")
    repeated = sorted({s for s in stages if stages.count(s) > 1})
    if repeated:
        raise Gemma4Error(f"--stages names {', '.join(repeated)} more than once", "name each stage once")
    return stages


def pytest_command(args: argparse.Namespace, stages: list[str], run_dir_file: Path,
                   extra: Sequence[str] = ()) -> list[str]:
    """The pytest command line of a run: the installed suite, the stages' markers, the suite's options, `extra`,
    then the user's own pytest arguments."""
    # No ini file, and conftest files only from the suite itself: the same run from any directory, installed or not.
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-c", os.devnull, "--rootdir", str(SUITE.parent),
           "--confcutdir", str(SUITE), *SUITE_OPTIONS, "-p", "no:cacheprovider",
           "-m", " or ".join(f"stage_{s}" for s in stages), "--report-dir", str(Path(args.report_dir or "reports").resolve()),
           "--gemma4-run-dir-file", str(run_dir_file)]
    if args.workers:
        cmd += ["-n", str(args.workers)]
    if args.model:
        cmd += ["--gemma4-model", str(Path(args.model).resolve())]
    if args.chat_template:
        cmd += ["--gemma4-chat-template", str(Path(args.chat_template).resolve())]
    if args.full_depth:
        cmd += ["--gemma4-full-depth"]
    if not any(a == "--tb" or a.startswith("--tb=") for a in args.pytest_args):
        cmd += ["--tb=short"]  # readable failing logs unless the user chose their own
    return cmd + list(extra) + list(args.pytest_args)


def _cmd_run(args: argparse.Namespace) -> int:
    from validation.workflow import Workflow, in_workflow_order, parse_stage_timeouts, run_workflow, write_run

    if args.retries < 0:
        raise Gemma4Error(f"--retries {args.retries} is negative", "pass --retries 0 (no retry) or more")
    workflow = Workflow(in_workflow_order(_selected_stages(args)), parse_stage_timeouts(args.stage_timeout),
                        args.retries, args.keep_going)
    if args.model:
        from gemma4_support.convert.preflight import preflight

        for warning in preflight(args.model).warnings:  # a bad config or checkpoint is refused before pytest starts
            print(f"gemma4-validate: warning: {warning}", file=sys.stderr)
    if args.chat_template and not Path(args.chat_template).is_file():
        raise Gemma4Error(f"chat template {args.chat_template} is not a file", "pass a Jinja chat template file")
    if args.baseline and not Path(args.baseline).is_dir():
        raise Gemma4Error(f"--baseline {args.baseline} is not a folder", "pass an earlier run folder or a report folder")
    from gemma4_support.reports.files import new_run_dir

    run = new_run_dir(Path(args.report_dir or "reports"))  # one line now (bad --report-dir), not a pytest error later
    code, summary, tests = run_workflow(args, workflow, run)
    write_run(run, summary, tests)
    for name, stage in summary["stages"].items():
        if stage["status"] != "not_selected":
            tries = f", {len(stage['attempts'])} attempts" if len(stage["attempts"]) > 1 else ""
            why = f": {stage['reason']}" if stage["status"] in ("blocked", "timed_out", "error") else ""
            print(f"gemma4-validate: {name}: {stage['status']}{tries}{why}", file=sys.stderr)
    print(f"gemma4-validate: verdict {summary['verdict']} (complete: {str(summary['complete']).lower()}), exit {code}; "
          f"reports: {run}", file=sys.stderr)
    if code >= 128:
        name = signal.Signals(code - 128).name
        print(f"gemma4-validate: interrupted by {name}: the run (pytest, its workers, their vLLM servers) was stopped "
              f"and is not complete; reports: {run}", file=sys.stderr)
    elif summary["not_run"] and code == 3:
        print(f"gemma4-validate: stage(s) {', '.join(summary['not_run'])} ran no tests (not_run), so the run is not "
              "green — fix: select stages that have tests (--stages), or pass --allow-not-run", file=sys.stderr)
    elif summary["not_run"]:
        print(f"gemma4-validate: stage(s) {', '.join(summary['not_run'])} ran no tests (not_run; allowed by "
              "--allow-not-run)", file=sys.stderr)
    return code


class Supervised(NamedTuple):
    """How a supervised command ended: its exit code, the first signal this process received while it ran (None if
    none), and whether it was stopped for running past its time limit."""

    returncode: int
    received: int | None
    timed_out: bool


def run_supervised(cmd: list[str], timeout_s: float | None = None) -> Supervised:
    """Run `cmd` as a supervised process group that dies with this process, forwarding SIGINT and SIGTERM to all of
    it and waiting for it; past `timeout_s` it gets SIGTERM (an orderly interrupt: reports written) and is stopped."""
    from gemma4_support.serving.process import spawn

    received: list[tuple[int, float]] = []  # (signal, monotonic time it arrived)
    expired: list[float] = []  # when the time limit ran out
    child = None

    def forward(signum: int, _frame: object) -> None:
        received.append((signum, time.monotonic()))
        if child is not None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        child = spawn(cmd, None, env=os.environ.copy(), stop_grace_s=10.0)
        started = time.monotonic()
        if received:  # arrived while it was starting
            child.send_signal(received[0][0])
        while child.popen.poll() is None:
            if received and time.monotonic() - received[0][1] > _STOP_AFTER_SIGNAL_S:
                break  # it had its time to stop in order: stop() below ends it
            if timeout_s is not None and not expired and time.monotonic() - started > timeout_s:
                expired.append(time.monotonic())
                child.send_signal(signal.SIGTERM)
            if expired and time.monotonic() - expired[0] > _STOP_AFTER_SIGNAL_S:
                break
            child.refresh_process_tree()
            try:
                child.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    finally:
        left = child.stop() if child is not None else []  # whatever the run left behind (normally nothing)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        print(f"gemma4-validate: warning: processes of the run survived SIGKILL: {left}", file=sys.stderr)
    return Supervised(child.popen.returncode, received[0][0] if received else None, bool(expired))


def build_parser() -> argparse.ArgumentParser:
    """The gemma4-validate argument parser."""
    parser = argparse.ArgumentParser(prog="gemma4-validate", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    fx = sub.add_parser("fixtures", help="write the deterministic tiny Gemma 4 checkpoints")
    fx.add_argument("--out", required=True, help="output folder (one sub-folder per variant)")
    fx.add_argument("--variant", default=None, help="comma-separated variants (default: all)")
    fx.add_argument("--seed", type=int, default=0)
    ds = sub.add_parser("discover", help="print a model's per-layer spec and layer families")
    ds.add_argument("--model", required=True, help="HF model directory or config.json")
    ds.add_argument("--json", action="store_true", help="machine-readable output")
    rn = sub.add_parser("run", help="run validation stages and write reports (default: every stage, embedded model)")
    for p in (parser, rn):
        p.add_argument("--model", default=None, help="HF Gemma 4 directory (default: embedded tiny fixture)")
        p.add_argument("--stages", default=None, help="comma-separated stages (default: all)")
        p.add_argument("--report-dir", default=None, help="where run folders go (default: ./reports)")
        p.add_argument("--full-depth", action="store_true", help="do not truncate --model to its covering depth")
        p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (0: in one process)")
        p.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Gemma 4 chat template (Jinja) for the tokenization stage (default: the model's own)")
        p.add_argument("--allow-not-run", action="store_true",
                       help="exit 0 even when a selected stage has no tests (status not_run; otherwise exit 3)")
        p.add_argument("--stage-timeout", action="append", default=None, metavar="[STAGE=]S",
                       help="a stage's time limit in seconds: S for every stage, STAGE=S for one (repeatable; default "
                            "3 h each); a stage past it is stopped and recorded timed_out")
        p.add_argument("--retries", type=int, default=1, metavar="N",
                       help="run a stage again up to N times when it failed only on transient start-up failures "
                            "(port in use, vLLM start time-out, connection refused); default 1")
        p.add_argument("--keep-going", action="store_true",
                       help="run the stages after a failed one (default: they are recorded blocked)")
        p.add_argument("--baseline", default=None, metavar="RUN",
                       help="an earlier run folder (or a report folder: the run its LATEST names) whose gates "
                            "index.html compares this run's with")
    rn.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments after --")
    parser.set_defaults(pytest_args=[])
    compare_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of gemma4-validate."""
    args = build_parser().parse_args(argv)
    if args.pytest_args and args.pytest_args[0] == "--":
        args.pytest_args = args.pytest_args[1:]
    handlers = {"fixtures": _cmd_fixtures, "discover": _cmd_discover, "run": _cmd_run, None: _cmd_run,
                "compare": compare_cli.cmd_compare}
    try:
        return handlers[args.command](args)
    except Gemma4Error as exc:
        print(f"gemma4-validate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
