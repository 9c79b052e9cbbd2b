"""Every command in the README runs, as written (output folders moved to a temporary place)."""

import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dogbreeds import cli
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
SETUP = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '


def _dogbreeds_commands():
    commands = []
    for block in BLOCKS:
        for line in block.strip().splitlines():
            line = line.removeprefix(SETUP)
            if line.startswith(".venv/bin/dogbreeds "):
                commands.append(line.removeprefix(".venv/bin/dogbreeds "))
    return commands


def test_the_quick_start_has_two_commands_and_ci_runs_the_second():
    first, second = [block.strip() for block in BLOCKS[:2]]
    assert first.startswith(SETUP) and second.startswith(SETUP)
    assert second in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("command", _dogbreeds_commands())
def test_readme_command(command, ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = [arg.replace("runs/", f"{tmp_path}/runs/") for arg in shlex.split(command)]
    assert cli.main(argv) == 0
    for output in re.findall(r"--output (\S+)", command):
        assert (tmp_path / output.removeprefix("runs/")).parent.exists()


@pytest.mark.slow
def test_tensorboard_command_serves_a_run(ray_cluster, tmp_path):
    logdir = re.search(r"`tensorboard --logdir (\S+)`", README).group(1)
    run = logdir.split("/")[1]
    train = next(c for c in _dogbreeds_commands() if f"--output runs/{run}" in c)
    assert cli.main([a.replace("runs/", f"{tmp_path}/runs/") for a in shlex.split(train)] + ["--epochs", "1"]) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / logdir.removeprefix("runs/")),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        runs = ""
        while time.time() < deadline and "train" not in runs:
            try:
                runs = urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5).read().decode()
            except OSError:
                time.sleep(1)
        assert "train" in runs and "validation" in runs
    finally:
        server.terminate()
        server.wait(timeout=30)
