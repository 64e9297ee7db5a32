"""Cached VAE latents: data_prep/cache_latents.py -> shards -> DataModule -> MultiViewDiffusion.target_latents.

The contract: targets sampled from the cache equal freshly encoded ones (posterior mode, and
posterior samples with the same generator) up to the cache's float16, for view subsets and — with
roll-invariant normal frames — rolled orbits; configs the cache cannot serve are refused with one
line; training runs on cached shards without calling the VAE encoder on the views.
"""
from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import zlib
from pathlib import Path

import pytest
import torch

from data_prep.cache_latents import build_conditioner, main as cache_main
from data_prep.write_shards import write_shards
from nova3d.config import load_experiment
from nova3d.data import schema
from nova3d.data.datamodule import MultiViewDataModule
from nova3d.data.inspect import inspect_shards
from nova3d.data.latent_cache import check_vae, decode_latents
from nova3d.data.manifest import Manifest
from nova3d.data.sample_error import SampleError
from nova3d.data.shards import decode_sample, iter_tar_samples
from nova3d.errors import Nova3DError
from nova3d.models.conditioning import Conditioner, build_tiny_conditioner
from nova3d.run_dir import run_dir_for
from nova3d.systems.mv_diffusion import MultiViewDiffusion
from nova3d.train import run_training
from tests.helpers_objects import make_object_folder

pytestmark = pytest.mark.usefixtures("one_thread")
RES, VIEWS = 16, 4  # 4 of the 16 stored views, at 16² (tiny VAE: 8² latents)


def _overrides(shards: Path, root: Path, frame: str, roll: bool) -> list[str]:
    return ["model.pretrained=null", "model.architecture=tiny", f"data.resolution={RES}", f"data.num_views={VIEWS}",
            f"data.train_shards={shards}", "data.val_shards=null", "data.num_workers=0", "data.batch_size=2",
            "data.samples_per_epoch=4", "data.shuffle_buffer=2", f"data.normal_frame={frame}",
            f"data.random_start_view={str(roll).lower()}", "data.train_background=white",
            "data.use_cached_latents=true", f"logging.root={root}"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    renders = tmp_path_factory.mktemp("renders")
    for i in range(2):
        make_object_folder(renders, f"obj{i}", views=16, res=32, seed=i)
    out = tmp_path_factory.mktemp("shards")
    write_shards(renders, out, progress=False)
    return out


@pytest.fixture(scope="module")
def cached(shards, tmp_path_factory) -> dict[str, Path]:
    """A cached copy per normal frame: input_view (no rolls allowed) and world (rolls allowed)."""
    out = {}
    for frame in ("input_view", "world"):
        out[frame] = tmp_path_factory.mktemp(f"cached_{frame}")
        args = [str(shards), "--out", str(out[frame]), "--experiment", "tiny", f"data.resolution={RES}",
                f"data.normal_frame={frame}", "data.train_background=white",
                f"data.random_start_view={str(frame != 'input_view').lower()}", "--device", "cpu"]
        assert cache_main(args) == 0
    return out


def _batch(cfg, train: bool):
    dm = MultiViewDataModule(cfg.data)
    dm.setup("fit")
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    want_roll = train and cfg.data.random_start_view
    for batch in loader:
        if not want_roll or (batch.view_indices[:, 0] != 0).any():
            return batch
    raise AssertionError("no rolled batch in an epoch")


def _assert_fp16_close(cached: torch.Tensor, fresh: torch.Tensor) -> None:
    err = (cached - fresh).abs().max().item()
    assert err <= 2e-3 * fresh.abs().max().item() + 1e-4, err  # float16 rounding, not a different latent


@pytest.mark.parametrize("frame, roll", [("input_view", False), ("world", True)])
def test_cached_latents_equal_fresh_ones(cached, tmp_path, frame, roll):
    cfg = load_experiment("tiny", _overrides(cached[frame], tmp_path, frame, roll))
    system = MultiViewDiffusion(cfg).eval()
    for train in (False, True):
        batch = _batch(cfg, train)
        assert batch.latent_params.shape[:3] == (2, 2, VIEWS) and batch.latent_params.dtype == torch.float32
        fresh_batch = dataclasses.replace(batch, latent_params=None)
        mode = system.target_latents(batch, sample_posterior=False)
        _assert_fp16_close(mode, system.target_latents(fresh_batch, sample_posterior=False))
        drawn = system.target_latents(batch, True, torch.Generator().manual_seed(4))
        _assert_fp16_close(drawn, system.target_latents(fresh_batch, True, torch.Generator().manual_seed(4)))
        assert (drawn - mode).abs().max() > 1e-3  # the draw really samples (tiny VAE: wide posterior)


def test_cache_folder_manifest_and_cli_errors(shards, cached, tmp_path, capsys):
    manifest = Manifest.load(cached["world"])
    info = manifest.encoding["latent_cache"]
    assert info["resolution"] == RES and info["normal_frame"] == "world" and info["dtype"] == "float16"
    assert manifest.shard_names() == Manifest.load(shards).shard_names()
    assert inspect_shards(str(cached["world"])).ok  # checksums and counts agree with the new manifest
    name = manifest.shard_names()[0]
    with tarfile.open(shards / name) as a, tarfile.open(cached["world"] / name) as b:
        old = {m.name: a.extractfile(m).read() for m in a if m.isfile()}
        new = {m.name: b.extractfile(m).read() for m in b if m.isfile()}
    crc_names = {k for k in old if k.endswith("." + schema.KEY_CRC)}
    assert crc_names and all(new[k] == v for k, v in old.items() if k not in crc_names)  # the rest unchanged
    added = {k.split(".", 1)[1] for k in set(new) - set(old)}
    assert added == {schema.KEY_LATENT_INFO, *schema.LATENT_KEYS.values()}
    for crc_name in crc_names:  # the writer's crc32s kept, the latents' added
        obj = crc_name.split(".", 1)[0]
        members = {k.split(".", 1)[1]: v for k, v in new.items() if k.startswith(obj + ".") and k != crc_name}
        assert json.loads(new[crc_name]) == {**json.loads(old[crc_name]),
                                             **{k: zlib.crc32(members[k]) for k in added}}
        assert set(json.loads(new[crc_name])) == set(members)
    # Into a folder that holds shards, from one without a manifest, for an experiment whose data settings
    # cannot use a cache (tiny trains on random backgrounds): one error line each.
    white = ["data.train_background=white", "data.random_start_view=false"]
    for source, out, extra, match in ((shards, cached["world"], white, "already holds shards"),
                                      (tmp_path, tmp_path / "out", white, "no manifest.json"),
                                      (shards, tmp_path / "out", [], "train_background=white")):
        assert cache_main([str(source), "--out", str(out), "--experiment", "tiny", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("cache_latents: error:") and match in err, err


def _flipped(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def test_a_flipped_byte_in_a_cached_latent_member_is_undecodable(cached, tmp_path):
    cfg = load_experiment("tiny", _overrides(cached["world"], tmp_path, "world", roll=True)).data
    shard = Manifest.load(cached["world"]).shard_names()[0]
    raw = next(iter_tar_samples(str(cached["world"] / shard)))
    assert decode_latents(raw, [0, 1], cfg, required=True).shape[:2] == (2, 2)
    for key in (schema.KEY_LATENT_INFO, *schema.LATENT_KEYS.values()):
        data = raw[key]
        for at in (len(data) // 3, len(data) // 2, len(data) - 1):  # npy data, JSON: would load without the check
            with pytest.raises(SampleError, match=f": {key}: crc32 mismatch") as err:
                decode_latents({**raw, key: _flipped(data, at)}, [0, 1], cfg, required=True)
            assert err.value.reason == "undecodable"


def test_latents_of_shards_without_crcs_get_crcs_of_every_member(tmp_path):
    """A source written before crc32.json: the cached copy covers every member, and is read back checked."""
    make_object_folder(tmp_path / "r", "obj0", views=4, res=32)
    write_shards(tmp_path / "r", tmp_path / "s", encoding=schema.ShardEncoding(checksums=False), progress=False)
    assert schema.KEY_CRC not in next(iter_tar_samples(str(tmp_path / "s" / "train-000000.tar")))
    args = [str(tmp_path / "s"), "--out", str(tmp_path / "c"), "--experiment", "tiny", f"data.resolution={RES}",
            "data.normal_frame=world", "data.train_background=white", "--device", "cpu"]
    assert cache_main(args) == 0
    raw = next(iter_tar_samples(str(tmp_path / "c" / "train-000000.tar")))
    members = {k: v for k, v in raw.items() if not k.startswith("__") and k != schema.KEY_CRC}
    assert json.loads(raw[schema.KEY_CRC]) == {k: zlib.crc32(v) for k, v in members.items()}
    decode_sample(raw)
    with pytest.raises(SampleError, match="rgb.npy.zst: crc32 mismatch"):
        decode_sample({**raw, schema.KEY_RGB: _flipped(raw[schema.KEY_RGB], len(raw[schema.KEY_RGB]) // 2)})


@pytest.mark.parametrize("override, match", [
    ("data.train_background=random", "train_background=white"),
    ("data.random_start_view=true", "random_start_view=false"),
    ("data.resolution=32", "resolution 16"),
    ("uncached", "no cached latents"),
])
def test_incompatible_configs_are_refused(shards, cached, tmp_path, override, match):
    overrides = _overrides(cached["input_view"], tmp_path, "input_view", roll=False)
    overrides += [f"data.train_shards={shards}"] if override == "uncached" else [override]
    cfg = load_experiment("tiny", overrides)
    with pytest.raises(Nova3DError, match=match) as err:
        MultiViewDataModule(cfg.data).setup("fit")
    assert "\n" not in str(err.value)


def test_latents_of_another_vae_are_refused(cached):
    cfg = load_experiment("tiny", [])
    same, _ = build_conditioner(cfg)
    check_vae([str(cached["world"])], same.vae)  # the training run's VAE: accepted
    with pytest.raises(Nova3DError, match="another VAE"):
        check_vae([str(cached["world"])], build_tiny_conditioner(seed=1).vae)


def test_trains_two_steps_on_cached_shards_without_encoding_views(cached, tmp_path, monkeypatch):
    def no_encoding(*args, **kwargs):
        raise AssertionError("the VAE encoder ran on the views although the shards cache them")

    monkeypatch.setattr(Conditioner, "encode_frames", no_encoding)
    overrides = _overrides(cached["world"], tmp_path, "world", roll=True) + [
        "data.batch_size=1", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1",
        "trainer.strategy=auto", "trainer.precision=32-true", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1", "system.val_num_objects=0"]
    cfg = load_experiment("tiny", overrides)
    run_training(cfg, ["test_cached_latents"])
    ckpt = torch.load(run_dir_for(cfg).last_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
