"""The HF <-> Megatron weight table for Gemma 4: one row per (HF name pattern(s), Megatron name pattern, HF shapes,
transform, condition), read top to bottom. Patterns: `{p}` = the HF text-model prefix (`model.` for `gemma4_text`,
`model.language_model.` for the multimodal wrapper), `{i}` = layer index, `{e}` = expert index. Shapes are
functions of the model's dimensions (`Dims`); conditions are functions of the model and the layer.

Layouts on the Megatron side (full, unsplit tensors):
* `linear_qkv`: Megatron's grouped layout — per kv group, its query heads, then its key head, then its value
  head. On full layers with K=V the HF checkpoint has no `v_proj`, and neither does Megatron: per group only
  [queries, key]; V is read from the raw key projection at run time. No v weight is ever invented.
* `mlp.linear_fc1`: [gate; up] (gate first), as megatron's gated MLP expects.
* experts: HF fused `experts.gate_up_proj` [E, 2I, H] (gate = first I rows) and `experts.down_proj` [E, H, I]
  split into per-expert `local_experts.{e}.linear_fc1.weight` [2I, H] / `linear_fc2.weight` [H, I].
Every transform is exact (views, concatenation, splitting): HF -> Megatron -> HF is bit for bit.

Tensor parallelism: every transform declares how the Megatron tensor it produces is split over tensor-parallel
ranks (`TPSplit`: the axis, and for gated [gate; up] rows the two blocks split separately so each rank holds
its share of both; the grouped `linear_qkv` only between whole kv groups); `TPSplit.shard` / `gather` are exact
inverses.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gemma4_support.config.spec import LayerSpec, ModelSpec
from gemma4_support.errors import CheckpointError

Tensors = Sequence[torch.Tensor]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TPSplit:
    """How a Megatron tensor is split over tensor-parallel ranks: along `axis` (None = replicated), its `parts`
    equal blocks along that axis each split separately (2 for gated [gate; up] rows), never inside a `unit` of
    that many rows (a kv group of the grouped linear_qkv)."""

    axis: int | None
    parts: int = 1
    unit: int = 1

    def shard(self, tensor: torch.Tensor, tp_size: int, rank: int) -> torch.Tensor:
        """The slice tensor-parallel rank `rank` of `tp_size` holds."""
        if self.axis is None or tp_size == 1:
            return tensor
        size = tensor.shape[self.axis]
        if size % (self.parts * tp_size * self.unit):
            raise CheckpointError(f"a tensor of shape {tuple(tensor.shape)} cannot be split into {tp_size} tensor-"
                                  f"parallel shards along axis {self.axis} ({self.parts} block(s) of whole "
                                  f"{self.unit}-row units)",
                                  "choose a tensor parallel size that divides the model's kv heads and widths")
        blocks = torch.chunk(tensor, self.parts, dim=self.axis)
        return torch.cat([torch.chunk(b, tp_size, dim=self.axis)[rank] for b in blocks], dim=self.axis).contiguous()

    def gather(self, shards: Tensors) -> torch.Tensor:
        """The full tensor from every rank's shard (in rank order); inverse of `shard`."""
        if self.axis is None or len(shards) == 1:
            return shards[0]
        per_rank = [torch.chunk(s, self.parts, dim=self.axis) for s in shards]
        return torch.cat([torch.cat([r[b] for r in per_rank], dim=self.axis) for b in range(self.parts)], dim=self.axis)


REPLICATED, ROWS, COLUMNS, GATED_ROWS = TPSplit(None), TPSplit(0), TPSplit(1), TPSplit(0, parts=2)


@dataclass(frozen=True)
class Transform:
    """A pair of exact, mutually inverse functions between HF tensors and Megatron tensors of one row, and how
    the Megatron tensors split over tensor-parallel ranks (`tp_unit`: the indivisible rows, from the geometry)."""

    name: str
    to_megatron: Callable[[Tensors, ModelSpec, LayerSpec | None], list[torch.Tensor]]
    to_hf: Callable[[Tensors, ModelSpec, LayerSpec | None], list[torch.Tensor]]
    tp: TPSplit
    tp_unit: Callable[[ModelSpec, LayerSpec | None], int] | None = None

    def tp_split(self, spec: ModelSpec, layer: LayerSpec | None) -> TPSplit:
        """The tensor-parallel split of this transform's Megatron tensors for one model and layer."""
        if self.tp_unit is None:
            return self.tp
        return dataclasses.replace(self.tp, unit=self.tp_unit(spec, layer))


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


def _qkv_group_rows(spec: ModelSpec, layer: LayerSpec | None) -> int:
    groups, per_group, d = _qkv_geometry(spec, layer)
    return (per_group + (1 if layer.k_eq_v else 2)) * d


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


REPLICATE = Transform("copy, replicated over TP", _same, _same, REPLICATED)
SPLIT_ROWS = Transform("copy, rows split over TP (column/vocab parallel)", _same, _same, ROWS)
SPLIT_COLUMNS = Transform("copy, columns split over TP (row parallel)", _same, _same, COLUMNS)
QKV = Transform("fuse q,k[,v] into Megatron's grouped linear_qkv", _fuse_qkv, _split_qkv, ROWS, _qkv_group_rows)
GATE_UP = Transform("concatenate [gate; up] rows", _cat_rows, _halve_rows, GATED_ROWS)
EXPERTS_GATE_UP = Transform("split the fused experts; each [gate; up]", _unstack, _stack, GATED_ROWS)
EXPERTS_DOWN = Transform("split the fused experts", _unstack, _stack, COLUMNS)


@dataclass(frozen=True)
class Dims:
    """The dimensions row shapes are written in: V vocab, H hidden, nq query heads, I dense MLP width, E experts,
    Ie expert width; per layer kv kv heads and d head dim."""

    V: int
    H: int
    nq: int
    I: int  # noqa: E741 - the width's usual symbol
    E: int = 0
    Ie: int = 0
    kv: int = 0
    d: int = 0

    @classmethod
    def of(cls, spec: ModelSpec, layer: LayerSpec | None) -> Dims:
        """The dimensions of `spec` (and of `layer`, for per-layer rows)."""
        moe = spec.moe
        return cls(V=spec.vocab_size, H=spec.hidden_size, nq=spec.num_attention_heads, I=spec.intermediate_size,
                   E=moe.num_experts if moe else 0, Ie=moe.expert_intermediate_size if moe else 0,
                   kv=layer.num_kv_heads if layer else 0, d=layer.head_dim if layer else 0)


# Row conditions: which models / layers a row applies to.
def always(spec: ModelSpec, layer: LayerSpec | None) -> bool:
    """Every model (and every layer, for per-layer rows)."""
    return True


def untied(spec: ModelSpec, layer: LayerSpec | None) -> bool:
    """The model has its own lm_head (tied models: lm_head IS the embedding)."""
    return not spec.tie_word_embeddings


def moe_layer(spec: ModelSpec, layer: LayerSpec | None) -> bool:
    """The layer has routed experts."""
    return layer is not None and layer.mlp == "moe"


def has_v(spec: ModelSpec, layer: LayerSpec | None) -> bool:
    """The layer has a v projection."""
    return layer is not None and not layer.k_eq_v


def k_eq_v(spec: ModelSpec, layer: LayerSpec | None) -> bool:
    """A full layer with K=V: no v projection."""
    return layer is not None and layer.k_eq_v


@dataclass(frozen=True)
class Rule:
    """One row: HF name pattern(s) with their shapes <-> a Megatron name pattern, the transform, and when it applies."""

    hf: tuple[str, ...]
    shapes: Callable[[Dims], tuple[Shape, ...]]
    megatron: str
    transform: Transform = REPLICATE
    when: Callable[[ModelSpec, LayerSpec | None], bool] = always

    @property
    def per_layer(self) -> bool:
        """Whether the row repeats for every decoder layer."""
        return "{i}" in self.hf[0]


L, M = "{p}layers.{i}.", "decoder.layers.{i}."


def _row(hf: str | tuple[str, ...], shapes: Callable[[Dims], Shape | tuple[Shape, ...]], megatron: str,
         transform: Transform = REPLICATE, when: Callable[[ModelSpec, LayerSpec | None], bool] = always) -> Rule:
    names = hf if isinstance(hf, tuple) else (hf,)
    one = len(names) == 1
    return Rule(names, (lambda g: (shapes(g),)) if one else shapes, megatron, transform, when)


def _hidden(g: Dims) -> Shape:
    return (g.H,)


TABLE: tuple[Rule, ...] = (
    _row("{p}embed_tokens.weight", lambda g: (g.V, g.H), "embedding.word_embeddings.weight", SPLIT_ROWS),
    _row("lm_head.weight", lambda g: (g.V, g.H), "output_layer.weight", SPLIT_ROWS, when=untied),
    _row("{p}norm.weight", _hidden, "decoder.final_layernorm.weight"),
    # attention
    _row(L + "input_layernorm.weight", _hidden, M + "input_layernorm.weight"),
    _row((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
         lambda g: ((g.nq * g.d, g.H), (g.kv * g.d, g.H), (g.kv * g.d, g.H)),
         M + "self_attention.linear_qkv.weight", QKV, when=has_v),
    _row((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight"),  # K=V: no v_proj anywhere
         lambda g: ((g.nq * g.d, g.H), (g.kv * g.d, g.H)),
         M + "self_attention.linear_qkv.weight", QKV, when=k_eq_v),
    _row(L + "self_attn.q_norm.weight", lambda g: (g.d,), M + "self_attention.q_layernorm.weight"),
    _row(L + "self_attn.k_norm.weight", lambda g: (g.d,), M + "self_attention.k_layernorm.weight"),
    _row(L + "self_attn.o_proj.weight", lambda g: (g.H, g.nq * g.d), M + "self_attention.linear_proj.weight",
         SPLIT_COLUMNS),
    _row(L + "post_attention_layernorm.weight", _hidden, M + "post_attention_layernorm.weight"),
    # dense MLP (the "shared expert" on MoE layers)
    _row(L + "pre_feedforward_layernorm.weight", _hidden, M + "pre_mlp_layernorm.weight"),
    _row((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), lambda g: ((g.I, g.H), (g.I, g.H)),
         M + "mlp.linear_fc1.weight", GATE_UP),
    _row(L + "mlp.down_proj.weight", lambda g: (g.H, g.I), M + "mlp.linear_fc2.weight", SPLIT_COLUMNS),
    # routed experts (MoE layers)
    _row(L + "post_feedforward_layernorm_1.weight", _hidden, M + "post_mlp_layernorm.weight", when=moe_layer),
    _row(L + "pre_feedforward_layernorm_2.weight", _hidden, M + "pre_moe_layernorm.weight", when=moe_layer),
    _row(L + "router.proj.weight", lambda g: (g.E, g.H), M + "moe.router.weight", when=moe_layer),
    _row(L + "router.scale", _hidden, M + "moe.router.scale", when=moe_layer),
    _row(L + "router.per_expert_scale", lambda g: (g.E,), M + "moe.router.per_expert_scale", when=moe_layer),
    _row(L + "experts.gate_up_proj", lambda g: (g.E, 2 * g.Ie, g.H), M + "moe.experts.local_experts.{e}.linear_fc1.weight",
         EXPERTS_GATE_UP, when=moe_layer),
    _row(L + "experts.down_proj", lambda g: (g.E, g.H, g.Ie), M + "moe.experts.local_experts.{e}.linear_fc2.weight",
         EXPERTS_DOWN, when=moe_layer),
    _row(L + "post_feedforward_layernorm_2.weight", _hidden, M + "post_moe_layernorm.weight", when=moe_layer),
    # layer output
    _row(L + "post_feedforward_layernorm.weight", _hidden, M + "post_ffn_layernorm.weight"),
    _row(L + "layer_scalar", lambda g: (1,), M + "layer_scalar"),
)

# Tensors of the multimodal wrapper that are not part of the text model: reported, never loaded.
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def hf_prefix(spec: ModelSpec) -> str:
    """The HF name prefix of the text model."""
    return "model.language_model." if spec.wrapped else "model."


@dataclass(frozen=True)
class Entry:
    """One instantiated row: concrete HF names and shapes, concrete Megatron names, the transform, the layer, and
    how its Megatron tensors split over tensor-parallel ranks."""

    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    megatron: tuple[str, ...]
    transform: Transform
    layer: LayerSpec | None
    tp: TPSplit


def entries(spec: ModelSpec) -> list[Entry]:
    """Every row of TABLE instantiated for `spec` (layers, experts, conditions resolved)."""
    prefix = hf_prefix(spec)
    experts = range(spec.moe.num_experts) if spec.moe else range(0)
    out = []
    for rule in TABLE:
        layers: Sequence[LayerSpec | None] = spec.layers if rule.per_layer else (None,)
        for layer in layers:
            if not rule.when(spec, layer):
                continue
            i = layer.index if layer is not None else None
            hf = tuple(p.format(p=prefix, i=i) for p in rule.hf)
            if "{e}" in rule.megatron:
                megatron = tuple(rule.megatron.format(i=i, e=e) for e in experts)
            else:
                megatron = (rule.megatron.format(i=i),)
            out.append(Entry(hf, rule.shapes(Dims.of(spec, layer)), megatron, rule.transform, layer,
                             rule.transform.tp_split(spec, layer)))
    return out


def hf_inventory(spec: ModelSpec) -> dict[str, Shape]:
    """Every HF tensor a checkpoint of `spec` holds, with its shape (tied models: no lm_head)."""
    return {name: shape for e in entries(spec) for name, shape in zip(e.hf, e.hf_shapes)}
