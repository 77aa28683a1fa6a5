"""The command line says what is wrong in one line: `--stages` empty or repeated is a usage error (exit 2);
`--report-dir` on a file, under a file or on a read-only directory is one line from gemma4-validate (exit 2) and from
plain pytest (pytest's usage error, exit 4, no INTERNALERROR); an existing report dir gets a new run folder. The
suite's path options work with a path outside the repository written `--opt PATH` as well as `--opt=PATH`: pytest
decides its rootdir, ini file and first conftests before it knows any plugin option, so it took PATH for a test path
("unrecognized arguments", no pyproject.toml); the suite's early plugin restarts pytest once with the value joined."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from validation.cli import main
from validation.plugin import OPTIONS, join_option_values

REPO = Path(__file__).resolve().parents[1]
_ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text and "INTERNALERROR" not in text, text[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# --stages


@pytest.mark.parametrize("stages", ["", ",", " , ", "discovery,,hf_parity", "discovery,", "discovery,discovery",
                                    "discovery, hf_parity,discovery"])
def test_empty_or_repeated_stages_are_a_usage_error(stages: str, tmp_path: Path, capsys) -> None:
    assert main(["run", "--stages", stages, "--report-dir", str(tmp_path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("gemma4-validate: error: --stages") and "fix:" in line, line
    assert not list(tmp_path.iterdir())  # refused before pytest started


def test_stages_usage_error_from_the_command_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "validation.cli", "run", "--stages", "", "--report-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=_ENV)
    assert out.returncode == 2 and out.stdout == "", out
    assert "empty stage name" in _one_line(out.stderr)


# ---------------------------------------------------------------------------------------------------
# --report-dir


def _unwritable(tmp_path: Path) -> tuple[Path, list[str]]:
    """A read-only directory, and the command prefix under which this process cannot write it (as root: without
    the capability that overrides file permissions)."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() != 0:
        return ro, []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only directory is writable here")
    return ro, ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_report_dir_problems_are_one_line(case: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    prefix: list[str] = []
    if case == "file":
        target, says = a_file, "is a file"
    elif case == "under_file":
        target, says = a_file / "reports", f"lies under {a_file}, which is a file"
    else:
        target, prefix = _unwritable(tmp_path)
        says = "cannot be written: Permission denied"
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    cli = subprocess.run([*prefix, sys.executable, "-m", "validation.cli", "run", "--stages", "discovery",
                          "--report-dir", str(target)], capture_output=True, text=True, timeout=120, env=_ENV)
    line = _one_line(cli.stderr)
    assert cli.returncode == 2 and says in line and "fix: pass --report-dir" in line, (cli.returncode, line)
    plain = subprocess.run([*prefix, sys.executable, "-m", "pytest", "-p", "validation.plugin", "-p", "no:cacheprovider",
                            "--report-dir", str(target), "test_one.py"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env=_ENV)
    line = _one_line(plain.stdout + plain.stderr)
    assert plain.returncode == pytest.ExitCode.USAGE_ERROR and line.startswith("ERROR: --report-dir:"), line
    assert says in line, line
    assert a_file.read_text() == "not a folder" and not [p for p in tmp_path.rglob("run-*")]  # nothing was made


# ---------------------------------------------------------------------------------------------------
# path options outside the repository, `--opt PATH` and `--opt=PATH`


def test_path_options_outside_the_repository(tmp_path: Path) -> None:
    """From the repository root, with no test path: every suite path option written `--opt PATH` outside the
    repository reaches the suite, pytest keeps its rootdir and pyproject.toml, and an existing report dir (here with
    an earlier run in it) gets a new run folder."""
    from fixtures.factory import fixture_dir

    model = Path(shutil.copytree(fixture_dir("dense"), tmp_path / "checkpoint"))
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    reports = tmp_path / "reports"
    (reports / "run-earlier").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                          "-m", "stage_discovery",
                          "--gemma4-model", str(model), "--report-dir", str(reports), "--gemma4-chat-template",
                          str(template), "--ignore-glob=validation/test_*.py"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=_ENV)
    text = out.stdout + out.stderr
    assert out.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, text[-3000:]
    assert f"rootdir: {REPO}" in text and "configfile: pyproject.toml" in text, text[-3000:]
    (run,) = [p for p in reports.iterdir() if p.is_dir() and p.name != "run-earlier"]
    options = json.loads((run / "summary.json").read_text())["options"]
    assert options["gemma4-model"] == str(model) and options["report-dir"] == str(reports), options
    assert options["gemma4-chat-template"] == str(template), options


def test_joined_value_when_pytest_cannot_restart(tmp_path: Path) -> None:
    """pytest.main() on arguments of its own cannot be restarted: one usage-error line says to join with '='."""
    code = "import sys, pytest; sys.exit(pytest.main(['--gemma4-model', sys.argv[1]]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=_ENV)
    line = _one_line(out.stdout + out.stderr)
    assert out.returncode == pytest.ExitCode.USAGE_ERROR and f"--gemma4-model={tmp_path}" in line, line


_VALUE_FLAGS = sorted(flag for flag, kw in OPTIONS if kw.get("action") != "store_true")
_PATHS = st.sampled_from(["/tmp/a", "/x/ckpt", "../up", "model dir", "reports"])
_ITEMS = st.one_of(
    st.tuples(st.just("split"), st.sampled_from(_VALUE_FLAGS), _PATHS),  # --opt PATH, PATH taken as a test path
    st.tuples(st.just("kept"), st.sampled_from(_VALUE_FLAGS), st.sampled_from(["7", "http://127.0.0.1:8000"])),
    st.tuples(st.just("joined"), st.sampled_from(_VALUE_FLAGS), _PATHS),  # already --opt=PATH
    st.tuples(st.just("flag"), st.sampled_from(["--gemma4-full-depth", "-q", "-x"]), st.none()),
    st.tuples(st.just("path"), st.none(), _PATHS),  # a real test path
)


@given(st.lists(_ITEMS, max_size=8))
def test_join_option_values_joins_exactly_the_split_ones(items: list[tuple]) -> None:
    args, expected, taken = [], [], []
    for kind, flag, value in items:
        if kind in ("split", "kept"):
            args += [flag, value]
            expected += [f"{flag}={value}"] if kind == "split" else [flag, value]
            taken += [value] if kind == "split" else []
        elif kind == "joined":
            args.append(f"{flag}={value}")
        elif kind == "flag":
            args.append(flag)
        else:
            args.append(value)
            taken.append(value)
        if kind in ("joined", "flag", "path"):
            expected.append(args[-1])
    assert join_option_values(args, taken) == expected
    assert join_option_values(expected, taken) == expected  # idempotent
    after = ["--", "--gemma4-model", "/tmp/a"]  # past "--" nothing is an option
    assert join_option_values([*args, *after], taken)[-3:] == after
