"""Stage tokenization, the vLLM server's lifecycle: vLLM's own start-up error surfaces; nothing survives a stop,
a failed start, or a whole pytest session whose test failed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gemma4_support.errors import ServerError
from gemma4_support.serving import ServerArgs, start_server

pytestmark = [pytest.mark.stage_tokenization, pytest.mark.xdist_group("vllm")]  # one vLLM engine at a time

REPO = Path(__file__).resolve().parents[1]


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
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "fake"}]}).encode() if self.path == "/v1/models" else b""
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


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


_INNER_TEST = textwrap.dedent("""
    def test_uses_server_then_fails(vllm_server):
        resp = vllm_server.client().chat([{"role": "user", "content": "hi"}], max_tokens=2)
        assert resp.choices[0].model_extra["token_ids"]
        vllm_server.process.refresh_process_tree()
        assert False, "deliberate failure inside a test that holds the vLLM server"
""")


@pytest.mark.slow
def test_no_vllm_process_survives_a_failing_session(tmp_path, stage_report):
    """A whole pytest session using the session fixture, whose test fails: afterwards no vLLM process is alive."""
    (tmp_path / "test_inner.py").write_text(_INNER_TEST)
    pidfile = tmp_path / "vllm_pids.json"
    env = {**os.environ, "GEMMA4_VLLM_PIDFILE": str(pidfile), "PYTHONPATH": str(REPO)}
    env.pop("GEMMA4_VLLM_URL", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "validation.conftest_vllm", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "deliberate failure inside a test" in out and "1 failed" in out, out[-3000:]
    doc = json.loads(pidfile.read_text())
    assert doc["phase"] == "stopped" and len(doc["tree"]) >= 2, doc
    survivors = _alive(doc["tree"])
    stage_report.record("vllm_session_teardown", server_tree_pids=doc["tree"], survivors=survivors,
                        inner_session_s=round(time.monotonic() - t0, 1), vllm_log=doc["log"])
    assert survivors == [] and doc["survivors"] == [], f"vLLM processes survived the session: {survivors}"
