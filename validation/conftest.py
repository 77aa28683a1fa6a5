"""Shared fixtures of every stage: the model under test and its spec (the one fixture factory is
`fixtures.factory`; tests get checkpoints through these fixtures or `fixture_dir`)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gemma4_support.config.spec import ModelSpec, load_spec

if TYPE_CHECKING:
    from validation.transformers_writers import Written


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Refuse a bad --gemma4-model before any stage (and before a run folder exists): every config and checkpoint
    problem on its own line, pytest's usage error (exit 4; gemma4-validate exits 2)."""
    from gemma4_support.convert.preflight import preflight
    from gemma4_support.errors import Gemma4Error

    given = config.getoption("--gemma4-model", None)
    if not given or hasattr(config, "workerinput") or config.option.help:
        return
    try:
        preflight(Path(given))
    except Gemma4Error as exc:
        raise pytest.UsageError(f"--gemma4-model: {exc}") from None


@pytest.fixture(scope="session")
def gemma4_model_dir(pytestconfig: pytest.Config) -> Path:
    """The HF checkpoint under test: --gemma4-model, else the embedded tiny MoE fixture."""
    given = pytestconfig.getoption("--gemma4-model")
    if given:
        return Path(given).resolve()
    from fixtures.factory import fixture_dir

    return fixture_dir("moe")


@pytest.fixture(scope="session")
def model_spec(gemma4_model_dir: Path) -> ModelSpec:
    """The spec of the model under test."""
    return load_spec(gemma4_model_dir)


@pytest.fixture(scope="session")
def gemma4_seed(pytestconfig: pytest.Config) -> int:
    """The suite's seed (--gemma4-seed)."""
    return int(pytestconfig.getoption("--gemma4-seed"))


@pytest.fixture(scope="session")
def chat_template_origin(pytestconfig: pytest.Config, gemma4_model_dir: Path) -> tuple[str, str]:
    """(the chat template under test, where it came from): --gemma4-chat-template FILE, else the model's own
    (chat_template.jinja, additional_chat_templates/ or tokenizer_config.json), else the fixtures' template."""
    from gemma4_support.chat.template import checkpoint_template

    given = pytestconfig.getoption("--gemma4-chat-template")
    if given:
        return Path(given).read_text(encoding="utf-8"), f"--gemma4-chat-template {given}"
    own = checkpoint_template(gemma4_model_dir)
    if own is not None:
        return own, f"the checkpoint's own ({gemma4_model_dir})"
    from fixtures.chat_template import CHAT_TEMPLATE

    return CHAT_TEMPLATE, f"the fixtures' template ({gemma4_model_dir} brings none)"


@pytest.fixture(scope="session")
def chat_template(chat_template_origin: tuple[str, str]) -> str:
    """The chat template under test (see chat_template_origin)."""
    return chat_template_origin[0]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module on one intra-op thread, as the multi-process (CP, TP) workers do."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def written_by(tmp_path_factory: pytest.TempPathFactory, gemma4_seed: int) -> Callable[[str], Written]:
    """Checkpoints and the fixtures' tokenizer written by another transformers release, once per release per process
    (validation/transformers_writers.py; the tests using it share the xdist group "transformers_writers")."""
    from validation.transformers_writers import write_with

    done: dict[str, Written] = {}

    def get(version: str) -> Written:
        if version not in done:
            done[version] = write_with(version, tmp_path_factory.mktemp(f"written-{version}"), gemma4_seed)
        return done[version]

    return get
