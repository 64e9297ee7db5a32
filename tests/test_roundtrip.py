"""The whole data path: Blender renders of 2 procedural objects -> shards -> a DataModule batch."""
from pathlib import Path

import pytest
import torch

from data_prep.render_io import ObjectSource, RenderSettings
from data_prep.render_views import render_objects
from data_prep.write_shards import write_shards
from nova3d.cameras import convert_normal_frame
from nova3d.config import DataConfig
from nova3d.data.datamodule import MultiViewDataModule

RES, VIEWS = 64, 16


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roundtrip")
    sources = [ObjectSource(object_id=name, source=f"procedural:{name}", procedural=name)
               for name in ("bracket", "mug")]
    summary = render_objects(sources, root / "renders", RenderSettings(views=VIEWS, resolution=RES, samples=2))
    assert summary.failed == [] and sorted(summary.rendered) == ["bracket", "mug"]
    write_shards(root / "renders", root / "shards", progress=False)
    return root / "shards"


def _datamodule(shards: Path, **overrides) -> MultiViewDataModule:
    cfg = DataConfig(train_shards=str(shards), resolution=32, num_views=VIEWS, num_workers=0,
                     samples_per_epoch=2, batch_size=2, **overrides)
    dm = MultiViewDataModule(cfg)
    dm.setup("fit")
    return dm


def test_rendered_objects_reach_the_model_as_a_valid_batch(shard_dir):
    dm = _datamodule(shard_dir)
    batch = next(iter(dm.val_dataloader()))
    assert sorted(batch.object_ids) == ["bracket", "mug"]
    B = 2
    assert batch.input_image.shape == (B, 3, 32, 32)
    assert batch.rgb.shape == batch.normals.shape == (B, VIEWS, 3, 32, 32)
    assert batch.masks.shape == (B, VIEWS, 1, 32, 32)
    assert batch.c2w.shape == (B, VIEWS, 4, 4) and batch.K.shape == (B, VIEWS, 3, 3)
    assert 0 <= batch.rgb.min() and batch.rgb.max() <= 1
    assert -1 <= batch.normals.min() and batch.normals.max() <= 1
    # Evaluation composites on white: pixels the object does not cover are exactly white.
    empty = batch.masks[:, :, 0] == 0
    assert torch.all(batch.rgb.permute(0, 1, 3, 4, 2)[empty] == 1)
    # Normals are unit length wherever the object fully covers a pixel.
    inside = batch.masks[:, :, 0] == 1
    assert inside.sum() > 100
    lengths = batch.normals.permute(0, 1, 3, 4, 2)[inside].norm(dim=-1)
    assert torch.allclose(lengths, torch.ones_like(lengths), atol=1e-3)
    # The objects are real renders, not blank frames: every view sees the object.
    assert torch.all(batch.masks.flatten(2).amax(-1) == 1)
    assert dm.skipped.total == 0


def test_training_batches_roll_the_orbit_consistently(shard_dir):
    dm = _datamodule(shard_dir, random_start_view=True, train_background="random")
    batch = next(iter(dm.train_dataloader()))
    for b in range(len(batch)):
        start = int(batch.view_indices[b, 0])
        assert batch.view_indices[b].tolist() == [(start + k) % VIEWS for k in range(VIEWS)]
        # In the input view's own frame, the visible surface faces the camera (+z), on average.
        inside = batch.masks[b, 0, 0] == 1
        z = batch.normals[b, 0, 2][inside]
        assert z.mean() > 0.3
        # Re-expressed in world and back into view k's frame, the same holds for every view.
        world = convert_normal_frame(batch.normals[b].permute(0, 2, 3, 1), batch.c2w[b], "input_view", "world")
        own = convert_normal_frame(world, batch.c2w[b], "world", "view")
        for k in range(VIEWS):
            covered = batch.masks[b, k, 0] == 1
            assert own[k][covered][:, 2].mean() > 0.3
