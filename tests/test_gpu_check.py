"""bench/gpu_check.sh (issue 14): the GPU check's dry run runs every part at toy size on CPU."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
PARTS = {"pytest_gpu", "render_eval", "gta_step", "train_steps", "fusion", "blender"}


def _run(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def test_bad_option_is_one_error_line():
    proc = _run("--frobnicate")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gpu_check.sh: error: unknown option --frobnicate "
                                                "(use --cpu-dry-run or --out FILE)"]


def test_without_cuda_the_gpu_mode_refuses_in_one_line():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "--cpu-dry-run" in proc.stderr


@pytest.mark.slow
def test_cpu_dry_run_runs_every_part_and_ends_with_one_json_line(tmp_path):
    out = tmp_path / "check.json"
    proc = _run("--cpu-dry-run", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())  # the file holds what was printed
    assert result["mode"] == "cpu-dry-run" and result["ok"] is True
    assert set(result["parts"]) == PARTS
    for name, part in result["parts"].items():
        assert part["status"] == "ok" and part["seconds"] > 0, name
    figures = {name: part.get("figures", {}) for name, part in result["parts"].items()}
    assert figures["render_eval"]["mask_iou"] > 0.99
    assert figures["train_steps"]["loss_finite"] is True and len(figures["train_steps"]["losses"]) == 3
    assert figures["gta_step"]["status"] == "ok"
    # the GPU path (bf16 autocast, checkpointing) ran on CPU with the tiny UNet: both models timed
    assert figures["gta_step"]["config"] == "tiny" and figures["gta_step"]["time_ratio"] > 0
