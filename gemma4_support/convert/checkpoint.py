"""Lazy safetensors reading and writing, and the two directions of conversion driven by `mapping.TABLE`.

Every checkpoint tensor is accounted for: converted by a table row, or declared out of the text model
(multimodal towers), beyond a truncation depth, or a tied duplicate of the embedding. Anything else, any
missing tensor and any shape that disagrees with the config raises CheckpointError naming the tensor and
both shapes. Nothing is skipped silently.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemma4_support.config.spec import ModelSpec
from gemma4_support.convert.headers import INDEX_FILE, printable, read_inventory
from gemma4_support.convert.mapping import NON_TEXT_PREFIXES, Entry, entries, hf_prefix
from gemma4_support.errors import CheckpointError, combined

__all__ = ["INDEX_FILE", "Accounting", "HFCheckpoint", "TensorDict", "account", "as_source", "check_hf", "expert_index",
           "held_name", "hf_to_megatron", "local_experts", "renumber_expert",
           "iter_hf_to_megatron", "load_hf_weights", "megatron_to_hf", "save_hf_checkpoint", "tensor_state"]


class HFCheckpoint:
    """An HF safetensors checkpoint directory (one file or sharded with an index), read tensor by tensor. Opening
    it reads every file's header (`headers.read_inventory`): a missing or damaged file raises CheckpointError
    naming each one."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.inventory = read_inventory(self.directory)
        if self.inventory.problems:
            raise combined(self.inventory.problems, CheckpointError, f"checkpoint {self.directory}", one_line=False)
        self._file_of = {name: self.directory / t.file for name, t in self.inventory.tensors.items()}
        self._handles: dict[Path, object] = {}

    def _handle(self, name: str):
        try:
            file = self._file_of[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in {self.directory}", "check the checkpoint") from None
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading its data."""
        if name not in self.inventory.tensors:
            raise CheckpointError(f"tensor {name} is not in {self.directory}", "check the checkpoint")
        return self.inventory.tensors[name].shape

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        return self._handle(name).get_tensor(name)


class TensorDict:
    """An in-memory name -> tensor mapping with the same interface as HFCheckpoint."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> list[str]:
        """Every tensor name."""
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape."""
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """One tensor."""
        return self._tensors[name]


Source = HFCheckpoint | TensorDict


def as_source(source: Source | Mapping[str, torch.Tensor] | str | Path) -> Source:
    """A checkpoint directory, an in-memory state dict, or an existing source, as a Source."""
    if isinstance(source, (HFCheckpoint, TensorDict)):
        return source
    if isinstance(source, (str, Path)):
        return HFCheckpoint(source)
    return TensorDict(source)


@dataclass
class Accounting:
    """How every HF tensor of a checkpoint was accounted for."""

    converted: list[str] = field(default_factory=list)
    non_text: list[str] = field(default_factory=list)  # multimodal towers: not part of the text model
    beyond_depth: list[str] = field(default_factory=list)  # layers cut off by truncation
    tied_duplicates: list[str] = field(default_factory=list)  # lm_head.weight equal to the tied embedding

    def to_dict(self) -> dict[str, int]:
        """Counts per category (JSON-ready)."""
        return {k: len(v) for k, v in self.__dict__.items()}


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def account(shapes: Mapping[str, tuple[int, ...]], spec: ModelSpec
            ) -> tuple[list[Entry], Accounting, list[CheckpointError]]:
    """Account for every tensor (name -> shape) against the table for `spec`: one problem per unknown, missing or
    mis-shaped tensor. A tied lm_head is accounted for by its shape here (its values: `check_hf`)."""
    table = entries(spec)
    expected = {name: shape for e in table for name, shape in zip(e.hf, e.hf_shapes)}
    layer_re = re.compile(re.escape(hf_prefix(spec)) + r"layers\.(\d+)\.")
    embed = hf_prefix(spec) + "embed_tokens.weight"
    acc, problems, unknown = Accounting(), [], []
    for name in sorted(shapes):
        got = tuple(shapes[name])
        if name in expected:
            if got != expected[name]:
                hint = " (transposed)" if got == expected[name][::-1] and len(got) > 1 else ""
                problems.append(CheckpointError(
                    f"tensor {name} has shape {_fmt(got)} in the checkpoint but the config implies "
                    f"{_fmt(expected[name])}{hint}", "the checkpoint and its config.json disagree: re-save them together"))
            acc.converted.append(name)
        elif name.startswith(NON_TEXT_PREFIXES):
            acc.non_text.append(name)
        elif (m := layer_re.match(name)) and int(m.group(1)) >= spec.num_layers:
            acc.beyond_depth.append(name)
        elif name == "lm_head.weight" and spec.tie_word_embeddings and embed in expected:
            if got != expected[embed]:
                problems.append(CheckpointError(
                    f"tensor lm_head.weight has shape {_fmt(got)} but the config ties it to {embed} {_fmt(expected[embed])}",
                    "set tie_word_embeddings: false in config.json, or drop lm_head.weight"))
            acc.tied_duplicates.append(name)
        else:
            unknown.append(name)
    problems += [CheckpointError(f"unknown tensor {printable(n)} {_fmt(tuple(shapes[n]))}, not in the Gemma 4 weight "
                                 "table", "this is not a supported Gemma 4 text checkpoint, or its config does not match it")
                 for n in unknown]
    problems += [CheckpointError(f"missing tensor {n} (expected {_fmt(s)})",
                                 "the checkpoint is incomplete or its config describes a different model")
                 for n, s in expected.items() if n not in shapes]
    return table, acc, problems


def check_hf(source: Source, spec: ModelSpec) -> tuple[list[Entry], Accounting]:
    """Validate a checkpoint against the table for `spec`: unknown, missing or mis-shaped tensors raise (all named)."""
    table, acc, problems = account({name: source.shape(name) for name in source.names()}, spec)
    embed = hf_prefix(spec) + "embed_tokens.weight"
    for name in acc.tied_duplicates:
        if not problems and not torch.equal(source.get(name), source.get(embed)):
            problems.append(CheckpointError(f"tensor lm_head.weight {_fmt(source.shape(name))} differs from {embed} but "
                                            "the config ties the output layer to the embedding",
                                            "set tie_word_embeddings: false in config.json, or drop lm_head.weight"))
    if problems:
        where = f"checkpoint {source.directory}" if isinstance(source, HFCheckpoint) else "state dict"
        raise combined(problems, CheckpointError, where, one_line=False)
    return table, acc


def _apply(entry: Entry, tensors: list[torch.Tensor], to_megatron: bool, spec: ModelSpec) -> list[torch.Tensor]:
    fn = entry.transform.to_megatron if to_megatron else entry.transform.to_hf
    try:
        return fn(tensors, spec, entry.layer)
    except RuntimeError as exc:
        names = entry.hf if to_megatron else entry.megatron
        shapes = ", ".join(f"{n} {_fmt(tuple(t.shape))}" for n, t in zip(names, tensors))
        raise CheckpointError(f"cannot apply '{entry.transform.name}' to {shapes}: {exc}",
                              "the tensors do not match the config's geometry") from None


def iter_hf_to_megatron(source: Source | Mapping[str, torch.Tensor] | str | Path, spec: ModelSpec
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate, then yield (Megatron name, tensor) one table row at a time (reads lazily)."""
    source = as_source(source)
    table, _ = check_hf(source, spec)
    for entry in table:
        out = _apply(entry, [source.get(n) for n in entry.hf], True, spec)
        yield from zip(entry.megatron, out)


def hf_to_megatron(source: Source | Mapping[str, torch.Tensor] | str | Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """HF checkpoint (dir or state dict) -> Megatron state dict (full tensors, tensor parallel size 1)."""
    return dict(iter_hf_to_megatron(source, spec))


def tensor_state(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """A Megatron state dict without its `._extra_state` entries (megatron's local linears keep None there)."""
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


def megatron_to_hf(state: Mapping[str, torch.Tensor], spec: ModelSpec, *, allow_absent_rows: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Megatron state dict -> HF tensors. `allow_absent_rows` (for gradients): a row whose Megatron tensors are
    all absent (buffers such as layer_scalar have no gradient) is left out; a partly present row still raises."""
    state = tensor_state(state)
    table = entries(spec)
    known = {name for e in table for name in e.megatron}
    unknown = sorted(set(state) - known)
    if unknown:
        raise CheckpointError(f"unknown Megatron tensor(s), not in the Gemma 4 table: {unknown[:6]}",
                              "convert a Gemma 4 model built by gemma4_support.model")
    out: dict[str, torch.Tensor] = {}
    for entry in table:
        present = [n for n in entry.megatron if n in state]
        if not present and allow_absent_rows:
            continue
        if len(present) != len(entry.megatron):
            missing = [n for n in entry.megatron if n not in state]
            raise CheckpointError(f"missing Megatron tensor(s) {missing[:6]} (HF {', '.join(entry.hf)})",
                                  "pass the model's complete state dict")
        converted = _apply(entry, [state[n] for n in entry.megatron], False, spec)
        for name, tensor, shape in zip(entry.hf, converted, entry.hf_shapes):
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"tensor {name} comes out with shape {_fmt(tuple(tensor.shape))} but the config "
                                      f"implies {_fmt(shape)}", "the Megatron state does not match this spec")
            out[name] = tensor
    return out


def _tp_placement() -> tuple[int, int, int, int]:
    """This process's (tensor-parallel size, rank, expert tensor-parallel size, rank) in Megatron's parallel state."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank())


_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert number in a Megatron tensor name (`...local_experts.{e}....`), None for other tensors."""
    found = _EXPERT.search(name)
    return int(found.group(1)) if found else None


def renumber_expert(name: str, shift: int) -> str:
    """`...local_experts.{e}...` -> `...local_experts.{e + shift}...` (global <-> a rank's local numbering)."""
    return _EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + shift}.", name, count=1)


def held_name(name: str, first: int, count: int | None) -> str | None:
    """A global Megatron name -> the name on a rank holding experts [first, first + count) (renumbered from 0), None
    for another rank's expert; `count` None (every expert here) and non-expert names pass unchanged."""
    e = expert_index(name)
    if e is None or count is None:
        return name
    return renumber_expert(name, -first) if first <= e < first + count else None


def local_experts(model: torch.nn.Module) -> tuple[int, int] | None:
    """(first global expert, count) this rank's routed-experts blocks hold; None for a model without experts."""
    from gemma4_support.model.mlp import Gemma4Experts

    block = next((m for m in model.modules() if isinstance(m, Gemma4Experts)), None)
    return None if block is None else (block.first_expert, block.num_local_experts)


def load_hf_weights(model: torch.nn.Module, source: Source | Mapping[str, torch.Tensor] | str | Path) -> Accounting:
    """Copy an HF checkpoint into a built Gemma4Model, row by row (cast to the model's dtype and device); at tensor
    parallel size > 1 each rank takes its shard of every tensor, split as the weight table says, and at expert
    parallel size > 1 only its own experts (renumbered from 0, as Megatron names a rank's local experts)."""
    spec = model.spec
    source = as_source(source)
    table, acc = check_hf(source, spec)
    tp, rank, expert_tp, expert_rank = _tp_placement() if getattr(model, "tp_size", 1) > 1 else (1, 0, 1, 0)
    first, count = local_experts(model) or (0, None)
    split = {name: e.tp for e in table for name in e.megatron}
    targets = tensor_state(model.state_dict(keep_vars=True))
    table_names = {held_name(n, first, count) for n in split} - {None}
    if set(targets) != table_names:
        raise CheckpointError(f"the model's tensors and the table disagree: model-only {sorted(set(targets) - table_names)[:6]}, "
                              f"table-only {sorted(table_names - set(targets))[:6]}", "fix gemma4_support.convert.mapping")
    with torch.no_grad():
        for name, tensor in iter_hf_to_megatron(source, spec):
            local = held_name(name, first, count)
            if local is None:
                continue
            target = targets[local]
            expert = ".local_experts." in name  # experts split over the expert tensor-parallel group
            tensor = split[name].shard(tensor, *((expert_tp, expert_rank) if expert else (tp, rank)))
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(f"tensor {name} is {_fmt(tuple(tensor.shape))} after conversion but the model "
                                      f"holds {_fmt(tuple(target.shape))}", "the model was built for another config")
            target.copy_(tensor)
    return acc


def save_hf_checkpoint(state: Mapping[str, torch.Tensor], spec: ModelSpec, directory: str | Path,
                       config: Mapping | None = None, max_shard_bytes: int = 4 << 30) -> Path:
    """Write a Megatron state dict as an HF safetensors checkpoint (sharded with an index when large)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in megatron_to_hf(state, spec).items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config is not None:
        (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    return out
