"""The process-wide runtime config: set once, equal again is a no-op, different raises, unset raises."""
from __future__ import annotations

import pytest

from gemma4_support import runtime
from gemma4_support.errors import RuntimeConfigError
from gemma4_support.runtime import RuntimeConfig, get_runtime, set_runtime


@pytest.fixture(autouse=True)
def fresh_runtime():
    runtime._reset_for_tests()
    yield
    runtime._reset_for_tests()


def test_read_before_set_names_the_call():
    with pytest.raises(RuntimeConfigError, match=r"set_runtime\(RuntimeConfig"):
        get_runtime()


def test_set_once_then_equal_is_noop_and_different_raises():
    first = set_runtime(RuntimeConfig(cp=2, packed_seq_len=64))
    assert set_runtime(RuntimeConfig(cp=2, packed_seq_len=64)) is first
    with pytest.raises(RuntimeConfigError, match="cannot change"):
        set_runtime(RuntimeConfig(cp=4, packed_seq_len=64))
    assert get_runtime() is first


def test_frozen():
    config = set_runtime(RuntimeConfig())
    with pytest.raises(AttributeError):
        config.cp = 8  # type: ignore[misc]


@pytest.mark.parametrize("kwargs,field", [
    ({"tp": 0}, "tp"), ({"cp": -1}, "cp"), ({"dtype": "fp8"}, "dtype"),
    ({"cp": 4, "packed_seq_len": 100}, "packed_seq_len"), ({"ep": True}, "ep"),
])
def test_bad_values(kwargs, field):
    with pytest.raises(RuntimeConfigError, match=field):
        RuntimeConfig(**kwargs)
