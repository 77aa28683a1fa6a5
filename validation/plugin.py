"""pytest plugin of the suite: its hooks, stage markers, the `stage_report` fixture, and the run's reports.

The hooks stay here (pytest finds them in this module); what they use lives in one module a job:
validation.options (the options and their re-execution), validation.signals (SIGTERM as an interrupt, signals held
while the reports are written) and validation.collector (`_RunCollector`, the run's reports).

Tests hand measured metrics to `stage_report`; records travel to the controlling process on the test
report (`user_properties`, so they survive pytest-xdist), and at the end of the session the controller
writes one JSON per stage, a summary and an HTML page into a fresh run folder under `--report-dir`.

A run's verdict is its real outcome: SIGTERM interrupts the controller and every xdist worker as SIGINT does
(KeyboardInterrupt, so fixtures tear down and vLLM servers stop), a test that did not run to its end is
`interrupted`, never passed, and a run that was interrupted, stopped early or hit a collection or internal error
leaves its folder marked INCOMPLETE with every affected stage `interrupted` / `error`; `LATEST` moves only to a
complete run. Signals that arrive while the reports are written are held until they are written (as interrupted).
With `--gemma4-stage-run DIR` (gemma4-validate's workflow: one session per stage) the session writes its stages' JSONs
into that run folder (with what the workflow's summary needs, and each failing test's transient start-up failure, if
it was one) and leaves the summary, page, INCOMPLETE marker and LATEST to the workflow.

`SUITE_OPTION_VALUES` (entry point `pytest11: gemma4-suite-options`; defined in validation.options, re-exported here)
lets the suite's path options take their value as a separate argument outside the repository. PYTEST_DONT_REWRITE:
that entry point imports this module before conftest.py names it as a plugin, too late for pytest to rewrite its
asserts (it has none), which it would warn about.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gemma4_support.errors import Gemma4Error
from gemma4_support.reports.files import jsonable, new_run_dir
from gemma4_support.runtime import RuntimeConfig, set_runtime
from validation.collector import _RECORD_KEY, REPO, _RunCollector  # noqa: F401 (REPO: re-exported for workflow.py)
# re-exported: the pytest11 entry point names validation.plugin:SUITE_OPTION_VALUES; tests import the other two
from validation.options import OPTIONS, SUITE_OPTION_VALUES, add_options, join_option_values  # noqa: F401
from validation.signals import _install_interrupts, _is_worker, _restore_interrupts
from validation.stages import EXTRA_MARKERS, STAGES, transient_start_failure

if TYPE_CHECKING:
    from xdist.workermanage import WorkerController

    from gemma4_support.metrics import Gate, GateResult

_RUN_DIR = pytest.StashKey[Path]()
# Warnings raised by dependencies, by design, that no test of ours should see as failures.
WARNING_FILTERS = (
    "ignore:Transformer Engine and Apex are not installed:UserWarning",  # megatron-core on CPU, by design
    "ignore:Warning. tp_group is None:DeprecationWarning",  # megatron-core 0.16 linears at world size 1
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",  # raised inside torch 2.13 itself
    "ignore:The following imports from `dynamic_context.py`:DeprecationWarning",  # megatron-core 0.16 import
)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the suite's command-line options."""
    add_options(parser)


# ---------------------------------------------------------------------------------------------------
# configuration


def pytest_configure(config: pytest.Config) -> None:
    """Register the stage markers and warning filters; set up the run folder, its report collector and interrupts."""
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
        _share_cores(int(config.workerinput.get("workercount", 1)))
    elif not (config.option.collectonly or config.option.help):
        stage_run = config.getoption("--gemma4-stage-run")
        base = Path(config.invocation_params.dir) / (config.getoption("--report-dir") or "reports")
        if stage_run and not Path(stage_run).is_dir():
            raise pytest.UsageError(f"--gemma4-stage-run: {stage_run} is not a run folder — fix: pass the folder "
                                    "gemma4-validate made for this run")
        try:
            run = Path(stage_run).absolute() if stage_run else new_run_dir(base)
        except Gemma4Error as exc:
            raise pytest.UsageError(f"--report-dir: {exc}") from None
        config.stash[_RUN_DIR] = run
        config.pluginmanager.register(_RunCollector(config, run, stage_only=bool(stage_run)), "gemma4-run-collector")
    _install_interrupts(config)


def _share_cores(workers: int) -> None:
    """Each xdist worker's torch takes its share of the cores: two workers each spinning two intra-op threads on two
    cores slowed a fixture's CPU training 6x (244 s against 40 s alone)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores // max(workers, 1))))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Put back the SIGINT / SIGTERM handlers the run replaced."""
    _restore_interrupts(config)



@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing report whose exception is a transient start-up failure says so (`gemma4_transient`, which travels
    with the report through pytest-xdist): gemma4-validate's workflow retries such a stage."""
    report = yield
    if report.failed and call.excinfo is not None:
        reason = transient_start_failure(call.excinfo.value, call.when)
        if reason:
            report.gemma4_transient = reason
    return report


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: WorkerController) -> None:  # pytest-xdist: hand the run folder to each worker
    """Hand this run's report folder to an xdist worker."""
    node.workerinput["gemma4_run_dir"] = str(node.config.stash[_RUN_DIR])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the tests for xdist (groups kept, longest modules first); skip gpu-marked tests without CUDA."""
    _restore_xdist_groups(config, items)
    _longest_first(items)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); this machine has no GPU — run it on a GPU runner")
    for item in gpu_items:
        item.add_marker(skip)


def _restore_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make `--dist loadgroup` group again: pytest-xdist 3.8 marks a test's group by rewriting `item._nodeid`, which
    pytest 9 no longer reads (the node id lives in `item._id`), so every `xdist_group` was scattered over the workers,
    each worker starting its own vLLM servers and CP launches for the same module (measured: the trainability and
    mismatch modules' servers twice, ~200 s of a 17-minute run)."""
    if not _is_worker(config) or not getattr(config.option, "loadgroup", False):  # xdist sets it on its workers
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(groups)}")


def _longest_first(items: list[pytest.Item]) -> None:
    """Modules ordered by their longest test's `expected_seconds` (longest first; unmarked modules after, as collected),
    each module's tests kept together and in order: pytest-xdist hands out work (whole groups under loadgroup) in this
    order, so the long groups start at once instead of one being left to run alone at the end (measured: a 283 s test
    started last made a 2-worker run 17.8 minutes)."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    weight: dict[str, float] = {}
    for item in items:
        marker = item.get_closest_marker("expected_seconds")
        weight[module(item)] = max(weight.get(module(item), 0.0), float(marker.args[0]) if marker else 0.0)
    first_seen = {name: i for i, name in enumerate(dict.fromkeys(module(item) for item in items))}
    items.sort(key=lambda item: (-weight[module(item)], first_seen[module(item)]))


# ---------------------------------------------------------------------------------------------------
# what tests measured


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
        from gemma4_support.metrics import evaluate

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
        from gemma4_support.metrics import evaluate

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
