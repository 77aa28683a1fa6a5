"""Stage cp_masks: sliding/document/shared-prefix masks (dense and block-sparse), packing invariance, and
context-parallel equivalence (CP = 2 and 4 in real gloo processes vs CP = 1), with sensitivity variants.

All model comparisons run on one intra-op thread (the CP workers do too): BLAS picks different kernels for
different row counts on two threads, which would add noise unrelated to masks.
"""
from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

from gemma4_support.attention.block_masks import (
    block_mask_to_dense,
    block_size_for_head_dim,
    block_states,
    build_block_mask,
    plan_block_states,
    prepare_block_masks,
)
from fixtures.packings import random_packed_row
from gemma4_support.attention.masks import (
    Packing,
    allowed,
    mask_builds,
    pack,
    packing_dense_mask,
    prepare_dense_masks,
)
from gemma4_support.errors import MaskNotPreparedError, PackingError
from gemma4_support.metrics import tensor_diff
from gemma4_support.parallel import CPMasks, attention_work, cp_forward, plan_cp, prepare_cp_masks
from validation import thresholds as T

pytestmark = [pytest.mark.stage_cp_masks, pytest.mark.xdist_group("cp_masks")]  # one 4-process CP launch

WINDOW = 8  # the fixture's sliding window; rows below are longer than it and cross chunk boundaries
# Row A (96 tokens): documents of 13 | shared prompt 6 + completions 9, 7 | 21 | prompt 5 + 4, 6, 2 | 23.
ROW_A = [13, (6, [9, 7]), 21, (5, [4, 6, 2]), 23]
# Row B (96 tokens): 40 | prompt 10 + completions 12, 10 | 14 | 10.
ROW_B = [40, (10, [12, 10]), 14, 10]
CP_VARIANTS = ("drop_window", "chunk_off_by_one", "no_shared_prefix", "packed_positions")


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one intra-op thread, as the CP workers do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def depth(pytestconfig: pytest.Config) -> str | None:
    """Covering depth unless --gemma4-full-depth."""
    return None if pytestconfig.getoption("--gemma4-full-depth") else "covering"


@pytest.fixture(scope="module")
def model(gemma4_model_dir, depth, one_thread):  # noqa: ANN001, ANN201
    """The megatron-core Gemma 4 under test (fp32, CPU, world size 1)."""
    from gemma4_support.model.build import load_model

    return load_model(gemma4_model_dir, depth=depth)


def _row(documents, seed: int, vocab: int) -> dict:  # noqa: ANN001
    p = pack(documents)
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (1, p.length), generator=g), "position_ids": p.position_ids,
            "document_ids": p.document_ids, "branch_ids": p.branch_ids, "packing": p}


@pytest.fixture(scope="module")
def rows(model, gemma4_seed) -> dict:  # noqa: ANN001
    """The packed rows of the CP runs."""
    return {"A": _row(ROW_A, gemma4_seed + 1, model.spec.vocab_size),
            "B": _row(ROW_B, gemma4_seed + 2, model.spec.vocab_size)}


def _dense_masks(p: Packing, windows):  # noqa: ANN001, ANN202
    br = None if p.branch_ids is None else p.branch_ids[None]
    return prepare_dense_masks(p.position_ids[None], p.document_ids[None], windows, branch_ids=br)


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(ids, -1, dims=1)
    return torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum") / ids.shape[1]


@pytest.fixture(scope="module")
def cp1_reference(model, rows) -> dict:  # noqa: ANN001
    """CP = 1: logits and every parameter's gradient of each row, the plain model on the whole row."""
    out = {}
    for name, row in rows.items():
        p = row["packing"]
        model.zero_grad(set_to_none=True)
        logits = model(row["input_ids"], p.position_ids[None], p.document_ids[None], masks=_dense_masks(p, model.windows))
        _loss(logits, row["input_ids"]).backward()
        grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
        out[name] = {"logits": logits.detach(), "grads": grads}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def cp_runs(gemma4_model_dir, depth, rows) -> dict:  # noqa: ANN001
    """One launch of 4 gloo processes: CP = 4 on row A, CP = 2 on rows A and B, flex under CP, broken variants."""
    from validation.cp_worker import launch

    runs = [
        {"name": "cp4", "cp": 4, "rows": ["A"], "variant": "none", "backward": True, "kind": "dense"},
        {"name": "cp2", "cp": 2, "rows": ["A", "B"], "variant": "none", "backward": True, "kind": "dense"},
        {"name": "cp4_flex", "cp": 4, "rows": ["A"], "variant": "none", "backward": False, "kind": "block",
         "block_size": 16},
    ]
    runs += [{"name": f"cp4_{v}", "cp": 4, "rows": ["A"], "variant": v, "backward": False, "kind": "dense"}
             for v in CP_VARIANTS]
    job_rows = {k: {f: v[f] for f in ("input_ids", "position_ids", "document_ids", "branch_ids")} for k, v in rows.items()}
    t0 = time.perf_counter()
    res = launch({"model_dir": str(gemma4_model_dir), "depth": depth, "rows": job_rows, "runs": runs}, world=4)
    res["_launch"]["total_seconds"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------------
# mask properties (no model)


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


def _property_violations(p: Packing, window: int | None, mask: torch.Tensor, q0: int) -> list[str]:
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


def test_mask_properties(stage_report) -> None:  # noqa: ANN001
    """Block-sparse == dense for every pair, == torch's generic block classification; window/document/sibling rules."""
    seen = {"examples": 0, "pairs": 0, "blocks_compared": 0}

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(docs=packings(), window=st.one_of(st.none(), st.integers(1, 12)),
           bq=st.sampled_from([2, 3, 4, 8, 16]), bk=st.sampled_from([2, 4, 5, 8, 16]), data=st.data())
    def check(docs, window, bq, bk, data) -> None:  # noqa: ANN001
        p = pack(docs)
        q0 = data.draw(st.integers(0, p.length - 1))
        q1 = data.draw(st.integers(q0 + 1, p.length))
        dense = packing_dense_mask(p, window, (q0, q1))
        bm = build_block_mask(p, window, (bq, bk), (q0, q1))
        assert torch.equal(block_mask_to_dense(bm), dense), "block-sparse mask differs from the dense mask"
        pos, seg, br = p.position_ids, p.segment_ids(), p.branches()

        def mask_mod(b, h, qi, ki):  # noqa: ANN001, ANN202
            return allowed(pos[qi + q0], pos[ki], seg[qi + q0], seg[ki], window, br[qi + q0], br[ki])

        generic = create_block_mask(mask_mod, None, None, q1 - q0, p.length, device="cpu", BLOCK_SIZE=(bq, bk))
        assert torch.equal(block_states(generic), block_states(bm)), "block classification differs from torch's"
        violations = _property_violations(p, window, dense, q0)
        assert not violations, violations[:3]
        seen["examples"] += 1
        seen["pairs"] += dense.numel()
        seen["blocks_compared"] += block_states(bm).numel()

    failure = None
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - reported through the gate with the falsifying example
        failure = f"{type(exc).__name__}: {exc}"[:2000]
    stage_report.check("mask_properties", {"examples": seen["examples"], "failures": int(failure is not None)},
                       T.CP_MASKS_PROPERTY, pairs_compared=seen["pairs"], blocks_compared=seen["blocks_compared"],
                       failure=failure)


def test_mask_window_off_by_one_is_caught(stage_report) -> None:  # noqa: ANN001
    """Sensitivity: an exclusive window (i - W <= j, W + 1 keys) violates the window property."""
    p = pack(ROW_A)

    def inclusive_by_one(qp, kp, qd, kd, window, qb=None, kb=None):  # noqa: ANN001, ANN202
        return allowed(qp, kp, qd, kd, None if window is None else window + 1, qb, kb)

    mask = packing_dense_mask(p, WINDOW, predicate=inclusive_by_one)
    violations = _property_violations(p, WINDOW, mask, 0)
    stage_report.expect_caught("window_off_by_one", {"examples": 1, "failures": len(violations)}, T.CP_MASKS_PROPERTY)


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
        Packing(torch.arange(5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(PackingError, match="more than one contiguous run"):
        Packing(torch.arange(4), torch.tensor([0, 1, 0, 1]))
    plan = plan_cp(96, 4)
    with pytest.raises(PackingError, match="tokens"):
        prepare_cp_masks(plan, pack([40]), [WINDOW])
    with pytest.raises(PackingError, match="CP rank 4"):
        plan.chunk_range(4, 0)


def test_unprepared_mask_names_key(model, rows, stage_report) -> None:  # noqa: ANN001
    """A lookup of an unprepared (rank, chunk, window) raises naming it, also from inside a real forward."""
    p = rows["A"]["packing"]
    plan = plan_cp(p.length, 4)
    prepared = prepare_cp_masks(plan, p, [WINDOW, None], ranks=[1])
    with pytest.raises(MaskNotPreparedError, match=r"CPMaskKey\(rank=2, chunk=0, window=8\)"):
        CPMasks(prepared, 2).lookup(WINDOW)
    only_sliding = prepare_cp_masks(plan_cp(p.length, 1), p, [WINDOW])
    ids = rows["A"]["input_ids"]
    builds = mask_builds()
    with pytest.raises(MaskNotPreparedError, match=r"CPMaskKey\(rank=0, chunk=0, window=None\)") as err:
        cp_forward(model, plan_cp(p.length, 1), 0, ids, p.position_ids[None], p.document_ids[None], only_sliding)
    assert mask_builds() == builds, "a mask was built during the forward"
    stage_report.record("unprepared_mask_error", message=str(err.value))


# ---------------------------------------------------------------------------------------------------
# the model: flex vs dense, packing invariance


def test_flex_vs_dense_model(model, rows, stage_report) -> None:  # noqa: ANN001
    """The model on the flex backend (planned BlockMasks, block size per head dim, flex_attention) equals the
    dense reference, both preparing their own masks from position, document and branch ids (shared-prefix
    rows). Small blocks (8 / 16) so that short rows have full, partial and empty blocks."""
    from gemma4_support.attention.backends import FlexPlan, attend_any
    from gemma4_support.attention.masks import prepare_dense_masks

    plan = FlexPlan({layer.window: {64: 8, 128: 16}[layer.head_dim] for layer in model.spec.layers})
    model_attend = model.decoder.layers[0].self_attention.attend
    for name, row in rows.items():
        p, ids = row["packing"], row["input_ids"]
        pos, doc, branch = p.position_ids[None], p.document_ids[None], p.branches()[None]
        with torch.no_grad():
            ref = model(ids, pos, doc, masks=_dense_masks(p, model.windows))
            via_hook = model(ids, pos, doc, branch_ids=branch)  # the dense backend's own preparation
            model.prepare_masks = plan.prepare
            model.set_attend(attend_any)
            try:
                out = model(ids, pos, doc, branch_ids=branch)
            finally:
                model.prepare_masks = prepare_dense_masks
                model.set_attend(model_attend)
        assert torch.equal(ref, via_hook)
        stage_report.check(f"flex_vs_dense_row_{name}", tensor_diff(ref, out), T.CP_MASKS_FLEX_VS_DENSE_FP32,
                           block_sizes={str(k): v for k, v in plan.block_sizes.items()},
                           shared_prefix=bool((p.branches() > 0).any()), flex="eager, CPU, forward only")


def _invariance(model, docs, ids: torch.Tensor, masks_fn=None, positions=None) -> tuple[dict, dict]:  # noqa: ANN001
    """Packed-row logits vs each sequence run alone; returns (metrics over all tokens, info)."""
    p = pack(docs)
    pos = p.position_ids if positions is None else positions
    with torch.no_grad():
        masks = (masks_fn or _dense_masks)(Packing(pos, p.document_ids, p.branch_ids), model.windows)
        packed = model(ids, pos[None], p.document_ids[None], masks=masks)
        refs, cands = [], []
        for idx in p.standalone_sequences():
            alone = model(ids[:, idx], p.position_ids[idx][None], torch.zeros_like(idx)[None])
            refs.append(alone[0])
            cands.append(packed[0, idx])
    return tensor_diff(torch.cat(refs), torch.cat(cands)), {"sequences": len(refs), "tokens": p.length}


def test_packing_invariance(model, rows, gemma4_seed, stage_report) -> None:  # noqa: ANN001
    """Packed rows (plain + shared-prefix documents) vs each sequence alone; random packings included."""
    rng = random.Random(gemma4_seed)
    cases = {"A": ROW_A, "B": ROW_B}
    for i in range(4):
        docs = []
        for _ in range(rng.randint(2, 4)):
            docs.append((rng.randint(4, 12), [rng.randint(4, 14) for _ in range(rng.randint(1, 3))])
                        if rng.random() < 0.5 else rng.randint(4, 30))
        cases[f"random{i}"] = docs
    for name, docs in cases.items():
        length = pack(docs).length
        ids = torch.randint(0, model.spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(len(name)))
        metrics, info = _invariance(model, docs, ids)
        stage_report.check(f"packing_invariance_{name}", metrics, T.CP_MASKS_PACKING_INVARIANCE_FP32,
                           documents=repr(docs), **info)


def test_packing_isolation(model, rows, stage_report) -> None:  # noqa: ANN001
    """Same row geometry, every other document's tokens replaced: a document's fp32 logits stay put (≤ 1e-5)."""
    row = rows["A"]
    p, ids = row["packing"], row["input_ids"]
    seg = p.segment_ids()
    masks = _dense_masks(p, model.windows)
    with torch.no_grad():
        base = model(ids, p.position_ids[None], p.document_ids[None], masks=masks)
        worst = {"max_abs": 0.0}
        for s in range(int(seg.max()) + 1):
            other = torch.randint(0, model.spec.vocab_size, ids.shape, generator=torch.Generator().manual_seed(s))
            mixed = torch.where((seg == s)[None], ids, other)
            out = model(mixed, p.position_ids[None], p.document_ids[None], masks=masks)
            d = tensor_diff(base[0, seg == s], out[0, seg == s])
            worst = d if d["max_abs"] >= worst["max_abs"] else worst
    stage_report.check("packing_isolation_row_A", worst, T.CP_MASKS_PACKING_ISOLATION_FP32,
                       documents=int(seg.max()) + 1)


@pytest.mark.parametrize("variant", ["no_shared_prefix", "packed_positions"])
def test_packing_sensitivity(model, rows, variant, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: masks without the sibling rule, or positions from packed indices, fail packing invariance."""
    docs = ROW_A
    p = pack(docs)
    if variant == "no_shared_prefix":
        def masks_fn(q, windows):  # noqa: ANN001, ANN202
            return prepare_dense_masks(q.position_ids[None], q.document_ids[None], windows)
        metrics, info = _invariance(model, docs, rows["A"]["input_ids"], masks_fn=masks_fn)
    else:
        metrics, info = _invariance(model, docs, rows["A"]["input_ids"], positions=torch.arange(p.length))
    stage_report.expect_caught(f"packing_{variant}", metrics, T.CP_MASKS_PACKING_INVARIANCE_FP32, **info)


# ---------------------------------------------------------------------------------------------------
# context parallelism (real multi-process gloo runs)


def _grad_metrics(ref: dict, cand: dict) -> dict:
    names = sorted(ref)
    missing = sorted(set(ref) ^ set(cand))
    assert not missing, f"gradient names differ: {missing[:5]}"
    d = tensor_diff(torch.cat([ref[n].flatten() for n in names]), torch.cat([cand[n].flatten() for n in names]))
    per = {n: tensor_diff(ref[n], cand[n])["max_abs"] for n in names}
    worst = max(per, key=per.get)
    return {"grads_max_abs": d["max_abs"], "grads_rel_l2": d["rel_l2"], "grads_worst": worst,
            "grads_tensors": len(names)}


def _bookkeeping(cp_runs: dict, name: str, group: int, cp: int) -> dict:
    ranks = [cp_runs[name][group]] + [cp_runs[f"{name}@rank{r}"][group] for r in range(1, cp)]
    return {
        "masks_built_during_forward": sum(r["masks_built_during_forward"] for r in ranks),
        "missing_mask_keys": sum(len(set(r["expected_keys"]) - set(r["mask_keys"])) for r in ranks),
        "masks_prepared_per_rank": [r["masks_prepared"] for r in ranks],
        "mask_lookups_per_rank": [r["mask_lookups"] for r in ranks],
        "mask_plan_seconds_per_rank": [r["plan_seconds"] for r in ranks],
        "forward_seconds_per_rank": [r["forward_seconds"] for r in ranks],
        "step_seconds_per_rank": [r["step_seconds"] for r in ranks],
        "chunk_len": ranks[0]["chunk_len"], "local_tokens": ranks[0]["local_tokens"], "seq_len": ranks[0]["seq_len"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_equivalence(cp, cp_runs, cp1_reference, stage_report) -> None:  # noqa: ANN001
    """CP = 2 / 4 logits and all-reduced gradients equal CP = 1 (fp32), masks only looked up, never built."""
    for group, res in cp_runs[f"cp{cp}"].items():
        ref = cp1_reference[res["row"]]
        logits = tensor_diff(ref["logits"], res["logits"])
        book = _bookkeeping(cp_runs, f"cp{cp}", group, cp)
        metrics = {"logits_max_abs": logits["max_abs"], "logits_rel_l2": logits["rel_l2"],
                   **_grad_metrics(ref["grads"], res["grads"]),
                   "masks_built_during_forward": book.pop("masks_built_during_forward"),
                   "missing_mask_keys": book.pop("missing_mask_keys")}
        stage_report.check(f"cp{cp}_vs_cp1_row_{res['row']}", metrics, T.CP_MASKS_CP_EQUIVALENCE_FP32,
                           cp=cp, row=res["row"], launch=cp_runs["_launch"], **book)


@pytest.mark.slow
def test_cp_flex(cp_runs, cp1_reference, stage_report) -> None:  # noqa: ANN001
    """The flex BlockMask path under CP = 4 (forward) equals CP = 1 dense."""
    res = cp_runs["cp4_flex"][0]
    d = tensor_diff(cp1_reference[res["row"]]["logits"], res["logits"])
    book = _bookkeeping(cp_runs, "cp4_flex", 0, 4)
    stage_report.check("cp4_flex_vs_cp1", {"logits_max_abs": d["max_abs"],
                                           "masks_built_during_forward": book.pop("masks_built_during_forward")},
                       T.CP_MASKS_CP_FLEX_FP32, **book)


@pytest.mark.slow
@pytest.mark.parametrize("variant", CP_VARIANTS)
def test_cp_sensitivity(variant, cp_runs, cp1_reference, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: each deliberately broken CP variant fails the CP equivalence gates."""
    res = cp_runs[f"cp4_{variant}"][0]
    d = tensor_diff(cp1_reference[res["row"]]["logits"], res["logits"])
    metrics = {"logits_max_abs": d["max_abs"], "grads_max_abs": 0.0, "masks_built_during_forward": 0,
               "missing_mask_keys": 0}
    stage_report.expect_caught(f"cp4_{variant}", metrics, T.CP_MASKS_CP_EQUIVALENCE_FP32,
                               logits_rel_l2=d["rel_l2"], note="forward only; gradients not compared")


def test_flex_backend_through_build(model, gemma4_model_dir, depth, stage_report) -> None:  # noqa: ANN001
    """`build_model(attention="flex")` prepares BlockMasks itself (block size per head dim) and equals the
    dense model on a plain packed row; "auto" is dense on CPU (flex has no CPU backward) and flex on CUDA."""
    from gemma4_support.attention.backends import resolve
    from gemma4_support.errors import Gemma4Error
    from gemma4_support.model.build import load_model

    flex = load_model(gemma4_model_dir, depth=depth, attention="flex")
    p = pack([150, 97, 209])
    ids = torch.randint(0, model.spec.vocab_size, (1, p.length), generator=torch.Generator().manual_seed(3))
    pos, doc = p.position_ids[None], p.document_ids[None]
    with torch.no_grad():
        ref, out = model(ids, pos, doc), flex(ids, pos, doc)
    stage_report.check("flex_backend_plain_row", tensor_diff(ref, out), T.CP_MASKS_FLEX_VS_DENSE_FP32, tokens=p.length)
    assert resolve("auto", "cpu") == "dense" and resolve("auto", "cuda") == "flex"
    with pytest.raises(Gemma4Error, match="unknown attention backend"):
        resolve("sdpa", "cpu")
    with pytest.raises(Gemma4Error, match="one packed row"):
        flex(ids.repeat(2, 1), pos.repeat(2, 1), doc.repeat(2, 1))


def test_auto_backend_keeps_wide_heads_dense() -> None:
    """On CUDA, `auto` plans flex for head dims up to 256 and keeps Gemma 4's 512-wide global heads dense
    (their flex kernel does not fit the H200's shared memory in bf16: docs/gpu_flex_attention.md)."""
    from fixtures.configs import real_config
    from gemma4_support.attention.backends import backend_hooks
    from gemma4_support.config.spec import load_spec

    spec = load_spec(real_config("26B-A4B"))
    prepare, _ = backend_hooks("auto", spec, "cuda")
    assert prepare.__self__.block_sizes == {1024: 128, None: None}
    prepare, _ = backend_hooks("flex", spec, "cuda")
    assert prepare.__self__.block_sizes == {1024: 128, None: 64}
