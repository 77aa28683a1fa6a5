"""Stage cp_masks, through the model: flex vs dense attention, packing isolation and invariance, and
context-parallel equivalence (CP = 2 and 4 in real gloo processes vs CP = 1), with sensitivity variants.

All model comparisons run on one intra-op thread (the CP workers do too): BLAS picks different kernels for
different row counts on two threads, which would add noise unrelated to masks.
"""
from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from fixtures.packings import ROW_A, ROW_B, WINDOW
from gemma4_support.attention.backends import AttentionBackend, DenseBackend, FlexBackend, attention_backend
from gemma4_support.errors import Gemma4Error, MaskNotPreparedError
from gemma4_support.loss import token_loss
from gemma4_support.metrics import Gate, tensor_diff
from gemma4_support.model.build import load_model
from gemma4_support.packing import PackedRow, pack
from gemma4_support.parallel import ContextParallelBackend, CPMasks, cp_forward
from validation import thresholds as T
from validation.cp_worker import BROKEN_VARIANTS, launch
from validation.mask_variants import CountingBackend, NoSharedPrefix

pytestmark = [pytest.mark.stage_cp_masks, pytest.mark.xdist_group("cp_masks"), pytest.mark.usefixtures("one_thread")]  # the CP launches

CP_VARIANTS = tuple(BROKEN_VARIANTS)


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def depth(pytestconfig: pytest.Config) -> str | None:
    """Covering depth unless --gemma4-full-depth."""
    return None if pytestconfig.getoption("--gemma4-full-depth") else "covering"


@pytest.fixture(scope="module")
def model(gemma4_model_dir, depth, one_thread):  # noqa: ANN001, ANN201
    """The megatron-core Gemma 4 under test (fp32, CPU, world size 1, dense attention)."""
    return load_model(gemma4_model_dir, depth=depth, attention="dense")


def _row(documents, seed: int, vocab: int) -> PackedRow:  # noqa: ANN001
    geometry = pack(documents)
    g = torch.Generator().manual_seed(seed)
    return geometry.with_tokens(torch.randint(0, vocab, (1, geometry.length), generator=g)[0])


@pytest.fixture(scope="module")
def rows(model, gemma4_seed) -> dict[str, PackedRow]:  # noqa: ANN001
    """The packed rows of the CP runs."""
    return {"A": _row(ROW_A, gemma4_seed + 1, model.spec.vocab_size),
            "B": _row(ROW_B, gemma4_seed + 2, model.spec.vocab_size)}


def _masks(row: PackedRow, windows, backend: AttentionBackend | None = None):  # noqa: ANN001, ANN202
    """Masks of a row prepared ahead by `backend` (default: the dense reference)."""
    return (backend or DenseBackend()).prepare(row.position_ids[None], row.document_ids[None], windows,
                                               row.batched_branch_ids())


def _probe_loss(logits: torch.Tensor, row: PackedRow) -> torch.Tensor:
    """The gradient probe of every CP comparison: next-token cross entropy of every token, over the row length."""
    return token_loss(logits, torch.roll(row.input_ids, -1)[None], denominator=row.length)


@pytest.fixture(scope="module")
def cp1_reference(model, rows) -> dict:  # noqa: ANN001
    """CP = 1: logits and every parameter's gradient of each row, the plain model on the whole row."""
    out = {}
    for name, row in rows.items():
        model.zero_grad(set_to_none=True)
        logits = model(*row.model_inputs(), masks=_masks(row, model.windows))
        _probe_loss(logits, row).backward()
        grads = {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}
        out[name] = {"logits": logits.detach(), "grads": grads}
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def cp_runs(gemma4_model_dir, depth, rows) -> dict:  # noqa: ANN001
    """Two launches: CP = 4 (row A: dense with backward, flex forward, the broken variants with backward) and
    CP = 2 (rows A and B, with backward)."""
    cp4 = [{"name": "cp4", "rows": ["A"], "variant": "none", "backward": True, "kind": "dense"},
           {"name": "cp4_flex", "rows": ["A"], "variant": "none", "backward": False, "kind": "flex", "block_size": 16}]
    cp4 += [{"name": f"cp4_{v}", "rows": ["A"], "variant": v, "backward": True, "kind": "dense"} for v in CP_VARIANTS]
    cp2 = [{"name": "cp2", "rows": ["A", "B"], "variant": "none", "backward": True, "kind": "dense"}]
    job = {"model_dir": str(gemma4_model_dir), "depth": depth, "rows": rows}
    t0 = time.perf_counter()
    res = {"_launch": {}}
    for cp, runs in ((4, cp4), (2, cp2)):
        out = launch({**job, "cp": cp, "runs": runs})
        res["_launch"][f"cp{cp}"] = out.pop("_launch")
        res.update(out)
    res["_launch"]["total_seconds"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------------
# the model: errors, flex vs dense, packing invariance


def test_unprepared_mask_names_key(gemma4_model_dir, depth, rows, stage_report) -> None:  # noqa: ANN001
    """A lookup of an unprepared (rank, chunk, window) raises naming it, also from inside a real forward; a CP
    model called without masks says how to prepare them."""
    row = rows["A"]
    counter = CountingBackend(DenseBackend())
    cp_model = load_model(gemma4_model_dir, depth=depth, attention=ContextParallelBackend(counter))
    rank_0 = cp_model.backend.prepare_row(row, [WINDOW, None])
    with pytest.raises(MaskNotPreparedError, match=r"CPMaskKey\(rank=2, chunk=0, window=8\)"):
        CPMasks(rank_0.prepared, rank_0.plan, rank=2).lookup(WINDOW)
    only_sliding = cp_model.backend.prepare_row(row, [WINDOW])
    builds = counter.builds
    with pytest.raises(MaskNotPreparedError, match=r"CPMaskKey\(rank=0, chunk=0, window=None\)") as err:
        cp_forward(cp_model, row, only_sliding)
    assert counter.builds == builds, "a mask was built during the forward"
    with pytest.raises(Gemma4Error, match="without masks"):
        cp_model(*row.model_inputs())
    stage_report.record("unprepared_mask_error", message=str(err.value))


def test_cp_forward_replays_the_rows_routing(rows, gemma4_seed, stage_report) -> None:  # noqa: ANN001
    """A row carrying the sampler's MoE routing is scored under it through `cp_forward` too (MoE fixture, world size
    1, each rank's part of the routes sharded by the row's CP plan): equal to the plain model under `replay_routing`.
    Sensitivity: the routes dropped (`replay=False`, what cp_forward did before) moves the logits past the gate."""
    from fixtures.factory import fixture_dir
    from gemma4_support.model.router_replay import replay_recorded, routers_by_layer

    moe_dir = fixture_dir("moe")
    plain = load_model(moe_dir, depth="covering", attention="dense")
    cp_model = load_model(moe_dir, depth="covering", attention=ContextParallelBackend(DenseBackend()))
    routers = routers_by_layer(plain)
    experts, top_k = next(iter(routers.values())).per_expert_scale.numel(), next(iter(routers.values())).top_k
    row = _row(ROW_A, gemma4_seed + 3, plain.spec.vocab_size)
    gen = torch.Generator().manual_seed(gemma4_seed)
    routes = torch.rand(row.length, len(routers), experts, generator=gen).argsort(-1)[..., :top_k]
    routed = dataclasses.replace(row, routed_experts=routes)
    with torch.no_grad():
        with replay_recorded(plain, routes):
            ref = plain(*row.model_inputs(), branch_ids=row.batched_branch_ids())
        got = {"replayed": cp_forward(cp_model, routed), "dropped": cp_forward(cp_model, routed, replay=False)}
    gates = (Gate("cp_replay_logits_max_abs", "<=", 1e-5),)
    info = {"routes": "random, distinct per token", "experts": experts, "top_k": top_k, "seq_len": row.length}
    stage_report.check("cp_forward replays routed_experts",
                       {"cp_replay_logits_max_abs": tensor_diff(ref, got["replayed"])["max_abs"]}, gates, **info)
    stage_report.expect_caught("sensitivity/cp_routes_dropped",
                               {"cp_replay_logits_max_abs": tensor_diff(ref, got["dropped"])["max_abs"]}, gates, **info)


def test_flex_vs_dense_model(model, gemma4_model_dir, depth, rows, stage_report) -> None:  # noqa: ANN001
    """The model on the flex backend (planned BlockMasks, block size per head dim, flex_attention) equals the
    dense reference, both preparing their own masks from position, document and branch ids (shared-prefix
    rows). Small blocks (8 / 16) so that short rows have full, partial and empty blocks."""
    flex = FlexBackend({layer.window: {64: 8, 128: 16}[layer.head_dim] for layer in model.spec.layers})
    flex_model = load_model(gemma4_model_dir, depth=depth, attention=flex)
    for name, row in rows.items():
        inputs, branch = row.model_inputs(), row.batched_branch_ids()
        with torch.no_grad():
            ref = model(*inputs, masks=_masks(row, model.windows))
            via_backend = model(*inputs, branch_ids=branch)  # the dense backend's own preparation
            out = flex_model(*inputs, branch_ids=branch)
        assert torch.equal(ref, via_backend)
        stage_report.check(f"flex_vs_dense_row_{name}", tensor_diff(ref, out), T.CP_MASKS_FLEX_VS_DENSE_FP32,
                           block_sizes={str(k): v for k, v in flex.block_sizes.items()},
                           shared_prefix=bool((row.branches() > 0).any()), flex="eager, CPU, forward only")


def _invariance(model, docs, ids: torch.Tensor, backend: AttentionBackend | None = None,  # noqa: ANN001
                positions: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Packed-row logits vs each sequence run alone; returns (metrics over all tokens, info)."""
    p = pack(docs)
    packed_row = p.with_tokens(ids[0]) if positions is None else dataclasses.replace(p, position_ids=positions)
    with torch.no_grad():
        packed = model(ids, packed_row.position_ids[None], p.document_ids[None],
                       masks=_masks(packed_row, model.windows, backend))
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
    ids, pos, doc = row.model_inputs()
    seg = row.segment_ids()
    masks = _masks(row, model.windows)
    with torch.no_grad():
        base = model(ids, pos, doc, masks=masks)
        worst = {"max_abs": 0.0}
        for s in range(int(seg.max()) + 1):
            other = torch.randint(0, model.spec.vocab_size, ids.shape, generator=torch.Generator().manual_seed(s))
            mixed = torch.where((seg == s)[None], ids, other)
            out = model(mixed, pos, doc, masks=masks)
            d = tensor_diff(base[0, seg == s], out[0, seg == s])
            worst = d if d["max_abs"] >= worst["max_abs"] else worst
    stage_report.check("packing_isolation_row_A", worst, T.CP_MASKS_PACKING_ISOLATION_FP32,
                       documents=int(seg.max()) + 1)


PACKING_VARIANTS = {
    "no_shared_prefix": "masks built without the shared-prefix rule: completions see their siblings",
    "packed_positions": "position ids taken from packed indices instead of each document's own positions",
}


@pytest.mark.parametrize("variant", PACKING_VARIANTS)
def test_packing_sensitivity(model, rows, variant, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: masks without the sibling rule, or positions from packed indices, fail packing invariance."""
    ids = rows["A"].input_ids[None]
    if variant == "no_shared_prefix":
        metrics, info = _invariance(model, ROW_A, ids, backend=NoSharedPrefix())
    else:
        metrics, info = _invariance(model, ROW_A, ids, positions=torch.arange(pack(ROW_A).length))
    stage_report.expect_caught(f"packing_{variant}", metrics, T.CP_MASKS_PACKING_INVARIANCE_FP32,
                               broken=PACKING_VARIANTS[variant], **info)


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


def _bookkeeping(cp_runs: dict, name: str, row: str, cp: int) -> dict:
    ranks = [cp_runs[name][row]] + [cp_runs[f"{name}@rank{r}"][row] for r in range(1, cp)]
    return {
        "masks_built_during_forward": sum(r["masks_built_during_forward"] for r in ranks),
        "missing_mask_keys": sum(len(set(r["expected_keys"]) - set(r["mask_keys"])) for r in ranks),
        "masks_prepared_per_rank": [r["masks_prepared"] for r in ranks],
        "mask_lookups_per_rank": [r["mask_lookups"] for r in ranks],
        "mask_plan_seconds_per_rank": [r["plan_seconds"] for r in ranks],
        "forward_seconds_per_rank": [r["forward_seconds"] for r in ranks],
        "step_seconds_per_rank": [r["step_seconds"] for r in ranks],
        "chunk_len": ranks[0]["chunk_len"], "local_tokens": ranks[0]["local_tokens"], "seq_len": ranks[0]["seq_len"],
        "backend": ranks[0]["backend"],
    }


@pytest.mark.expected_seconds(43)
@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_equivalence(cp, cp_runs, cp1_reference, stage_report) -> None:  # noqa: ANN001
    """CP = 2 / 4 logits and all-reduced gradients equal CP = 1 (fp32), masks only looked up, never built."""
    for row, res in cp_runs[f"cp{cp}"].items():
        ref = cp1_reference[row]
        logits = tensor_diff(ref["logits"], res["logits"])
        book = _bookkeeping(cp_runs, f"cp{cp}", row, cp)
        metrics = {"logits_max_abs_rel": logits["max_abs_rel"], "logits_max_abs": logits["max_abs"],
                   "logits_rel_l2": logits["rel_l2"],
                   **_grad_metrics(ref["grads"], res["grads"]),
                   "masks_built_during_forward": book.pop("masks_built_during_forward"),
                   "missing_mask_keys": book.pop("missing_mask_keys")}
        stage_report.check(f"cp{cp}_vs_cp1_row_{row}", metrics, T.CP_MASKS_CP_EQUIVALENCE_FP32,
                           cp=cp, row=row, launch=cp_runs["_launch"], **book)


@pytest.mark.slow
def test_cp_flex(cp_runs, cp1_reference, stage_report) -> None:  # noqa: ANN001
    """The flex BlockMask path under CP = 4 (forward) equals CP = 1 dense."""
    res = cp_runs["cp4_flex"]["A"]
    d = tensor_diff(cp1_reference["A"]["logits"], res["logits"])
    book = _bookkeeping(cp_runs, "cp4_flex", "A", 4)
    metrics = {"logits_max_abs_rel": d["max_abs_rel"], "logits_max_abs": d["max_abs"],
               "masks_built_during_forward": book.pop("masks_built_during_forward")}
    stage_report.check("cp4_flex_vs_cp1", metrics, T.CP_MASKS_CP_FLEX_FP32, **book)


@pytest.mark.slow
@pytest.mark.parametrize("variant", CP_VARIANTS)
def test_cp_sensitivity(variant, cp_runs, cp1_reference, stage_report) -> None:  # noqa: ANN001
    """Sensitivity: each deliberately broken CP variant (forward + backward, like the real one) fails the CP
    equivalence gates; every metric is measured as in test_cp_equivalence."""
    res = cp_runs[f"cp4_{variant}"]["A"]
    ref = cp1_reference["A"]
    d = tensor_diff(ref["logits"], res["logits"])
    book = _bookkeeping(cp_runs, f"cp4_{variant}", "A", 4)
    metrics = {"logits_max_abs_rel": d["max_abs_rel"], "logits_max_abs": d["max_abs"], "logits_rel_l2": d["rel_l2"],
               **_grad_metrics(ref["grads"], res["grads"]),
               "masks_built_during_forward": book.pop("masks_built_during_forward"),
               "missing_mask_keys": book.pop("missing_mask_keys")}
    stage_report.expect_caught(f"cp4_{variant}", metrics, T.CP_MASKS_CP_EQUIVALENCE_FP32,
                               broken=BROKEN_VARIANTS[variant], cp=4, row="A", **book)


def test_flex_backend_through_build(model, gemma4_model_dir, depth, stage_report) -> None:  # noqa: ANN001
    """`build_model(attention="flex")` prepares BlockMasks itself (block size per head dim) and equals the
    dense model on a plain packed row; "auto" is dense on CPU (flex has no CPU backward) and flex on CUDA."""
    flex = load_model(gemma4_model_dir, depth=depth, attention="flex")
    p = pack([150, 97, 209])
    ids = torch.randint(0, model.spec.vocab_size, (1, p.length), generator=torch.Generator().manual_seed(3))
    pos, doc = p.position_ids[None], p.document_ids[None]
    with torch.no_grad():
        ref, out = model(ids, pos, doc), flex(ids, pos, doc)
    stage_report.check("flex_backend_plain_row", tensor_diff(ref, out), T.CP_MASKS_FLEX_VS_DENSE_FP32, tokens=p.length)
    assert attention_backend("auto", model.spec, "cpu").name == "dense"
    assert attention_backend("auto", model.spec, "cuda").name == "flex"
    with pytest.raises(Gemma4Error, match="unknown attention backend"):
        attention_backend("sdpa", model.spec, "cpu")
    with pytest.raises(Gemma4Error, match="one packed row"):
        flex(ids.repeat(2, 1), pos.repeat(2, 1), doc.repeat(2, 1))


def test_auto_backend_plans_flex_with_wide_head_tiles() -> None:
    """On CUDA, `auto` plans flex for every window, Gemma 4's 512-wide global heads with smaller kernel tiles (flex's
    default tiles do not fit Hopper's shared memory at head dim 512: docs/gpu_flex_attention.md)."""
    import torch

    from fixtures.configs import real_config
    from gemma4_support.attention.block_masks import kernel_options
    from gemma4_support.config.spec import load_spec

    spec = load_spec(real_config("26B-A4B"))
    assert attention_backend("auto", spec, "cuda").block_sizes == {1024: 128, None: 64}
    assert attention_backend("flex", spec, "cuda").block_sizes == {1024: 128, None: 64}
    assert kernel_options(256, torch.bfloat16) is None
    assert kernel_options(512, torch.bfloat16)["BLOCK_M"] == 32 and kernel_options(512, torch.float32)["BLOCK_M"] == 16
