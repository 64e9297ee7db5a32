"""Training: the system overfits one object, the entry point writes a complete run directory,
a second launch resumes it, parameter groups, and every experiment file trains for 2 steps.

Tiny random UNet/VAE/CLIP on CPU; shards of 2 synthetic objects with 16 views at 32² (so the
6-view ablation works), built once per module.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from lightning.pytorch.callbacks import Callback

from data_prep.write_shards import write_shards
from nova3d.config import ModelConfig, TrainerConfig, list_experiments, load_experiment
from nova3d.data.datamodule import MultiViewDataModule
from nova3d.errors import Nova3DError
from nova3d.models.conditioning import build_tiny_components, tiny_clip_vision_config, tiny_vae_config
from nova3d.models.ema import ParameterEMA
from nova3d.models.factory import ARCHITECTURES, build_components, gta_config, svd_xt_clip_config, svd_xt_vae_config
from nova3d.models.gta import GTAConfig, is_new_parameter
from nova3d.models.svd_configs import tiny_unet_config
from nova3d.run_dir import resume_checkpoint, run_dir_for
from nova3d.systems.mv_diffusion import CONDITIONER_PREFIX, MultiViewDiffusion
from nova3d.train import main, resolve_precision, run_training
from tests.helpers_objects import make_object_folder

VIEWS, RES, NUM_OBJECTS = 16, 32, 2
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    renders = tmp_path_factory.mktemp("renders")
    for i in range(NUM_OBJECTS):
        make_object_folder(renders, f"obj{i}", views=VIEWS, res=RES, seed=i)
    out = tmp_path_factory.mktemp("shards")
    write_shards(renders, out, progress=False)
    return out


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """Runs here are local, even when pytest itself runs inside a SLURM job."""
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)


def tiny_overrides(shards: Path, root: Path, resolution: int = 32) -> list[str]:
    """Shrinks any experiment to the tiny random model, these shards and a CPU run of 2 steps."""
    return [
        "model.pretrained=null", "model.conditioner=null", "model.architecture=tiny", f"data.resolution={resolution}",
        f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=1",
        "data.samples_per_epoch=4", "data.shuffle_buffer=2", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.num_nodes=1", "trainer.strategy=auto", "trainer.precision=32-true", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "system.val_num_objects=1",
        "system.val_sampling_steps=2", f"logging.root={root}",
    ]


def fast_overrides(shards: Path, root: Path) -> list[str]:
    """The tiny experiment at 16² with 4 views: the fast tier's size."""
    return tiny_overrides(shards, root, resolution=16) + ["data.num_views=4"]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _event_tags(tensorboard_dir: Path) -> dict[str, list[str]]:
    """{"scalars": [...], "images": [...]} logged under a TensorBoard directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events.Tags()


def test_overfits_one_object(shards, tmp_path):
    """Same object, σ, noise and posterior sample every step: the loss must fall a lot."""
    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + [
        "system.cond_dropout=0", "system.warmup_steps=0", "system.lr=2e-3", "system.lr_new=2e-3"])
    system = MultiViewDiffusion(cfg).train()
    datamodule = MultiViewDataModule(cfg.data)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))  # deterministic: input view 0, white background
    optimizer = system.configure_optimizers()["optimizer"]
    losses, start = [], time.perf_counter()
    for _ in range(30):
        total = system.compute_losses(batch, torch.Generator().manual_seed(0))[0].total
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    initial, final = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    print(f"overfit: {initial:.4f} -> {final:.4f} in {len(losses)} steps, {time.perf_counter() - start:.1f} s")
    assert final < 0.25 * initial, losses  # observed: 30-100x lower


def test_train_entry_writes_run_dir_and_resumes(shards, tmp_path):
    """`python -m nova3d.train tiny ...` for 2 steps, then a second launch continues to step 4."""
    # Step checkpoints every 5: last.ckpt at steps 2 and 4 can only come from the end-of-fit save.
    overrides = fast_overrides(shards, tmp_path) + ["system.ema_decay=0.9", "trainer.checkpoint_every_n_steps=5"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-m", "nova3d.train", "tiny", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # issue 16: no third-party noise on the console (Lightning's tips, GPU/TPU lines, warnings):
    # stderr holds progress bars only (checked in a real process: pytest's own hides warnings)
    noise = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.strip() and "|" not in line]
    assert not noise, noise
    run = run_dir_for(load_experiment("tiny", overrides))
    assert run.path == tmp_path / "tiny" / "local"
    assert "name: tiny" in (run.path / "config.yaml").read_text()
    assert "max_steps: 2" in (run.path / "config.yaml").read_text()
    assert (run.path / "git.txt").read_text().startswith("commit: ")
    assert "nova3d.train tiny" in (run.path / "command.txt").read_text()
    first = _load(run.last_checkpoint)
    assert first["global_step"] == 2
    assert not any(k.startswith(CONDITIONER_PREFIX) for k in first["state_dict"])
    assert first["ema"]["num_updates"] == 2
    tags = _event_tags(run.tensorboard)
    assert any(tag.startswith("val_samples/") for tag in tags["images"])
    assert {"train/loss", "train/loss_rgb", "train/loss_normal", "train/weight_rgb", "train/weight_normal",
            "train/sigma_mean", "val/loss", "val/loss_rgb", "val/loss_normal",
            "lr-AdamW/pretrained", "lr-AdamW/new"} <= set(tags["scalars"])

    seen = {}

    class StartProbe(Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            seen["global_step"] = trainer.global_step
            seen["adam_steps"] = {float(s["step"]) for s in optimizer.state.values()}
            seen["ema_updates"] = pl_module.ema.num_updates

    assert resume_checkpoint(run) == run.last_checkpoint
    run_training(load_experiment("tiny", overrides + ["trainer.max_steps=4"]), ["resumed"], [StartProbe()])
    assert seen == {"global_step": 2, "adam_steps": {2.0}, "ema_updates": 2}  # restored, not fresh
    second = _load(run.last_checkpoint)
    assert second["global_step"] == 4
    assert {float(s["step"]) for s in second["optimizer_states"][0]["state"].values()} == {4.0}
    assert second["ema"]["num_updates"] == 4
    assert len((run.path / "command.txt").read_text().splitlines()) == 2
    restored = MultiViewDiffusion.load_trained(str(run.last_checkpoint))
    assert not restored.training and restored.ema is not None


def test_parameter_groups(shards, tmp_path):
    cfg = load_experiment("tiny", fast_overrides(shards, tmp_path) + ["system.lr=1e-5", "system.lr_new=3e-4"])
    system = MultiViewDiffusion(cfg)
    optimizer = system.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in system.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in optimizer.param_groups}
    lrs = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert lrs == {"pretrained": 1e-5, "new": 3e-4}
    assert groups["new"] and all(is_new_parameter(n) for n in groups["new"])
    assert not any(is_new_parameter(n) for n in groups["pretrained"])
    optimised = groups["new"] + groups["pretrained"]
    assert len(optimised) == len(set(optimised))
    assert set(optimised) == {f"unet.{n}" for n, _ in system.unet.named_parameters()}
    assert not any(n.startswith(CONDITIONER_PREFIX) for n in optimised)
    assert not any(p.requires_grad for p in system.conditioner.parameters())
    rgb_only = MultiViewDiffusion(load_experiment("tiny", fast_overrides(shards, tmp_path) + ["model.domains=[rgb]"]))
    assert [g["name"] for g in rgb_only.configure_optimizers()["optimizer"].param_groups] == ["pretrained"]


def test_gta_keys_come_from_the_model_config():
    assert gta_config(ModelConfig()).keys == "other_domains"
    assert gta_config(load_experiment("ablations/gta_all_domain_keys").model).keys == "all_domains"
    with pytest.raises(Nova3DError, match="model.gta_keys"):
        gta_config(ModelConfig(gta_keys="every_domain"))


def test_factory_loads_a_pretrained_folder_and_architectures_fit(tmp_path):
    """The `model.pretrained` path: an SVD-layout folder of tiny models saved with save_pretrained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel.from_config(tiny_unet_config())
        image_encoder, vae, feature_extractor = build_tiny_components(seed=1)
    parts = {"unet": unet, "image_encoder": image_encoder, "vae": vae, "feature_extractor": feature_extractor}
    for sub, part in parts.items():
        part.save_pretrained(tmp_path / sub)
    built = build_components(ModelConfig(pretrained=str(tmp_path), gta_temporal=False))
    assert built.unet.gta_config == GTAConfig(spatial=True, temporal=False, num_domains=2)
    loaded = dict(built.unet.named_parameters())
    for name, p in unet.named_parameters():
        torch.testing.assert_close(loaded[name], p)
    torch.testing.assert_close(built.conditioner.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    with pytest.raises(Nova3DError, match="model.domains"):
        build_components(ModelConfig(domains=["normal", "rgb"]))
    for name, arch in ARCHITECTURES.items():  # every random architecture's UNet fits its conditioner
        config = arch.unet_config()
        small = name in ("tiny", "toy")  # the toy recipe's own CLIP has the tiny one's projection
        clip = tiny_clip_vision_config() if small else svd_xt_clip_config()
        latent_channels = (tiny_vae_config() if small else svd_xt_vae_config())["latent_channels"]
        assert config["cross_attention_dim"] == clip["projection_dim"], name
        assert config["in_channels"] == 2 * latent_channels, name


def test_precision_run_dir_and_ema_helpers(tmp_path):
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="bf16-mixed")) == "32-true"
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="32-true")) == "32-true"
    assert resolve_precision(TrainerConfig(accelerator="gpu", precision="bf16-mixed")) == "bf16-mixed"
    cfg = load_experiment("ablations/no_gta", [f"logging.root={tmp_path}"])
    assert run_dir_for(cfg, {"SLURM_JOB_ID": "123"}).path == tmp_path / "ablations" / "no_gta" / "123"
    assert run_dir_for(cfg, {}).path == tmp_path / "ablations" / "no_gta" / "local"

    layer = torch.nn.Linear(2, 2)
    ema = ParameterEMA(0.5)
    ema.update(layer.named_parameters())  # first update copies
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer.named_parameters())  # d = min(0.5, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["weight"], d * before + (1 - d) * (before + 1))
    with ema.applied(layer.named_parameters()):
        torch.testing.assert_close(layer.weight, ema.shadow["weight"])
    torch.testing.assert_close(layer.weight, before + 1)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in list_experiments() if not e.startswith(("fusion/", "autoencoder/"))])
def test_every_experiment_trains_two_steps(experiment, shards, tmp_path):
    assert main([experiment, *tiny_overrides(shards, tmp_path)]) == 0
    cfg = load_experiment(experiment, tiny_overrides(shards, tmp_path))
    run = run_dir_for(cfg)
    ckpt = _load(run.last_checkpoint)
    assert ckpt["global_step"] == 2
    assert (run.checkpoints / "best.ckpt").is_file()  # validation ran and reported val/loss
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_a_truncated_last_ckpt_is_named_before_resuming(tmp_path):
    """issue 16: resuming from a cut-off last.ckpt crashed deep in torch.load with a traceback."""
    from nova3d.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, run.last_checkpoint)
    assert resume_checkpoint(run) == run.last_checkpoint  # an intact one is resumed from
    with open(run.last_checkpoint, "r+b") as f:
        f.truncate(run.last_checkpoint.stat().st_size // 2)
    with pytest.raises(Nova3DError, match="last.ckpt: not a complete checkpoint") as info:
        resume_checkpoint(run)
    assert str(run.last_checkpoint) in str(info.value) and "\n" not in str(info.value)
