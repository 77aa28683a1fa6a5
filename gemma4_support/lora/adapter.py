"""LoRA on the Megatron Gemma 4 model, named the way PEFT and vLLM name it.

An adapter is one (A [r, in], B [out, r]) pair per HF module (`model.layers.{i}.self_attn.q_proj`,
`….mlp.gate_proj`, `….experts.{e}.down_proj`, ...); the module's weight moves by `scaling · B @ A` with
`scaling = alpha / r`. On the Megatron side an adapter pair is attached to the fused linear that holds its HF
module (q, k[, v] -> `linear_qkv`; gate, up -> `linear_fc1`; per expert likewise) by a forward hook that adds
`scaling · (x Aᵀ) Bᵀ` of each member, combined into the fused layout by the weight table's own transform
(`convert.mapping.QKV` / `GATE_UP`), so the delta lands exactly where the table puts the HF rows. Routed experts
on the grouped path (the default) get one `lora_delta` per experts block instead, which runs every expert's pair
as grouped GEMMs and places the members the same way. On full
layers with K=V there is no v projection: V is the raw K projection, so the K adapter is the V adapter (one
tensor, trained once). The adapters live outside the model's state dict (the model still matches the weight
table); base weights are frozen.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gemma4_support.config.spec import LayerSpec, ModelSpec
from gemma4_support.convert.mapping import GATE_UP, QKV, Transform, hf_prefix
from gemma4_support.errors import ConfigError, require_positive_ints

__all__ = ["ATTENTION_TARGETS", "MLP_TARGETS", "LoraAdapters", "LoraConfig", "LoraModule", "attach_lora", "detach_lora",
           "lora_modules"]

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """Rank, alpha, which projections (PEFT `target_modules` names; `experts` adds the routed experts' gate/up/down),
    and the deterministic init: "zero" (PEFT's: B = 0) or "random" (B ~ N(0, b_std²), for tests)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS
    experts: bool = True
    init: str = "zero"
    b_std: float = 0.05
    seed: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        require_positive_ints({"rank": self.rank}, ConfigError, "LoraConfig")
        unknown = sorted(set(self.target_modules) - set(ATTENTION_TARGETS + MLP_TARGETS))
        if unknown:
            raise ConfigError(f"LoraConfig.target_modules has unknown module(s) {unknown}",
                              f"choose from {ATTENTION_TARGETS + MLP_TARGETS}")
        if ("k_proj" in self.target_modules) != ("v_proj" in self.target_modules):
            raise ConfigError("LoraConfig targets one of k_proj / v_proj but not the other",
                              "target both: on K=V layers the V adapter is the K adapter")
        if self.init not in ("zero", "random"):
            raise ConfigError(f"LoraConfig.init is {self.init!r}", 'use "zero" (PEFT default) or "random" (tests)')
        if self.dropout != 0.0:
            raise ConfigError(f"LoraConfig.dropout is {self.dropout}", "LoRA dropout is not supported: use 0")
        if not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha is {self.alpha}", "use a positive alpha (scaling = alpha / rank)")

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / rank."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraModule:
    """One adaptable HF module: its PEFT name (without `base_model.model.`), shapes, and where its weight lives in
    the HF checkpoint (tensor name, expert index or None, row range within the tensor or None)."""

    name: str
    in_features: int
    out_features: int
    layer: LayerSpec
    hf_tensor: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    alias_of: str | None = None  # K=V layers: v_proj is k_proj (exported again under v_proj, never trained apart)

    def weight_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This module's [out, in] weight within its HF tensor (or within that tensor's gradient): a view."""
        view = tensor if self.expert is None else tensor[self.expert]
        return view if self.rows is None else view[self.rows[0]:self.rows[1]]


@dataclass(frozen=True)
class _Site:
    """A Megatron linear and the adapted HF modules whose outputs its output concatenates, in `combine`'s order."""

    megatron: str
    members: tuple[str, ...]
    combine: Transform | None
    layer: LayerSpec


def _layer_modules(spec: ModelSpec, layer: LayerSpec, config: LoraConfig) -> tuple[list[LoraModule], list[_Site]]:
    p = f"{hf_prefix(spec)}layers.{layer.index}."
    m = f"decoder.layers.{layer.index}."
    H, d, nq, kv = spec.hidden_size, layer.head_dim, spec.num_attention_heads, layer.num_kv_heads
    mods: list[LoraModule] = []
    sites: list[_Site] = []

    def add(name: str, fin: int, fout: int, tensor: str, **kw: object) -> str:
        mods.append(LoraModule(p + name, fin, fout, layer, p + tensor, **kw))
        return p + name

    qkv = [("q_proj", nq * d), ("k_proj", kv * d)] + ([] if layer.k_eq_v else [("v_proj", kv * d)])
    members = tuple(add(f"self_attn.{n}", H, out, f"self_attn.{n}.weight") for n, out in qkv)
    if layer.k_eq_v:
        mods.append(LoraModule(p + "self_attn.v_proj", H, kv * d, layer, p + "self_attn.k_proj.weight",
                               alias_of=p + "self_attn.k_proj"))
    sites.append(_Site(m + "self_attention.linear_qkv", members, QKV, layer))
    sites.append(_Site(m + "self_attention.linear_proj", (add("self_attn.o_proj", nq * d, H, "self_attn.o_proj.weight"),),
                       None, layer))
    In = spec.intermediate_size
    gate_up = tuple(add(f"mlp.{n}", H, In, f"mlp.{n}.weight") for n in ("gate_proj", "up_proj"))
    sites.append(_Site(m + "mlp.linear_fc1", gate_up, GATE_UP, layer))
    sites.append(_Site(m + "mlp.linear_fc2", (add("mlp.down_proj", In, H, "mlp.down_proj.weight"),), None, layer))
    if layer.mlp == "moe" and config.experts:
        Ie = spec.moe.expert_intermediate_size
        for e in range(spec.moe.num_experts):
            fused = f"experts.{e}."
            g = add(fused + "gate_proj", H, Ie, "experts.gate_up_proj", expert=e, rows=(0, Ie))
            u = add(fused + "up_proj", H, Ie, "experts.gate_up_proj", expert=e, rows=(Ie, 2 * Ie))
            dn = add(fused + "down_proj", Ie, H, "experts.down_proj", expert=e)
            sites.append(_Site(f"{m}moe.experts.local_experts.{e}.linear_fc1", (g, u), GATE_UP, layer))
            sites.append(_Site(f"{m}moe.experts.local_experts.{e}.linear_fc2", (dn,), None, layer))
    return mods, sites


def _chosen(mod: LoraModule, config: LoraConfig) -> bool:
    return ".experts." in mod.name or mod.name.rsplit(".", 1)[-1] in config.target_modules


def lora_modules(spec: ModelSpec, config: LoraConfig) -> list[LoraModule]:
    """Every HF module `config` adapts in a model of `spec` (K=V layers: v_proj listed as an alias of k_proj)."""
    return [x for layer in spec.layers for x in _layer_modules(spec, layer, config)[0] if _chosen(x, config)]


class LoraAdapters(nn.Module):
    """The adapter tensors of one model: `lora_A[key]` [r, in], `lora_B[key]` [out, r] per trained HF module (keys are
    the PEFT names with dots as '/'), plus the config; a layer's routed experts hold one packed [E, r, in] / [E, out, r]
    pair per member (key `…/experts/<member>`; `pair` gives one expert's views), so the grouped path reads them as
    they are and the optimizer sees a few tensors per layer, not one per expert. Aliases (K=V layers' v_proj) hold
    no tensors."""

    def __init__(self, spec: ModelSpec, config: LoraConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec, self.config = spec, config
        every = [x for layer in spec.layers for x in _layer_modules(spec, layer, config)[0]]
        self.widths = {x.name: x.out_features for x in every}
        self.modules_by_name = {x.name: x for x in every if _chosen(x, config)}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self._slots: dict[str, tuple[str, int]] = {}  # a routed expert's module -> (its packed key, its expert index)
        packed: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        gen = torch.Generator().manual_seed(config.seed)
        for name, mod in self.modules_by_name.items():
            if mod.alias_of is not None:
                continue
            bound = mod.in_features ** -0.5  # PEFT's kaiming_uniform(a=sqrt(5)) bound for A
            a = (torch.rand(config.rank, mod.in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            b = torch.zeros(mod.out_features, config.rank, dtype=torch.float64)
            if config.init == "random":
                b = torch.randn(mod.out_features, config.rank, generator=gen, dtype=torch.float64) * config.b_std
            if mod.expert is None:
                self.lora_A[_key(name)] = nn.Parameter(a.to(dtype))
                self.lora_B[_key(name)] = nn.Parameter(b.to(dtype))
                continue
            key = _key(name.replace(f".experts.{mod.expert}.", ".experts."))
            self._slots[name] = (key, len(packed.setdefault(key, [])))
            packed[key].append((a, b))
        for key, pairs in packed.items():  # one [E, r, in] / [E, out, r] tensor per layer and member for all experts
            self.lora_A[key] = nn.Parameter(torch.stack([a for a, _ in pairs]).to(dtype))
            self.lora_B[key] = nn.Parameter(torch.stack([b for _, b in pairs]).to(dtype))
        self._handles: list = []
        self._plans: dict[tuple[int, bool], tuple[_Site, _FusedPlan | None]] = {}  # per attached site, see `_plan`

    def trained_names(self) -> list[str]:
        """PEFT names of the modules with their own tensors (aliases excluded)."""
        return [n for n, m in self.modules_by_name.items() if m.alias_of is None]

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a module (an alias resolves to the module it repeats; a routed expert's are views of the
        packed tensors of its layer and member)."""
        mod = self.modules_by_name[name]
        name = mod.alias_of or name
        if name in self._slots:
            key, e = self._slots[name]
            return self.lora_A[key][e], self.lora_B[key][e]
        return self.lora_A[_key(name)], self.lora_B[_key(name)]

    def expert_pairs(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) of one member across experts, `names` in expert order: the packed tensors
        themselves when `names` are exactly their experts, else a stack of the pairs."""
        key = self.packed_key(names)
        if key is not None:
            return self.lora_A[key], self.lora_B[key]
        return self.stacked_pairs(names)

    def stacked_pairs(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, r, in], B [E, out, r]) of one member across experts, stacked from each expert's pair."""
        pairs = [self.pair(n) for n in names]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    def packed_key(self, names: Sequence[str]) -> str | None:
        """The key of the packed tensors whose experts are exactly `names`, in order (None if there is none)."""
        key = self._slots[names[0]][0] if names[0] in self._slots else None
        if key is not None and len(names) == len(self.lora_A[key]) and all(
                self._slots.get(n) == (key, e) for e, n in enumerate(names)):
            return key
        return None

    def module_tensors(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """{"lora_A.<key>" / "lora_B.<key>": tensor} per trained module (key: its PEFT name with '/' for '.'), the
        parameters or (`grads`) their gradients, as views: per module whether or not its tensors are packed."""
        out = {}
        for name in self.trained_names():
            for which, t in zip("AB", self.pair(name)):
                if grads:
                    key, e = self._slots.get(name, (_key(name), None))
                    grad = getattr(self, f"lora_{which}")[key].grad
                    t = None if grad is None else (grad if e is None else grad[e])
                if t is not None:
                    out[f"lora_{which}.{_key(name)}"] = t
        return out

    def delta(self, name: str) -> torch.Tensor:
        """scaling · B @ A of one module, [out, in], in float64 (for merging)."""
        a, b = self.pair(name)
        return self.config.scaling * (b.detach().double() @ a.detach().double())

    def load_pairs(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy (A, B) per trained module name into the adapter (shapes must match)."""
        with torch.no_grad():
            for name in self.trained_names():
                for mine, given in zip(self.pair(name), pairs[name]):
                    mine.copy_(given)


def _key(name: str) -> str:
    return name.replace(".", "/")


def _sites(spec: ModelSpec, config: LoraConfig) -> Iterator[_Site]:
    for layer in spec.layers:
        yield from _layer_modules(spec, layer, config)[1]


@dataclass
class _FusedPlan:
    """How one site's members fuse into one LoRA pair, worked out once per site (the adapted members, where each
    member's rows go): per forward only the tensors are gathered. `rows` [out]: for each fused output row, its row in
    the members' rows laid end to end (None: that order already); `where[j]`: member j's first row in that layout."""

    members: list[tuple[int, str | list[str]]]  # (member position, its module name or, stacked, one per expert)
    packed: list[str | None]  # stacked: the packed tensors' key holding exactly those experts (else None: stack them)
    where: list[int]
    out: int
    rows: torch.Tensor | None


def _plan(adapters: LoraAdapters, site: _Site, stack: list[_Site] | None) -> _FusedPlan | None:
    """The site's fusion plan (None when no member is adapted), cached on the adapters."""
    key = (id(site), stack is not None)  # a site alone or heading its experts' stack
    known = adapters._plans.get(key)
    if known is not None and known[0] is site:
        return known[1]
    sites = stack or [site]
    members = [(j, [s.members[j] for s in sites] if stack else name) for j, name in enumerate(site.members)
               if name in adapters.modules_by_name]
    widths = [adapters.widths[name] for name in site.members]
    where = [sum(widths[:j]) for j in range(len(widths))]
    rows = None
    if site.combine is not None and members:  # the transform applied to row numbers: where each fused row comes from
        numbered = [torch.arange(w0, w0 + w).view(w, 1) for w0, w in zip(where, widths)]
        (fused,) = site.combine.to_megatron(numbered, adapters.spec, site.layer)
        rows = None if torch.equal(fused.view(-1), torch.arange(sum(widths))) else fused.view(-1)
    packed = [adapters.packed_key(names) if stack else None for _, names in members]
    plan = _FusedPlan(members, packed, where, sum(widths), rows) if members else None
    adapters._plans[key] = (site, plan)  # the site kept alive with its plan: its id is not reused
    return plan


def _fused_pair(adapters: LoraAdapters, site: _Site, stack: list[_Site] | None = None, *,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The site's members as one LoRA pair in the fused layout, in `dtype`: A [m·r, in] (the m adapted members' A,
    stacked) and B [out, m·r] (member j's B in columns j·r.., its rows placed by the site's transform, zeros
    elsewhere), so that (x Aᵀ) Bᵀ is every member's output placed as the weight table places its rows. With `stack`
    (one site per routed expert, `site` the first) both gain a leading expert dimension: [E, m·r, in] and
    [E, out, m·r]. None when no member is adapted."""
    plan = _plan(adapters, site, stack)
    if plan is None:
        return None
    pairs = [(adapters.lora_A[key], adapters.lora_B[key]) if key is not None else
             adapters.stacked_pairs(names) if stack else tuple(t[None] for t in adapters.pair(names))
             for (_, names), key in zip(plan.members, plan.packed)]
    if len(pairs) == 1 and plan.rows is None and len(site.members) == 1:  # one member, rows as they are
        a, b = (t.to(dtype) for t in pairs[0])
    else:
        rank = adapters.config.rank
        a = torch.cat([a for a, _ in pairs], dim=1).to(dtype)  # [E, m·r, in]
        b = a.new_zeros(a.shape[0], plan.out, len(pairs) * rank)
        for i, ((j, _), (_, b_j)) in enumerate(zip(plan.members, pairs)):
            b[:, plan.where[j]:plan.where[j] + b_j.shape[1], i * rank:(i + 1) * rank] = b_j
        if plan.rows is not None:
            if plan.rows.device != b.device:
                plan.rows = plan.rows.to(b.device)
            b = b.index_select(1, plan.rows)
    return (a, b) if stack else (a[0], b[0])


def _combined(adapters: LoraAdapters, site: _Site, x: torch.Tensor) -> torch.Tensor | None:
    """The site's LoRA output [..., out] (None when no member is adapted)."""
    pair = _fused_pair(adapters, site, dtype=x.dtype)
    if pair is None:
        return None
    a, b = pair
    return ((x @ a.t()) @ b.t()) * adapters.config.scaling


def _grouped_delta(adapters: LoraAdapters, sites: dict[str, list[_Site]]):  # noqa: ANN202 - a GroupedDelta
    """LoRA for a grouped experts block: (x Aₑᵀ) Bₑᵀ for every expert e at once, two grouped GEMMs over the
    experts' fused pairs (`_fused_pair` over `sites["fc1"|"fc2"]`, one site per expert)."""

    def delta(which: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        per_expert = sites[which]
        pair = _fused_pair(adapters, per_expert[0], per_expert, dtype=x.dtype)
        if pair is None:
            return x.new_zeros(x.shape[0], 0)
        a, b = (t.transpose(-2, -1) for t in pair)  # [E, in, m·r], [E, m·r, out]
        mid = torch._grouped_mm(x, a, offs=offsets)
        return torch._grouped_mm(mid, b, offs=offsets) * adapters.config.scaling

    return delta


class _Unset:
    """A removable handle for an attribute attach_lora set (the grouped experts' LoRA)."""

    def __init__(self, module: nn.Module, attr: str) -> None:
        self.module, self.attr = module, attr

    def remove(self) -> None:
        """Unset the attribute (detach the experts' LoRA)."""
        setattr(self.module, self.attr, None)


def attach_lora(model: nn.Module, config: LoraConfig, *, dtype: torch.dtype = torch.float32,
                adapters: LoraAdapters | None = None, freeze_base: bool = True) -> LoraAdapters:
    """Attach LoRA to a built Gemma4Model (base weights frozen); returns the adapters (the trainable parameters)."""
    from gemma4_support.model.mlp import Gemma4Experts

    spec = model.spec
    named = dict(model.named_modules())
    split = [m for m in named.values() if isinstance(m, Gemma4Experts) and m.num_local_experts != m.num_experts]
    if split and config.experts:
        raise ConfigError(f"LoRA on routed experts with expert parallelism ({split[0].num_local_experts} of "
                          f"{split[0].num_experts} experts on this rank) is not supported",
                          "train LoRA with expert parallel size 1, or leave the experts out (LoraConfig(experts=False))")
    adapters = adapters if adapters is not None else LoraAdapters(spec, config, dtype=dtype)
    adapters.to(next(model.parameters()).device)
    if freeze_base:
        model.requires_grad_(False)
    grouped: dict[str, dict[str, list[_Site]]] = {}
    for site in _sites(spec, config):
        linear = named.get(site.megatron)
        if linear is None:
            raise ConfigError(f"the model has no module {site.megatron} to attach LoRA to",
                              "attach LoRA to a Gemma4Model built by gemma4_support.model for this spec")
        owner, _, rest = site.megatron.partition(".local_experts.")
        experts = named.get(owner) if rest else None
        if isinstance(experts, Gemma4Experts) and experts.path == "grouped":
            grouped.setdefault(owner, {"fc1": [], "fc2": []})[rest.rsplit("_", 1)[-1]].append(site)
            continue
        adapters._handles.append(linear.register_forward_hook(_hook(adapters, site)))
    for owner, sites in grouped.items():
        if [len(v) for v in sites.values()] != [named[owner].num_experts] * 2:
            raise ConfigError(f"LoRA sites of {owner} do not cover each expert's two linears once",
                              "attach LoRA to a Gemma4Model built by gemma4_support.model for this spec")
        named[owner].lora_delta = _grouped_delta(adapters, sites)
        adapters._handles.append(_Unset(named[owner], "lora_delta"))
    return adapters


def detach_lora(adapters: LoraAdapters) -> None:
    """Remove the adapters' hooks from the model (the base model runs alone again)."""
    for handle in adapters._handles:
        handle.remove()
    adapters._handles.clear()
    adapters._plans.clear()


def _hook(adapters: LoraAdapters, site: _Site):  # noqa: ANN202
    def add_delta(module: nn.Module, args: Sequence[torch.Tensor], output: tuple) -> tuple:
        out, bias = output
        delta = _combined(adapters, site, args[0])
        return output if delta is None else (out + delta.to(out.dtype), bias)

    return add_delta
