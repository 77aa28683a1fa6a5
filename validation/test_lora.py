"""Stage mismatch, offline parts: LoRA export/import round trips, adapters vLLM would ignore refused with one line,
RL packing's capacity and routing errors, router replay from recorded routes (no server needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.factory import fixture_dir
from gemma4_support.convert.checkpoint import HFCheckpoint, megatron_to_hf
from gemma4_support.errors import CheckpointError, ConfigError, Gemma4Error, PackingError
from gemma4_support.lora import LoraAdapters, LoraConfig, attach_lora, load_adapter, save_adapter, save_merged
from gemma4_support.lora.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from gemma4_support.logprobs import score_row
from gemma4_support.metrics import Gate, evaluate, tensor_diff
from gemma4_support.model.build import load_model, model_spec
from gemma4_support.model.router_replay import recorded_routing
from gemma4_support.packing import pack
from gemma4_support.rl.rows import pack_sequences
from gemma4_support.rl.trajectory import TrainingSequence

pytestmark = pytest.mark.stage_mismatch

LORA = LoraConfig(rank=4, alpha=8.0, init="random", b_std=0.02, seed=3)
ROUND_TRIP_GATES = (Gate("adapter_round_trip_exact", "==", 1.0), Gate("merged_round_trip_exact", "==", 1.0),
                    Gate("merged_vs_lora_logits_max_abs_rel", "<=", 1e-5),
                    Gate("chunked_vs_full_logprob_max_abs", "<=", 1e-5), Gate("layers_without_v_written", "==", 0.0))


@pytest.fixture(scope="module", params=["dense", "moe"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    base = fixture_dir(request.param)
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    adapters = LoraAdapters(model_spec(base), LORA)
    return request.param, base, adapters, save_adapter(adapters, root / "adapter"), save_merged(adapters, base, root / "merged")


def test_round_trip(exported, stage_report) -> None:
    """Adapter directory -> LoraAdapters is bit for bit; the merged checkpoint reads back through the Megatron model
    bit for bit, and its logits equal the base model with the adapter attached."""
    variant, base, adapters, adapter_dir, merged_dir = exported
    back = load_adapter(adapter_dir, adapters.spec)
    exact = all(torch.equal(a, b) for a, b in zip(adapters.state_dict().values(), back.state_dict().values()))
    merged = load_model(merged_dir, attention="dense")
    written = HFCheckpoint(merged_dir)
    reread = megatron_to_hf(merged.state_dict(), merged.spec)
    merged_exact = all(torch.equal(reread[n], written.get(n)) for n in written.names())
    model = load_model(base, attention="dense")
    attach_lora(model, back.config, adapters=back)
    row = pack([(24, [10, 12]), 30]).with_tokens(torch.randint(5, 500, (76,), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        with_lora = model(*row.model_inputs(), branch_ids=row.batched_branch_ids())
        from_merged = merged(*row.model_inputs(), branch_ids=row.batched_branch_ids())
        chunked = score_row(model, row, chunk_tokens=16).logprobs
    full = torch.log_softmax(with_lora[0].float(), -1).gather(-1, row.labels[:, None])[:, 0]
    metrics = {"adapter_round_trip_exact": float(exact and len(back.trained_names()) == len(adapters.trained_names())),
               "merged_round_trip_exact": float(merged_exact),
               "merged_vs_lora_logits_max_abs_rel": tensor_diff(with_lora, from_merged)["max_abs_rel"],
               "chunked_vs_full_logprob_max_abs": tensor_diff(full, chunked)["max_abs"],
               "layers_without_v_written": float(len(adapters.spec.layers) - sum(
                   1 for k in load_file(adapter_dir / ADAPTER_WEIGHTS) if "v_proj.lora_A" in k))}
    gates = [g for g in ROUND_TRIP_GATES if g.metric in metrics]
    stage_report.check(f"lora round trip ({variant})", metrics, gates)


@pytest.mark.parametrize("targets, experts", [(("q_proj", "up_proj"), False), (("o_proj", "gate_proj"), True)])
def test_partial_targets_land_where_merging_puts_them(tmp_path, stage_report, targets, experts) -> None:
    """A site with only some members adapted (q without k, up without gate; the experts' gate/up/down): the attached
    adapter's logits equal the merged checkpoint's, so every fused pair places its rows as the weight table does."""
    base = fixture_dir("moe")
    config = LoraConfig(rank=4, alpha=8.0, init="random", b_std=0.02, seed=5, target_modules=targets, experts=experts)
    adapters = LoraAdapters(model_spec(base), config)
    merged = load_model(save_merged(adapters, base, tmp_path / "merged"), attention="dense")
    model = load_model(base, attention="dense")
    attach_lora(model, config, adapters=adapters)
    row = pack([40, 24]).with_tokens(torch.randint(5, 500, (64,), generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        with_lora = model(*row.model_inputs(), branch_ids=row.batched_branch_ids())
        from_merged = merged(*row.model_inputs(), branch_ids=row.batched_branch_ids())
        base_logits = load_model(base, attention="dense")(*row.model_inputs(), branch_ids=row.batched_branch_ids())
    metrics = {"merged_vs_lora_logits_max_abs_rel": tensor_diff(with_lora, from_merged)["max_abs_rel"],
               "lora_moves_logits_max_abs_rel": tensor_diff(with_lora, base_logits)["max_abs_rel"]}
    placement = Gate("merged_vs_lora_logits_max_abs_rel", "<=", 1e-5)
    stage_report.check(f"lora partial targets {'+'.join(targets)}{' + experts' if experts else ''}", metrics,
                       [placement, Gate("lora_moves_logits_max_abs_rel", ">=", 1e-3)])
    if experts:  # sensitivity: every expert's gate and up pairs exchanged, as a misplaced [gate; up] would land them
        with torch.no_grad():
            for table in (adapters.lora_A, adapters.lora_B):
                for key in [k for k in table.keys() if k.endswith("experts/gate_proj")]:
                    up = key.removesuffix("gate_proj") + "up_proj"
                    gate = table[key].clone()
                    table[key].copy_(table[up])
                    table[up].copy_(gate)
            swapped = model(*row.model_inputs(), branch_ids=row.batched_branch_ids())
        broken = {placement.metric: tensor_diff(swapped, from_merged)["max_abs_rel"]}
        assert not evaluate(broken, [placement])[0].passed, broken
        stage_report.record("lora partial targets: gate and up exchanged (sensitivity)", **broken)


def test_expert_adapters_are_read_packed() -> None:
    """The grouped path reads a layer's expert adapters as the packed parameters themselves (no per-call stack of E
    pairs); a module's pair is a view of them, and its gradient is the packed gradient's slice."""
    from gemma4_support.lora.adapter import _key

    adapters = LoraAdapters(model_spec(fixture_dir("moe")), LORA)
    spec = adapters.spec
    layer = next(x for x in spec.layers if x.mlp == "moe")
    names = [n for n in adapters.trained_names() if f"layers.{layer.index}.experts." in n and n.endswith("gate_proj")]
    a, b = adapters.expert_pairs(names)
    key = _key(names[0].replace(".experts.0.", ".experts."))
    assert len(names) == spec.moe.num_experts and a is adapters.lora_A[key] and b is adapters.lora_B[key]
    assert adapters.pair(names[1])[0].data_ptr() == a[1].data_ptr()
    (a.sum() * 2).backward()
    grads = adapters.module_tensors(grads=True)
    assert torch.equal(grads[f"lora_A.{_key(names[1])}"], torch.full_like(a[1], 2.0))


def _broken(adapter_dir, tmp_path, *, rename=None, drop=None, change=None, config=None):  # noqa: ANN001, ANN202
    out = tmp_path / "broken"
    out.mkdir()
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    if drop:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    if change:
        key = next(k for k in tensors if change[0] in k)
        tensors[key] = change[1](tensors[key])
    save_file(tensors, str(out / ADAPTER_WEIGHTS))
    doc = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    doc.update(config or {})
    (out / ADAPTER_CONFIG).write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("how, expected", [
    (dict(rename=("self_attn.q_proj", "self_attn.qq_proj")), "names no module"),
    (dict(rename=("layers.0.", "layers.60.")), "names no module"),
    (dict(drop="layers.5.self_attn.v_proj"), "but no model.layers.5.self_attn.v_proj"),
    (dict(change=("layers.5.self_attn.v_proj.lora_B", lambda t: t * 2)), "differs from"),
    (dict(change=("layers.0.mlp.down_proj.lora_A", lambda t: t[:, :-1].contiguous())), "has shape"),
    (dict(config={"use_dora": True}), "use_dora"),
    (dict(config={"peft_type": "IA3"}), "not LORA"),
])
def test_adapter_vllm_would_misread_is_refused(exported, tmp_path, how: dict, expected: str) -> None:
    """Every tensor vLLM would ignore or apply differently from the trainer: one CheckpointError line naming it."""
    variant, _, adapters, adapter_dir, _ = exported
    broken = _broken(adapter_dir, tmp_path, **how)
    with pytest.raises(CheckpointError) as err:
        load_adapter(broken, adapters.spec)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_lora_config_refusals() -> None:
    """LoRA settings the trainer cannot honour are refused at configuration time."""
    for bad in (dict(target_modules=("k_proj",)), dict(dropout=0.1), dict(rank=0), dict(init="kaiming"),
                dict(target_modules=("qkv",))):
        with pytest.raises(ConfigError):
            LoraConfig(**bad)


def _sequence(n: int, routed: np.ndarray | None = None, index: int = 0) -> TrainingSequence:
    ids = list(range(5, 5 + n))
    return TrainingSequence(ids, [0] * 4 + [1] * (n - 4), [0.0] * 4 + [-1.0] * (n - 4), index, 0, [0], [(4, n)], routed)


def test_packing_and_routing_errors() -> None:
    """Over capacity, truncation on request, routed experts of the wrong shape or layer count: one line each."""
    with pytest.raises(PackingError, match="more than the packing capacity 16"):
        pack_sequences([[_sequence(20)]], capacity=16)
    rows, _ = pack_sequences([[_sequence(20)]], capacity=16, truncate=True)
    assert rows[0].length == 16 and int(rows[0].loss_mask.sum()) == 12
    with pytest.raises(PackingError, match=r"routed_experts of trajectory 0, history 0 has shape \(5, 1, 2\)"):
        pack_sequences([[_sequence(10, np.zeros((5, 1, 2), dtype=np.int64))]], capacity=16)
    routed = np.tile(np.array([[[0, 1]]]), (9, 1, 1))
    rows, _ = pack_sequences([[_sequence(10, routed)]], capacity=16)
    assert rows[0].routed_experts.shape == (16, 1, 2) and int((rows[0].routed_experts[:, 0, 0] < 0).sum()) == 7
    model = load_model(fixture_dir("moe"), attention="dense")
    with pytest.raises(Gemma4Error, match="records 1 MoE layers x top-2; the model has 6 MoE layers"):
        recorded_routing(model, rows[0].routed_experts)


def test_wire_errors_name_the_field() -> None:
    """What the mismatch stage reads from vLLM, missing or malformed: one ServerError line naming the field."""
    from gemma4_support.errors import ServerError
    from gemma4_support.serving.wire import choice_top_logprobs, prompt_logprobs

    cases = [
        (lambda: choice_top_logprobs({"logprobs": None}, "choice 3"), "choice 3 has no logprobs content"),
        (lambda: choice_top_logprobs({"logprobs": {"content": [{"logprob": -1.0, "top_logprobs": []}]}}, "c"),
         "c token 0 has no top_logprobs"),
        (lambda: choice_top_logprobs({"logprobs": {"content": [{"top_logprobs": [{"token": "abc", "logprob": -1}]}]}},
                                     "c"), "is not 'token_id:N'"),
        (lambda: prompt_logprobs({"prompt_logprobs": None}, [1, 2], 20, "sample 0"), "sample 0 has no prompt_logprobs"),
        (lambda: prompt_logprobs({"prompt_logprobs": [None, {"7": {"logprob": -1.0, "rank": 1}}]}, [1, 2], 20, "s"),
         "lacks the token there (2)"),
    ]
    for call, expected in cases:
        with pytest.raises(ServerError) as err:
            call()
        assert expected in str(err.value) and "\n" not in str(err.value)


def _fused_vs_checkpointed(model: torch.nn.Module, adapters: torch.nn.Module, row) -> dict[str, float]:  # noqa: ANN001
    """The fused label log-probs (training's path) against the checkpointed chunked head: values and every gradient
    (base and LoRA) of the same weighted sum."""
    from gemma4_support.logprobs import chunked_logprobs, label_logprobs
    from gemma4_support.metrics import named_tensor_metrics

    weights = torch.linspace(-1.0, 1.0, row.length)
    runs = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        adapters.zero_grad(set_to_none=True)
        hidden = model.hidden_states(*row.model_inputs())[:, 0]
        lp = (label_logprobs(hidden, model.head_weight(), row.labels, softcap=model.softcap, chunk_tokens=24) if fused
              else chunked_logprobs(hidden, model.logits, row.labels, chunk_tokens=24).logprobs)
        (lp * weights).sum().backward()
        named = [*model.named_parameters(), *(("lora." + n, p) for n, p in adapters.named_parameters())]
        grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        assert any(n.startswith("lora.") for n in grads), "no adapter gradient to compare"
        runs.append((lp.detach(), grads))
    return {"logprob_max_abs": tensor_diff(runs[0][0], runs[1][0])["max_abs"],
            "grad_max_rel_l2": float(named_tensor_metrics(runs[0][1], runs[1][1])["max_rel_l2"])}


FUSED_HEAD_GATES = (Gate("logprob_max_abs", "<=", 1e-5), Gate("grad_max_rel_l2", "<=", 1e-5))


@pytest.mark.parametrize("broken,frozen", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["fused", "fused-frozen-head", "sensitivity/softcap-dropped-in-training",
                              "sensitivity/softcap-dropped-frozen-head"])
def test_fused_label_logprobs_equal_the_checkpointed_head(stage_report, monkeypatch: pytest.MonkeyPatch,
                                                          broken: bool, frozen: bool) -> None:
    """Training scores labels through the fused head (no recomputed logits); it equals the checkpointed chunked
    head in fp32 — values, base gradients (the tied embedding included) and LoRA gradients — on the MoE fixture,
    and a fused head that forgets the final-logit softcap when training fails the gates. With the base frozen (LoRA
    training) the head keeps its [tokens, h] product instead of the [tokens, vocab] per-unit gradient."""
    from gemma4_support import logprobs as logprobs_module

    base = fixture_dir("moe")
    model = load_model(base, dtype=torch.float32, device="cpu", attention="dense")
    adapters = attach_lora(model, LORA, freeze_base=frozen)
    row = pack([40, 56]).with_tokens(torch.randint(1, model.spec.vocab_size, (96,),
                                                   generator=torch.Generator().manual_seed(5)))
    if broken:
        original = logprobs_module._head_chunk
        monkeypatch.setattr(logprobs_module, "_head_chunk",
                            lambda z, y, softcap, train: original(z, y, None, train) if train else original(z, y, softcap, train))
        assert model.softcap is not None, "the fixture must softcap its logits for this sensitivity to mean anything"
    metrics = _fused_vs_checkpointed(model, adapters, row)
    if frozen and not broken:  # what the fused head keeps for backward: no [tokens, vocab] tensor
        from gemma4_support.logprobs import label_logprobs

        hidden = torch.randn(row.length, model.spec.hidden_size, requires_grad=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            label_logprobs(hidden, model.head_weight(), row.labels, softcap=model.softcap, chunk_tokens=24)
        widest = max(t.shape[-1] for t in saved)
        assert widest == model.spec.hidden_size < model.spec.vocab_size, [tuple(t.shape) for t in saved]
    if broken:
        stage_report.expect_caught("fused head without the softcap when training", metrics, FUSED_HEAD_GATES)
    else:
        stage_report.check("fused label log-probs vs checkpointed head", metrics, FUSED_HEAD_GATES)
