"""Training a long recipe in pieces (issue 24): a new run starts from an exported pipeline's UNet
(`model.init_from`), a run that resumes ignores it, the learning rate can decay (cosine) and the
diffusion target can be the VAE posterior's mode. Tiny random models, fast tier."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data_prep.write_shards import write_shards
from nova3d.config import load_experiment
from nova3d.errors import Nova3DError
from nova3d.export import export_checkpoint
from nova3d.run_dir import run_dir_for
from nova3d.systems.mv_diffusion import LinearWarmup, MultiViewDiffusion
from nova3d.train import run_training
from tests.helpers_objects import make_object_folder
from tests.test_train import fast_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    renders = tmp_path_factory.mktemp("renders")
    for i in range(2):
        make_object_folder(renders, f"obj{i}", views=16, res=32, seed=i)
    out = tmp_path_factory.mktemp("shards")
    write_shards(renders, out, progress=False)
    return out


@pytest.fixture(scope="module")
def exported(shards, tmp_path_factory) -> Path:
    """A tiny run of 2 steps exported as a pipeline folder (EMA weights)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_experiment("tiny", fast_overrides(shards, root) + ["system.ema_decay=0.9", "system.val_num_objects=0"])
    run_training(cfg, ["first piece"])
    out = tmp_path_factory.mktemp("export") / "pipe"
    export_checkpoint(run_dir_for(cfg).path, out)
    return out


def _unet_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "gta_unet.safetensors"))


class FirstStepWeights(Callback):
    """Records the UNet's weights when training starts (before any optimizer step)."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}
        self.ema_updates = None

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()}
        self.ema_updates = pl_module.ema.num_updates if pl_module.ema is not None else None


def test_new_run_starts_from_the_exported_unet_and_a_resume_ignores_it(shards, exported, tmp_path, capfd):
    overrides = fast_overrides(shards, tmp_path) + [f"model.init_from={exported}", "system.val_num_objects=0",
                                                    "system.ema_decay=0.9", "trainer.max_steps=1",
                                                    f"model.conditioner={exported}"]  # loaded as toy's is
    probe = FirstStepWeights()
    run_training(load_experiment("tiny", overrides), ["second piece"], [probe])
    console = "".join(capfd.readouterr())  # a quiet console: nova3d's lines, no loaders' bars or hints
    assert f"UNet initialised from {exported}" in console and "M trainable parameters" in console
    assert not [n for n in ("Loading weights", "accelerate", "Trainable params", "Total FLOPs") if n in console]
    stored = _unet_state(exported)
    assert stored.keys() == probe.state.keys()
    for key, value in stored.items():
        assert torch.equal(probe.state[key], value.to(probe.state[key].dtype)), key
    assert probe.ema_updates == 0  # EMA starts afresh, from the loaded weights

    # The same run launched again resumes its checkpoint (step 1): init_from must not reset it.
    run = run_dir_for(load_experiment("tiny", overrides))
    after_first = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    probe = FirstStepWeights()
    run_training(load_experiment("tiny", overrides[:-1] + ["trainer.max_steps=2"]), ["resumed"], [probe])
    changed = [k for k, v in stored.items() if not torch.equal(after_first[f"unet.{k}"], v)]
    assert changed, "one optimizer step changed no weight"
    for key in changed:
        assert torch.equal(probe.state[key], after_first[f"unet.{key}"]), key


@pytest.mark.parametrize("case", ["missing", "other_gta"])
def test_init_from_that_does_not_fit_is_one_error_naming_the_file(case, shards, exported, tmp_path):
    folder, extra = (tmp_path / "nothing", []) if case == "missing" else (exported, ["model.gta_temporal=false"])
    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + [f"model.init_from={folder}", *extra])
    with pytest.raises(Nova3DError, match=r"model\.init_from: .*gta_unet\.safetensors"):
        MultiViewDiffusion(cfg).init_unet_from(folder)


def test_cosine_schedule_values():
    s = LinearWarmup(steps=10, decay_steps=110, final_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert LinearWarmup(steps=10)(10_000) == 1.0  # constant after warm-up


def test_cosine_schedule_reaches_the_final_ratio_at_max_steps(shards, tmp_path):
    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + [
        "system.lr_schedule=cosine", "system.lr_final_ratio=0.2", "system.warmup_steps=2", "trainer.max_steps=20"])
    opt = MultiViewDiffusion(cfg).configure_optimizers()["lr_scheduler"]["scheduler"]
    for _ in range(20):
        opt.optimizer.step()
        opt.step()
    assert [g["lr"] / g["initial_lr"] for g in opt.optimizer.param_groups] == pytest.approx([0.2, 0.2])


@pytest.mark.parametrize("target", ["sample", "mode"])
def test_training_regresses_the_configured_posterior_target(target, shards, tmp_path, monkeypatch):
    """mode: the posterior mean, the same for any draw; sample: a fresh posterior draw each step."""
    from nova3d.data.datamodule import MultiViewDataModule

    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + [f"system.diffusion_target={target}"])
    system = MultiViewDiffusion(cfg)
    dm = MultiViewDataModule(cfg.data)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    seen = []
    original = system.target_latents
    monkeypatch.setattr(system, "target_latents", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    for seed in (1, 2):
        system.compute_losses(batch, torch.Generator().manual_seed(seed))
    mode = system.target_latents(batch, sample_posterior=False)
    assert torch.equal(seen[0], seen[1]) == (target == "mode")
    assert torch.equal(seen[0], mode) == (target == "mode")


@pytest.mark.parametrize("override", ["system.diffusion_target=median", "system.lr_schedule=linear",
                                      "system.lr_final_ratio=2"])
def test_bad_recipe_values_are_refused(override, shards, tmp_path):
    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + [override])
    with pytest.raises(Nova3DError, match=override.split("=")[0].replace(".", r"\.")):
        MultiViewDiffusion(cfg)


def test_wall_clock_cap_stops_the_run_with_a_checkpoint_to_resume(shards, tmp_path):
    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + [
        "trainer.max_time=00:00:00:01", "trainer.max_steps=10000", "trainer.checkpoint_every_n_steps=10000",
        "trainer.val_check_interval=10000", "system.val_num_objects=0"])
    trainer = run_training(cfg, ["capped"])
    step = trainer.global_step
    assert 1 <= step < 10000
    saved = torch.load(run_dir_for(cfg).last_checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == step
    # The cap is per launch: the next piece resumes and trains on (Lightning's own Timer would count the
    # first piece's time and stop at once).
    assert run_training(cfg, ["capped"]).global_step > step
