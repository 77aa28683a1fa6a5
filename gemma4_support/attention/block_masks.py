"""flex_attention BlockMasks planned from the row's geometry, never by evaluating every (query, key) pair.

The row is cut into *runs*: maximal stretches of tokens inside one block with one document, one branch
and consecutive position ids. For a query run with positions [a, b] and a key run with positions [c, d]
of the same document whose branches are compatible (same branch, or the key in the shared prompt), the
predicate of `gemma4_support.attention.masks.allowed` reduces to two interval tests:

  some pair allowed   c <= b  and  d >= a - W + 1      (the union of the windows of [a, b] is [a-W+1, b])
  every pair allowed  d <= a  and  c >= b - W + 1

(W = infinity on global layers). Only run pairs of the same document are enumerated (documents are
contiguous), so planning costs O(run pairs), not O(tokens²): a 131,072-token row has about a thousand
runs per side. A block is *full* when the areas of its fully-allowed run pairs add up to the whole
(complete) block, *partial* when some pair is allowed, *empty* otherwise; partial blocks evaluate the same
predicate per element through the BlockMask's `mask_mod`.

Where flex runs: eager `flex_attention` runs forward on CPU (it materialises the scores, no backward
on CPU in torch 2.13); compiled flex runs forward and backward on CUDA. Training on CPU uses the dense
masks; both realisations are tested equal.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from gemma4_support.attention.masks import PreparedMasks, allowed, check_window
from gemma4_support.errors import PackingError
from gemma4_support.packing import PackedRow

EMPTY, PARTIAL, FULL = 0, 1, 2
BlockSize = int | tuple[int, int]

#: block size (query, key) per head dim on the flex path; larger heads take smaller blocks (SRAM on GPU).
DEFAULT_BLOCK_SIZES: dict[int, int] = {64: 128, 128: 128, 256: 128, 512: 64}


def block_size_for_head_dim(head_dim: int, table: Mapping[int, int] | None = None) -> int:
    """The flex block size for a head dim: the table's entry, else 128 up to head dim 256 and 64 above."""
    table = DEFAULT_BLOCK_SIZES if table is None else table
    if head_dim in table:
        return int(table[head_dim])
    return 128 if head_dim <= 256 else 64


def _pair(block_size: BlockSize) -> tuple[int, int]:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    if bq < 1 or bk < 1:
        raise PackingError(f"block size {block_size!r} is not positive", "pass a positive block size")
    return int(bq), int(bk)


def _runs(pos: torch.Tensor, seg: torch.Tensor, br: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
    """Cut a stretch of tokens into runs (one block, document, branch; consecutive positions)."""
    n = pos.numel()
    start = torch.ones(n, dtype=torch.bool)
    if n > 1:
        idx = torch.arange(1, n)
        start[1:] = (seg[1:] != seg[:-1]) | (br[1:] != br[:-1]) | (pos[1:] != pos[:-1] + 1) | (idx % block == 0)
    starts = start.nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([n]))
    return {"pos": pos[starts], "len": lengths, "seg": seg[starts], "br": br[starts], "blk": starts // block}


def plan_block_states(
    row: PackedRow,
    window: int | None,
    block_size: BlockSize = 128,
    query_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """[query blocks, key blocks] int8 states (0 empty, 1 partial, 2 full) from the row's geometry."""
    check_window(window)
    bq, bk = _pair(block_size)
    L = row.length
    q0, q1 = query_range if query_range is not None else (0, L)
    if not 0 <= q0 < q1 <= L:
        raise PackingError(f"query range {query_range} outside the row of {L} tokens", "fix the range")
    pos = row.position_ids.detach().to("cpu", torch.long)
    seg = row.segment_ids().to("cpu")
    br = row.branches().to("cpu", torch.long)
    qr = _runs(pos[q0:q1], seg[q0:q1], br[q0:q1], bq)
    kr = _runs(pos, seg, br, bk)
    nqb, nkb = -(-(q1 - q0) // bq), -(-L // bk)

    # same-document run pairs (documents are contiguous, so each query run meets one range of key runs)
    lo = torch.searchsorted(kr["seg"], qr["seg"])
    hi = torch.searchsorted(kr["seg"], qr["seg"], right=True)
    cnt = hi - lo
    qi = torch.repeat_interleave(torch.arange(cnt.numel()), cnt)
    first = torch.cumsum(cnt, 0) - cnt
    ki = lo[qi] + torch.arange(qi.numel()) - first[qi]

    a = qr["pos"][qi]
    b = a + qr["len"][qi] - 1
    c = kr["pos"][ki]
    d = c + kr["len"][ki] - 1
    qb, kb = qr["br"][qi], kr["br"][ki]
    br_ok = (kb == qb) | (kb == 0)
    some = br_ok & (c <= b)
    every = br_ok & (d <= a)
    if window is not None:
        some &= d >= a - window + 1
        every &= c >= b - window + 1

    pair_block = qr["blk"][qi] * nkb + kr["blk"][ki]
    any_allowed = torch.zeros(nqb * nkb, dtype=torch.bool)
    any_allowed[pair_block[some]] = True
    area = torch.zeros(nqb * nkb, dtype=torch.long)
    area.index_add_(0, pair_block[every], (qr["len"][qi] * kr["len"][ki])[every])
    # an incomplete trailing block is never full (as torch's generic builder: padding counts as masked)
    full = area.view(nqb, nkb) == bq * bk
    states = torch.where(full, FULL, torch.where(any_allowed.view(nqb, nkb), PARTIAL, EMPTY)).to(torch.int8)
    return states


def _mask_mod(row: PackedRow, window: int | None, q0: int, q1: int, device: torch.device | str):
    pos, seg, br = (t.to(device, non_blocking=t.device.type == "cpu")  # a read back to the host must wait
                    for t in (row.position_ids, row.segment_ids(), row.branches()))
    qp, qs, qb = pos[q0:q1], seg[q0:q1], br[q0:q1]

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex's mask_mod signature
        return allowed(qp[q_idx], pos[kv_idx], qs[q_idx], seg[kv_idx], window, qb[q_idx], br[kv_idx])

    return mask_mod


def _direction(states: torch.Tensor, device: torch.device | str) -> list[torch.Tensor]:
    """(partial count, partial indices, full count, full indices) per row, shaped [1, 1, rows, ...].

    Indices of a row are ascending in its first `count` slots; the slots after them are never read.
    """
    out = []
    n_rows, n_cols = states.shape
    for value in (PARTIAL, FULL):
        rows, cols = (states == value).nonzero(as_tuple=True)
        num = torch.bincount(rows, minlength=n_rows)
        rank = torch.arange(rows.numel()) - (torch.cumsum(num, 0) - num)[rows]
        idx = torch.zeros(n_rows, n_cols, dtype=torch.int32)
        idx[rows, rank] = cols.to(torch.int32)
        out += [num.to(torch.int32), idx]
    return [t[None, None].to(device, non_blocking=True) for t in out]  # from the host: queued, never awaited


def block_mask_from_states(
    states: torch.Tensor,
    block_size: BlockSize,
    seq_lengths: tuple[int, int],
    mask_mod: Callable | None = None,  # flex's mask_mod callable
    device: torch.device | str = "cpu",
) -> BlockMask:
    """A flex BlockMask from [query blocks, key blocks] states, with both the kv- and q-direction block lists."""
    kv_num, kv_idx, full_kv_num, full_kv_idx = _direction(states, device)
    q_num, q_idx, full_q_num, full_q_idx = _direction(states.t(), device)
    return BlockMask(
        seq_lengths=tuple(seq_lengths),
        kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_kv_num, full_kv_indices=full_kv_idx,
        q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
        BLOCK_SIZE=_pair(block_size), mask_mod=mask_mod if mask_mod is not None else _allow_all,
    )


def _allow_all(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex's mask_mod signature
    return q_idx >= 0


def build_block_mask(
    row: PackedRow,
    window: int | None,
    block_size: BlockSize = 128,
    query_range: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> BlockMask:
    """The flex BlockMask of a packed row (queries: `query_range`, default the whole row; keys: the row)."""
    q0, q1 = query_range if query_range is not None else (0, row.length)
    with planning_threads():
        states = plan_block_states(row, window, block_size, (q0, q1))
        return block_mask_from_states(
            states, block_size, (q1 - q0, row.length), _mask_mod(row, window, q0, q1, device), device
        )


@contextlib.contextmanager
def planning_threads(threads: int = 1) -> Iterator[None]:
    """Run mask planning on `threads` intra-op threads: its ops are small, fanning out only adds sync cost."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if before != threads:
            torch.set_num_threads(before)


def block_states(block_mask: BlockMask) -> torch.Tensor:
    """[query blocks, key blocks] int8 states (0 empty, 1 partial, 2 full) of any BlockMask (batch 0, head 0)."""
    nq = block_mask.kv_num_blocks.shape[-1]
    nk = -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1])
    states = torch.zeros(nq, nk, dtype=torch.int8)
    for num, idx, value in (
        (block_mask.kv_num_blocks, block_mask.kv_indices, PARTIAL),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, FULL),
    ):
        if num is None:
            continue
        num, idx = num[0, 0].cpu().long(), idx[0, 0].cpu().long()
        keep = torch.arange(idx.shape[-1])[None, :] < num[:, None]
        rows = torch.arange(nq)[:, None].expand_as(idx)
        states[rows[keep], idx[keep]] = value
    return states


def block_mask_to_dense(block_mask: BlockMask) -> torch.Tensor:
    """Token-level [Q, KV] bool mask a BlockMask realises (partial blocks evaluate its mask_mod); for checks."""
    q_len, kv_len = block_mask.seq_lengths
    bq, bk = block_mask.BLOCK_SIZE
    states = block_states(block_mask)
    tok = states.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:q_len, :kv_len]
    q_idx = torch.arange(q_len)[:, None]
    kv_idx = torch.arange(kv_len)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    elem = block_mask.mask_mod(zero, zero, q_idx, kv_idx).cpu().to(torch.bool)
    return (tok == FULL) | ((tok == PARTIAL) & elem)


def prepare_block_masks(
    row: PackedRow,
    windows: Iterable[int | None],
    block_size: BlockSize | Mapping[int | None, BlockSize] = 128,
    query_range: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> PreparedMasks:
    """BlockMasks for each distinct window (None = global), keyed by window; block size per window if a mapping."""
    t0 = time.perf_counter()
    masks = {}
    for w in set(windows):
        bs = block_size[w] if isinstance(block_size, Mapping) else block_size
        masks[w] = build_block_mask(row, w, bs, query_range, device)
    return PreparedMasks(masks, plan_seconds=time.perf_counter() - t0, kind="block")


# Kernel tiles for heads wider than 256 on CUDA: flex's default tiles need more shared memory than Hopper has at head
# dim 512 (264,192 bytes in bf16 against 232,448). Measured on the H100 (scripts/gpu/global_attention_gpu.py, 16 heads,
# 8,192 tokens, bf16): forward 32 x 32 tiles 5.0 ms, backward 16 x 16 tiles ~29 ms; the dense reference 18.8 / 43 ms.
# fp32 doubles every tile's bytes, so it takes 16 x 16 tiles in the forward too.
WIDE_HEAD_KERNEL_OPTIONS: dict[torch.dtype, dict[str, int]] = {
    torch.bfloat16: {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4,
                     "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16},
    torch.float32: {"BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 1, "num_warps": 4,
                    "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16},
}


def kernel_options(head_dim: int, dtype: torch.dtype) -> dict[str, int] | None:
    """flex's kernel tiles for a head dim and dtype on CUDA (None: flex's own choice, for heads up to 256)."""
    if head_dim <= 256:
        return None
    return WIDE_HEAD_KERNEL_OPTIONS.get(dtype, WIDE_HEAD_KERNEL_OPTIONS[torch.float32])


def flex_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float = 1.0
) -> torch.Tensor:
    """flex_attention over [B, heads, S, D] tensors (GQA when kv heads differ); eager on CPU, compiled on CUDA."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                kernel_options=kernel_options(q.shape[-1], q.dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


_COMPILED = None


def _compiled_flex():  # noqa: ANN202
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention)
    return _COMPILED
