"""Layer families of a Gemma 4 model and the smallest truncation that still contains every one."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from gemma4_support.config.spec import FULL, SLIDING, ModelSpec
from gemma4_support.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """A kind of layer (attention type or MLP kind) and where it occurs."""

    name: str
    indices: tuple[int, ...]

    @property
    def first_index(self) -> int:
        """The first layer index of this family."""
        return self.indices[0]


@dataclass(frozen=True)
class Discovery:
    """The families of a model and the depths that cover them."""

    families: tuple[Family, ...]
    covering_depth: int  # smallest depth whose layers contain every family
    truncation_depth: int  # smallest covering depth whose last layer is full (HF forces the last layer to full)

    def family(self, name: str) -> Family:
        """The family called `name`."""
        for fam in self.families:
            if fam.name == name:
                return fam
        raise KeyError(f"no family {name!r}; families: {[f.name for f in self.families]}")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "families": {f.name: {"first_index": f.first_index, "indices": list(f.indices)} for f in self.families},
            "covering_depth": self.covering_depth,
            "truncation_depth": self.truncation_depth,
        }


def discover(spec: ModelSpec) -> Discovery:
    """Group layers into families (sliding attention, full attention, MoE or dense MLP)."""
    groups: dict[str, list[int]] = {}
    for layer in spec.layers:
        groups.setdefault(layer.layer_type, []).append(layer.index)
        groups.setdefault(f"{layer.mlp}_mlp", []).append(layer.index)
    order = [SLIDING, FULL, "moe_mlp", "dense_mlp"]
    families = tuple(Family(name, tuple(groups[name])) for name in order if name in groups)
    covering = max(f.first_index for f in families) + 1
    truncation = next(d for d in range(covering, spec.num_layers + 1) if spec.layers[d - 1].layer_type == FULL)
    return Discovery(families, covering, truncation)


def truncate_config(config: dict, depth: int) -> dict:
    """A copy of an HF Gemma 4 config cut to its first `depth` layers (text config or multimodal wrapper)."""
    out = copy.deepcopy(config)
    text = out["text_config"] if out.get("model_type") == "gemma4" else out
    n = text.get("num_hidden_layers")
    if not isinstance(n, int) or not 0 < depth <= n:
        raise ConfigError(f"cannot truncate a {n}-layer config to {depth} layers", f"choose a depth in 1..{n}")
    text["num_hidden_layers"] = depth
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:depth]
        if text["layer_types"][-1] != FULL:
            raise ConfigError(
                f"truncating to {depth} layers ends on a sliding layer; HF would silently turn it into a full layer",
                "use Discovery.truncation_depth, which ends on a full layer",
            )
    if isinstance(text.get("per_layer_config"), dict):
        text["per_layer_config"] = {k: v for k, v in text["per_layer_config"].items() if int(k) < depth}
    return out
