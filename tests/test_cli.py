"""launch.py as a user runs it: help, clear one-line errors, exit code 2 for misuse."""
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_help_lists_the_verbs():
    out = run("--help")
    assert out.returncode == 0
    for verb in ("chat", "teach", "bench"):
        assert verb in out.stdout
    assert "--state-dir" in run("chat", "--help").stdout


@pytest.mark.parametrize("args,needle", [
    (["--quantize", "int3", "chat", "--once", "hi"], "quantize must be one of"),
    (["chat", "--quantize", "int3", "--once", "hi"], "quantize must be one of"),
    (["chat", "--model", "/no/such/model", "--once", "hi"], "no such directory"),
    (["chat", "--once", "   "], "message is empty"),
    (["chat", "--once", ""], "message is empty"),
    (["chat", "--threads", "-1", "--once", "hi"], "threads must be between"),
    (["teach", "/no/such/file.txt"], "No such file"),
    (["bench", "sleepwalk"], "invalid choice"),
])
def test_misuse_gives_one_clear_line_and_exit_2(args, needle, tmp_path):
    out = run(*args, "--state-dir", str(tmp_path)) if args[0] != "bench" else run(*args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_binary_file_is_refused_by_teach(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x00\x01\x02binary")
    out = run("teach", str(f), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "binary" in out.stderr


def test_the_package_ships_every_module_and_the_data():
    """pyproject.toml (`pip install .` → `sleep-lab`): every package with Python files is listed,
    the shipped data is included, and the command is launch.main."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob("*/**/__init__.py")
             if p.parent.relative_to(ROOT).parts[0] in ("sleep_engine", "app")}
    assert found == listed
    assert project["project"]["scripts"]["sleep-lab"] == "launch:main"
    assert project["tool"]["setuptools"]["package-data"]["sleep_engine"] == ["assets/*", "*.cpp"]
    assert (ROOT / "sleep_engine" / "assets" / "passages.jsonl").is_file()
    pins = {line.split("==")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    declared = {d.split("==")[0] for d in project["project"]["dependencies"]}
    assert pins <= declared      # the package needs what make setup installs


def test_chat_once_leaves_at_once_with_its_episode_saved_and_the_state_dir_free(tmp_path, embedded_source):
    """`chat --once` skips Python's teardown (launch.leave): the reply is printed, the turn is in
    the episode log and the state dir's lock is free once the process is gone."""
    from stress_state import make_tiny_model
    from sleep_engine.store import StateDir
    make_tiny_model(tmp_path / "m", embedded_source)
    out = run("chat", "--model", str(tmp_path / "m"), "--quantize", "none", "--threads", "1", "--fast-every", "0",
              "--max-new-tokens", "4", "--state-dir", str(tmp_path / "s"), "--once", "Where is Brenmoor?")
    assert out.returncode == 0, out.stderr[-2000:]
    state = StateDir(tmp_path / "s")   # takes the writer lock: the process released it
    try:
        (turn,) = state.episodes.all()
        assert turn.kind == "turn" and "Where is Brenmoor?" in turn.text
        # the reply reached the pipe (this random model's reply is newlines; the logged turn has them)
        assert out.stdout and out.stdout[:-1] in turn.text
    finally:
        state.close()
