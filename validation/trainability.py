"""The length-trainability loop: vLLM rollouts (GRPO groups) -> RL sequences from vLLM's ids -> packed rows -> a
GRPO-clip policy-gradient step on the Megatron model's LoRA (Adam) -> the policy published to vLLM under
`<base>@<step>` (native LoRA or merged weights: `validation.publish`) -> the next rollouts come from it. After each
publish the loop measures how far the served policy is from the trainer's on a fixed probe (the first rollout).

The task (as in the reference workflow): the model is asked for one plain sentence about a topic, followed by
shuffled filler notes; it is never told the target. reward = -|generated - target| / max(1, target), generated =
completion tokens before the end of turn; error = mean |generated - target| per step.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fixtures.warmup import filler_prompt
from gemma4_support.lora import LoraConfig, attach_lora
from gemma4_support.loss import group_advantages, policy_loss
from gemma4_support.logprobs import score_row
from gemma4_support.model.build import load_model
from gemma4_support.rl.trajectory import read_choice
from gemma4_support.runtime import get_runtime
from gemma4_support.serving.client import VLLMClient
from gemma4_support.serving.wire import prompt_logprobs
from validation import mismatch as M
from validation.publish import LoraPublisher, MergedPublisher, Publication

BASE_NAME = "gemma4-length"
_LEAKS = re.compile(r"\d|token|length|long|short|word|count|brief|concise|limit", re.I)


def guard(messages: list[dict]) -> list[dict]:
    """The prompt, refused (ValueError naming the leak) when it tells the model anything about the objective."""
    for m in messages:
        hit = _LEAKS.search(str(m.get("content", "")))
        if hit:
            raise ValueError(f"prompt leaks the length objective ({hit.group(0)!r} in a {m['role']} message): "
                             "the model must never be told the target")
    return messages


def generated_tokens(token_ids: tuple[int, ...], stop_ids: set[int]) -> int:
    """Completion tokens before the end of turn (a final stop token is not counted)."""
    return len(token_ids) - (1 if token_ids and token_ids[-1] in stop_ids else 0)


def reward(generated: int, target: int) -> float:
    """-|generated - target| / max(1, target), unclamped."""
    return -abs(generated - target) / max(1, target)


@dataclass
class LoopConfig:
    """One run of the loop: the task, the sampling, the optimiser, and the deliberate breaks (sensitivity)."""

    target: int = 8
    max_steps: int = 20
    success_error: float = 1.5
    prompts_per_step: int = 2
    group: int = 4
    max_tokens: int = 40
    temperature: float = 1.0
    lr: float = 2e-2
    rank: int = 8
    alpha: float = 16.0
    loss: str = "grpo"
    seed: int = 0
    advantage_sign: float = 1.0  # -1: the advantage sign flipped (sensitivity)
    reload: bool = True  # False: the adapter is never reloaded into vLLM (sensitivity)
    stop_when: Callable[[list], bool] | None = None  # a sensitivity run may stop once its failure is final
    dtype: str = "float32"  # the trainer's weights (LoRA tensors stay fp32)


@dataclass
class StepRecord:
    """What one step measured."""

    step: int
    served_model: str
    mean_error: float
    reward_mean: float
    reward_std: float
    loss: float
    ratio_mean: float
    served_gap: float  # after this step's publish: max |Δ log-prob| of the served policy vs the trainer's (probe)
    publish_mode: str
    truncated: int
    completions: int
    lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    publish_seconds: float = 0.0
    rejected_reload_max_abs: float | None = None


class LengthLoop:
    """The RL loop on one publisher (a vLLM server and how the policy reaches it) and one Megatron model with LoRA."""

    def __init__(self, publisher: LoraPublisher | MergedPublisher, model_dir: Path, root: Path, config: LoopConfig,
                 stop_ids: set[int], model_hook: Callable[[torch.nn.Module], None] | None = None) -> None:
        self.publisher, self.cfg, self.root, self.stop_ids = publisher, config, root, stop_ids
        torch.manual_seed(config.seed)
        on_gpu = torch.cuda.is_available()
        self.model = load_model(model_dir, dtype=getattr(torch, config.dtype), device="cuda" if on_gpu else "cpu",
                                attention="auto" if on_gpu else "dense")
        if model_hook is not None:
            model_hook(self.model)
        self.adapters = attach_lora(self.model, LoraConfig(rank=config.rank, alpha=config.alpha, init="zero",
                                                           seed=config.seed))
        self.opt = torch.optim.Adam(self.adapters.parameters(), lr=config.lr)
        self.rng = np.random.default_rng(config.seed)
        self.records: list[StepRecord] = []
        self.served = ""
        self.probe: list[int] | None = None  # prompt + completion ids of the first rollout
        self.probe_start = 0
        self.first_grads: dict[str, torch.Tensor] | None = None  # the first step's LoRA gradients and parameters
        self.first_params: dict[str, torch.Tensor] | None = None
        self.first_batch: list | None = None

    def publish(self, step: int) -> Publication | None:
        """Publish the adapter as `<base>@<step>` (unless the run never reloads: then the old id stays)."""
        if step > 0 and not self.cfg.reload:
            return None
        pub = self.publisher.publish(self.adapters, step, self.served_gap)
        self.served = pub.name
        return pub

    def served_gap(self, client: VLLMClient | None = None) -> float:
        """Max |Δ log-prob| over the probe's completion tokens: the policy `client` reaches (default: the
        publisher's) against the trainer's."""
        client = client or self.publisher.client()
        probe = self.probe
        resp = client.complete(probe, max_tokens=1, temperature=0.0, logprobs=None, extra_body={"prompt_logprobs": 0})
        served = torch.tensor([x[0] for x in prompt_logprobs(resp.choices[0], probe, 0, "probe")[self.probe_start:]],
                              dtype=torch.float64)
        device = next(self.model.parameters()).device
        ids = torch.tensor([probe], device=device)
        with torch.no_grad():
            logits = self.model(ids, torch.arange(len(probe), device=device)[None], torch.zeros_like(ids))[0].float()
        lp = torch.log_softmax(logits[self.probe_start - 1:-1], -1).gather(-1, ids[0, self.probe_start:, None])[:, 0]
        return float((lp.double().cpu() - served).abs().max())

    def rollouts(self) -> list[M.Sample]:
        """GRPO groups from the served adapter."""
        out = []
        for _ in range(self.cfg.prompts_per_step):
            messages = guard(filler_prompt(self.rng))
            resp = self.publisher.client().chat(messages, n=self.cfg.group, max_tokens=self.cfg.max_tokens,
                                    temperature=self.cfg.temperature, seed=int(self.rng.integers(1 << 30)))
            for j, raw in enumerate(resp.choices):
                choice = read_choice(raw, f"rollout choice {j}")
                out.append(M.Sample(choice, messages, torch.zeros(0, 0), torch.zeros(0, 0)))
        return out

    def train(self, samples: list[M.Sample], advantages: torch.Tensor) -> tuple[float, float]:
        """One policy-gradient step on the LoRA: returns (loss, mean importance ratio vs vLLM)."""
        rows, where = M.packed(samples, get_runtime().packing_capacity, self.model.spec.vocab_size)
        self.opt.zero_grad()
        scored = [score_row(self.model, row) for row in rows]  # host rows: planned there, queued to the model's device
        lp = torch.cat([M.at_places(scored, places) for places in where])
        old = torch.cat([torch.tensor(s.choice.logprobs, dtype=torch.float64) for s in samples]).to(lp.device)
        adv = torch.cat([torch.full((len(p),), float(a)) for p, a in zip(where, advantages)]).to(lp.device)
        loss, ratio = policy_loss(lp, old, adv, torch.ones_like(adv, dtype=torch.bool), kind=self.cfg.loss)
        loss.backward()
        if self.first_grads is None:
            self.first_grads = {n: g.detach().clone() for n, g in self.adapters.module_tensors(grads=True).items()}
            self.first_params = {n: p.detach().clone() for n, p in self.adapters.module_tensors().items()}
            self.first_batch = [(s, float(a)) for s, a in zip(samples, advantages)]
        self.opt.step()
        return float(loss.detach()), float(ratio.mean())

    def step(self, k: int) -> StepRecord:
        """One RL step: rollouts, an update on their length rewards, publish as step `k + 1`; what it measured."""
        start = time.perf_counter()
        served = self.served
        samples = self.rollouts()
        if self.probe is None:
            first = samples[0].choice
            self.probe, self.probe_start = list(first.prompt_token_ids) + list(first.token_ids), len(first.prompt_token_ids)
        lengths = [generated_tokens(s.choice.token_ids, self.stop_ids) for s in samples]
        rewards = torch.tensor([reward(n, self.cfg.target) for n in lengths])
        groups = torch.arange(len(samples)) // self.cfg.group
        adv = self.cfg.advantage_sign * group_advantages(rewards, groups)
        loss, ratio = self.train(samples, adv)
        truncated = sum(1 for s in samples if s.choice.finish_reason == "length")
        pub = self.publish(k + 1)
        rec = StepRecord(k, served, float(np.mean([abs(n - self.cfg.target) for n in lengths])), float(rewards.mean()),
                         float(rewards.std(unbiased=False)), loss, ratio, self.served_gap(), self.publisher.mode,
                         truncated, len(samples), lengths)
        if pub is not None:
            rec.publish_seconds, rec.rejected_reload_max_abs = pub.seconds, pub.rejected_reload_max_abs
        rec.seconds = round(time.perf_counter() - start, 2)
        return rec

    def run(self, log: Callable[[str], None] = print) -> list[StepRecord]:
        """Steps until a step's error reaches the success threshold or max_steps; a progress line per step."""
        self.publish(0)
        for k in range(self.cfg.max_steps):
            rec = self.step(k)
            self.records.append(rec)
            log(f"trainability step {rec.step:2d}: error {rec.mean_error:5.2f}  reward {rec.reward_mean:+.3f} "
                f"± {rec.reward_std:.3f}  loss {rec.loss:+.4f}  ratio {rec.ratio_mean:.4f}  "
                f"rolled out by {rec.served_model}, then served {self.served} ({rec.publish_mode}, gap "
                f"{rec.served_gap:.1e})  {rec.seconds:.1f} s")
            if rec.mean_error <= self.cfg.success_error:
                break
            if self.cfg.stop_when is not None and self.cfg.stop_when(self.records):
                break
        return self.records

    def metrics(self, progress_step: int) -> dict[str, float]:
        """The stage's numbers over the run (progress: the error at `progress_step` over step 0's)."""
        errors = [r.mean_error for r in self.records]
        best = int(np.argmin(errors))
        return {"step0_error": errors[0], "best_error": errors[best], "best_step": float(self.records[best].step),
                "steps_run": float(len(self.records)),
                "untruncated_completions": float(sum(r.completions - r.truncated for r in self.records)),
                "steps_with_reward_variance": float(sum(r.reward_std > 0 for r in self.records)),
                "served_is_last_step": float(self.served == f"{BASE_NAME}@{len(self.records)}"),
                "first_step_ratio_mean": self.records[0].ratio_mean,
                "served_gap_max": max(r.served_gap for r in self.records),
                "served_listed": float(self.publisher.serves(self.served)),
                "progress_ratio": (errors[min(progress_step, len(errors) - 1)] / errors[0]) if errors[0] else 0.0}

    def close(self) -> None:
        """Release what the publisher holds (the last adapter; a server it started)."""
        self.publisher.close()

    def history(self) -> list[dict]:
        """Every step's record, JSON-ready."""
        return [asdict(r) for r in self.records]


def hf_lora_grads(model_dir: Path, loop: LengthLoop, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The first step's LoRA gradients as HF transformers implies them: the same policy loss on the same samples
    (unpacked, one sequence at a time) through HF's model in `dtype` with the step-0 weights (the adapter starts at
    B = 0, so they are the checkpoint's), each adapted weight's gradient G mapped to dB = s·G·Aᵀ and dA = s·Bᵀ·G
    with the step-0 A and B."""
    from validation.parity import load_hf_reference

    hf = load_hf_reference(str(model_dir), dtype=dtype)
    hf.zero_grad()
    lps, olds, advs = [], [], []
    for s, a in loop.first_batch:
        ids = list(s.choice.prompt_token_ids) + list(s.choice.token_ids)
        logits = hf(input_ids=torch.tensor([ids])).logits[0].float()
        p = len(s.choice.prompt_token_ids)
        lp = torch.log_softmax(logits[p - 1:-1], -1).gather(-1, torch.tensor(ids[p:])[:, None])[:, 0]
        lps.append(lp)
        olds.append(torch.tensor(s.choice.logprobs, dtype=torch.float64))
        advs.append(torch.full((len(lp),), a))
    adv = torch.cat(advs)
    loss, _ = policy_loss(torch.cat(lps), torch.cat(olds), adv, torch.ones_like(adv, dtype=torch.bool),
                          kind=loop.cfg.loss)
    loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    ad = loop.adapters
    out = {}
    for name in ad.trained_names():
        mod = ad.modules_by_name[name]
        g = mod.weight_view(grads[mod.hf_tensor])
        key = name.replace(".", "/")
        a, b = (loop.first_params[f"lora_{x}.{key}"].double() for x in "AB")
        out[f"lora_A.{key}"] = ad.config.scaling * (b.t() @ g.double())
        out[f"lora_B.{key}"] = ad.config.scaling * (g.double() @ a.t())
    return out
