"""Stage tokenization, a real vLLM engine (`vllm.LLM`, in a child process) serving the MoE fixture: its chat prompt
ids are the template's render + encode, and its sampled-token log-probs equal HF transformers' log-probs of the
same tokens in the same context (gated); HF's log-probs read one position late (an alignment bug) are caught.

Run as a script (``python validation/test_vllm_engine.py MODEL_DIR IN_JSON OUT_JSON``) it is the vLLM probe
the slow test starts in a subprocess (``vllm.LLM`` spawns processes, hence the ``__main__`` guard).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from validation import thresholds as T

REPO = Path(__file__).resolve().parent.parent
SAMPLED_TOKENS = 8  # per prompt

pytestmark = [pytest.mark.stage_tokenization, pytest.mark.xdist_group("vllm")]  # one vLLM engine at a time


@pytest.fixture(scope="module")
def moe_dir() -> Path:
    from fixtures.factory import fixture_dir

    return fixture_dir("moe")


def _probe_prompts() -> list[dict]:
    from fixtures.chat_template import CHAT_TEMPLATE
    from fixtures.tokenizer import encode
    from gemma4_support.chat.template import render

    conv = [{"role": "user", "content": "Tell me about the weather in Paris today, please. And tomorrow?"}]
    chat_ids = encode(render(conv, template=CHAT_TEMPLATE, add_generation_prompt=True))
    return [{"messages": conv, "ids": chat_ids}, {"ids": [2] + list(range(110, 150))}]


def _vllm_probe(model_dir: str, in_json: str, out_json: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(in_json).read_text())
    t0 = time.time()
    llm = LLM(model=model_dir, dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, seed=0,
              enforce_eager=True)
    t1 = time.time()
    sp = SamplingParams(max_tokens=SAMPLED_TOKENS, temperature=1.0, logprobs=0, seed=1234, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in prompts], sp, use_tqdm=False)
    chat = llm.chat([p["messages"] for p in prompts if "messages" in p], sp, use_tqdm=False)
    rows = []
    for out in outs:
        o = out.outputs[0]
        rows.append({"ids": list(o.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]})
    result = {"rows": rows, "chat_prompt_ids": [list(c.prompt_token_ids) for c in chat],
              "engine_start_s": t1 - t0, "generate_s": time.time() - t1}
    Path(out_json).write_text(json.dumps(result))


def _hf_sampled_logprobs(model, prompts: list[dict], rows: list[dict], shift: int = 0) -> list[float]:  # noqa: ANN001
    """HF transformers' log-prob of each sampled token in its context; `shift` = 1 reads one position late (broken)."""
    import torch

    out = []
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([prompt["ids"] + row["ids"]])
        with torch.no_grad():
            logp = model(ids).logits.float().log_softmax(-1)[0]
        n = len(prompt["ids"])
        out += [logp[n - 1 + i + shift, t].item() for i, t in enumerate(row["ids"])]
    return out


def _logprob_metrics(hf: list[float], vllm: list[float], prompts: int) -> dict:
    """Max / mean |Δ log-prob| between HF's and vLLM's sampled-token log-probs, with the counts compared."""
    import torch

    from gemma4_support.metrics import tensor_diff

    d = tensor_diff(torch.tensor(hf, dtype=torch.float64), torch.tensor(vllm, dtype=torch.float64))
    return {"max_abs_logprob_diff": d["max_abs"], "mean_abs_logprob_diff": d["mean_abs"],
            "sampled_tokens": len(hf), "prompts": prompts}


@pytest.mark.expected_seconds(55)
@pytest.mark.slow
def test_vllm_serves_moe_fixture_with_hf_logprobs(moe_dir, tmp_path, stage_report):
    """vLLM's chat prompt ids equal render + encode; its sampled-token log-probs equal HF's (gated), and HF's
    log-probs read one position late fail the same gate (sensitivity)."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts = _probe_prompts()
    assert len(prompts[0]["ids"]) > 2 * SAMPLED_TOKENS  # longer than two sliding windows
    (tmp_path / "in.json").write_text(json.dumps(prompts))
    # vLLM's IPC sockets and temp files go to a scratch dir removed afterwards, as VLLMServer does (vLLM leaves its
    # ZMQ sockets behind: in /tmp they accumulated, 7 a run, and showed up in the server-lifecycle test's /tmp check)
    scratch = Path(tempfile.mkdtemp(prefix="g4e-"))  # short: unix socket paths are limited to 107 bytes
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO), TMPDIR=str(scratch),
               VLLM_RPC_BASE_PATH=str(scratch))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, __file__, str(moe_dir), str(tmp_path / "in.json"),
                               str(tmp_path / "out.json")], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=240)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    # vLLM's chat prompt ids == template render + encode (BOS from the template only)
    assert result["chat_prompt_ids"] == [prompts[0]["ids"]]
    rows = result["rows"]
    assert [len(r["ids"]) for r in rows] == [SAMPLED_TOKENS] * len(prompts)
    vllm = [lp for r in rows for lp in r["logprobs"]]
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    hf = _hf_sampled_logprobs(model, prompts, rows)
    stage_report.check("vllm_vs_hf_sampled_logprobs", _logprob_metrics(hf, vllm, len(prompts)),
                       T.VLLM_VS_HF_SAMPLED_LOGPROBS_FP32, dtype="float32", engine_start_s=result["engine_start_s"],
                       generate_s=result["generate_s"], total_s=time.time() - t0)
    late = _hf_sampled_logprobs(model, prompts, rows, shift=1)
    stage_report.expect_caught("vllm_vs_hf_logprobs_one_position_late", _logprob_metrics(late, vllm, len(prompts)),
                               T.VLLM_VS_HF_SAMPLED_LOGPROBS_FP32,
                               broken="HF log-prob of sampled token i read at position n + i instead of n - 1 + i")


if __name__ == "__main__":
    _vllm_probe(*sys.argv[1:4])
