"""Benchmark: planning flex BlockMasks for a 131,072-token packed row (W = 1024) from geometry, against
torch's generic `create_block_mask` (which evaluates the mask at every (query, key) pair).

Run: .venv/bin/python benchmarks/mask_planning.py [--out benchmarks/results/mask_planning.md]
The generic builder runs in a child process per length, with a time limit and an address-space limit, so a
length it cannot finish is reported as such instead of exhausting the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fixtures.packings import random_packed_row  # noqa: E402
from gemma4_support.attention.block_masks import block_states, build_block_mask  # noqa: E402
from gemma4_support.attention.masks import allowed  # noqa: E402
from gemma4_support.packing import PackedRow  # noqa: E402

WINDOW, BLOCK = 1024, 128
GENERIC_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
GENERIC_TIMEOUT_S, GENERIC_MEMORY_GIB = 180, 8


def time_ours(p: PackedRow, window: int | None, repeats: int = 7) -> list[float]:
    """Wall seconds of build_block_mask (geometry planner + BlockMask with both directions)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        build_block_mask(p, window, BLOCK)
        out.append(time.perf_counter() - t0)
    return out


def generic_child(length: int, window: int) -> None:
    """Child process: time torch's create_block_mask, print JSON (and whether it equals ours)."""
    resource.setrlimit(resource.RLIMIT_AS, (GENERIC_MEMORY_GIB << 30, GENERIC_MEMORY_GIB << 30))
    from torch.nn.attention.flex_attention import create_block_mask

    p = random_packed_row(length)
    pos, seg, br = p.position_ids, p.segment_ids(), p.branches()

    def mask_mod(b, h, q, k):  # noqa: ANN001, ANN202
        return allowed(pos[q], pos[k], seg[q], seg[k], window, br[q], br[k])

    t0 = time.perf_counter()
    generic = create_block_mask(mask_mod, None, None, length, length, device="cpu", BLOCK_SIZE=BLOCK)
    seconds = time.perf_counter() - t0
    same = torch.equal(block_states(generic), block_states(build_block_mask(p, window, BLOCK)))
    print(json.dumps({"seconds": seconds, "same_blocks_as_ours": same}))


def time_generic(length: int, window: int) -> dict:
    """Run the generic builder for one length in a limited child process."""
    cmd = [sys.executable, "-W", "ignore", __file__, "--generic-child", str(length), str(window)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=GENERIC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": f"did not finish within {GENERIC_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"status": f"failed (limit {GENERIC_MEMORY_GIB} GiB address space): {tail}",
                "wall": time.perf_counter() - t0}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    """Run the benchmark and write the markdown result."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/mask_planning.md"))
    ap.add_argument("--generic-child", nargs=2, type=int)
    args = ap.parse_args()
    if args.generic_child:
        generic_child(*args.generic_child)
        return
    p = random_packed_row(131072)
    ours = {str(w): time_ours(p, w) for w in (WINDOW, None)}
    ours_by_len = {L: statistics.median(time_ours(random_packed_row(L), WINDOW, 3)) for L in GENERIC_LENGTHS}
    generic = {L: time_generic(L, WINDOW) for L in GENERIC_LENGTHS}
    lines = [
        "# Mask planning benchmark (BlockMask for flex_attention)",
        "",
        f"`benchmarks/mask_planning.py`, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads available (planning runs on 1), torch {torch.__version__}.",
        "Row: packed documents (plain 512-16384 tokens, and shared-prefix documents: prompt 64-2048 + 2-4 "
        f"completions), positions restarting per document; block size {BLOCK}.",
        "",
        "## 131,072-token row, this project's geometry planner (`build_block_mask`)",
        "",
        "| window | median s | min s | max s |",
        "|---|---|---|---|",
    ]
    for w, ts in ours.items():
        lines.append(f"| {w if w != 'None' else 'global'} | {statistics.median(ts):.4f} | {min(ts):.4f} | {max(ts):.4f} |")
    lines += ["", f"## Against torch's generic `create_block_mask` (W = {WINDOW}, eager, CPU)", "",
              f"Generic builder in a child process limited to {GENERIC_TIMEOUT_S} s and {GENERIC_MEMORY_GIB} GiB.",
              "", "| tokens | ours (median s) | generic | generic s | same blocks |", "|---|---|---|---|---|"]
    for L in GENERIC_LENGTHS:
        g = generic[L]
        secs = f"{g['seconds']:.3f}" if "seconds" in g else "—"
        same = str(g.get("same_blocks_as_ours", "—"))
        lines.append(f"| {L} | {ours_by_len[L]:.4f} | {g['status']} | {secs} | {same} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
