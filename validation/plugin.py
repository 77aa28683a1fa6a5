"""pytest plugin of the suite: stage markers, options, the `stage_report` fixture, and the run's reports.

Tests hand measured metrics to `stage_report`; records travel to the controlling process on the test
report (`user_properties`, so they survive pytest-xdist), and at the end of the session the controller
writes one JSON per stage, a summary and an HTML page into a fresh run folder under `--report-dir`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from gemma4_support.metrics import Gate, GateResult, evaluate
from gemma4_support.reports.files import jsonable, new_run_dir, write_atomic, write_json
from gemma4_support.reports.html import render_run
from gemma4_support.reports.provenance import collect
from gemma4_support.runtime import RuntimeConfig, set_runtime
from validation.stages import EXTRA_MARKERS, STAGES, stage_of

REPO = Path(__file__).resolve().parents[1]
_RECORD_KEY = "gemma4"
_RUN_DIR = pytest.StashKey[Path]()
# Warnings raised by dependencies, by design, that no test of ours should see as failures.
WARNING_FILTERS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",  # megatron-core on CPU, by design
    "ignore:Warning. tp_group is None:DeprecationWarning",  # megatron-core 0.16 linears at world size 1
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",  # raised inside torch 2.13 itself
    "ignore:The following imports from `dynamic_context.py`:DeprecationWarning",  # megatron-core 0.16 import
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gemma4", "gemma4-support validation")
    group.addoption("--gemma4-model", default=None, metavar="DIR",
                    help="HF Gemma 4 checkpoint directory to validate (default: the embedded tiny MoE fixture)")
    group.addoption("--report-dir", default=None, metavar="DIR",
                    help="where run folders with the stage JSONs are written (default: reports/ in the current directory)")
    group.addoption("--gemma4-seed", type=int, default=0, help="seed for every random input of the suite")
    group.addoption("--gemma4-full-depth", action="store_true",
                    help="do not truncate --gemma4-model to the depth that covers every layer family")
    group.addoption("--gemma4-chat-template", default=None, metavar="FILE",
                    help="a Gemma 4 chat template (Jinja) to run the tokenization stage with; default: the model's own, "
                         "else the fixtures' template")
    group.addoption("--gemma4-dtype", default=None, choices=("float32", "bfloat16"),
                    help="precision of the mismatch stage against --vllm-url (the server's --dtype; default bfloat16); "
                         "without --vllm-url the stage runs float32 and bfloat16 on the fixtures")
    group.addoption("--trainability-publish", default="auto", choices=("auto", "lora", "merged"),
                    help="how the trainability loop serves each step's policy: vLLM runtime LoRA loading, or merged "
                         "weights reloaded in place / restarted (default auto: lora for dense, merged for MoE)")
    group.addoption("--gemma4-run-dir-file", default=None, metavar="FILE",
                    help="write this run's report folder to FILE when the session ends (gemma4-validate reads it)")
    group.addoption("--throughput-tokens", type=int, default=8192, metavar="N",
                    help="tokens per step of the GPU throughput test (one packed row of two documents; HF: 2 x N/2)")
    group.addoption("--throughput-layers", type=int, default=6, metavar="N",
                    help="layers of the GPU throughput test's model (the 26B-A4B shapes, or --gemma4-model's config, "
                         "cut to N; it must end on a full layer)")


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    for stage in STAGES:
        config.addinivalue_line("markers", f"{stage.marker}: {stage.description}")
    for name, text in EXTRA_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    for line in WARNING_FILTERS:
        config.addinivalue_line("filterwarnings", line)
    # torch.compile's structured trace logs every graph at DEBUG; pytest would replay it under each failure (GPU runs)
    logging.getLogger("torch.__trace").setLevel(logging.WARNING)
    set_runtime(RuntimeConfig())  # one process, one model replica: tp = cp = ep = 1
    if _is_worker(config):
        config.stash[_RUN_DIR] = Path(config.workerinput["gemma4_run_dir"])
    elif not (config.option.collectonly or config.option.help):
        base = config.getoption("--report-dir") or Path(config.invocation_params.dir) / "reports"
        run = new_run_dir(Path(base))
        config.stash[_RUN_DIR] = run
        config.pluginmanager.register(_RunCollector(config, run), "gemma4-run-collector")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist: hand the run folder to each worker
    node.workerinput["gemma4_run_dir"] = str(node.config.stash[_RUN_DIR])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); this machine has no GPU — run it on a GPU runner")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class StageReport:
    """What a test measured, with thresholds and verdicts; failing gates fail the test."""

    def __init__(self, node: pytest.Item) -> None:
        self._node = node

    def _add(self, record: dict) -> None:
        self._node.user_properties.append((_RECORD_KEY, jsonable(record)))

    def record(self, case: str, **info: object) -> None:
        """Record information (timings, counts, ids) without a gate."""
        self._add({"case": case, "kind": "info", "info": info})

    def check(self, case: str, metrics: Mapping[str, object], gates: Sequence[Gate], **info: object) -> list[GateResult]:
        """Record metrics and judge them; fail the test naming every gate that failed."""
        results = evaluate(_numeric(metrics), gates)
        passed = all(r.passed for r in results)
        self._add({"case": case, "kind": "gate", "metrics": metrics, "gates": [r.to_dict() for r in results],
                   "passed": passed, "info": info})
        if not passed:
            failed = "; ".join(r.describe() for r in results if not r.passed)
            first = info.get("first_failures")
            example = f"; first failing example: {first[0]}" if isinstance(first, list) and first else ""
            pytest.fail(f"[{case}] gate failed: {failed}{example}", pytrace=False)
        return results

    def expect_caught(self, case: str, metrics: Mapping[str, object], gates: Sequence[Gate],
                      **info: object) -> list[GateResult]:
        """Sensitivity: a deliberately broken variant must fail at least one gate on a measured value (a metric
        missing from `metrics` fails its gate but catches nothing), else this test fails."""
        results = evaluate(_numeric(metrics), gates)
        caught = any(not r.passed and r.value is not None for r in results)
        self._add({"case": case, "kind": "sensitivity", "metrics": metrics, "gates": [r.to_dict() for r in results],
                   "passed": caught, "caught": caught, "info": info})
        if not caught:
            values = "; ".join(r.describe() for r in results)
            pytest.fail(f"[{case}] the broken variant failed no gate on a measured value — the gate cannot fail: {values}",
                        pytrace=False)
        return results


def _numeric(metrics: Mapping[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture
def stage_report(request: pytest.FixtureRequest) -> StageReport:
    """Record a test's measured metrics, thresholds and verdicts into its stage's JSON report."""
    return StageReport(request.node)


@pytest.fixture(scope="session")
def run_dir(pytestconfig: pytest.Config) -> Path:
    """This run's report folder (for artifacts a stage wants to keep beside its JSON)."""
    return pytestconfig.stash[_RUN_DIR]


class _RunCollector:
    """Controller-side: gathers every test's outcome and records, and writes the run's reports."""

    def __init__(self, config: pytest.Config, run: Path) -> None:
        self.config = config
        self.run = run
        self.tests: dict[str, dict] = {}
        self.t0 = time.time()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.setdefault(report.nodeid, {
            "nodeid": report.nodeid, "stage": stage_of(report.keywords), "outcome": "passed",
            "duration_s": 0.0, "records": [], "longrepr": None,
        })
        entry["duration_s"] += report.duration
        entry["records"].extend(v for k, v in report.user_properties if k == _RECORD_KEY and v not in entry["records"])
        if report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            entry["longrepr"] = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
            entry["longrepr"] = str(report.longrepr)[-4000:]

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        model = self.config.getoption("--gemma4-model")
        provenance = collect(REPO, Path(model) if model else _default_model_dir(), self.config.getoption("--gemma4-seed"))
        tests = list(self.tests.values())
        stages = {}
        for stage in STAGES:
            mine = [t for t in tests if t["stage"] == stage.name]
            doc = {"stage": stage.name, "marker": stage.marker, "description": stage.description,
                   "status": _status(mine), "counts": _counts(mine), "provenance": provenance, "tests": mine}
            write_json(self.run / f"{stage.name}.json", doc)
            stages[stage.name] = {"status": doc["status"], "counts": doc["counts"]}
        other = [t for t in tests if t["stage"] is None]
        summary = {"not_run": [name for name, s in stages.items() if s["status"] == "not_run"],
                   "run_dir": str(self.run), "exit_status": int(exitstatus),
                   "selection": self.config.getoption("markexpr") or None, "provenance": provenance,
                   "duration_s": round(time.time() - self.t0, 2), "stages": stages,
                   "unstaged": {"status": _status(other), "counts": _counts(other)}}
        write_json(self.run / "summary.json", summary)
        write_atomic(self.run / "index.html", render_run(summary, tests))
        write_atomic(self.run.parent / "LATEST", self.run.name + "\n")
        pointer = self.config.getoption("--gemma4-run-dir-file")
        if pointer:
            write_atomic(Path(pointer), str(self.run) + "\n")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"gemma4-support reports: {self.run}")


def _default_model_dir() -> Path | None:
    try:
        from fixtures.factory import fixture_dir

        return fixture_dir("moe")
    except Exception:
        return None


def _counts(tests: list[dict]) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for t in tests:
        counts[t["outcome"]] += 1
    return counts


def _status(tests: list[dict]) -> str:
    if not tests:
        return "not_run"
    outcomes = {t["outcome"] for t in tests}
    if outcomes & {"failed", "error"}:
        return "failed"
    return "skipped" if outcomes == {"skipped"} else "passed"
