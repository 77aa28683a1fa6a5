"""The process-wide runtime config: set once, equal again is a no-op, different raises, unset raises; the model
builder reads it. Each scenario runs in a fresh interpreter (the config is process-wide by design)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gemma4_support.errors import RuntimeConfigError
from gemma4_support.runtime import RuntimeConfig, get_runtime


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_read_before_set_names_the_call():
    out = _fresh("""
        from gemma4_support.runtime import get_runtime
        get_runtime()
    """)
    assert out.returncode != 0 and "set_runtime(RuntimeConfig(...))" in out.stderr, out.stderr[-500:]


def test_set_once_then_equal_is_noop_and_different_raises():
    out = _fresh("""
        from gemma4_support.errors import RuntimeConfigError
        from gemma4_support.runtime import RuntimeConfig, get_runtime, set_runtime
        first = set_runtime(RuntimeConfig(cp=2, packing_capacity=64))
        assert set_runtime(RuntimeConfig(cp=2, packing_capacity=64)) is first
        try:
            set_runtime(RuntimeConfig(cp=4, packing_capacity=64))
        except RuntimeConfigError as err:
            assert "cannot change" in str(err)
        else:
            raise SystemExit("a different second value was accepted")
        assert get_runtime() is first
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-1000:]


def test_model_builder_reads_the_topology():
    """cp > 1 without a process group is refused before any model is built, naming the launch to make."""
    out = _fresh("""
        from fixtures.factory import fixture_dir
        from gemma4_support.errors import RuntimeConfigError
        from gemma4_support.model.build import load_model
        from gemma4_support.runtime import RuntimeConfig, set_runtime
        try:
            load_model(fixture_dir("dense"))
        except RuntimeConfigError as err:
            print("unset:", err)
        set_runtime(RuntimeConfig(cp=2))
        try:
            load_model(fixture_dir("dense"))
        except RuntimeConfigError as err:
            print("cp2:", err)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("unset:") and "set_runtime" in lines[0]
    assert lines[1].startswith("cp2:") and "cp=2" in lines[1] and "torchrun" in lines[1]


def test_this_session_runs_one_replica_per_process():
    """The suite's plugin sets tp = cp = ep = 1 for every test process."""
    assert get_runtime() == RuntimeConfig()


def test_frozen():
    with pytest.raises(AttributeError):
        get_runtime().cp = 8  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,field", [
    ({"tp": 0}, "tp"), ({"cp": -1}, "cp"), ({"packing_capacity": 0}, "packing_capacity"),
    ({"cp": 4, "packing_capacity": 100}, "packing_capacity"), ({"ep": True}, "ep"),
])
def test_bad_values(kwargs, field):
    with pytest.raises(RuntimeConfigError, match=field):
        RuntimeConfig(**kwargs)
