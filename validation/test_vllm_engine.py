"""A real vLLM engine (`vllm.LLM`, in a child process) serves the MoE fixture: its chat prompt ids are the
template's render + encode, and its sampled-token log-probs equal HF transformers' (plain test, no stage).

Run as a script (``python validation/test_vllm_engine.py MODEL_DIR IN_JSON OUT_JSON``) it is the vLLM probe
the slow test starts in a subprocess (``vllm.LLM`` spawns processes, hence the ``__main__`` guard).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
    sp = SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, seed=1234, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in prompts], sp, use_tqdm=False)
    chat = llm.chat([p["messages"] for p in prompts if "messages" in p], sp, use_tqdm=False)
    rows = []
    for out in outs:
        o = out.outputs[0]
        rows.append({"ids": list(o.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]})
    result = {"rows": rows, "chat_prompt_ids": [list(c.prompt_token_ids) for c in chat],
              "engine_start_s": t1 - t0, "generate_s": time.time() - t1}
    Path(out_json).write_text(json.dumps(result))


@pytest.mark.slow
def test_vllm_serves_moe_fixture_with_hf_logprobs(moe_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    prompts = _probe_prompts()
    (tmp_path / "in.json").write_text(json.dumps(prompts))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, str(moe_dir), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    # vLLM's chat prompt ids == template render + encode (BOS from the template only)
    assert result["chat_prompt_ids"] == [prompts[0]["ids"]]

    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    worst = 0.0
    for prompt, row in zip(prompts, result["rows"]):
        assert len(row["ids"]) == 8
        ids = torch.tensor([prompt["ids"] + row["ids"]])
        with torch.no_grad():
            logp = model(ids).logits.float().log_softmax(-1)[0]
        n = len(prompt["ids"])
        hf = [logp[n - 1 + i, t].item() for i, t in enumerate(row["ids"])]
        worst = max(worst, max(abs(a - b) for a, b in zip(hf, row["logprobs"])))
    assert worst <= 1e-4, f"vLLM vs HF sampled-token logprob max abs diff {worst:.2e}"
    assert len(prompts[0]["ids"]) > 2 * 8  # longer than two sliding windows
    print(f"vLLM engine start {result['engine_start_s']:.1f}s, total {time.time() - t0:.1f}s, max|Δlogprob| {worst:.1e}")


if __name__ == "__main__":
    _vllm_probe(*sys.argv[1:4])
