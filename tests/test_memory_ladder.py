"""bench/memory_ladder.py and its parts (live_tensors, step_memory, memory_validation): the live-tensor
tracker counts what a real step allocates, fake tensors predict what real ones measure, and `--toy`
prints the JSON contract (issue 14)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import memory_validation, step_memory
from bench.live_tensors import LiveTensorTracker

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run faster on one thread


def test_tracker_counts_live_storages_once_and_frees_them():
    tracker = LiveTensorTracker()
    with tracker:
        a = torch.ones(MIB // 4)  # 1 MiB of float32
        view = a[:10]  # a view: no new storage
        b = a + 1  # 1 MiB more: peak 2 MiB
        del b
        c = torch.zeros(MIB // 8)  # 0.5 MiB
    assert view.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert tracker.peak == 2 * MIB and tracker.current == MIB + MIB // 2
    del a, view, c
    assert tracker.current == 0


def test_fake_tensors_predict_the_real_step_exactly():
    """Same shapes, same frees: the FakeTensorMode prediction equals the tracker on real tensors."""
    fake = step_memory.step_memory("tiny", "gta", "none", 16, 4, precision="32")
    real = step_memory.step_memory("tiny", "gta", "none", 16, 4, fake=False, precision="32")
    assert fake["peak_bytes"] == real["peak_bytes"] and fake["resident_bytes"] == real["resident_bytes"]
    # Steady state: weights + AdamW's two states are resident before the step.
    steps = 4 * sum(1 for _ in step_memory.build_unet("tiny", "gta", "none").parameters())  # AdamW's float32 step counters
    assert real["optimizer_bytes"] == 2 * real["weights_bytes"] + steps
    assert real["resident_bytes"] >= 3 * real["weights_bytes"]


def test_checkpointing_and_vanilla_rows_are_lower():
    none = step_memory.step_memory("tiny", "gta", "none", 16, 8)
    diffusers = step_memory.step_memory("tiny", "gta", "diffusers", 16, 8)
    full = step_memory.step_memory("tiny", "gta", "full", 16, 8)
    vanilla = step_memory.step_memory("tiny", "vanilla", "none", 16, 8)
    assert full["peak_forward_bytes"] < diffusers["peak_forward_bytes"] < none["peak_forward_bytes"]
    assert vanilla["peak_bytes"] < none["peak_bytes"]


def test_prediction_matches_a_real_cpu_measurement():
    """The independent check: the peak-RSS growth of a real float32 CPU step in a fresh process
    (tiny UNet at 32² latents x 8 frames, ~0.8 GiB: small beside any CI machine's memory) against the
    fake-tensor prediction."""
    row = memory_validation.validation_row("tiny", "gta", "none", 32, 8)
    assert row["tracked_real_peak_gib"] == row["predicted_peak_gib"]
    assert 0.9 <= row["measured_over_predicted"] <= 1.25, row


@pytest.mark.slow
def test_toy_run_prints_the_json_contract(tmp_path):
    out = tmp_path / "ladder.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory_ladder.py"), "--toy", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text()) and result["status"] == "ok"
    configs = result["configs"]
    assert configs and all({"resolution", "views", "checkpointing", "predicted_peak_gib"} <= c.keys() for c in configs)
    measured = [c for c in configs if "measured_peak_gib" in c]
    assert measured and all(c["measured_peak_gib"] > 0 for c in measured)


def test_bad_option_is_one_error_line():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory_ladder.py"), "--threads", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--threads must be >= 1" in proc.stderr.strip().splitlines()[-1]
