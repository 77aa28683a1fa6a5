"""Stage tokenization, the vLLM server's lifecycle: vLLM's own start-up error surfaces; nothing survives a stop,
a failed start, or a whole pytest session whose test failed, and nothing is left in the temp dirs; attaching to
a URL nothing listens on fails in seconds while a server still loading gets its time."""
from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from gemma4_support.errors import ServerError
from gemma4_support.ports import free_port
from gemma4_support.serving import ServerArgs, attach_server, start_server

pytestmark = pytest.mark.stage_tokenization
_ONE_ENGINE = pytest.mark.xdist_group("vllm")  # one vLLM engine at a time (the attach tests start none)

REPO = Path(__file__).resolve().parents[1]


# The end of every fake server script: answer /health and /v1/models (as "fake") on `port` until stopped.
FAKE_SERVE = """
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "fake"}]}).encode() if self.path == "/v1/models" else b""
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""

_FAKE_SERVER = textwrap.dedent("""
    import http.server, json, os, signal, subprocess, sys, time
    port, pidfile, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    print("fake vllm: loading weights", flush=True)
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
    kids = [subprocess.Popen(stubborn), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                                         start_new_session=True)]
    with open(pidfile, "w") as f:
        json.dump([os.getpid()] + [k.pid for k in kids], f)
    if mode == "hang":
        time.sleep(600)
    """ + FAKE_SERVE)


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@_ONE_ENGINE
def test_server_stop_reaps_whole_tree_even_when_the_test_body_fails(tmp_path):
    """Process handling on a fake server tree (a SIGTERM-ignoring child, a child in its own session)."""
    script = tmp_path / "fake_server.py"
    script.write_text(_FAKE_SERVER)
    pidfile = tmp_path / "pids.json"
    with pytest.raises(RuntimeError, match="test body failed"):
        with start_server(ServerArgs(tmp_path), command=[sys.executable, str(script), "{port}", str(pidfile), "serve"],
                          startup_timeout_s=60, stop_grace_s=2, log_dir=tmp_path) as server:
            assert server.model == "fake" and server.is_running()
            assert len(_alive(json.loads(pidfile.read_text()))) == 3
            raise RuntimeError("test body failed")
    assert _alive(json.loads(pidfile.read_text())) == [] and server.process.surviving_processes() == []

    with pytest.raises(ServerError) as exc:
        start_server(ServerArgs(tmp_path), command=[sys.executable, str(script), "{port}", str(pidfile), "hang"],
                     startup_timeout_s=3, stop_grace_s=2, log_dir=tmp_path)
    assert "not healthy after 3 s" in str(exc.value) and "fake vllm: loading weights" in str(exc.value)
    assert _alive(json.loads(pidfile.read_text())) == []


@_ONE_ENGINE
@pytest.mark.slow
def test_server_startup_error_is_vllms_own(tmp_path):
    """A model vLLM cannot load fails fast with the root cause from vLLM's worker log, leaving no process behind."""
    import shutil

    from fixtures.factory import fixture_dir

    broken = tmp_path / "broken"
    shutil.copytree(fixture_dir("dense"), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["head_dim"] = 32  # weights are saved for head_dim 64
    (broken / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    with pytest.raises(ServerError) as exc:
        start_server(ServerArgs(broken, enforce_eager=True), log_dir=tmp_path, startup_timeout_s=300)
    first_line = str(exc.value).splitlines()[0]
    assert "exited with code" in first_line and "Attempted to load weight" in first_line, first_line
    assert time.monotonic() - t0 < 200


class _Loading(http.server.BaseHTTPRequestHandler):
    """A server still loading: /health answers 503 until ``server.ready_at``, then 200; /v1/models lists a model."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"data": [{"id": "loading-model"}]}).encode() if self.path == "/v1/models" else b""
        ready = time.monotonic() >= self.server.ready_at  # type: ignore[attr-defined]
        self.send_response(503 if self.path == "/health" and not ready else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_attach_to_a_refused_port_fails_fast_in_one_line():
    """Nothing listens on the port: a few retries over ~3 s, then one line naming the URL and the fix."""
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ServerError) as exc:
        attach_server(url + "/v1", timeout_s=60)
    waited, text = time.monotonic() - t0, str(exc.value)
    assert 2.5 <= waited < 10, waited
    assert "\n" not in text and f"nothing is listening at {url} " in text and "fix: start the vLLM server" in text


def test_attach_waits_for_a_server_that_is_still_loading():
    """A server whose port is bound but not yet listening (as vLLM while it loads the model) for 4 s, then
    answering /health 503 until 8 s: attached once healthy, the refused-port limit never applied."""
    port = free_port()
    httpd = http.server.HTTPServer(("127.0.0.1", port), _Loading, bind_and_activate=False)
    httpd.server_bind()
    t0 = time.monotonic()
    httpd.ready_at = t0 + 8.0  # type: ignore[attr-defined]

    def listen_later() -> None:
        time.sleep(4.0)
        httpd.server_activate()
        httpd.serve_forever(poll_interval=0.1)

    thread = threading.Thread(target=listen_later, daemon=True)
    thread.start()
    try:
        server = attach_server(f"http://127.0.0.1:{port}", timeout_s=60)
        waited = time.monotonic() - t0
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
    assert server.model == "loading-model" and not server.owned and 8.0 <= waited < 30, (server, waited)


_NEEDS_SERVER = """
def test_needs_server(vllm_server):
    pass
"""


def test_vllm_url_nothing_listens_on_is_one_line_in_a_session(tmp_path):
    """`pytest --vllm-url` to a refused port: the test needing the server errors within seconds, one line, no
    traceback."""
    (tmp_path / "test_inner.py").write_text(_NEEDS_SERVER)
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GEMMA4_VLLM_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "validation.conftest_vllm", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, "--vllm-url", url, str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if f"nothing is listening at {url}" in ln]
    assert proc.returncode == 1 and "1 error" in out and lines, out[-3000:]
    assert "Traceback" not in out and "During handling" not in out, out[-3000:]
    assert "fix: start the vLLM server" in lines[0] and time.monotonic() - t0 < 60, out[-3000:]


_INNER_TEST = textwrap.dedent("""
    def test_uses_server_then_fails(vllm_server):
        resp = vllm_server.client().chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert resp.choices[0].model_extra["token_ids"]
        vllm_server.process.refresh_process_tree()
        assert False, "deliberate failure inside a test that holds the vLLM server"
""")


# What vLLM leaves in a temp dir when it bypasses its scratch directory: ZMQ IPC sockets (uuid names), vllm_* files.
_VLLM_LIKE = re.compile(r"^vllm|^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _entries(root: Path) -> dict[str, bool]:
    """The entries directly under ``root``: name -> whether it is a unix socket."""
    out = {}
    with os.scandir(root) as it:
        for entry in it:
            try:
                out[entry.name] = stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
            except FileNotFoundError:
                continue
    return out


@pytest.mark.expected_seconds(56)
@_ONE_ENGINE
@pytest.mark.slow
def test_no_vllm_process_survives_a_failing_session(tmp_path, stage_report):
    """A whole pytest session (the suite's plugin and server fixture, the real engine) whose test fails: afterwards
    no vLLM process is alive, nothing new is left in the session's temp dir nor in /tmp, vLLM's log is in the run
    folder."""
    (tmp_path / "test_inner.py").write_text(_INNER_TEST)
    pidfile = tmp_path / "vllm_pids.json"
    session_tmp = Path(tempfile.mkdtemp(prefix="g4s-"))  # the inner session's system temp dir, short for sockets
    roots = {Path("/tmp"), Path(tempfile.gettempdir())}
    before = {root: _entries(root) for root in roots}
    env = {**os.environ, "GEMMA4_VLLM_PIDFILE": str(pidfile), "PYTHONPATH": str(REPO), "TMPDIR": str(session_tmp)}
    env.pop("GEMMA4_VLLM_URL", None)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "validation.plugin", "-p", "validation.conftest_vllm",
             "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", os.devnull,
             "--report-dir", str(tmp_path / "reports"), str(tmp_path / "test_inner.py")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )
        left_in_session_tmp = sorted(_entries(session_tmp))
    finally:
        shutil.rmtree(session_tmp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "deliberate failure inside a test" in out and "1 failed" in out, out[-3000:]
    doc = json.loads(pidfile.read_text())
    assert doc["phase"] == "stopped" and len(doc["tree"]) >= 2, doc
    survivors = _alive(doc["tree"])
    new_in_tmp = {str(root / name): sock for root in roots for name, sock in _entries(root).items()
                  if name not in before[root] and root / name != session_tmp}
    left_in_tmp = sorted(path for path, sock in new_in_tmp.items() if sock or _VLLM_LIKE.search(Path(path).name))
    stage_report.record("vllm_session_teardown", server_tree_pids=doc["tree"], survivors=survivors,
                        inner_session_s=round(time.monotonic() - t0, 1), vllm_log=doc["log"],
                        ipc_sockets=len(doc["unix_sockets"]), left_in_session_tmp=left_in_session_tmp,
                        left_in_tmp=left_in_tmp, other_new_in_tmp=sorted(set(new_in_tmp) - set(left_in_tmp)))
    assert survivors == [] and doc["survivors"] == [], f"vLLM processes survived the session: {survivors}"
    scratch = Path(doc["scratch"])
    assert scratch.parent == session_tmp and doc["unix_sockets"], doc  # vLLM's IPC sockets were bound ...
    assert all(Path(s).parent == scratch for s in doc["unix_sockets"]), doc["unix_sockets"]  # ... in its scratch
    assert left_in_session_tmp == [] and left_in_tmp == [], (left_in_session_tmp, left_in_tmp)
    log = Path(doc["log"])
    assert log.is_file() and log.parent.parent == tmp_path / "reports" and "api_server" in log.read_text(), log
