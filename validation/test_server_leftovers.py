"""Stage tokenization, a started server leaves nothing behind: its temp files and IPC sockets live in its own
scratch directory, removed at stop, at interpreter exit and (owner killed) by the next start; a failed start
keeps only its log, named in the error. The real engine's check is in test_server_lifecycle's session test."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gemma4_support.errors import ServerError
from gemma4_support.serving import ServerArgs, start_server
from validation.test_server_lifecycle import FAKE_SERVE

pytestmark = [pytest.mark.stage_tokenization]

REPO = Path(__file__).resolve().parents[1]

# A server that touches the temp dirs as vLLM does: a unix socket bound under VLLM_RPC_BASE_PATH (ZMQ ipc://)
# and a vllm_dist_* store file from tempfile; then it serves /health, or exits with an error ("crash").
_SCRATCH_USER = textwrap.dedent("""
    import http.server, json, os, socket, sys, tempfile, uuid
    port, record, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ipc = socket.socket(socket.AF_UNIX)
    ipc.bind(os.path.join(os.environ["VLLM_RPC_BASE_PATH"], str(uuid.uuid4())))
    open(os.path.join(tempfile.gettempdir(), "vllm_dist_" + uuid.uuid4().hex), "w").close()
    with open(record, "w") as f:
        json.dump({k: os.environ.get(k) for k in ("TMPDIR", "VLLM_RPC_BASE_PATH")}, f)
    if mode == "crash":
        print("RuntimeError: Engine core initialization failed", flush=True)
        sys.exit(3)
    """ + FAKE_SERVE)


@pytest.fixture
def temp_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short, empty system temp dir for this test (unix socket paths are limited to 107 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="g4t-"))
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setenv("TMPDIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _command(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "scratch_user.py"
    script.write_text(_SCRATCH_USER)
    return [sys.executable, str(script), "{port}", str(tmp_path / "env.json"), mode]


def test_scratch_holds_the_servers_temp_files_and_goes_at_stop(tmp_path, temp_root):
    """TMPDIR and VLLM_RPC_BASE_PATH point into the server's own scratch directory; stop removes it."""
    server = start_server(ServerArgs(tmp_path), command=_command(tmp_path, "serve"), startup_timeout_s=60,
                          stop_grace_s=2)
    try:
        scratch = server.scratch_dir
        env = json.loads((tmp_path / "env.json").read_text())
        assert env == {"TMPDIR": str(scratch), "VLLM_RPC_BASE_PATH": str(scratch)}, env
        assert scratch.parent == temp_root and server.process.log_path == scratch / "vllm.log"
        made = [p for p in scratch.iterdir() if p.name != "vllm.log"]
        assert len(made) == 2 and any(p.is_socket() for p in made), made
        assert any(p.name.startswith("vllm_dist_") for p in made), made
    finally:
        server.stop()
    assert list(temp_root.iterdir()) == []


def test_log_dir_gets_the_log_and_the_scratch_still_goes(tmp_path, temp_root):
    """With a log folder (the run folder under the suite) the log stays there after stop; the scratch goes."""
    logs = tmp_path / "run"
    with start_server(ServerArgs(tmp_path), command=_command(tmp_path, "serve"), startup_timeout_s=60,
                      stop_grace_s=2, log_dir=logs) as server:
        assert server.process.log_path.parent == logs
    assert [p.suffix for p in logs.iterdir()] == [".log"] and list(temp_root.iterdir()) == []


def test_failed_start_keeps_only_its_log_and_names_it(tmp_path, temp_root):
    """A start that fails: socket and store file removed, the log kept where the error says."""
    with pytest.raises(ServerError) as exc:
        start_server(ServerArgs(tmp_path), command=_command(tmp_path, "crash"), startup_timeout_s=60, stop_grace_s=2)
    first = str(exc.value).splitlines()[0]
    assert "exited with code 3" in first and "Engine core initialization failed" in first, first
    (scratch,) = temp_root.iterdir()
    assert [p.name for p in scratch.iterdir()] == ["vllm.log"] and str(scratch / "vllm.log") in first, first


def test_scratch_goes_at_interpreter_exit_without_stop(tmp_path, temp_root):
    """A process that starts a server and exits without stopping it: the atexit path removes server and scratch."""
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from gemma4_support.serving import ServerArgs, start_server
        server = start_server(ServerArgs(Path({str(tmp_path)!r})), command={_command(tmp_path, "serve")!r},
                              startup_timeout_s=60, stop_grace_s=2)
        print(server.scratch_dir, server.process.pid, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scratch, pid = proc.stdout.split()
    import psutil

    assert Path(scratch).parent == temp_root and not Path(scratch).exists() and not psutil.pid_exists(int(pid))
    assert list(temp_root.iterdir()) == []


def test_next_start_sweeps_a_killed_owners_scratch(tmp_path, temp_root):
    """Scratch of an owner that died without cleanup (SIGKILL): cleared by the next start, its log kept;
    a live owner's scratch is left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = temp_root / f"gemma4-vllm-{dead.pid}-abcdefgh"
    live = temp_root / f"gemma4-vllm-{os.getpid()}-abcdefgh"
    for d in (stale, live):
        d.mkdir()
        (d / "vllm_dist_0").write_text("x")
        (d / "vllm.log").write_text("log")
    with start_server(ServerArgs(tmp_path), command=_command(tmp_path, "serve"), startup_timeout_s=60,
                      stop_grace_s=2):
        pass
    assert sorted(p.name for p in stale.iterdir()) == ["vllm.log"]
    assert sorted(p.name for p in live.iterdir()) == ["vllm.log", "vllm_dist_0"]


def test_temp_dir_too_long_for_ipc_sockets_is_one_line(tmp_path, monkeypatch):
    """A system temp dir whose socket paths would pass 107 bytes: one line naming it and the fix, nothing started."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(ServerError) as exc:
        start_server(ServerArgs(tmp_path), command=_command(tmp_path, "serve"), startup_timeout_s=60)
    text = str(exc.value)
    assert "\n" not in text and "too long for vLLM's IPC socket paths" in text and "TMPDIR" in text, text
    assert list(deep.iterdir()) == [] and not (tmp_path / "env.json").exists()
