"""The one comparison module: numeric metrics between a reference and a candidate, and gate verdicts.

Every stage measures with these functions and judges with `evaluate`; nothing else computes a metric.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


@dataclass(frozen=True)
class Gate:
    """A threshold on one metric: passes when `metric op threshold` holds (NaN never passes)."""

    metric: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"gate op {self.op!r} is not one of {sorted(_OPS)}")


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict on a measured value."""

    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool

    def describe(self) -> str:
        """One line: metric value op threshold and the verdict."""
        verdict = "ok" if self.passed else "FAIL"
        return f"{self.metric}={self.value!r} {self.op} {self.threshold!r}: {verdict}"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def evaluate(metrics: Mapping[str, float], gates: Sequence[Gate]) -> list[GateResult]:
    """Judge measured metrics against gates; a metric missing from `metrics` fails its gate."""
    results = []
    for gate in gates:
        value = metrics.get(gate.metric)
        ok = value is not None and not _isnan(value) and bool(_OPS[gate.op](value, gate.threshold))
        results.append(GateResult(gate.metric, gate.op, gate.threshold, None if value is None else float(value), ok))
    return results


def _isnan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def tensor_diff(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """max/mean abs difference, max abs relative to max |reference|, mean-abs-% (of mean |reference|) and relative
    L2 between two tensors."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}")
    ref = reference.detach().to(torch.float64)
    diff = (candidate.detach().to(torch.float64) - ref).abs()
    ref_abs_mean = ref.abs().mean().item()
    ref_abs_max = ref.abs().max().item() if ref.numel() else 0.0
    ref_norm = ref.norm().item()
    max_abs = diff.max().item() if diff.numel() else 0.0
    return {
        "max_abs": max_abs,
        "max_abs_rel": max_abs / ref_abs_max if ref_abs_max > 0 else _zero_or_inf(max_abs > 0),
        "mean_abs": diff.mean().item() if diff.numel() else 0.0,
        "mean_abs_pct": 100.0 * diff.mean().item() / ref_abs_mean if ref_abs_mean > 0 else _zero_or_inf(diff.sum() > 0),
        "rel_l2": diff.norm().item() / ref_norm if ref_norm > 0 else _zero_or_inf(diff.sum() > 0),
    }


def max_ulps(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """The largest difference in units in the last place of the reference's dtype at each reference value."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}")
    info = torch.finfo(reference.dtype)
    ref = reference.detach().to(torch.float64)
    _, exponent = torch.frexp(ref)  # |ref| in [2^(e-1), 2^e): one unit there is 2^(e-1) * eps
    ulp = torch.ldexp(torch.full_like(ref, info.eps), exponent - 1)
    ulp = torch.where(ref == 0, 0.0, ulp).clamp(min=info.tiny * info.eps)  # zero and subnormals: the subnormal spacing
    diff = (candidate.detach().to(torch.float64) - ref).abs() / ulp
    return diff.max().item() if diff.numel() else 0.0


def _zero_or_inf(differs: object) -> float:
    """A relative error against an all-zero reference: 0 when the candidate is zero too, else infinite."""
    return math.inf if bool(differs) else 0.0


def logprob_metrics(
    reference_logits: torch.Tensor,
    candidate_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, float]:
    """Log-prob agreement of two [..., vocab] logit tensors at every (valid) position.

    Reports, over the full vocabulary: max abs log-prob difference and mean KL(reference ‖ candidate) per
    token; and, for the label tokens when `labels` is given: max/mean abs log-prob difference and mean-abs-%.
    """
    if reference_logits.shape != candidate_logits.shape:
        raise ValueError(
            f"logit shape mismatch: reference {tuple(reference_logits.shape)} vs candidate {tuple(candidate_logits.shape)}"
        )
    ref = torch.log_softmax(reference_logits.detach().to(torch.float64), dim=-1)
    cand = torch.log_softmax(candidate_logits.detach().to(torch.float64), dim=-1)
    if valid is not None:
        ref, cand = ref[valid], cand[valid]
        labels = labels[valid] if labels is not None else None
    ref = ref.reshape(-1, ref.shape[-1])
    cand = cand.reshape(-1, cand.shape[-1])
    kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0.0)
    out = {
        "tokens": float(ref.shape[0]),
        "max_abs_logprob_full": (ref - cand).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
    }
    if labels is not None:
        idx = labels.reshape(-1, 1)
        d = tensor_diff(ref.gather(-1, idx), cand.gather(-1, idx))
        out.update(
            max_abs_logprob=d["max_abs"], mean_abs_logprob=d["mean_abs"], logprob_mean_abs_pct=d["mean_abs_pct"]
        )
    return out


def named_tensor_metrics(
    reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor]
) -> dict[str, float | str | dict]:
    """Per-name relative L2 between two tensor dicts (e.g. gradients), with the worst name."""
    missing = sorted(set(reference) ^ set(candidate))
    if missing:
        raise ValueError(f"tensor names differ between reference and candidate: {missing[:8]}")
    per = {name: tensor_diff(reference[name], candidate[name])["rel_l2"] for name in sorted(reference)}
    worst = max(per, key=lambda n: per[n]) if per else ""
    return {"max_rel_l2": per[worst] if per else 0.0, "worst": worst, "per_tensor_rel_l2": per}


def routing_agreement(
    reference_weights: torch.Tensor,
    reference_indices: torch.Tensor,
    candidate_weights: torch.Tensor,
    candidate_indices: torch.Tensor,
    reference_probs: torch.Tensor | None = None,
    tie_margin: float = 0.0,
) -> dict[str, float]:
    """MoE routing agreement over [tokens, k] top-k choices, compared as expert sets per token.

    router_token_mismatch_frac: tokens whose chosen expert set differs; router_decisive_mismatch_frac: of
    those, the ones where the reference's k-th and (k+1)-th probabilities are more than `tie_margin` apart
    (a flip there is a bug, not rounding); router_weight_max_abs: routing weights, where the sets agree.
    """
    if reference_indices.shape != candidate_indices.shape:
        raise ValueError(f"routing shape mismatch: {tuple(reference_indices.shape)} vs {tuple(candidate_indices.shape)}")
    if reference_indices.numel() == 0:
        return {"router_token_mismatch_frac": 0.0, "router_decisive_mismatch_frac": 0.0, "router_weight_max_abs": 0.0}
    ref_idx, ref_order = reference_indices.sort(dim=-1)
    cand_idx, cand_order = candidate_indices.sort(dim=-1)
    differs = (ref_idx != cand_idx).any(dim=-1)
    if reference_probs is not None and reference_probs.shape[-1] > reference_indices.shape[-1]:
        top = reference_probs.detach().to(torch.float64).topk(reference_indices.shape[-1] + 1, dim=-1).values
        decisive = differs & ((top[:, -2] - top[:, -1]) > tie_margin)
    else:
        decisive = differs
    ref_w = reference_weights.detach().to(torch.float64).gather(-1, ref_order)[~differs]
    cand_w = candidate_weights.detach().to(torch.float64).gather(-1, cand_order)[~differs]
    return {
        "router_token_mismatch_frac": differs.to(torch.float64).mean().item(),
        "router_decisive_mismatch_frac": decisive.to(torch.float64).mean().item(),
        "router_weight_max_abs": (ref_w - cand_w).abs().max().item() if ref_w.numel() else 0.0,
    }


def sampled_logprob_metrics(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    reference_top: tuple[torch.Tensor, torch.Tensor] | None = None,
    candidate_top: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Agreement of two samplers' log-probs of the same sampled tokens ([N] each; reference = what the sampler
    used), and of their top-k lists ((ids [N, k], log-probs [N, k]) each) where given.

    mean_abs_pct: 100 · mean |Δ| / mean |reference|; mae, max_abs, p50/p95/p99_abs of |Δ|; mean_exp_abs: mean
    exp(|Δ|) (NeMo-RL's form). Top-k: top1_match (the most likely token agrees), topk_overlap (shared ids / k),
    kl_topk_ref_cand and kl_topk_cand_ref: KL in each direction between the two distributions renormalised
    on the ids both lists hold.
    """
    if reference.shape != candidate.shape or reference.dim() != 1:
        raise ValueError(f"sampled log-probs must be two [N] tensors, got {tuple(reference.shape)} and {tuple(candidate.shape)}")
    ref, cand = reference.detach().double().cpu(), candidate.detach().double().cpu()
    diff = (cand - ref).abs()
    n = diff.numel()
    q = (lambda p: torch.quantile(diff, p).item()) if n else (lambda p: 0.0)  # noqa: E731
    out = {
        "tokens": float(n),
        "mean_abs_pct": 100.0 * diff.mean().item() / ref.abs().mean().item() if n and ref.abs().sum() > 0 else 0.0,
        "mae": diff.mean().item() if n else 0.0,
        "max_abs": diff.max().item() if n else 0.0,
        "p50_abs": q(0.5), "p95_abs": q(0.95), "p99_abs": q(0.99),
        "mean_exp_abs": diff.exp().mean().item() if n else 1.0,
    }
    if reference_top is None or candidate_top is None:
        return out
    r_ids, r_lp = (t.detach().cpu() for t in reference_top)
    c_ids, c_lp = (t.detach().cpu() for t in candidate_top)
    if r_ids.shape != c_ids.shape or r_ids.shape[0] != n:
        raise ValueError(f"top-k lists must be [N, k] for N={n}: {tuple(r_ids.shape)} vs {tuple(c_ids.shape)}")
    k = r_ids.shape[1]
    top1 = r_ids.gather(1, r_lp.argmax(1, keepdim=True)) == c_ids.gather(1, c_lp.argmax(1, keepdim=True))
    shared = r_ids[:, :, None] == c_ids[:, None, :]  # [N, k, k]: reference slot i holds candidate slot j's id
    in_both = shared.any(2)
    c_at_r = torch.where(shared, c_lp.double()[:, None, :], torch.zeros(())).sum(2)  # candidate log-prob of each ref id
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    p = torch.log_softmax(torch.where(in_both, r_lp.double(), neg), dim=1)
    qd = torch.log_softmax(torch.where(in_both, c_at_r, neg), dim=1)
    terms_pq = torch.where(in_both, p.exp() * (p - qd), torch.zeros(()))
    terms_qp = torch.where(in_both, qd.exp() * (qd - p), torch.zeros(()))
    out.update(
        top1_match=top1.double().mean().item() if n else 1.0,
        topk_overlap=in_both.double().sum(1).div(k).mean().item() if n else 1.0,
        kl_topk_ref_cand=terms_pq.sum(1).clamp_min(0).mean().item() if n else 0.0,
        kl_topk_cand_ref=terms_qp.sum(1).clamp_min(0).mean().item() if n else 0.0,
    )
    return out
