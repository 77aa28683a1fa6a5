"""The HF <-> Megatron weight table for Gemma 4: one row per (HF name pattern(s), Megatron name pattern(s),
transform), read top to bottom. Patterns: `{p}` = the HF text-model prefix (`model.` for `gemma4_text`,
`model.language_model.` for the multimodal wrapper), `{i}` = layer index, `{e}` = expert index.

Layouts on the Megatron side (tensor parallel size 1, full tensors):
* `linear_qkv`: Megatron's grouped layout — per kv group, its query heads, then its key head, then its value
  head. On full layers with K=V the HF checkpoint has no `v_proj`, and neither does Megatron: per group only
  [queries, key]; V is read from the raw key projection at run time. No v weight is ever invented.
* `mlp.linear_fc1`: [gate; up] (gate first), as megatron's gated MLP expects.
* experts: HF fused `experts.gate_up_proj` [E, 2I, H] (gate = first I rows) and `experts.down_proj` [E, H, I]
  split into per-expert `local_experts.{e}.linear_fc1.weight` [2I, H] / `linear_fc2.weight` [H, I].
Every transform is exact (views, concatenation, splitting): HF -> Megatron -> HF is bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gemma4_support.config.spec import LayerSpec, ModelSpec

Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class Transform:
    """A pair of exact, mutually inverse functions between HF tensors and Megatron tensors of one row."""

    name: str
    to_megatron: Callable[[Tensors, ModelSpec, LayerSpec | None], list[torch.Tensor]]
    to_hf: Callable[[Tensors, ModelSpec, LayerSpec | None], list[torch.Tensor]]


def _same(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    return list(tensors)


def _qkv_geometry(spec: ModelSpec, layer: LayerSpec) -> tuple[int, int, int]:
    groups = layer.num_kv_heads
    return groups, spec.num_attention_heads // groups, layer.head_dim


def _fuse_qkv(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    groups, per_group, d = _qkv_geometry(spec, layer)
    q, k, *v = tensors
    hidden = q.shape[-1]
    parts = [q.reshape(groups, per_group, d, hidden), k.reshape(groups, 1, d, hidden)]
    parts += [t.reshape(groups, 1, d, hidden) for t in v]
    return [torch.cat(parts, dim=1).reshape(-1, hidden)]


def _split_qkv(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    groups, per_group, d = _qkv_geometry(spec, layer)
    (qkv,) = tensors
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(groups, -1, d, hidden)
    out = [grouped[:, :per_group].reshape(-1, hidden), grouped[:, per_group].reshape(-1, hidden)]
    if not layer.k_eq_v:
        out.append(grouped[:, per_group + 1].reshape(-1, hidden))
    return [t.contiguous() for t in out]


def _cat_rows(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    return [torch.cat(list(tensors), dim=0)]


def _halve_rows(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    return [t.contiguous() for t in torch.chunk(tensors[0], 2, dim=0)]


def _unstack(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    return [t.contiguous() for t in torch.unbind(tensors[0], dim=0)]


def _stack(tensors: Tensors, spec: ModelSpec, layer: LayerSpec | None) -> list[torch.Tensor]:
    return [torch.stack(list(tensors), dim=0)]


IDENTITY = Transform("identity", _same, _same)
QKV = Transform("fuse q,k[,v] into Megatron's grouped linear_qkv", _fuse_qkv, _split_qkv)
GATE_UP = Transform("concatenate [gate; up] rows", _cat_rows, _halve_rows)
PER_EXPERT = Transform("split the fused expert tensor along experts", _unstack, _stack)

# Row conditions: which models / layers a row applies to.
ALWAYS = "always"
UNTIED = "untied"  # the model has its own lm_head
MOE = "moe"  # the layer has routed experts
HAS_V = "has_v"  # the layer has a v projection
K_EQ_V = "k_eq_v"  # full layer with K=V: no v projection


@dataclass(frozen=True)
class Rule:
    """One row: HF name pattern(s) with their shapes <-> Megatron name pattern(s), the transform, and when
    the row applies. Shapes are written in the symbols of `_symbols` (V vocab, H hidden, nq query heads,
    kv kv heads, d head dim, I dense MLP width, E experts, Ie expert width)."""

    hf: tuple[str, ...]
    hf_shapes: tuple[str, ...]
    megatron: tuple[str, ...]
    transform: Transform = IDENTITY
    when: str = ALWAYS

    @property
    def per_layer(self) -> bool:
        """Whether the row repeats for every decoder layer."""
        return "{i}" in self.hf[0]


L, M = "{p}layers.{i}.", "decoder.layers.{i}."


def _row(hf: str | tuple[str, ...], shapes: str | tuple[str, ...], megatron: str, transform: Transform = IDENTITY,
         when: str = ALWAYS) -> Rule:
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)  # noqa: E731
    return Rule(as_tuple(hf), as_tuple(shapes), (megatron,), transform, when)


TABLE: tuple[Rule, ...] = (
    _row("{p}embed_tokens.weight", "V,H", "embedding.word_embeddings.weight"),
    _row("lm_head.weight", "V,H", "output_layer.weight", when=UNTIED),  # tied models: lm_head IS the embedding
    _row("{p}norm.weight", "H", "decoder.final_layernorm.weight"),
    # attention
    _row(L + "input_layernorm.weight", "H", M + "input_layernorm.weight"),
    _row((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         ("nq*d,H", "kv*d,H", "kv*d,H"), M + "self_attention.linear_qkv.weight", QKV, when=HAS_V),
    _row((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight"),  # K=V: no v_proj anywhere
         ("nq*d,H", "kv*d,H"), M + "self_attention.linear_qkv.weight", QKV, when=K_EQ_V),
    _row(L + "self_attn.q_norm.weight", "d", M + "self_attention.q_layernorm.weight"),
    _row(L + "self_attn.k_norm.weight", "d", M + "self_attention.k_layernorm.weight"),
    _row(L + "self_attn.o_proj.weight", "H,nq*d", M + "self_attention.linear_proj.weight"),
    _row(L + "post_attention_layernorm.weight", "H", M + "post_attention_layernorm.weight"),
    # dense MLP (the "shared expert" on MoE layers)
    _row(L + "pre_feedforward_layernorm.weight", "H", M + "pre_mlp_layernorm.weight"),
    _row((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), ("I,H", "I,H"), M + "mlp.linear_fc1.weight", GATE_UP),
    _row(L + "mlp.down_proj.weight", "H,I", M + "mlp.linear_fc2.weight"),
    # routed experts (MoE layers)
    _row(L + "post_feedforward_layernorm_1.weight", "H", M + "post_mlp_layernorm.weight", when=MOE),
    _row(L + "pre_feedforward_layernorm_2.weight", "H", M + "pre_moe_layernorm.weight", when=MOE),
    _row(L + "router.proj.weight", "E,H", M + "moe.router.weight", when=MOE),
    _row(L + "router.scale", "H", M + "moe.router.scale", when=MOE),
    _row(L + "router.per_expert_scale", "E", M + "moe.router.per_expert_scale", when=MOE),
    _row(L + "experts.gate_up_proj", "E,2*Ie,H", M + "moe.experts.local_experts.{e}.linear_fc1.weight", PER_EXPERT, when=MOE),
    _row(L + "experts.down_proj", "E,H,Ie", M + "moe.experts.local_experts.{e}.linear_fc2.weight", PER_EXPERT, when=MOE),
    _row(L + "post_feedforward_layernorm_2.weight", "H", M + "post_moe_layernorm.weight", when=MOE),
    # layer output
    _row(L + "post_feedforward_layernorm.weight", "H", M + "post_ffn_layernorm.weight"),
    _row(L + "layer_scalar", "1", M + "layer_scalar"),
)

# Tensors of the multimodal wrapper that are not part of the text model: reported, never loaded.
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def hf_prefix(spec: ModelSpec) -> str:
    """The HF name prefix of the text model."""
    return "model.language_model." if spec.wrapped else "model."


def _applies(rule: Rule, spec: ModelSpec, layer: LayerSpec | None) -> bool:
    if rule.when == ALWAYS:
        return True
    if rule.when == UNTIED:
        return not spec.tie_word_embeddings
    if rule.when == MOE:
        return layer is not None and layer.mlp == "moe"
    if rule.when == K_EQ_V:
        return layer is not None and layer.k_eq_v
    if rule.when == HAS_V:
        return layer is not None and not layer.k_eq_v
    raise ValueError(f"unknown row condition {rule.when!r}")


def _symbols(spec: ModelSpec, layer: LayerSpec | None) -> dict[str, int]:
    sym = {"V": spec.vocab_size, "H": spec.hidden_size, "nq": spec.num_attention_heads, "I": spec.intermediate_size}
    if spec.moe:
        sym.update(E=spec.moe.num_experts, Ie=spec.moe.expert_intermediate_size)
    if layer is not None:
        sym.update(kv=layer.num_kv_heads, d=layer.head_dim)
    return sym


def _shape(expr: str, symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(int(eval(term, {"__builtins__": {}}, symbols)) for term in expr.split(","))  # our own table only


@dataclass(frozen=True)
class Entry:
    """One instantiated row: concrete HF names and shapes, concrete Megatron names, the transform and the layer."""

    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    megatron: tuple[str, ...]
    transform: Transform
    layer: LayerSpec | None


def entries(spec: ModelSpec) -> list[Entry]:
    """Every row of TABLE instantiated for `spec` (layers, experts, conditions resolved)."""
    prefix = hf_prefix(spec)
    experts = range(spec.moe.num_experts) if spec.moe else range(0)
    out = []
    for rule in TABLE:
        layers: Sequence[LayerSpec | None] = spec.layers if rule.per_layer else (None,)
        for layer in layers:
            if not _applies(rule, spec, layer):
                continue
            i = layer.index if layer is not None else None
            hf = tuple(p.format(p=prefix, i=i) for p in rule.hf)
            megatron = []
            for pattern in rule.megatron:
                if "{e}" in pattern:
                    megatron += [pattern.format(i=i, e=e) for e in experts]
                else:
                    megatron.append(pattern.format(i=i))
            shapes = tuple(_shape(expr, _symbols(spec, layer)) for expr in rule.hf_shapes)
            out.append(Entry(hf, shapes, tuple(megatron), rule.transform, layer))
    return out
