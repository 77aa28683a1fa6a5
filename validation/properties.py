"""Hypothesis properties whose example counts go into the stage reports (a property that ran no examples
cannot pass its gate)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def counted_property(strategy: st.SearchStrategy, body: Callable[[object], None], examples: Counter) -> None:
    """Run `body` as a hypothesis property over `strategy`, counting the examples it ran."""
    @PROPERTY_SETTINGS
    @given(strategy)
    def run(x):
        examples["examples"] += 1
        body(x)

    run()
