"""bench/bad_inputs.py itself (issues 16 and 25, "shown, not claimed"): its catalogue holds every
class of both issues, and its checks fail a command that dies silently, prints a traceback or
exits 0 on a bad input."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bad_inputs  # noqa: E402

CLASSES = {"data loss", "silent corruption", "traceback", "rerun", "argument",  # issue 16
           "weights", "numbers", "signals", "unwritable output", "message", "valid"}  # issue 25


def test_the_catalogue_holds_every_class_of_both_issues(tmp_path):
    fx = {name: tmp_path / name for name in ("gt_root", "views", "fused", "pred", "eval", "shards", "model")}
    cases = bad_inputs.catalogue(fx)  # the lambdas are not run: nothing is built
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    assert {c.kind for c in cases} == CLASSES
    assert all(c.expect or c.kill_after for c in cases)  # every case names what the output must say


def _case(code: str, **kw) -> bad_inputs.Case:
    return bad_inputs.Case("t", "argument", lambda w: [sys.executable, "-c", code], kw.pop("expect", "boom"), **kw)


ONE_LINE = "import sys; print('prog: error: boom', file=sys.stderr); sys.exit(2)"
WAIT = "import time; print('ready', flush=True); time.sleep(30)"
ONE_LINE_ON_TERM = ("import signal, sys, time\n"
                    "def bye(n, f): print('prog: error: interrupted by SIGTERM, boom', file=sys.stderr); sys.exit(143)\n"
                    "signal.signal(signal.SIGTERM, bye); print('ready', flush=True); time.sleep(30)")


@pytest.mark.parametrize("case, ok", [
    (_case(ONE_LINE), True),
    (_case("raise SystemExit('boom')"), False),  # not `<prog>: error:`
    (_case("raise ValueError('boom')"), False),  # a traceback
    (_case("print('boom')"), False),  # exit 0 on a bad input
    (_case("print('wrote it')", expect="wrote", valid=True), True),
    (_case("import sys; print('wrote it'); sys.exit(1)", expect="wrote", valid=True), False),
    (_case(WAIT, signal_on=(signal.SIGTERM, "ready")), False),  # died of the signal: no line, exit -15
    (_case(ONE_LINE_ON_TERM, signal_on=(signal.SIGTERM, "ready")), True),
])
def test_the_checks_fail_what_they_should(case, ok, tmp_path):
    assert bad_inputs.run_case(case, tmp_path)["ok"] is ok
