"""SIGTERM and SIGINT end the data tools (render_views, write_shards, toy_data) and the demo as
they end every nova3d command (nova3d.signals, issue 25 class 4): one error line and 128 + the
signal, not a KeyboardInterrupt traceback or a silent death."""
from __future__ import annotations

import os
import signal
import time

import pytest

from data_prep import render_views, toy_data, write_shards
from nova3d import demo, demo_chain


def _killed_by(signum):
    def work(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs at the next bytecode
        raise AssertionError("the signal did not interrupt the work")
    return work


TOOLS = {  # tool module, the function its main does the work in, arguments, the prefix of its error line
    "render_views": (render_views, "render_objects", ["--procedural", "--out", "{out}"]),
    "write_shards": (write_shards, "write_shards", ["{src}", "--out", "{out}"]),
    "toy_data": (toy_data, "make_toy_data", ["--out", "{out}", "--count", "3"]),
    "nova3d demo": (demo_chain, "run_chain", ["--out", "{out}", "--quick"]),  # make demo's last step
}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_signal_ends_a_data_tool_with_one_line(tool, signum, tmp_path, monkeypatch, capsys):
    module, work, argv = TOOLS[tool]
    monkeypatch.setattr(module, work, _killed_by(signum))
    (tmp_path / "src").mkdir()
    argv = [a.format(out=tmp_path / "out", src=tmp_path / "src") for a in argv]
    before = signal.getsignal(signum)
    main = demo.main if tool == "nova3d demo" else module.main
    assert main(argv) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: interrupted by {signal.Signals(signum).name}"), err
    assert signal.getsignal(signum) == before  # the tool gave the handlers back
