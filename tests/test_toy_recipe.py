"""The toy recipe end to end at a few steps, so it never rots: toy data -> VAE -> GTA-UNet -> export
-> generate, through the same commands as `make toy-data`, `make toy-vae`, `make train EXP=toy`."""
import json

import pytest
import torch

from nova3d.config import load_experiment
from nova3d.models.conditioning import load_conditioning
from nova3d.run_dir import run_dir_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from data_prep.toy_data import make_toy_data

    out = tmp_path_factory.mktemp("toy_data")
    report = make_toy_data(out, count=20, resolution=64, samples=2, progress=False)
    assert report["train"]["samples"] == 18 and report["val"]["samples"] == report["test"]["samples"] == 1
    assert (out / "renders" / "test" / "toy-s0-00000" / "mesh.glb").is_file()
    again = make_toy_data(out, count=20, resolution=64, samples=2, progress=False)  # rerun: nothing redone
    assert again["train"]["rendered"] == 0 and again["train"]["skipped"] == 18
    return out


def _data(toy_data):
    return [f"data.train_shards={toy_data}/shards/train", f"data.val_shards={toy_data}/shards/val/val-000000.tar",
            "data.resolution=32", "data.samples_per_epoch=2", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]


def test_toy_recipe_trains_exports_and_generates(toy_data, tmp_path):
    from nova3d.export import export_checkpoint
    from nova3d.pipeline import Nova3DPipeline
    from nova3d.train import main as train_main
    from nova3d.train_vae import main as vae_main

    vae_args = ["autoencoder/toy", *_data(toy_data), f"test_shards={toy_data}/shards/test/test-000000.tar",
                "optim.scale_samples=2", "test_objects=1", f"logging.root={tmp_path}"]
    assert vae_main(vae_args) == 0
    conditioner = run_dir_for(load_experiment("autoencoder/toy", vae_args[1:])).path / "conditioner"
    metrics = json.loads((conditioner / "metrics.json").read_text())
    assert metrics["objects"] == 1 and metrics["scaling_factor"] > 0 and metrics["global_step"] == 2
    loaded = load_conditioning(conditioner)
    assert loaded.vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])

    unet_args = ["toy", *_data(toy_data), f"model.conditioner={conditioner}", "system.val_sampling_steps=2",
                 "system.val_num_objects=1", f"logging.root={tmp_path}"]
    assert train_main(unet_args) == 0
    run = run_dir_for(load_experiment("toy", unet_args[1:]))
    out = export_checkpoint(run.path, tmp_path / "pipeline").out
    pipe = Nova3DPipeline.from_pretrained(str(out))
    assert type(pipe.vae).__name__ == "AutoencoderKL" and pipe.unet.gta_config.spatial
    views = pipe(torch.rand(3, 32, 32), num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 progress=False)
    assert views.rgb.shape == (1, 16, 3, 32, 32) and torch.isfinite(views.normals).all()
