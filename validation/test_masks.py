"""Stage cp_masks, the masks themselves (no model): sliding/document/shared-prefix masks, dense and block-sparse
equal for every pair and equal to torch's generic block classification, planning from geometry at 131,072 tokens,
the CP planner's load balance, and one clear error for each kind of bad input."""
from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from fixtures.packings import ROW_A, WINDOW, random_packed_row
from gemma4_support.attention.block_masks import (
    block_mask_to_dense,
    block_size_for_head_dim,
    block_states,
    build_block_mask,
    plan_block_states,
    prepare_block_masks,
)
from gemma4_support.attention.masks import allowed, packing_dense_mask
from gemma4_support.errors import PackingError
from gemma4_support.packing import PackedRow, pack
from gemma4_support.parallel import attention_work, plan_cp
from validation import thresholds as T
from validation.properties import counted_property

pytestmark = pytest.mark.stage_cp_masks


@st.composite
def packings(draw, max_docs: int = 5) -> list:  # noqa: ANN001
    """Random packings: plain documents and shared-prefix documents (prompt + 1..3 completions)."""
    docs = []
    for _ in range(draw(st.integers(1, max_docs))):
        if draw(st.booleans()):
            docs.append((draw(st.integers(1, 10)), draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))))
        else:
            docs.append(draw(st.integers(1, 30)))
    return docs


def _property_violations(p: PackedRow, window: int | None, mask: torch.Tensor, q0: int) -> list[str]:
    """Window inclusive of self and exactly W wide (in positions); no attention across documents or siblings."""
    bad = []
    pos, seg, br = p.position_ids, p.segment_ids(), p.branches()
    for i in range(mask.shape[0]):
        q = q0 + i
        keys = mask[i].nonzero().flatten()
        lo = 0 if window is None else max(0, int(pos[q]) - window + 1)
        if sorted(pos[keys].tolist()) != list(range(lo, int(pos[q]) + 1)):
            bad.append(f"query {q}: key positions {sorted(pos[keys].tolist())} != {lo}..{int(pos[q])}")
        if bool((seg[keys] != seg[q]).any()):
            bad.append(f"query {q} attends another document")
        if bool(((br[keys] != br[q]) & (br[keys] != 0)).any()):
            bad.append(f"query {q} attends a sibling completion")
    return bad


@st.composite
def mask_cases(draw) -> tuple:  # noqa: ANN001
    """A packing, a window (None: global), block sizes (q, k) and a query range inside the packed row."""
    docs = draw(packings())
    length = pack(docs).length
    q0 = draw(st.integers(0, length - 1))
    query_range = (q0, draw(st.integers(q0 + 1, length)))
    window = draw(st.one_of(st.none(), st.integers(1, 12)))
    blocks = (draw(st.sampled_from([2, 3, 4, 8, 16])), draw(st.sampled_from([2, 4, 5, 8, 16])))
    return docs, window, blocks, query_range


def _window_inclusive_by_one(qp, kp, qd, kd, window, qb=None, kb=None):  # noqa: ANN001, ANN202
    """Broken predicate: an exclusive window (i - W <= j), W + 1 keys per query."""
    return allowed(qp, kp, qd, kd, None if window is None else window + 1, qb, kb)


def _mask_property(stats: Counter, predicate=allowed):  # noqa: ANN001, ANN202
    """The mask property of one case: block-sparse == dense (built with `predicate`) for every pair, block states
    == torch's generic create_block_mask, and no window/document/sibling rule violated; counts what it compared."""
    def body(case: tuple) -> None:
        docs, window, (bq, bk), (q0, q1) = case
        p = pack(docs)
        dense = packing_dense_mask(p, window, (q0, q1), predicate=predicate)
        bm = build_block_mask(p, window, (bq, bk), (q0, q1))
        assert torch.equal(block_mask_to_dense(bm), dense), "block-sparse mask differs from the dense mask"
        pos, seg, br = p.position_ids, p.segment_ids(), p.branches()

        def mask_mod(b, h, qi, ki):  # noqa: ANN001, ANN202
            return allowed(pos[qi + q0], pos[ki], seg[qi + q0], seg[ki], window, br[qi + q0], br[ki])

        generic = create_block_mask(mask_mod, None, None, q1 - q0, p.length, device="cpu", BLOCK_SIZE=(bq, bk))
        assert torch.equal(block_states(generic), block_states(bm)), "block classification differs from torch's"
        violations = _property_violations(p, window, dense, q0)
        assert not violations, violations[:3]
        stats["pairs"] += dense.numel()
        stats["blocks_compared"] += block_states(bm).numel()

    return body


def test_mask_properties(stage_report) -> None:  # noqa: ANN001
    """Block-sparse == dense for every pair, == torch's generic block classification; window/document/sibling rules."""
    stats = Counter()
    first = counted_property(mask_cases(), _mask_property(stats), stats, max_examples=40)
    stage_report.check("mask_properties", {"examples": stats["examples"], "failures": stats["failures"]},
                       T.CP_MASKS_PROPERTY, first_failures=first, pairs_compared=stats["pairs"],
                       blocks_compared=stats["blocks_compared"])


def test_mask_window_off_by_one_is_caught(stage_report) -> None:  # noqa: ANN001
    """Sensitivity: the same property with an exclusive window (W + 1 keys) fails on every windowed example."""
    stats = Counter()
    first = counted_property(mask_cases(), _mask_property(stats, _window_inclusive_by_one), stats, max_examples=40)
    stage_report.expect_caught("window_off_by_one", {"examples": stats["examples"], "failures": stats["failures"]},
                               T.CP_MASKS_PROPERTY, first_failures=first,
                               broken="dense mask predicate with window W + 1 (i - W <= j): one key too many")


def test_block_planning_131k(stage_report) -> None:  # noqa: ANN001
    """A 131,072-token packed row (W = 1024), planned from geometry for every window, well under a second."""
    p = random_packed_row(131072)
    sizes = {1024: block_size_for_head_dim(256), None: block_size_for_head_dim(512)}
    sliding, both = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        build_block_mask(p, 1024, sizes[1024])
        sliding.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        prepared = prepare_block_masks(p, [1024, None], sizes)
        both.append(time.perf_counter() - t0)
    states = {str(w): torch.bincount(plan_block_states(p, w, sizes[w]).flatten().long(), minlength=3).tolist()
              for w in sizes}
    stage_report.check("planning_131072_W1024", {"plan_seconds": min(sliding)}, T.CP_MASKS_PLANNING,
                       tokens=131072, window=1024, block_sizes={str(k): v for k, v in sizes.items()},
                       plan_seconds_runs=sliding, all_windows_plan_seconds=min(both), masks=len(prepared),
                       block_states_empty_partial_full=states)


# ---------------------------------------------------------------------------------------------------
# planner and errors


def test_planner_load_balance(stage_report) -> None:  # noqa: ANN001
    """Front/back chunks give every rank the same causal work on one long document; figures for row A."""
    single = pack([64])
    figures = {}
    for cp in (2, 4):
        plan = plan_cp(64, cp)
        work = attention_work(plan, single, None)
        naive = [int(packing_dense_mask(single, None, (r * 64 // cp, (r + 1) * 64 // cp)).sum()) for r in range(cp)]
        figures[f"cp{cp}"] = {"work_per_rank": work, "contiguous_split_work": naive,
                              "contiguous_imbalance": max(naive) / (sum(naive) / cp),
                              "chunks": [plan.global_chunks(r) for r in range(cp)]}
        stage_report.check(f"balance_single_document_cp{cp}", {"work_imbalance": max(work) / (sum(work) / cp)},
                           T.CP_MASKS_BALANCE, **figures[f"cp{cp}"])
    row_a = pack(ROW_A)
    stage_report.record("balance_row_A", **{
        f"cp{cp}_window_{w}": attention_work(plan_cp(row_a.length, cp), row_a, w) for cp in (2, 4) for w in (WINDOW, None)
    })


def test_bad_input_errors() -> None:
    """Inconsistent lengths, non-contiguous documents, a CP size that doesn't divide: one clear error each."""
    with pytest.raises(PackingError, match="2\\*cp=6"):
        plan_cp(100, 3)
    with pytest.raises(PackingError, match="inconsistent"):
        PackedRow(torch.arange(5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(PackingError, match="more than one contiguous run"):
        PackedRow(torch.arange(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(PackingError, match="input_ids must hold integer ids"):
        PackedRow(torch.arange(4), torch.zeros(4, dtype=torch.long), input_ids=torch.zeros(4))
    plan = plan_cp(96, 4)
    with pytest.raises(PackingError, match="tokens"):
        plan.shard(torch.zeros(1, 40), 0, dim=1)
    with pytest.raises(PackingError, match="CP rank 4"):
        plan.chunk_range(4, 0)
