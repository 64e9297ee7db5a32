"""Writer -> shards -> the real MultiViewDataModule (tiny objects: 8 views at 32², output 16² or 32²)."""
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from data_prep.write_shards import write_shards
from nova3d.cameras import convert_normal_frame, intrinsics
from nova3d.config import DataConfig
from nova3d.data.datamodule import MultiViewDataModule, SkipCounter, resolve_num_workers
from nova3d.data.shards import read_object_folder
from nova3d.data.views import MultiViewBatch, PackedBatch, collate_packed, make_views, pack_views, unpack_batch
from nova3d.errors import Nova3DError
from tests.helpers_objects import make_object_folder, rewrite_tar, synthetic_views

VIEWS, RES, NUM_OBJECTS = 8, 32, 6


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("renders")
    for i in range(NUM_OBJECTS):
        make_object_folder(root, f"obj{i}", views=VIEWS, res=RES, seed=i)
    return root


@pytest.fixture(scope="module")
def shards(renders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(renders, out, max_count=2, progress=False)  # 3 shards
    return out


def _cfg(shards: Path, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), resolution=16, num_views=4, batch_size=2, num_workers=0,
                samples_per_epoch=6, shuffle_buffer=4)
    return DataConfig(**{**base, **kw})


def _dm(shards: Path, **kw) -> MultiViewDataModule:
    dm = MultiViewDataModule(_cfg(shards, **kw))
    dm.setup("fit")
    return dm


def test_training_batch_shapes_ranges_and_cameras(shards):
    batch = next(iter(_dm(shards).train_dataloader()))
    assert isinstance(batch, MultiViewBatch) and len(batch) == 2
    B, V, R = 2, 4, 16
    assert batch.rgb.shape == batch.normals.shape == (B, V, 3, R, R)
    assert batch.input_image.shape == (B, 3, R, R) and batch.masks.shape == (B, V, 1, R, R)
    assert batch.c2w.shape == (B, V, 4, 4) and batch.K.shape == (B, V, 3, 3)
    torch.testing.assert_close(batch.input_image, batch.rgb[:, 0])
    assert batch.rgb.min() >= 0 and batch.rgb.max() <= 1 and batch.normals.abs().max() <= 1
    assert batch.masks.min() >= 0 and batch.masks.max() <= 1 and batch.masks.max() == 1
    torch.testing.assert_close(batch.K, intrinsics(49.1, R, R).expand(B, V, 3, 3))  # 32² K scaled by 1/2
    for b in range(B):  # evenly spaced: 4 of 8 from a random start
        start = int(batch.view_indices[b, 0])
        assert batch.view_indices[b].tolist() == [(start + 2 * k) % VIEWS for k in range(V)]
    fg = batch.masks[:, :, 0] == 1
    norms = batch.normals.norm(dim=2)[fg]
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    bg = batch.masks[:, :, 0] == 0  # composited on the sample's background, normals on 2 * bg - 1
    colour = batch.background[:, None, :, None, None].expand_as(batch.rgb)
    torch.testing.assert_close(batch.rgb.permute(0, 1, 3, 4, 2)[bg], colour.permute(0, 1, 3, 4, 2)[bg])
    torch.testing.assert_close(batch.normals.permute(0, 1, 3, 4, 2)[bg], 2 * colour.permute(0, 1, 3, 4, 2)[bg] - 1)


def test_normals_match_ground_truth_in_every_frame(shards):
    gt = synthetic_views(VIEWS, RES)
    for frame in ("world", "view", "input_view"):
        batch = next(iter(_dm(shards, resolution=RES, normal_frame=frame, batch_size=1).val_dataloader()))
        idx = batch.view_indices[0]
        assert batch.object_ids == ["obj0"] and idx.tolist() == [0, 2, 4, 6]
        world = torch.from_numpy(gt.normals_world[idx.numpy()])
        expected = convert_normal_frame(world, gt.cameras.c2w[idx], "world", frame, 0)
        got = batch.normals[0].permute(0, 2, 3, 1)
        fg = torch.from_numpy(gt.mask[idx.numpy()])
        torch.testing.assert_close(got[fg], expected[fg], atol=1e-4, rtol=0)
        torch.testing.assert_close(batch.background, torch.ones(1, 3))  # evaluation: white


def test_roll_moves_every_domain_together(renders):
    obj = read_object_folder(renders / "obj3")
    white = torch.ones(3)
    ref = make_views(obj, list(range(VIEWS)), resolution=RES, normal_frame="input_view", background=white)
    for s in (3, 6):
        rolled = make_views(obj, [(s + k) % VIEWS for k in range(VIEWS)], resolution=RES,
                            normal_frame="input_view", background=white)
        torch.testing.assert_close(rolled.rgb[0], ref.rgb[s])
        torch.testing.assert_close(rolled.input_image, ref.rgb[s])
        torch.testing.assert_close(rolled.masks, torch.roll(ref.masks, -s, 0))
        torch.testing.assert_close(rolled.c2w, torch.roll(ref.c2w, -s, 0))
        # Normals re-expressed in the new input view's frame: the conversion of the original ones.
        fg = ref.masks[:, 0] == 1
        ref_world = convert_normal_frame(ref.normals.permute(0, 2, 3, 1), ref.c2w, "input_view", "world", 0)
        expected = convert_normal_frame(ref_world, ref.c2w, "world", "input_view", s)
        got = torch.roll(rolled.normals.permute(0, 2, 3, 1), s, 0)
        torch.testing.assert_close(got[fg], expected[fg], atol=1e-5, rtol=0)


def test_training_roll_through_datamodule_matches_validation(shards):
    """A training sample's view 0 is the stored view `start`: same foreground as the unrolled eval view."""
    full = {b.object_ids[0]: b for b in _dm(shards, resolution=RES, num_views=VIEWS, batch_size=1).val_dataloader()}
    batch = next(iter(_dm(shards, resolution=RES, num_views=VIEWS, batch_size=NUM_OBJECTS).train_dataloader()))
    for i, oid in enumerate(batch.object_ids):
        start = int(batch.view_indices[i, 0])
        ref = full[oid]
        fg = ref.masks[0, start, 0] == 1
        torch.testing.assert_close(batch.rgb[i, 0][:, fg], ref.rgb[0, start][:, fg])
        torch.testing.assert_close(batch.c2w[i, 0], ref.c2w[0, start])


def test_validation_is_deterministic_and_complete(shards):
    dm = _dm(shards, num_workers=2)
    runs = [list(dm.val_dataloader()) for _ in range(2)]
    ids = [oid for b in runs[0] for oid in b.object_ids]
    assert sorted(ids) == [f"obj{i}" for i in range(NUM_OBJECTS)]  # 2 workers: disjoint and complete
    for a, b in zip(*runs):
        assert a.object_ids == b.object_ids
        torch.testing.assert_close(a.rgb, b.rgb)


def test_ranks_see_disjoint_validation_shards(shards, monkeypatch):
    seen = []
    for rank in range(2):
        dm = _dm(shards)
        monkeypatch.setattr(dm, "_rank_world", lambda rank=rank: (rank, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seen.append({oid for b in dm.val_dataloader() for oid in b.object_ids})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == NUM_OBJECTS


@pytest.mark.parametrize("workers", [0, 2])
def test_fixed_batches_per_epoch(shards, workers):
    dm = _dm(shards, samples_per_epoch=5, batch_size=2, num_workers=workers)
    loader = dm.train_dataloader()
    assert dm.batches_per_epoch == 3
    for _ in range(2):  # every epoch, whatever the worker count or the shard sizes
        assert [len(b) for b in loader] == [2, 2, 2]


def _corrupt_dir(shards: Path, dst: Path) -> str:
    """dst/ with four damaged shards; their brace pattern (the folder has no manifest: refused)."""
    dst.mkdir()
    good = (shards / "train-000000.tar").read_bytes()
    (dst / "train-000000.tar").write_bytes(good)  # obj0, obj1
    (dst / "train-000001.tar").write_bytes(good[: len(good) // 3])  # truncated
    rewrite_tar(shards / "train-000001.tar", dst / "train-000002.tar",  # obj2 loses a key; obj3 fine
                lambda name, d: None if name == "obj2.mask.npy.zst" else d)
    rewrite_tar(shards / "train-000002.tar", dst / "train-000003.tar",  # obj4: garbage; obj5 fine
                lambda name, d: b"\x89PNG garbage" if name == "obj4.normal.npy.zst" else d)
    return str(dst / "train-{000000..000003}.tar")


def test_broken_samples_are_skipped_counted_and_warned(shards, tmp_path):
    dm = _dm(_corrupt_dir(shards, tmp_path / "bad"), batch_size=1)
    with pytest.warns(RuntimeWarning) as record:
        ids = [oid for b in dm.val_dataloader() for oid in b.object_ids]
    assert ids == ["obj0", "obj1", "obj3", "obj5"]
    assert dm.skipped.counts == {"unreadable_shard": 1, "missing_key": 1, "undecodable": 1, "invalid": 0}
    text = "\n".join(str(w.message) for w in record)
    assert "train-000001.tar: truncated" in text and "sample obj2: missing mask.npy.zst" in text
    assert "sample obj4: normal.npy.zst" in text


def test_broken_samples_counted_across_workers_in_training(shards, tmp_path):
    dm = _dm(_corrupt_dir(shards, tmp_path / "bad"), batch_size=1, samples_per_epoch=12, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.train_dataloader())
    assert len(batches) == 12 and {"obj2", "obj4"}.isdisjoint(o for b in batches for o in b.object_ids)
    assert dm.skipped.total > 0  # counted in the workers, read in the main process


def test_nothing_readable_raises_instead_of_spinning(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-000000.tar").write_bytes(b"\0" * 100)
    dm = _dm(bad / "train-000000.tar")
    dm._counter = SkipCounter(max_consecutive_failures=5)
    with warnings.catch_warnings(), pytest.raises(Nova3DError, match="all failed"):
        warnings.simplefilter("ignore")
        next(iter(dm.train_dataloader()))


def test_batch_moves_with_lightning(shards):
    batch = next(iter(_dm(shards).train_dataloader()))
    moved = move_data_to_device(batch, torch.device("meta"))
    assert isinstance(moved, MultiViewBatch) and moved.object_ids == batch.object_ids
    assert all(getattr(moved, f.name).device.type == "meta" for f in dataclasses.fields(moved)
               if isinstance(getattr(moved, f.name), torch.Tensor))


def test_worker_count_from_config_or_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert resolve_num_workers(DataConfig(num_workers=None)) == 1
    assert resolve_num_workers(DataConfig(num_workers=3)) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert resolve_num_workers(DataConfig(num_workers=None)) == 5


def test_a_shard_folder_of_another_split_says_which_split_it_holds(renders, tmp_path):
    """A val folder named as train_shards: its manifest lists no train shards, and the error says so."""
    write_shards(renders, tmp_path / "val", prefix="val", split="val", progress=False)
    with pytest.raises(Nova3DError, match="no shards found of split 'train' .*lists split 'val'"):
        MultiViewDataModule(DataConfig(train_shards=str(tmp_path / "val"))).setup("fit")


def test_bad_config_and_missing_shards_fail_clearly(tmp_path):
    with pytest.raises(Nova3DError, match="train_background"):
        MultiViewDataModule(DataConfig(train_background="blue"))
    with pytest.raises(Nova3DError, match="no shards found"):
        MultiViewDataModule(DataConfig(train_shards=str(tmp_path))).setup("fit")
    with pytest.raises(Nova3DError, match="shards missing"):
        MultiViewDataModule(DataConfig(train_shards=str(tmp_path / "t-{000000..000001}.tar"))).setup("fit")


def test_lightning_fit_and_validate_with_the_datamodule(shards):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, MultiViewBatch) and batch.rgb.shape == (2, 4, 3, 16, 16)
            self.seen.append("train")
            return (self.w * batch.rgb.mean()).sum() + self.w.pow(2).sum()

        def validation_step(self, batch, batch_idx):
            self.seen.append("val")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = Probe()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(probe, datamodule=MultiViewDataModule(_cfg(shards, samples_per_epoch=4)))
    assert trainer.global_step == 4
    assert probe.seen == ["train", "train", "val", "val", "val", "train", "train", "val", "val", "val"]


@pytest.mark.parametrize("resolution", [RES, 16])
def test_deferred_unpacking_gives_the_direct_tensors(renders, shards, resolution):
    """Workers hand over PackedBatch; unpacking it (after transfer) gives what make_views gives."""
    objs = [read_object_folder(renders / f"obj{i}") for i in (1, 4)]
    views = [[(s + 2 * k) % VIEWS for k in range(4)] for s in (3, 6)]
    bgs = [torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 0.0, 0.3])]
    kw = dict(resolution=resolution, normal_frame="input_view")
    direct = [make_views(o, v, background=bg, **kw) for o, v, bg in zip(objs, views, bgs)]
    packed = collate_packed([pack_views(o, v, background=bg, **kw) for o, v, bg in zip(objs, views, bgs)])
    assert packed.rgba.dtype == torch.uint8 and packed.normal.dtype == torch.uint16
    batch = unpack_batch(packed)
    assert isinstance(batch, MultiViewBatch) and batch.object_ids == ["obj1", "obj4"]
    assert batch.latent_params is None  # no cached latents here (tests/test_cached_latents.py)
    for f in dataclasses.fields(MultiViewBatch):
        if f.name not in ("object_ids", "latent_params"):
            torch.testing.assert_close(getattr(batch, f.name), torch.stack([getattr(d, f.name) for d in direct]),
                                       atol=1e-6, rtol=0, msg=f.name)
    # What a Trainer gets from the loaders, unpacked by the DataModule's hook, equals the direct loader.
    dm = _dm(shards, resolution=resolution, batch_size=2)
    direct_batch = next(iter(dm.val_dataloader()))
    raw = next(iter(dm.val_dataloader().loader))
    assert isinstance(raw, PackedBatch)
    hooked = dm.on_after_batch_transfer(move_data_to_device(raw, torch.device("cpu")), 0)
    for f in dataclasses.fields(MultiViewBatch):
        a, b = getattr(hooked, f.name), getattr(direct_batch, f.name)
        assert a == b if f.name in ("object_ids", "latent_params") else torch.equal(a, b), f.name
