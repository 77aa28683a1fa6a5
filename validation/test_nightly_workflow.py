"""The nightly CI recipe (.github/workflows/nightly.yml) parses as YAML and does what the README says: scheduled and
manually dispatched, a CPU job running the README's two commands, a self-hosted GPU job validating a checkpoint against
a vLLM server with commands gemma4-validate accepts, and the reports uploaded as artifacts."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from gemma4_support.errors import Gemma4Error
from validation.cli import _selected_stages, build_parser
from validation.stages import STAGE_NAMES

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "nightly.yml"


def load() -> dict:
    """The workflow as PyYAML reads it (`on:` is YAML 1.1's boolean True; GitHub reads it as the key 'on')."""
    doc = yaml.safe_load(WORKFLOW.read_text())
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def readme_commands() -> list[str]:
    """The command lines of the README's "The two commands" block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## The two commands\s+```bash\n(.*?)```", text, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _runs(job: dict) -> list[str]:
    return [s["run"] for s in job.get("steps", []) if "run" in s]


def _uploads(job: dict) -> list[dict]:
    return [s for s in job.get("steps", []) if str(s.get("uses", "")).startswith("actions/upload-artifact@")]


def gemma4_argv(script: str, env: dict[str, str]) -> list[list[str]]:
    """The argument lists of every gemma4-validate invocation in a step's script, $VARS expanded from `env`."""
    out = []
    for line in script.splitlines():
        line = re.sub(r"\$\{\{[^}]*\}\}", "EXPR", line)  # GitHub expressions: a placeholder value
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
        words = shlex.split(line)
        for i, word in enumerate(words):
            if word.endswith("gemma4-validate"):
                rest = words[i + 1:]
                out.append(rest[:rest.index("&&")] if "&&" in rest else rest)
    return out


def job_env(job: dict) -> dict[str, str]:
    """A job's env with each GitHub expression replaced by its last quoted default ('…' || 'default')."""
    return {k: (re.findall(r"'([^']*)'", str(v)) or [str(v)])[-1] for k, v in (job.get("env") or {}).items()}


def problems(doc: dict) -> list[str]:
    """What the recipe lacks (empty when it is complete)."""
    found = []
    on = doc.get("on") or {}
    if not (on.get("schedule") and all("cron" in c for c in on["schedule"])):
        found.append("no nightly schedule")
    if "workflow_dispatch" not in on:
        found.append("no manual dispatch")
    jobs = doc.get("jobs") or {}
    cpu, gpu = jobs.get("cpu") or {}, jobs.get("gpu") or {}
    if "ubuntu" not in str(cpu.get("runs-on")):
        found.append("cpu job not on a hosted Linux runner")
    for command in readme_commands():
        if command not in _runs(cpu):
            found.append(f"cpu job lacks the README command {command!r}")
    labels = gpu.get("runs-on") or []
    if not (isinstance(labels, list) and "self-hosted" in labels and "gpu" in labels):
        found.append("gpu job not on a self-hosted gpu runner")
    runs = [argv for script in _runs(gpu) for argv in gemma4_argv(script, job_env(gpu))]
    validate = [a for a in runs if a and a[0] == "run"]
    if len(validate) != 1:
        found.append("gpu job does not run gemma4-validate run once")
    else:
        args = build_parser().parse_args(validate[0])
        try:
            stages = _selected_stages(args) if args.stages else []
        except Gemma4Error as exc:
            found.append(f"gpu job's stage list is refused: {exc}")
            stages = list(STAGE_NAMES)
        pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
        if not args.model:
            found.append("gpu job passes no --model")
        if not stages or not set(stages) <= set(STAGE_NAMES):
            found.append("gpu job names no stage list")
        if not any(a.startswith("--vllm-url") for a in pytest_args):
            found.append("gpu job passes no --vllm-url")
    for argv in (a for a in runs if a and a[0] == "compare"):
        build_parser().parse_args(argv)  # the comparison step's command is one gemma4-validate accepts
    for name, job in (("cpu", cpu), ("gpu", gpu)):
        uploads = _uploads(job)
        if not uploads or not all(u.get("with", {}).get("path") for u in uploads):
            found.append(f"{name} job uploads no reports")
        elif not all("always()" in str(u.get("if")) or "!cancelled()" in str(u.get("if")) for u in uploads):
            found.append(f"{name} job uploads reports only when everything passed")
    return found


def test_the_nightly_workflow_parses_and_has_both_jobs():
    doc = load()
    assert set(doc["jobs"]) == {"cpu", "gpu"} and doc["on"]["schedule"][0]["cron"].count(" ") == 4
    assert readme_commands() == ["bash scripts/setup.sh && .venv/bin/gemma4-validate --allow-not-run",
                                 ".venv/bin/pytest -n 2"]
    assert problems(doc) == []


def _without_step(doc: dict, job: str, needle: str) -> dict:
    doc = copy.deepcopy(doc)
    doc["jobs"][job]["steps"] = [s for s in doc["jobs"][job]["steps"] if needle not in str(s)]
    return doc


@pytest.mark.parametrize("change, problem", [
    (lambda d: d["on"].pop("schedule"), "no nightly schedule"),
    (lambda d: d["on"].pop("workflow_dispatch"), "no manual dispatch"),
    (lambda d: d["jobs"]["gpu"].update({"runs-on": "ubuntu-latest"}), "gpu job not on a self-hosted gpu runner"),
    (lambda d: d["jobs"]["cpu"]["steps"].pop(3), "cpu job lacks the README command '.venv/bin/pytest -n 2'"),
    (lambda d: d.update(_without_step(d, "gpu", "upload-artifact")), "gpu job uploads no reports"),
    (lambda d: _uploads(d["jobs"]["cpu"])[0].pop("if"), "cpu job uploads reports only when everything passed"),
    (lambda d: d["jobs"]["gpu"]["steps"][2].update(
        {"run": d["jobs"]["gpu"]["steps"][2]["run"].replace('--vllm-url="$GEMMA4_VLLM_URL"', "")}),
     "gpu job passes no --vllm-url"),
    (lambda d: d["jobs"]["gpu"]["steps"][2].update(
        {"run": d["jobs"]["gpu"]["steps"][2]["run"].replace('--model "$GEMMA4_MODEL"', "")}), "gpu job passes no --model"),
])
def test_each_check_can_fail(change, problem):
    doc = copy.deepcopy(load())
    change(doc)
    assert problem in problems(doc)


def test_the_gpu_jobs_default_stage_list_is_every_stage_and_a_bad_one_is_caught():
    doc = load()
    assert job_env(doc["jobs"]["gpu"])["GEMMA4_STAGES"] == ",".join(STAGE_NAMES)
    doc["jobs"]["gpu"]["env"]["GEMMA4_STAGES"] = "${{ inputs.stages || 'discovery,hf_parity,nope' }}"
    assert any(p.startswith("gpu job's stage list is refused: unknown stage(s) ['nope']") for p in problems(doc))
