"""A catalogue of bad inputs run against nova3d's commands, as a new user would run them.

    python bench/bad_inputs.py [--quick] [--keep DIR]      (make bad-inputs)

Each case makes one bad input (or one failure: a diverging fit, a kill) in a scratch folder, runs
one command in a subprocess, and checks four things:
  exit      the exit status is non-zero
  one_line  the error is one line (the last stderr line starts with `<prog>: error:`, no traceback)
            and names the problem (a word the case expects), unless the case is a kill or a report
  intact    every file that existed before (earlier results, the input) is byte-identical after,
            and no `*.partial` / `*.tmp` is left behind
  named     the output names the problem (the case's expected word)
A case is OK when every check holds. The fixtures (a Blender render of a toy object, a good fused
result, a good evaluation, shards, a copy of pretrained/toy) are built once, in process.
Last line: one JSON object {"tried", "ok", "failed": [case names], "cases": {name: checks}}.
--quick runs the fast half of the catalogue (no fit is started).
Kinds: the classes of issue 16 (data loss, silent corruption, traceback, rerun, argument) and of
issue 25 (weights, numbers, signals, unwritable output, message); `valid` cases are borderline
inputs that must work (exit 0).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_input_cases import REPO, Case, build_fixtures, catalogue  # noqa: E402,F401  (Case: the tests build their own)

# ---------------------------------------------------------------- running and checking

def tree_digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in ([root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(w: Path) -> list[str]:
    return [str(p) for p in w.rglob("*") if p.name.endswith((".partial", ".tmp", ".old"))]


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 600) -> str:
    """stdout up to the first line holding `text` (all of it, if the command ends first)."""
    seen, end = "", time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        seen += line
        if text in line or (not line and proc.poll() is not None):
            break
    return seen


def run_case(case: Case, w: Path) -> dict:
    argv = case.make(w)
    protected = case.protect(w)
    before = tree_digest(protected)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        if case.signal_on:  # to the command only, as a terminal's Ctrl-C or a scheduler's SIGTERM would
            out = wait_for_line(proc, case.signal_on[1])
            time.sleep(3)
            proc.send_signal(case.signal_on[0])
            more, err = proc.communicate(timeout=120)
            out += more
        else:
            out, err = proc.communicate(timeout=case.kill_after or 600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        more, err = proc.communicate()
        out = (out if case.signal_on else "") + more
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    text = (out + err).lower()
    if case.valid:
        exit_ok = proc.returncode == 0
    elif case.signal_on:
        exit_ok = proc.returncode == 128 + case.signal_on[0]
    else:
        exit_ok = proc.returncode != 0
    checks = {
        "exit": exit_ok,
        "one_line": (not case.one_line or case.valid) or (": error: " in last and "Traceback" not in err),
        # a killed run may leave its FOLDER.partial (the next run removes it); nothing else
        "intact": tree_digest(protected) == before and (case.kill_after is not None or not leftovers(w)),
        "named": case.expect.lower() in text,
    }
    return {"kind": case.kind, "ok": all(checks.values()), "checks": checks, "exit": proc.returncode,
            "last_line": last[:300], "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the fast half of the catalogue (no fit is started)")
    p.add_argument("--keep", help="build fixtures and scratch folders here (kept, and reused by a rerun) "
                   "instead of a temporary folder")
    p.add_argument("--only", nargs="*", help="case names to run")
    args = p.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nova3d_bad_inputs_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print("building fixtures (Blender render, a quick fuse, an evaluation, shards) ...", flush=True)
        fx = build_fixtures(root / "fixtures")
        cases = [c for c in catalogue(fx) if (not args.quick or c.quick) and (not args.only or c.name in args.only)]
        results = {}
        for n, case in enumerate(cases, 1):
            w = root / "cases" / case.name
            shutil.rmtree(w, ignore_errors=True)
            w.mkdir(parents=True)
            results[case.name] = r = run_case(case, w)
            bad = [k for k, ok in r["checks"].items() if not ok]
            print(f"[{n:2d}/{len(cases)}] {'ok  ' if r['ok'] else 'FAIL'} {case.name} ({r['seconds']}s)"
                  + (f": {', '.join(bad)} — {r['last_line']}" if bad else ""), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    failed = [name for name, r in results.items() if not r["ok"]]
    print(json.dumps({"tried": len(results), "ok": len(results) - len(failed), "failed": failed, "cases": results}))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
