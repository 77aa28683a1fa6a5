"""Stage throughput's measurements: our Megatron trainer and HF transformers on the same random weights and the
same tokens, on one device: tok/s, FLOPs per token, MFU against a matmul ceiling measured in the same run, peak
memory, and (CUDA only) the top kernels of one profiled train step. Everything returns plain dicts.

Workload: one packed row of `tokens` tokens holding two documents of tokens/2 on our side (positions restart,
document ids keep them apart), the same tokens as a [2, tokens/2] batch on HF's side; both compute the same loss,
the mean cross entropy of the next token within each document. The weights are drawn once in HF's names (every
2-D+ weight ~ N(0, 0.02²), 1-D weights and `layer_scalar` 1), kept on the host and loaded into one model at a time,
so each peak (max_memory_allocated, weights included) is that model's alone. Measurements (warm-up, then the
median of `reps`, CUDA synchronised around each):

  train          ours, every parameter trainable: forward, chunked log-probs (`score_row`), backward
  score          ours under no_grad: `score_row`, the log-probs of the given tokens (the mismatch stage's scorer)
  lora_train     ours with LoRA (rank 16 on every projection and expert) attached, base frozen: the same step
  score_lora     `score_row` with that adapter attached (the mismatch stage's exact path)
  hf_train_<x>   HF Gemma4ForCausalLM, sdpa attention, experts implementation x: forward with labels (its own
                 loss), backward; an implementation that transformers refuses is skipped; `hf_train` = the fastest
  hf_forward     HF's no_grad forward (logits) with the fastest implementation

Then, both models resident, `paired_rounds` rounds of ours and HF's steps called in turn (train, score, and again
with the LoRA attached): the median per-round ratios are immune to a drift in the machine's speed.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch

from gemma4_support.config.families import truncate_config
from gemma4_support.config.spec import ModelSpec, load_spec
from gemma4_support.convert.checkpoint import load_hf_weights
from gemma4_support.logprobs import score_row
from gemma4_support.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig, attach_lora, detach_lora, lora_modules
from gemma4_support.model.build import build_model
from gemma4_support.model.mlp import set_expert_path
from gemma4_support.packing import PackedRow, pack

GiB = 2 ** 30
HF_EXPERTS = ("grouped_mm", "batched_mm", "eager")  # transformers' experts implementations tried on HF's side
OURS = ("train", "score", "lora_train", "score_lora")
CORE = (*OURS, "hf_train", "hf_forward")  # the measurements every run must produce
# The 26B-A4B cut shrunk for CPU smoke runs (scripts/gpu/*.py --small).
SMALL_WIDTHS = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_global_key_value_heads": 1,
                "head_dim": 64, "global_head_dim": 128, "intermediate_size": 96, "num_experts": 16, "top_k_experts": 4,
                "moe_intermediate_size": 32, "vocab_size": 4096, "sliding_window": 64}


# ---- models on one set of weights ---------------------------------------------------------------------------------
def cut_config(layers: int = 6, *, small: bool = False, vocab: int | None = None, window: int | None = None) -> dict:
    """The 26B-A4B text config cut to `layers` (real vocabulary unless `vocab`; `small`: SMALL_WIDTHS for CPU runs)."""
    from fixtures.configs import real_config

    cfg = truncate_config(real_config("26B-A4B"), layers)
    cfg.update(SMALL_WIDTHS if small else {})
    cfg.update({k: v for k, v in (("vocab_size", vocab), ("sliding_window", window)) if v is not None})
    return cfg


@torch.no_grad()
def normal_init_(model: torch.nn.Module, seed: int) -> None:
    """Weights drawn on the model's device: 2-D+ parameters ~ N(0, 0.02²), 1-D ones and `layer_scalar` buffers 1."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for _, p in model.named_parameters():
        p.normal_(0.0, 0.02, generator=gen) if p.dim() >= 2 else p.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)


def hf_model(cfg: dict, dtype: torch.dtype, device: str, state: dict | None = None,
             experts: str = "eager") -> torch.nn.Module:
    """HF Gemma4ForCausalLM (sdpa) for a text config on `device` in `dtype`, loaded from `state`, in training mode."""
    import transformers
    from transformers import Gemma4ForCausalLM

    from validation.hf_checkpoints import hf_config

    transformers.utils.logging.disable_progress_bar()
    config = hf_config(cfg)
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts
    with torch.device(device):
        model = Gemma4ForCausalLM._from_config(config, dtype=dtype)  # rotary frequencies stay fp32
    if state is not None:
        model.load_state_dict(state)
    return model.train()


def random_state(cfg: dict, dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    """One set of random weights in HF's names (`normal_init_` on `device` inside HF's model), kept on the host."""
    model = hf_model(cfg, dtype, device)
    normal_init_(model, seed)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    del model
    free(device)
    return state


def megatron_model(spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                   attention: str) -> torch.nn.Module:
    """Our model for `spec` with HF-named weights moved in through the weight table."""
    model = build_model(spec, dtype=dtype, device=device, attention=attention)
    load_hf_weights(model, state)
    return model


def megatron_from(hf: torch.nn.Module, dtype: torch.dtype, device: str, attention: str = "dense") -> torch.nn.Module:
    """Our model for an HF model's config, holding the HF model's weights."""
    return megatron_model(load_spec(hf.config.to_dict()), dict(hf.state_dict()), dtype, device, attention)


def expert_path(model: torch.nn.Module) -> str | None:
    """How our routed experts run ("grouped" / "sequential"; None without experts)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    paths = {getattr(m, "path", "sequential") for m in model.modules() if isinstance(m, SequentialMLP)}
    return ",".join(sorted(paths)) or None


def set_hf_experts(model: torch.nn.Module, impl: str) -> None:
    """Switch HF's experts implementation (raises where transformers refuses it)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl


# ---- FLOPs --------------------------------------------------------------------------------------------------------
def mean_keys(doc_tokens: int, window: int | None) -> float:
    """Keys a causal query attends to, averaged over a document's positions (sliding: at most `window`)."""
    n = doc_tokens
    w = min(window or n, n)
    return (w * (w + 1) / 2 + (n - w) * w) / n


def flop_per_token(spec: ModelSpec, doc_tokens: int) -> dict[str, float]:
    """Forward FLOPs per token by term for documents of `doc_tokens`, plus `forward` and `train` (= 3 x forward)."""
    # A multiply-add counts 2. Left out (a fraction of a percent): norms, rotary, softmax, activations, the
    # embedding lookup. Attention scores count the keys each query really sees (causal; sliding: at most W).
    H, nq = spec.hidden_size, spec.num_attention_heads
    t = dict.fromkeys(("attention_projections", "attention_scores_sliding", "attention_scores_global", "dense_mlp",
                       "experts_active", "router"), 0.0)
    for layer in spec.layers:
        d, kv = layer.head_dim, layer.num_kv_heads
        t["attention_projections"] += 2 * H * d * (2 * nq + kv * (1 if layer.k_eq_v else 2))  # q, o; k[, v]
        kind = "sliding" if layer.is_sliding else "global"
        t[f"attention_scores_{kind}"] += 4 * nq * d * mean_keys(doc_tokens, layer.window)  # QKᵀ and PV
        t["dense_mlp"] += 6 * H * spec.intermediate_size  # gate, up, down
        if layer.mlp == "moe":
            t["experts_active"] += spec.moe.top_k * 6 * H * spec.moe.expert_intermediate_size
            t["router"] += 2 * H * spec.moe.num_experts
    t["lm_head"] = 2 * H * spec.vocab_size
    forward = sum(t.values())
    return {**t, "forward": forward, "train": 3 * forward}


def lora_r16(targets: str) -> LoraConfig:
    """The benchmarks' LoRA r16 (alpha 32, PEFT's B = 0 init) on every projection and expert ("all") or on PEFT's own
    targets for HF Gemma 4 ("peft": q/k/v/o and the dense MLP, no experts)."""
    if targets == "all":
        return LoraConfig(rank=16, alpha=32)
    if targets == "peft":
        return LoraConfig(rank=16, alpha=32, target_modules=ATTENTION_TARGETS + MLP_TARGETS, experts=False)
    raise ValueError(f"unknown LoRA targets {targets!r}: use 'all' or 'peft'")


def lora_flop_per_token(spec: ModelSpec, config: LoraConfig) -> float:
    """Forward FLOPs per token of the adapters alone: 2·r·(in + out) per adapted module, top-k experts per token."""
    top_k = spec.moe.top_k if spec.moe else 0
    total = 0.0
    for mod in lora_modules(spec, config):
        if mod.alias_of is not None or (mod.expert or 0) > 0:
            continue  # an alias shares its module's pair; every expert costs what expert 0 costs
        total += 2 * config.rank * (mod.in_features + mod.out_features) * (top_k if mod.expert is not None else 1)
    return total


# ---- timing ---------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    """Wait for the device's queued work."""
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    """Release unreferenced memory (and CUDA's cached blocks)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def allocated_gib(device: str) -> float | None:
    """GiB allocated on the CUDA device now (None on CPU)."""
    return torch.cuda.memory_allocated() / GiB if device == "cuda" else None


def timed(fn: Callable[[], object], device: str, warmup: int, reps: int, freeze_gc: bool = True
          ) -> tuple[dict, object]:
    """Median / all seconds of `reps` calls after `warmup` ones, their peak GiB (CPU: None), the last call's result,
    and the median host seconds (until the call returned, before the device finished: near `seconds`, the host is
    what the step waits on). `freeze_gc`: the timed calls run with every object alive before them frozen out of
    Python's collections (as trainers manage the collector: a full pass over the models' objects stalls the host)."""
    out = None
    for _ in range(warmup):
        out = None
        out = fn()
    with frozen_gc(freeze_gc):
        return _timed_calls(fn, device, reps)


@contextlib.contextmanager
def frozen_gc(enabled: bool = True) -> Iterator[None]:
    """Collect, then exempt every live object from later collections until the block ends (`gc.freeze`)."""
    if not enabled:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _timed_calls(fn: Callable[[], object], device: str, reps: int) -> tuple[dict, object]:
    out = None
    times, host, peak = [], [], 0
    for _ in range(reps):
        out = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        host.append(time.perf_counter() - t0)
        sync(device)
        times.append(time.perf_counter() - t0)
        peak = max(peak, torch.cuda.max_memory_allocated()) if device == "cuda" else 0
    return {"seconds": statistics.median(times), "seconds_all": times, "host_seconds": statistics.median(host),
            "peak_gib": peak / GiB if device == "cuda" else None}, out


class GcPauses:
    """Python's garbage-collector passes while active: their count and summed milliseconds (host stalls that a step
    whose host barely keeps ahead of the device pays in full)."""

    def __init__(self) -> None:
        self.count, self.ms, self._t0 = 0, 0.0, 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count += 1
            self.ms += (time.perf_counter() - self._t0) * 1e3

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


_ALLOCATOR_EVENTS = {"alloc_retries": "num_alloc_retries", "device_allocs": "num_device_alloc",
                     "device_frees": "num_device_free"}


def paired(steps: dict[str, Callable[[], object]], device: str, rounds: int,
           events: dict[str, list[dict[str, float]]] | None = None, freeze_gc: bool = True) -> dict[str, list[float]]:
    """Seconds of each step, called once a round in turn for `rounds` rounds (after one untimed round): a drift in
    the machine's speed (seen: 10-25 % between processes on one H100) hits both sides of a ratio alike. `events` (if
    given) receives per timed call its host seconds, garbage-collector passes and, on CUDA, the caching allocator's
    cache flushes and device (de)allocations — what would slow one step beside another model's resident memory."""
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            before = torch.cuda.memory_stats() if device == "cuda" else {}
            with frozen_gc(freeze_gc), GcPauses() as pauses:  # the passes of the timed call, not the freeze's
                rec = timed(fn, device, warmup=0, reps=1, freeze_gc=False)[0]
            times[name].append(rec["seconds"])
            if events is not None:
                after = torch.cuda.memory_stats() if device == "cuda" else {}
                events.setdefault(name, []).append(
                    {**{k: int(after.get(key, 0) - before.get(key, 0)) for k, key in _ALLOCATOR_EVENTS.items()},
                     "gc_passes": pauses.count, "gc_ms": round(pauses.ms, 3), "host_s": round(rec["host_seconds"], 5)})
    return times


def paired_ratios(times: dict[str, list[float]], pairs: dict[str, tuple[str, str]]) -> dict[str, float]:
    """{metric: median over rounds of reference seconds / candidate seconds} for pairs {metric: (candidate, ref)}."""
    return {metric: statistics.median(r / c for c, r in zip(times[cand], times[ref]))
            for metric, (cand, ref) in pairs.items()}


def measure(fn: Callable[[], object], *, tokens: int, flops: float, ceiling: float | None, device: str,
            warmup: int, reps: int, freeze_gc: bool = True) -> dict:
    """One record: status (ok / OOM / error), timing, tok/s, FLOP/token, TFLOP/s, MFU, loss (a returned scalar)."""
    failed = None
    try:
        rec, out = timed(fn, device, warmup, reps, freeze_gc)
    except Exception as exc:  # noqa: BLE001 - recorded: one failing measurement must not lose the others
        failed = {"status": "OOM" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error",
                  "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400], "tokens": tokens}
    if failed:
        free(device)  # outside the handler: the traceback's frames (and their tensors) are gone by now
        return failed
    tok_s = tokens / rec["seconds"]
    loss = float(out) if isinstance(out, torch.Tensor) and out.numel() == 1 else None
    return {"status": "ok", **rec, "tokens": tokens, "tok_per_s": tok_s, "flop_per_token": flops,
            "achieved_tflops": tok_s * flops / 1e12, "mfu": tok_s * flops / ceiling if ceiling else None, "loss": loss}


def matmul_ceiling(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> dict:
    """The device's attainable speed: an n x n x n matmul in `dtype`, TFLOP/s of the median run."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    rec, _ = timed(lambda: a @ b, device, warmup=3, reps=reps)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": rec["seconds"],
            "tflops": 2 * n ** 3 / rec["seconds"] / 1e12}


def host_syncs(step: Callable[[], object]) -> list[str]:
    """Where one call of `step` waits on the device (torch's CUDA sync debug mode): a line per synchronising call."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
            if "called a synchronizing" in str(w.message)]  # not the mode's own "prototype feature" notice


def top_kernels(step: Callable[[], object], count: int = 15) -> list[dict]:
    """The `count` CUDA kernels with the most self time in one profiled call of `step`: name, ms, calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        if us > 0 and "CUDA" in str(getattr(e, "device_type", "CUDA")):
            rows.append({"name": e.key[:160], "ms": us / 1e3, "count": e.count})
    return sorted(rows, key=lambda r: -r["ms"])[:count]


# ---- the steps ------------------------------------------------------------------------------------------------------
def packed_documents(tokens: int, documents: int, vocab: int, seed: int) -> PackedRow:
    """A packed row of `documents` equal documents of random ids in [1, vocab), `tokens` in all."""
    if tokens % documents or tokens // documents < 2:
        raise ValueError(f"tokens={tokens} do not split into {documents} documents of >= 2 tokens")
    ids = torch.randint(1, vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    return pack([tokens // documents] * documents).with_tokens(ids)


def train_step(model: torch.nn.Module, row: PackedRow, params: list[torch.nn.Parameter], chunk_tokens: int,
               optimizer: torch.optim.Optimizer | None = None) -> Callable[[], torch.Tensor]:
    """Our step: forward, mean -log p(label) over the loss mask (chunked log-probs), backward[, optimizer]: the loss."""

    mask = row.loss_mask.to(next(model.parameters()).device, torch.float32)
    count = float(row.loss_mask.sum())

    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        lp = score_row(model, row, chunk_tokens=chunk_tokens).logprobs
        loss = -(lp * mask).sum() / count  # the mean over the loss mask, without indexing (which waits on the device)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    return step


def score_step(model: torch.nn.Module, row: PackedRow, chunk_tokens: int) -> Callable[[], torch.Tensor]:
    """Our scoring forward under no_grad (the label log-probs): their mean."""

    def step() -> torch.Tensor:
        with torch.no_grad():
            return score_row(model, row, chunk_tokens=chunk_tokens).logprobs.mean()

    return step


def hf_train_step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                  micro_batch: int | None = None) -> Callable[[], torch.Tensor]:
    """HF's step on a [B, n] batch: forward with labels (its own shifted loss), backward[, optimizer]: the loss.

    `micro_batch` rows at a time with the gradients accumulated (one optimizer step for the whole batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    parts = ids.split(micro_batch or ids.shape[0])

    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        total = torch.zeros((), device=ids.device)
        for part in parts:
            loss = model(input_ids=part, labels=part, use_cache=False).loss * (part.shape[0] / ids.shape[0])
            loss.backward()
            total += loss.detach()
        if optimizer is not None:
            optimizer.step()
        return total

    return step


def hf_forward_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """HF's no_grad forward to logits on a [B, n] batch."""

    def step() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return step


def slowed(step: Callable[[], object], seconds: float, device: str) -> Callable[[], object]:
    """`step`, then a synchronised stall of `seconds` (sensitivity: a trainer that waits on the host)."""

    def run() -> object:
        out = step()
        sync(device)
        time.sleep(seconds)
        return out

    return run


# ---- a run ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One run: HF text config (random weights), tokens per step, precision, device, our attention, repetitions."""

    config: dict
    tokens: int = 8192
    dtype: str = "bfloat16"
    device: str = "cuda"
    attention: str = "auto"
    seed: int = 0
    warmup: int = 1
    reps: int = 3
    chunk_tokens: int = 1024  # positions per log-prob chunk under gradients (the train steps)
    score_chunk_tokens: int = 1024  # the scoring forward (no_grad: one chunk's logits live; 4096 measured equal on the H100)
    lora_rank: int = 16
    hf_experts: tuple[str, ...] = HF_EXPERTS
    ceiling_n: int = 8192  # the matmul ceiling's size (bf16 on CUDA, the model's dtype on CPU)
    profile: bool = True  # CUDA only: the top kernels of one train step
    expert_path: str = "grouped"  # our routed experts: grouped GEMMs or one MLP per expert (gemma4_support.model.mlp)
    hf: bool = True  # False: our measurements only (comparing our own variants in one run)
    paired_rounds: int = 5  # then both models resident, ours and HF's steps in turn: ratios immune to speed drift
    freeze_gc: bool = True  # timed calls with the objects alive before them frozen out of Python's GC (both sides)


def cpu_workload(**changes: object) -> Workload:
    """The CPU smoke run: the tiny MoE fixture's config, 128 tokens (two documents of 8 windows), fp32, dense."""
    from fixtures.factory import fixture_config

    base = Workload(fixture_config("moe"), tokens=128, dtype="float32", device="cpu", attention="dense",
                    chunk_tokens=64, score_chunk_tokens=64, ceiling_n=1024, profile=False)
    return replace(base, **changes)


def run(w: Workload) -> dict:
    """Every measurement of a workload (see the module docstring), FLOPs per token, the ceiling, the gate metrics."""
    import transformers

    dtype, dev = getattr(torch, w.dtype), w.device
    spec = load_spec(w.config)
    row = packed_documents(w.tokens, 2, spec.vocab_size, w.seed)  # on the host: each step plans and moves it
    ids = row.input_ids.view(2, -1).to(dev)
    ceiling = matmul_ceiling(dev, torch.bfloat16 if dev == "cuda" else dtype, w.ceiling_n)
    flops = flop_per_token(spec, w.tokens // 2)
    lora = LoraConfig(rank=w.lora_rank, alpha=2.0 * w.lora_rank, init="random", b_std=0.01)
    lora_flops = lora_flop_per_token(spec, lora)
    go = functools.partial(measure, tokens=w.tokens, ceiling=ceiling["tflops"] * 1e12, device=dev, warmup=w.warmup,
                           reps=w.reps, freeze_gc=w.freeze_gc)
    res = {"workload": {**asdict(w), "config": None}, "model": describe(spec), "documents": row.document_lengths(),
           "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "ceiling": ceiling,
           "flop_per_token": flops, "lora": {"rank": lora.rank, "alpha": lora.alpha, "experts": lora.experts,
                                             "flop_per_token": lora_flops}, "measurements": {}}
    m = res["measurements"]
    state = random_state(w.config, dtype, dev, w.seed)

    model = megatron_model(spec, state, dtype, dev, w.attention)
    set_expert_path(model, w.expert_path)
    res["ours"] = {"attention": w.attention, "expert_path": expert_path(model), "weights_gib": allocated_gib(dev)}
    train = train_step(model, row, list(model.parameters()), w.chunk_tokens)
    m["train"] = go(train, flops=flops["train"])
    if w.profile and dev == "cuda" and m["train"]["status"] == "ok":
        try:
            res["top_kernels"] = top_kernels(train)
        except Exception as exc:  # noqa: BLE001 - the profile is information, not a measurement
            res["top_kernels"] = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
    model.zero_grad(set_to_none=True)
    m["score"] = go(score_step(model, row, w.score_chunk_tokens), flops=flops["forward"])
    adapters = attach_lora(model, lora)
    # LoRA backward: activation gradients through the frozen base (1 x forward) and the adapters' own 3 x.
    m["lora_train"] = go(train_step(model, row, list(adapters.parameters()), w.chunk_tokens),
                         flops=2 * flops["forward"] + 3 * lora_flops)
    m["score_lora"] = go(score_step(model, row, w.score_chunk_tokens), flops=flops["forward"] + lora_flops)
    detach_lora(adapters)
    model.requires_grad_(True)  # attach_lora froze the base; the paired rounds train every parameter again
    model.zero_grad(set_to_none=True)
    if not (w.hf and w.paired_rounds):
        del model, train
    del adapters
    free(dev)

    if not w.hf:
        res["metrics"] = {}
        return res
    hf = hf_model(w.config, dtype, dev, state)
    del state
    res["hf"] = {"attention": "sdpa", "weights_gib": allocated_gib(dev)}
    impls = w.hf_experts if spec.moe else ("none",)
    for impl in impls:
        try:
            set_hf_experts(hf, impl) if impl != "none" else None
        except Exception as exc:  # noqa: BLE001 - an implementation transformers refuses here is skipped
            m[f"hf_train_{impl}"] = {"status": "skipped", "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        m[f"hf_train_{impl}"] = go(hf_train_step(hf, ids), flops=flops["train"])
    ran = [i for i in impls if m[f"hf_train_{i}"]["status"] == "ok"]
    best = min(ran, key=lambda i: m[f"hf_train_{i}"]["seconds"]) if ran else None
    res["hf"]["experts_implementation"] = best
    m["hf_train"] = ({**m[f"hf_train_{best}"], "experts_implementation": best} if best
                     else {"status": "error", "error": "no experts implementation ran", "tokens": w.tokens})
    if best not in (None, "none"):
        set_hf_experts(hf, best)
    hf.zero_grad(set_to_none=True)
    m["hf_forward"] = go(hf_forward_step(hf, ids), flops=flops["forward"])
    res["metrics"] = metrics(m, [f"hf_train_{i}" for i in ran])
    if w.paired_rounds and best is not None:  # both models resident: rounds of ours / HF in turn, gradients freed
        def then_free(step: Callable[[], object], module: torch.nn.Module) -> Callable[[], None]:
            return lambda: (step(), module.zero_grad(set_to_none=True))

        hf_steps = {"hf_train": then_free(hf_train_step(hf, ids), hf), "hf_forward": hf_forward_step(hf, ids)}
        steps = {"train": then_free(train, model), "score": score_step(model, row, w.score_chunk_tokens)}
        res["paired"] = paired_phase({**steps, **hf_steps}, {"trainer_train_ratio_vs_hf_paired": ("train", "hf_train"),
                                     "trainer_score_ratio_vs_hf_forward_paired": ("score", "hf_forward")}, w, res)
        adapters = attach_lora(model, lora)  # the LoRA steps in turn with HF's too (single calls drift with the host)
        lora_steps = {"lora_train": then_free(train_step(model, row, list(adapters.parameters()), w.chunk_tokens), adapters),
                      "score_lora": score_step(model, row, w.score_chunk_tokens)}
        res["paired_lora"] = paired_phase(
            {**lora_steps, **hf_steps}, {"trainer_lora_train_ratio_vs_hf_train_paired": ("lora_train", "hf_train"),
                                         "trainer_score_lora_ratio_vs_hf_forward_paired": ("score_lora", "hf_forward")},
            w, res)
        detach_lora(adapters)
        del model, train, adapters, steps, lora_steps
    del hf
    free(dev)
    return res


def paired_phase(steps: dict[str, Callable[[], object]], pairs: dict[str, tuple[str, str]], w: Workload, res: dict) -> dict:
    """`paired` rounds of `steps` as a report entry (status, seconds, per-call events); their median ratios `pairs`
    go into res["metrics"]."""
    events: dict[str, list[dict[str, float]]] = {}
    try:
        times = paired(steps, w.device, w.paired_rounds, events, w.freeze_gc)
    except torch.cuda.OutOfMemoryError as exc:
        return {"status": "OOM", "error": str(exc).splitlines()[0][:300]}
    res["metrics"].update(paired_ratios(times, pairs))
    return {"status": "ok", "rounds": w.paired_rounds, "seconds": times, "call_events": events}


def describe(spec: ModelSpec) -> dict:
    """The model's shape in a few fields (for reports)."""
    return {"layers": spec.num_layers, "full_layers": [x.index for x in spec.layers if not x.is_sliding],
            "hidden": spec.hidden_size, "vocab": spec.vocab_size, "window": spec.sliding_window,
            "experts": spec.moe.num_experts if spec.moe else None, "top_k": spec.moe.top_k if spec.moe else None}


def ratio(cand: dict, ref: dict) -> float | None:
    """Candidate tok/s over reference tok/s (None unless both ran)."""
    both = cand.get("status") == "ok" and ref.get("status") == "ok"
    return cand["tok_per_s"] / ref["tok_per_s"] if both else None


def metrics(m: dict[str, dict], hf_trains: list[str]) -> dict[str, float | None]:
    """The flat numbers gates read: per-measurement tok/s, MFU, peak; ratios to HF; loss agreement; failure counts."""
    ok = [n for n in CORE if m[n]["status"] == "ok"]
    out: dict[str, float | None] = {
        "failed_measurements": len(CORE) - len(ok),
        "min_tok_s": min((m[n]["tok_per_s"] for n in ok), default=None),
        "peak_fields_missing": sum(m[n]["peak_gib"] is None for n in ok),
        "trainer_train_ratio_vs_hf": ratio(m["train"], m["hf_train"]),
        "trainer_score_ratio_vs_hf_forward": ratio(m["score"], m["hf_forward"]),
        "trainer_lora_train_ratio_vs_hf_train": ratio(m["lora_train"], m["hf_train"]),
    }
    for n in CORE:
        out.update({f"{n}_tok_s": m[n].get("tok_per_s"), f"{n}_mfu": m[n].get("mfu"),
                    f"{n}_peak_gib": m[n].get("peak_gib")})
    ours = m["train"].get("loss")
    diffs = [abs(ours - m[n]["loss"]) / abs(m[n]["loss"]) for n in hf_trains if ours is not None]
    out["train_loss_rel_diff_vs_hf"] = max(diffs) if diffs else None
    return out
