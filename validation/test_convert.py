"""Stage hf_parity, weight conversion: HF -> Megatron -> HF is bit for bit; bad checkpoints fail loudly.

Every tensor of the fixtures round-trips exactly (through the table, through a built model, through a
sharded checkpoint on disk); K=V layers get no invented v weights; experts split gate-first; unknown,
missing and mis-shaped tensors raise CheckpointError naming the tensor and both shapes.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.configs import multimodal_wrapper
from fixtures.factory import fixture_config, fixture_dir
from validation.hf_checkpoints import TINY_VISION
from gemma4_support.config.spec import load_spec
from gemma4_support.convert.checkpoint import (
    INDEX_FILE, HFCheckpoint, check_hf, hf_to_megatron, load_hf_weights, megatron_to_hf, save_hf_checkpoint,
    tensor_state,
)
from gemma4_support.convert.mapping import GATE_UP, QKV, ROWS, entries
from gemma4_support.errors import CheckpointError
from gemma4_support.model.build import build_model, model_spec

pytestmark = pytest.mark.stage_hf_parity
VARIANTS = ("moe", "dense")


def _hf_tensors(variant: str) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir(variant) / "model.safetensors"))


def _assert_bitwise(original: dict[str, torch.Tensor], back: dict[str, torch.Tensor]) -> None:
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_the_table(variant: str, stage_report) -> None:
    """HF -> Megatron -> HF reproduces every tensor bit for bit."""
    spec = load_spec(fixture_dir(variant))
    original = _hf_tensors(variant)
    megatron = hf_to_megatron(fixture_dir(variant), spec)
    back = megatron_to_hf(megatron, spec)
    _assert_bitwise(original, back)
    stage_report.record(f"convert/{variant}/round_trip_table", hf_tensors=len(original), megatron_tensors=len(megatron),
                        bitwise_equal=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_through_a_model_and_a_sharded_checkpoint(variant: str, tmp_path: Path, stage_report) -> None:
    """Load into the megatron-core model, save as a sharded HF checkpoint, read it back lazily: identical bits."""
    spec = load_spec(fixture_dir(variant))
    model = build_model(spec)
    accounting = load_hf_weights(model, HFCheckpoint(fixture_dir(variant)))
    out = save_hf_checkpoint(model.state_dict(), spec, tmp_path / "hf", config=fixture_config(variant),
                             max_shard_bytes=64 << 10)
    assert (out / INDEX_FILE).is_file()
    reread = HFCheckpoint(out)
    assert len({reread._file_of[n] for n in reread.names()}) > 1  # really sharded
    _assert_bitwise(_hf_tensors(variant), {n: reread.get(n) for n in reread.names()})
    reloaded = build_model(load_spec(out))
    load_hf_weights(reloaded, reread)
    for name, tensor in tensor_state(model.state_dict()).items():
        assert torch.equal(tensor, tensor_state(reloaded.state_dict())[name]), name
    stage_report.record(f"convert/{variant}/round_trip_model_sharded", accounting=accounting.to_dict(),
                        shards=len(json.loads((out / INDEX_FILE).read_text())["weight_map"]))


def test_k_eq_v_layers_get_no_v_weights() -> None:
    """Full K=V layers: no v_proj in HF, and Megatron's linear_qkv holds only [queries; key] per group."""
    spec = load_spec(fixture_dir("moe"))
    megatron = hf_to_megatron(fixture_dir("moe"), spec)
    hf = _hf_tensors("moe")
    for layer in spec.layers:
        qkv = megatron[f"decoder.layers.{layer.index}.self_attention.linear_qkv.weight"]
        slots = spec.num_attention_heads + layer.num_kv_heads * (1 if layer.k_eq_v else 2)
        assert qkv.shape == (slots * layer.head_dim, spec.hidden_size)
        assert (f"model.layers.{layer.index}.self_attn.v_proj.weight" in hf) == (not layer.k_eq_v)
    assert any(layer.k_eq_v for layer in spec.layers)


def test_experts_split_per_expert_gate_first() -> None:
    """experts.gate_up_proj [E, 2I, H] -> local_experts.{e}.linear_fc1 [2I, H] with the gate rows first."""
    spec = load_spec(fixture_dir("moe"))
    megatron = hf_to_megatron(fixture_dir("moe"), spec)
    hf = _hf_tensors("moe")
    inter = spec.moe.expert_intermediate_size
    for e in range(spec.moe.num_experts):
        fc1 = megatron[f"decoder.layers.0.moe.experts.local_experts.{e}.linear_fc1.weight"]
        assert torch.equal(fc1[:inter], hf["model.layers.0.experts.gate_up_proj"][e, :inter])  # gate
        assert torch.equal(fc1[inter:], hf["model.layers.0.experts.gate_up_proj"][e, inter:])  # up
        assert torch.equal(megatron[f"decoder.layers.0.moe.experts.local_experts.{e}.linear_fc2.weight"],
                           hf["model.layers.0.experts.down_proj"][e])


def test_table_covers_every_model_tensor() -> None:
    """Each Megatron parameter/buffer of a built model is produced by exactly one table row."""
    for variant in VARIANTS:
        spec = load_spec(fixture_dir(variant))
        produced = [name for e in entries(spec) for name in e.megatron]
        assert len(produced) == len(set(produced))
        assert set(produced) == set(tensor_state(build_model(spec).state_dict()))
        assert all(len(e.hf) == len(e.hf_shapes) for e in entries(spec))


def _broken_copy(tmp_path: Path, edit) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(fixture_dir("dense"), out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    path = _broken_copy(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.bogus.weight", torch.zeros(3, 4)))
    with pytest.raises(CheckpointError, match=r"unknown tensor.*model\.layers\.0\.self_attn\.bogus\.weight \(3, 4\)"):
        build_and_load(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = _broken_copy(tmp_path, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.3\.mlp\.up_proj\.weight \(expected \(384, 128\)\)"):
        build_and_load(path)


def test_mis_shaped_tensor_names_both_shapes(tmp_path: Path) -> None:
    def shrink(t):
        t["model.layers.5.self_attn.k_proj.weight"] = t["model.layers.5.self_attn.k_proj.weight"][:128]

    path = _broken_copy(tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.5\.self_attn\.k_proj\.weight has shape \(128, 128\).*\(256, 128\)"):
        build_and_load(path)


def test_megatron_side_unknown_and_missing_are_named() -> None:
    spec = load_spec(fixture_dir("dense"))
    state = hf_to_megatron(fixture_dir("dense"), spec)
    with pytest.raises(CheckpointError, match="decoder.layers.0.extra.weight"):
        megatron_to_hf({**state, "decoder.layers.0.extra.weight": torch.zeros(1)}, spec)
    state.pop("decoder.layers.2.mlp.linear_fc2.weight")
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.2\.mlp\.linear_fc2\.weight"):
        megatron_to_hf(state, spec)


def test_truncation_and_multimodal_wrapper_are_accounted_for(tmp_path: Path, stage_report) -> None:
    """Layers beyond a truncation depth and multimodal towers are declared, counted, never silently dropped."""
    cut = model_spec(fixture_dir("moe"), 6)
    _, acc = check_hf(HFCheckpoint(fixture_dir("moe")), cut)
    assert acc.beyond_depth == []
    wrapped_dir = tmp_path / "wrapped"
    wrapped_dir.mkdir()
    tensors = {k.replace("model.", "model.language_model.", 1): v for k, v in _hf_tensors("moe").items()}
    tensors["model.vision_tower.patch.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(wrapped_dir / "model.safetensors"))
    (wrapped_dir / "config.json").write_text(json.dumps(multimodal_wrapper(fixture_config("moe"))))
    spec = load_spec(wrapped_dir)
    assert spec.wrapped
    megatron = hf_to_megatron(wrapped_dir, spec)
    _, acc = check_hf(HFCheckpoint(wrapped_dir), spec)
    assert acc.non_text == ["model.vision_tower.patch.weight"]
    assert torch.equal(megatron["embedding.word_embeddings.weight"], _hf_tensors("moe")["model.embed_tokens.weight"])
    stage_report.record("convert/wrapped_checkpoint", accounting=acc.to_dict())


def build_and_load(path: Path) -> None:
    """Build the model for a checkpoint directory and load it."""
    load_hf_weights(build_model(load_spec(path)), HFCheckpoint(path))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tensor_parallel_splits_are_exact_and_keep_blocks_whole(variant: str, stage_report) -> None:
    """Every Megatron tensor, split over 2 tensor-parallel ranks by its row's declared split and gathered back, is
    bit-identical. The grouped linear_qkv gives each rank whole kv groups (its queries, key and value); gated
    [gate; up] rows give each rank its share of both gate and up — a plain row split (the wrong layout, checked
    here too) would give rank 0 only gate rows. A tensor that cannot be split evenly is refused naming its shape."""
    spec = load_spec(fixture_dir(variant))
    hf = _hf_tensors(variant)
    split = refused = 0
    for entry in entries(spec):
        megatron = entry.transform.to_megatron([hf[n] for n in entry.hf], spec, entry.layer)
        for tensor in megatron:
            try:
                shards = [entry.tp.shard(tensor, 2, r) for r in range(2)]
            except CheckpointError as err:
                assert str(tuple(tensor.shape)) in str(err)
                refused += 1
                continue
            assert torch.equal(entry.tp.gather(shards), tensor), entry.megatron
            split += 1
        layer = entry.layer
        if entry.transform is QKV and layer.num_kv_heads == 1:
            with pytest.raises(CheckpointError, match="whole"):  # one kv group: a split would cut it in half
                entry.tp.shard(megatron[0], 2, 0)
        if entry.transform is QKV and layer.num_kv_heads % 2 == 0:
            q, k, *v = (hf[n] for n in entry.hf)
            for r in range(2):
                group = slice(r * layer.num_kv_heads // 2, (r + 1) * layer.num_kv_heads // 2)
                per_group = spec.num_attention_heads // layer.num_kv_heads
                heads = slice(group.start * per_group, group.stop * per_group)
                d = layer.head_dim
                own = [q[heads.start * d:heads.stop * d], k[group.start * d:group.stop * d],
                       *(t[group.start * d:group.stop * d] for t in v)]
                fused = QKV.to_megatron(own, dataclasses.replace(spec, num_attention_heads=spec.num_attention_heads // 2),
                                        dataclasses.replace(layer, num_kv_heads=layer.num_kv_heads // 2))[0]
                assert torch.equal(entry.tp.shard(megatron[0], 2, r), fused)
        if entry.transform is GATE_UP:
            gate, up = (hf[n] for n in entry.hf)
            half = gate.shape[0] // 2
            assert torch.equal(entry.tp.shard(megatron[0], 2, 0), torch.cat([gate[:half], up[:half]]))
            assert not torch.equal(ROWS.shard(megatron[0], 2, 0), torch.cat([gate[:half], up[:half]]))
    stage_report.record(f"convert/{variant}/tensor_parallel_2", tensors_split=split, tensors_refused=refused)


# case -> (text config overrides, wrapper fields or None[, save_pretrained options])
TRANSFORMERS_WRITTEN = {
    "untied_no_k_eq_v": ({"tie_word_embeddings": False, "attention_k_eq_v": False}, None),
    # stored as a bf16 training run saves it (config dtype "bfloat16", bf16 tensors): read and written back in bf16
    "stored_bf16_moe": ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32},
                        None, {"dtype": torch.bfloat16}),
    # transformers' own shards and index (its metadata, its split of the experts' tensors across files)
    "sharded_by_transformers": ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                 "moe_intermediate_size": 32}, None, {"max_shard_size": "100KB"}),
    "single_expert_head_widths": ({"enable_moe_block": True, "num_experts": 1, "top_k_experts": 1,
                                   "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 2}, None),
    "wrapper_untied_with_towers": ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                    "moe_intermediate_size": 32},
                                   {"tie_word_embeddings": False, "vision_config": TINY_VISION}),
}


@pytest.mark.parametrize("case", list(TRANSFORMERS_WRITTEN))
def test_transformers_written_checkpoints_round_trip(case: str, tmp_path: Path, stage_report) -> None:
    """Checkpoints written by transformers' save_pretrained (text, and the multimodal wrapper with a vision tower and
    an lm_head untied at the wrapper level): every text tensor HF -> Megatron -> HF bit for bit, the tower declared."""
    from fixtures.configs import tiny_text_config
    from validation.hf_checkpoints import save_random_checkpoint

    text, wrapper, *options = TRANSFORMERS_WRITTEN[case]
    save_random_checkpoint(tmp_path, tiny_text_config(**text), 0, wrapper=wrapper, **(options[0] if options else {}))
    spec = load_spec(tmp_path)
    source = HFCheckpoint(tmp_path)
    if options and "max_shard_size" in options[0]:
        assert len({source._file_of[n] for n in source.names()}) > 1  # really sharded
    if options and "dtype" in options[0]:
        assert {source.get(n).dtype for n in source.names()} == {options[0]["dtype"]}
    _, accounting = check_hf(source, spec)
    back = megatron_to_hf(hf_to_megatron(tmp_path, spec), spec)
    _assert_bitwise({name: source.get(name) for name in accounting.converted}, back)
    assert spec.wrapped == (wrapper is not None) and bool(accounting.non_text) == (wrapper is not None)
    assert ("lm_head.weight" in back) == (not spec.tie_word_embeddings)
    stage_report.record(f"convert/transformers-written/{case}", accounting=accounting.to_dict())
