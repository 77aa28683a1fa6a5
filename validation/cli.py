"""gemma4-validate: make fixtures, discover a model's layer families, run the validation stages."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from gemma4_support.errors import Gemma4Error

SUITE = Path(__file__).resolve().parent  # the installed (or checked-out) validation package: the tests live here
# What pyproject.toml's addopts give a run from the checkout; the CLI runs without any ini file.
SUITE_OPTIONS = ("--strict-markers", "--dist", "loadgroup", "-p", "validation.plugin", "-p", "validation.conftest_vllm")


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
    from gemma4_support.config.spec import load_spec

    spec = load_spec(args.model)
    found = discover(spec)
    if args.json:
        print(json.dumps({"model": str(args.model), "spec": spec.to_dict(), **found.to_dict()}, indent=2))
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
    for note in spec.notes:
        print(f"note: {note}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from validation.stages import STAGE_NAMES

    stages = [s.strip() for s in args.stages.split(",")] if args.stages else list(STAGE_NAMES)
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise Gemma4Error(f"unknown stage(s) {unknown}", f"choose from {', '.join(STAGE_NAMES)}")
    if args.model:
        from gemma4_support.config.spec import load_spec

        load_spec(args.model)  # refuse a bad model before pytest starts
    # No ini file, and conftest files only from the suite itself: the same run from any directory, installed or not.
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-c", os.devnull, "--rootdir", str(SUITE.parent),
           "--confcutdir", str(SUITE), *SUITE_OPTIONS, "-p", "no:cacheprovider",
           "-m", " or ".join(f"stage_{s}" for s in stages), "--report-dir", str(Path(args.report_dir or "reports").resolve())]
    if args.workers:
        cmd += ["-n", str(args.workers)]
    if args.model:
        cmd += ["--gemma4-model", str(Path(args.model).resolve())]
    if args.full_depth:
        cmd += ["--gemma4-full-depth"]
    cmd += args.pytest_args
    rc = subprocess.call(cmd, env=os.environ.copy())
    if rc == 5:
        print(f"gemma4-validate: no tests selected for stage(s) {', '.join(stages)}", file=sys.stderr)
    return rc


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
    rn.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments after --")
    parser.set_defaults(pytest_args=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of gemma4-validate."""
    args = build_parser().parse_args(argv)
    if args.pytest_args and args.pytest_args[0] == "--":
        args.pytest_args = args.pytest_args[1:]
    handlers = {"fixtures": _cmd_fixtures, "discover": _cmd_discover, "run": _cmd_run, None: _cmd_run}
    try:
        return handlers[args.command](args)
    except Gemma4Error as exc:
        print(f"gemma4-validate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
