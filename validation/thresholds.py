"""Every gate's threshold, in one table per stage. Tighter if measured better; never looser than the issue's bar."""
from __future__ import annotations

from gemma4_support.metrics import Gate

# --- stage_hf_parity (issue 3) ---------------------------------------------------------------
HF_PARITY_FORWARD_FP32 = (
    Gate("max_abs_logprob", "<=", 1e-4),
    Gate("mean_kl", "<=", 1e-7),
)
HF_PARITY_FORWARD_BF16 = (
    Gate("logprob_mean_abs_pct", "<=", 1.0),
    Gate("mean_kl", "<=", 1e-3),
)
HF_PARITY_BACKWARD_FP32 = (
    Gate("loss_rel_diff", "<=", 1e-5),
    Gate("max_rel_l2", "<=", 1e-4),
)

# --- stage_discovery (issue 2): our per-layer resolution must equal HF transformers' exactly ---------
DISCOVERY_AGREEMENT = (
    Gate("layer_count_diff", "==", 0),
    Gate("type_mismatches", "==", 0),
    Gate("geometry_mismatches", "==", 0),
    Gate("window_errors", "==", 0),
)
