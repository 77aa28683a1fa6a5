"""The flex attention backend (planned BlockMasks + compiled flex_attention) against the dense reference,
on CUDA, forward and backward, with a side-by-side timing of one training step.

Cases: the MoE fixture and the 26B-A4B shapes cut to 6 layers (random weights, as in hf_parity_gpu.py), one
packed row of three documents (4096 tokens), fp32 and bf16. Metrics: logits max abs / rel-L2 and every
gradient's rel-L2 (worst named), flex vs dense in the same dtype. A head dim whose flex kernel fails is
reported and routed to dense (`dense_head_dims`), which is what the `auto` backend would then need.
  pip install --no-deps .whl/megatron_core-*.whl && python scripts/gpu/flex_vs_dense_gpu.py --out "$OUT"
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "gpu"))

import torch  # noqa: E402

from gemma4_support.attention.backends import flex_backend  # noqa: E402
from gemma4_support.config.spec import load_spec  # noqa: E402
from gemma4_support.convert.checkpoint import TensorDict, load_hf_weights  # noqa: E402
from gemma4_support.metrics import named_tensor_metrics, tensor_diff  # noqa: E402
from gemma4_support.model.build import build_model  # noqa: E402
from gemma4_support.packing import PackedRow  # noqa: E402
from gemma4_support.runtime import RuntimeConfig, set_runtime  # noqa: E402
from validation.parity import packed_lengths, random_row, row_loss  # noqa: E402


def step(model: torch.nn.Module, batch: PackedRow, backward: bool) -> tuple[torch.Tensor, dict, float]:
    """One forward (+ backward) of the packed row: logits, grads by name, seconds (after one warm-up)."""
    def once():
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logits = model(*batch.model_inputs())
            if backward:
                row_loss(logits, batch).backward()
        return logits
    once()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    logits = once()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    seconds = time.perf_counter() - t0
    grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads, seconds


def run(name: str, hf_model: torch.nn.Module, seq: int, dtype: torch.dtype, device: str, backward: bool) -> dict:
    """Dense vs flex for one model and dtype."""
    spec = load_spec(hf_model.config.to_dict())
    batch = random_row(packed_lengths(seq, spec.sliding_window), spec.vocab_size, 0, pad_id=spec.pad_token_id).to(device)
    weights = TensorDict({k: v.to(dtype) for k, v in hf_model.state_dict().items()})
    out = {"case": name, "dtype": str(dtype).removeprefix("torch."), "seq": seq, "doc_lengths": batch.document_lengths()}
    dense = build_model(spec, dtype=dtype, device=device, attention="dense")
    load_hf_weights(dense, weights)
    ref_logits, ref_grads, out["dense_step_s"] = step(dense, batch, backward)
    del dense
    for dense_dims in ((), (512,)):
        try:
            flex = build_model(spec, dtype=dtype, device=device, attention=flex_backend(spec, dense_dims))
            load_hf_weights(flex, weights)
            logits, grads, out["flex_step_s"] = step(flex, batch, backward)
            out["dense_head_dims"] = list(dense_dims)
            out["logits"] = tensor_diff(ref_logits, logits)
            if backward:
                g = named_tensor_metrics(ref_grads, grads)
                out["grads"] = {"max_rel_l2": g["max_rel_l2"], "worst": g["worst"]}
            out["flex_over_dense_time"] = out["flex_step_s"] / out["dense_step_s"]
            del flex
            break
        except Exception as exc:  # report the kernel failure, then route that head dim to dense
            out.setdefault("flex_failures", []).append({"dense_head_dims": list(dense_dims),
                                                        "error": f"{type(exc).__name__}: {exc}"[:600],
                                                        "trace": traceback.format_exc()[-1500:]})
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(json.dumps({k: v for k, v in out.items() if k != "flex_failures"}), flush=True)
    for f in out.get("flex_failures", []):
        print("  flex failed with dense_head_dims", f["dense_head_dims"], ":", f["error"][:300], flush=True)
    return out


def main() -> int:
    """Dense vs flex on the MoE fixture and the 26B-A4B cut, fp32 and bf16; writes flex_vs_dense_gpu.json; 0."""
    from hf_parity_gpu import cut_26b_config, random_hf_model

    from validation.parity import load_hf_reference

    set_runtime(RuntimeConfig())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--small", action="store_true", help="CPU smoke run: forward only, 64 tokens, shrunken cut")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    seq = 64 if args.small else args.seq
    rows = []
    from fixtures.factory import fixture_dir

    models = {"fixture-moe": lambda: load_hf_reference(str(fixture_dir("moe")), device=device),
              "26B-A4B-cut6": lambda: random_hf_model(cut_26b_config(512 if args.small else 32768, args.small), 0, device)}
    for name, make in models.items():
        hf_model = make()
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(run(name, hf_model, seq, dtype, device, backward=device == "cuda"))
        del hf_model
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "flex_vs_dense_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
