"""One validation pass at the door (issue 13): a bad config.json or checkpoint is refused before any stage, through
`gemma4-validate discover` / `run --model` and plain `pytest --gemma4-model`, with one line per problem (exit 2;
pytest's usage error, exit 4), every problem listed, never a traceback. Each symptom the issue reproduced is a case
here; hypothesis fuzzes config.json; a 50 GB checkpoint (sparse files) is checked by its headers in well under a
second; weights in another float dtype than the declared one are a warning, integer weights an error."""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from fixtures.configs import multimodal_wrapper, real_config
from fixtures.factory import fixture_config, fixture_dir
from gemma4_support.config.spec import load_spec
from gemma4_support.convert.checkpoint import HFCheckpoint
from gemma4_support.convert.headers import INDEX_FILE
from gemma4_support.convert.mapping import hf_inventory
from gemma4_support.convert.preflight import preflight
from gemma4_support.errors import CheckpointError
from validation.cli import main
from validation.properties import PROPERTY_SETTINGS, counted_property
from validation.thresholds import DISCOVERY_CONFIG_FUZZ

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str) -> tuple[int, str, str]:
    """gemma4-validate in this process: (exit code, stdout, stderr); any exception other than the CLI's own escapes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def refused_in_one_line(rc: int, out: str, err: str) -> str:
    """The single error line of a refusal (exit 2, nothing on stdout, no traceback)."""
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, (rc, out, err)
    assert lines[0].startswith("gemma4-validate: error: ") and "fix:" in lines[0] and "Traceback" not in err, err
    return lines[0]


def _write_config(directory: Path, content: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    (directory / "config.json").write_bytes(data)
    return directory


def _moe(*path: object) -> dict:
    """The MoE fixture's config with the field at `path[:-1]` set to `path[-1]`."""
    config = fixture_config("moe")
    *keys, last, value = path
    node = config
    for key in keys:
        node = node[key]
    node[last] = value
    return config


# The reproductions (and a NaN), each: config.json content -> what the one line must name.
CONFIG_SYMPTOMS = {
    "non_utf8_bytes": (json.dumps(fixture_config("moe")).encode().replace(b'"gelu_pytorch_tanh"', b'"gelu\xff"'),
                       "not UTF-8"),
    "top_level_list": ([fixture_config("moe")], "JSON list"),
    "top_level_string": ("gemma4", "JSON string"),
    "rope_parameters_list": (_moe("rope_parameters", [{"rope_theta": 1e4}]), "rope_parameters"),
    "per_layer_kv_heads_0": (_moe("per_layer_config", "5", "num_key_value_heads", 0),
                             "per_layer_config['5']['num_key_value_heads']=0"),
    "head_dim_abc": (_moe("head_dim", "abc"), "head_dim='abc'"),
    "rope_theta_big": (_moe("rope_parameters", "sliding_attention", "rope_theta", "big"), "['rope_theta']='big'"),
    "rope_theta_nan": (_moe("rope_parameters", "full_attention", "rope_theta", math.nan), "['rope_theta']=nan"),
    "max_positions_lots": (_moe("max_position_embeddings", "lots"), "max_position_embeddings='lots'"),
    "window_1e9": (_moe("sliding_window", 10**9), "sliding_window=1000000000 exceeds max_position_embeddings=4096"),
    "moe_flag_as_string": (_moe("enable_moe_block", "true"), "enable_moe_block='true'"),
}


@pytest.mark.stage_discovery
@pytest.mark.parametrize("command", ["discover", "run"])
@pytest.mark.parametrize("case", list(CONFIG_SYMPTOMS))
def test_config_symptoms_are_refused_in_one_line(case: str, command: str, tmp_path: Path) -> None:
    """Each reproduced bad config: exit 2 and one line naming the field, through `discover` and `run --model`
    (before pytest starts: no report folder)."""
    content, named = CONFIG_SYMPTOMS[case]
    model = _write_config(tmp_path / "model", content)
    extra = ["--stages", "discovery", "--report-dir", str(tmp_path / "reports")] if command == "run" else []
    line = refused_in_one_line(*cli(command, "--model", str(model), *extra))
    assert named in line, line
    assert not (tmp_path / "reports").exists()


@pytest.mark.stage_discovery
def test_every_config_problem_is_listed_on_one_line(tmp_path: Path) -> None:
    config = _moe("per_layer_config", "5", "num_key_value_heads", 0)
    config.update(head_dim="abc", max_position_embeddings="lots", tie_word_embeddings="no")
    config["rope_parameters"]["sliding_attention"]["rope_theta"] = "big"
    line = refused_in_one_line(*cli("discover", "--model", str(_write_config(tmp_path, config))))
    assert "has 5 problems" in line, line
    for named in ("head_dim='abc'", "max_position_embeddings='lots'", "tie_word_embeddings='no'", "'rope_theta']='big'",
                  "['num_key_value_heads']=0"):
        assert named in line, named


# ---------------------------------------------------------------- hypothesis: config.json fuzzed through the CLI

BASES = {"moe": fixture_config("moe"), "dense": fixture_config("dense"), "26B-A4B": real_config("26B-A4B"),
         "31B-wrapped": multimodal_wrapper(real_config("31B"))}
# Fields the library reads that a base may lack: the fuzzer also sets them.
READ_FIELDS = ("max_position_embeddings", "global_head_dim", "num_global_key_value_heads", "rms_norm_eps",
               "final_logit_softcapping", "pad_token_id", "rope_parameters", "per_layer_config", "layer_types",
               "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size", "tie_word_embeddings",
               "hidden_activation", "attention_dropout", "dtype", "torch_dtype", "hidden_size_per_layer_input")
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 7, 8, 64, 4096, 10**9]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(["sliding_attention", "full_attention", "proportional", "default", "bfloat16"]))
JSON_VALUES = st.recursive(_LEAVES, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                                max_size=4), max_leaves=8)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = []
    for key, value in items:
        out += [(*prefix, key), *_paths(value, (*prefix, key))]
    return out


@st.composite
def config_files(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(config.json bytes, --json?): a real config with 1-3 fields set to any JSON value or deleted, else the whole
    document replaced, cut short, or given stray bytes."""
    config = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    kind = draw(st.sampled_from(["fields"] * 7 + ["document", "cut", "bytes"]))
    as_json = draw(st.booleans())
    if kind == "document":
        return json.dumps(draw(JSON_VALUES)).encode(), as_json
    text = json.dumps(config).encode()
    if kind != "fields":
        at = draw(st.integers(0, len(text)))
        return (text[:at] if kind == "cut" else text[:at] + draw(st.binary(min_size=1, max_size=3)) + text[at:]), as_json
    inner = ("text_config",) if "text_config" in config else ()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(config) + [(*inner, key) for key in READ_FIELDS]))
        parent = config
        for key in path[:-1]:
            parent = parent[key] if isinstance(parent, (dict, list)) and _has(parent, key) else None
        if parent is None or not isinstance(parent, (dict, list)):
            continue
        if isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            parent.pop(path[-1], None)
        elif isinstance(parent, dict) or _has(parent, path[-1]):
            parent[path[-1]] = draw(JSON_VALUES)
    return json.dumps(config).encode(), as_json


def _has(container: dict | list, key: object) -> bool:
    return key in container if isinstance(container, dict) else isinstance(key, int) and key < len(container)


def fuzz_body(directory: Path, stats: Counter):
    """One fuzzed config through `gemma4-validate discover`: exit 0, or exit 2 with one line and no traceback."""
    def body(example: tuple[bytes, bool]) -> None:
        data, as_json = example
        (directory / "config.json").write_bytes(data)
        rc, out, err = cli("discover", "--model", str(directory), *(["--json"] if as_json else []))
        if rc == 0:
            assert out and err == "", err
            stats["accepted"] += 1
        else:
            refused_in_one_line(rc, out, err)
            stats["refused"] += 1
    return body


@pytest.mark.stage_discovery
def test_fuzzed_configs_exit_0_or_refuse_in_one_line(tmp_path_factory: pytest.TempPathFactory, stage_report) -> None:
    stats: Counter = Counter(accepted=0, refused=0)
    first = counted_property(config_files(), fuzz_body(tmp_path_factory.mktemp("fuzz"), stats), stats, max_examples=250)
    stage_report.check("preflight/config_fuzz", dict(stats), DISCOVERY_CONFIG_FUZZ, first_failures=first)


@pytest.mark.stage_discovery
def test_sensitivity_fuzz_catches_a_door_left_open(tmp_path_factory: pytest.TempPathFactory, monkeypatch,
                                                   stage_report) -> None:
    """The same fuzz with the field check switched off: bad configs reach the reader and crash it."""
    import gemma4_support.config.spec as spec_module

    monkeypatch.setattr(spec_module, "check_config", lambda raw, where="": None)
    stats: Counter = Counter(accepted=0, refused=0)
    first = counted_property(config_files(), fuzz_body(tmp_path_factory.mktemp("fuzz_open"), stats), stats,
                             max_examples=40)
    stage_report.expect_caught("sensitivity/config_fuzz_without_field_check", dict(stats), DISCOVERY_CONFIG_FUZZ[1:2],
                               first_failures=first, broken="config.check.check_config switched off")


# ---------------------------------------------------------------- the checkpoint: files, names, shapes, dtypes

def _dense_copy(tmp_path: Path, edit=None) -> Path:
    """A copy of the dense fixture with its tensors edited (`edit(tensors)` in place) and re-saved."""
    out = tmp_path / "model"
    shutil.copytree(fixture_dir("dense"), out)
    if edit is not None:
        tensors = load_file(str(out / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _cut(size: int | None):
    def cut(model: Path) -> None:
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[:size if size is not None else len(data) // 2])
    return cut


def _set(name: str, fn):
    return lambda tensors: tensors.__setitem__(name, fn(tensors[name]).contiguous())


def _missing_shard(model: Path) -> None:
    names = list(load_file(str(model / "model.safetensors")))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (model / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


K, O, NORM = ("model.layers.5.self_attn.k_proj.weight", "model.layers.1.self_attn.o_proj.weight",
              "model.layers.0.input_layernorm.weight")
# case -> (file edit, tensor edit, what the first problem line names)
BROKEN = {
    "no_safetensors": (lambda m: (m / "model.safetensors").unlink(), None, "no *.safetensors files"),
    "truncated_file": (_cut(None), None, "file model.safetensors is truncated"),
    "100_byte_file": (_cut(100), None, "file model.safetensors (100 bytes) has no complete safetensors header"),
    "changed_shape": (None, _set(K, lambda t: t[:128]), f"tensor {K} has shape (128, 128) in the checkpoint but the "
                                                         "config implies (256, 128)"),
    "transposed": (None, _set(O, lambda t: t.t()), f"tensor {O} has shape (256, 128) in the checkpoint but the config "
                                                   "implies (128, 256) (transposed)"),
    "norm_as_int32": (None, _set(NORM, lambda t: t.to(torch.int32)), f"tensor {NORM} is stored as int32"),
    "missing_shard": (_missing_shard, None, f"{INDEX_FILE} names shard model-00002-of-00002.safetensors"),
}


@pytest.mark.stage_hf_parity
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_is_refused_by_its_own_line(case: str, tmp_path: Path) -> None:
    """`run --model` refuses each before pytest starts, in the project's words (never HF's OSError or
    "ignore_mismatched_sizes"); opening it in the library says the same."""
    edit_files, edit_tensors, named = BROKEN[case]
    model = _dense_copy(tmp_path, edit_tensors)
    if edit_files:
        edit_files(model)
    rc, out, err = cli("run", "--model", str(model), "--stages", "hf_parity", "--report-dir", str(tmp_path / "reports"))
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and "Traceback" not in err and "ignore_mismatched_sizes" not in err, err
    assert lines[0].startswith(f"gemma4-validate: error: checkpoint {model}"), err
    assert named in err and all("fix:" in line for line in lines if line.startswith("  ") or len(lines) == 1), err
    assert not (tmp_path / "reports").exists()
    if case in ("truncated_file", "100_byte_file", "missing_shard"):
        with pytest.raises(CheckpointError, match="truncated|header|names shard"):
            HFCheckpoint(model)


@pytest.mark.stage_hf_parity
def test_every_checkpoint_problem_is_listed_one_line_each(tmp_path: Path) -> None:
    def break_three(tensors: dict) -> None:
        tensors.pop("model.layers.3.mlp.up_proj.weight")
        tensors["model.layers.0.self_attn.bogus.weight"] = torch.zeros(3, 4)
        tensors[K] = tensors[K][:128].contiguous()

    model = _dense_copy(tmp_path, break_three)
    with pytest.raises(CheckpointError) as info:
        preflight(model)
    lines = str(info.value).splitlines()
    assert lines[0] == f"checkpoint {model} has 3 problems:" and len(lines) == 4, lines
    assert all(line.startswith("  ") and " — fix: " in line for line in lines[1:])
    assert "missing tensor model.layers.3.mlp.up_proj.weight (expected (384, 128))" in lines[3]
    assert "unknown tensor model.layers.0.self_attn.bogus.weight (3, 4)" in lines[2] and K in lines[1]


@pytest.mark.stage_hf_parity
def test_float_weights_in_another_dtype_are_a_warning(tmp_path: Path) -> None:
    """Weights stored bf16 (and one fp16) in a float32-declared checkpoint pass the door with one warning per dtype,
    printed by `discover`; the same checkpoint with an int32 norm is refused."""
    def lower(tensors: dict) -> None:
        tensors.update({n: t.to(torch.bfloat16) for n, t in tensors.items()})
        tensors[NORM] = tensors[NORM].to(torch.float16)

    model = _dense_copy(tmp_path, lower)
    checked = preflight(model)
    assert checked.checkpoint["declared_dtype"] == "float32"
    assert checked.checkpoint["dtypes"] == {"bfloat16": checked.checkpoint["tensors"] - 1, "float16": 1}
    assert len(checked.warnings) == 2 and "stored as bfloat16 but config.json declares float32" in checked.warnings[0]
    rc, out, err = cli("discover", "--model", str(model))
    assert rc == 0 and err == "" and "note: 1 weight tensor(s) stored as float16" in out
    tensors = load_file(str(model / "model.safetensors"))
    tensors[NORM] = tensors[NORM].to(torch.int32)
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor {NORM} is stored as int32, not a floating-point dtype"):
        preflight(model)


@functools.cache
def _fixture_weights_head() -> tuple[bytes, int]:
    """The dense fixture's weight file: its length prefix and header, and its size."""
    path = fixture_dir("dense") / "model.safetensors"
    with path.open("rb") as fh:
        prefix = fh.read(8)
        return prefix + fh.read(int.from_bytes(prefix, "little")), path.stat().st_size


@st.composite
def damaged_weights(draw: st.DrawFn) -> tuple[bytes, int]:
    """(the first bytes of a weight file, its length): the dense fixture's header with bytes overwritten, inserted
    or its length prefix replaced, or the file cut anywhere (the data region is left as a hole)."""
    original, size = _fixture_weights_head()
    head, kind = bytearray(original), draw(st.sampled_from(["overwrite", "insert", "prefix", "cut"]))
    if kind == "overwrite":
        for _ in range(draw(st.integers(1, 3))):
            head[draw(st.integers(0, len(head) - 1))] = draw(st.integers(0, 255))
    elif kind == "insert":
        at = draw(st.integers(8, len(head)))
        head[at:at] = draw(st.binary(min_size=1, max_size=5))
        size += len(head) - len(original)
        head[:8] = (len(head) - 8).to_bytes(8, "little")
    elif kind == "prefix":
        head[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    else:
        size = draw(st.integers(0, size))
    return bytes(head[:size]), size


@pytest.mark.stage_hf_parity
@settings(PROPERTY_SETTINGS, max_examples=150)
@given(damaged=damaged_weights())
def test_damaged_weight_files_are_named_or_read_as_safetensors_reads_them(damaged: tuple[bytes, int],
                                                                           damaged_dir: Path) -> None:
    """Preflight refuses a damaged file with one line per problem, or accepts exactly what safetensors opens (with
    the same tensors), never anything else."""
    from safetensors import safe_open

    data, size = damaged
    with (damaged_dir / "model.safetensors").open("wb") as fh:
        fh.write(data)
        fh.truncate(size)
    try:
        checked = preflight(damaged_dir)
    except CheckpointError as refusal:
        lines = str(refusal).splitlines()
        assert all("fix:" in line for line in (lines[1:] or lines)), str(refusal)
        return
    with safe_open(str(damaged_dir / "model.safetensors"), framework="pt") as handle:
        assert len(list(handle.keys())) == checked.checkpoint["tensors"]


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with the dense fixture's config, for weight files written by a test."""
    out = tmp_path_factory.mktemp("damaged")
    shutil.copy(fixture_dir("dense") / "config.json", out / "config.json")
    return out


def _sparse_checkpoint(directory: Path, config: dict, shards: int = 4) -> int:
    """A checkpoint of `config`'s full size in bf16 whose tensor data are holes (sparse files): real headers, an
    index, no bytes on disk. Returns its size in bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    names = sorted(hf_inventory(load_spec(config)).items())
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[k::shards]:
            size = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        raw = json.dumps(header).encode()
        with (directory / file).open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.truncate(8 + len(raw) + offset)
        total += 8 + len(raw) + offset
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


@pytest.mark.stage_hf_parity
def test_a_50gb_checkpoint_is_checked_by_its_headers(tmp_path: Path) -> None:
    """The real 26B-A4B shapes at full size (sparse files): the door passes in well under a second without reading
    tensor data; a shard cut by one byte is named."""
    total = _sparse_checkpoint(tmp_path, real_config("26B-A4B"))
    assert total > 45e9
    start = time.perf_counter()
    checked = preflight(tmp_path)
    seconds = time.perf_counter() - start
    assert checked.checkpoint["bytes"] == total and checked.checkpoint["dtypes"] == {"bfloat16": len(hf_inventory(
        checked.spec))} and not checked.warnings
    assert seconds < 2.0, seconds
    shard = tmp_path / "model-00003-of-00004.safetensors"
    os.truncate(shard, shard.stat().st_size - 1)
    with pytest.raises(CheckpointError, match="file model-00003-of-00004.safetensors is truncated"):
        preflight(tmp_path)


def test_plain_pytest_stops_before_any_stage(tmp_path: Path) -> None:
    """`pytest --gemma4-model=DIR` on a truncated checkpoint: pytest's usage error naming the file, no test run,
    no run folder written."""
    model = _dense_copy(tmp_path)
    _cut(None)(model)
    reports = tmp_path / "reports"
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "validation/test_discovery.py",
                          "-m", "stage_discovery", f"--gemma4-model={model}", "--report-dir", str(reports)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"--gemma4-model: checkpoint {model}: file model.safetensors is truncated" in out.stderr, out.stderr
    assert "passed" not in out.stdout and "Traceback" not in out.stderr
    assert not reports.exists()
