"""SIGTERM and SIGINT end a command with one line and a non-zero status, and nothing staged is
moved in (issue 25, class 4). Before: SIGTERM during a fit exited 0 with no message."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_objects import make_object_folder
from nova3d import cli
from nova3d.errors import Nova3DError
from nova3d.signals import Interrupted, interrupts_as_errors
from test_fusion_system import TINY

REPO = Path(__file__).resolve().parent.parent


def test_a_signal_inside_the_block_raises_interrupted_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        with interrupts_as_errors():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
    assert isinstance(info.value, Nova3DError) and info.value.exit_code == 128 + signal.SIGTERM
    assert "SIGTERM" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_exits_128_plus_signal_with_one_line(signum, monkeypatch, capsys):
    def interrupted_run(args):
        os.kill(os.getpid(), signum)
        time.sleep(5)
        return 0

    parser = cli._build_parser()
    parser._subparsers._group_actions[0].choices["config"].set_defaults(run=interrupted_run)
    monkeypatch.setattr(cli, "_build_parser", lambda: parser)
    assert cli.main(["config", "tiny"]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nova3d config: error: interrupted by ")


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 240) -> str:
    seen, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never printed {text!r}: {seen}")


def test_fuse_terminated_mid_fit_keeps_the_earlier_result(tmp_path):
    """SIGTERM inside Lightning's fit (Lightning's own handler runs first and calls ours)."""
    signum = signal.SIGTERM
    folder = make_object_folder(tmp_path, "ellipsoid", views=4, res=24)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".nova3d-result").write_text("{}")  # an earlier result nova3d wrote
    (out / "mesh.glb").write_bytes(b"the earlier mesh")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nova3d.cli", "fuse", "--views", str(folder), "--out", str(out),
                             *TINY, "optim.steps=100000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, "fusion:")  # the budget line: the fit starts right after it
        time.sleep(3)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and lines[-1].startswith("nova3d fuse: error: interrupted by"), err
    # issue 16: a fuse run's console has our bars and lines only, checked in a real process (in
    # pytest's own process its warning capture would hide third-party warnings from stderr)
    noise = [line for line in lines[:-1] if "|" not in line]
    assert not noise, noise
    assert sorted(p.name for p in out.iterdir()) == [".nova3d-result", "mesh.glb"]
    assert (out / "mesh.glb").read_bytes() == b"the earlier mesh"
    assert not list(tmp_path.glob("*.partial"))
