"""Oracle supervision of the conflict map (issue 15 §2): loss.conflict_supervision, the
fusion/supervised_conflict experiment, nova3d.fusion.supervision, the off-mask row of the
conflict sheet. Tiny synthetic folders (4 views at 24²); seconds."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers_objects import make_object_folder
from nova3d.cli import main as cli_main
from nova3d.errors import Nova3DError
from nova3d.fuse import load_fusion_config
from nova3d.fusion.perturb import PerturbConfig, load_corruption_masks, perturb_object
from nova3d.fusion.poses import rays_for_pixels
from nova3d.fusion.preview import VIRIDIS, conflict_sheet, sheet_tile_origin
from nova3d.fusion.supervision import attach_corruption
from nova3d.fusion.views import load_views
from nova3d.losses import fusion as L
from nova3d.systems.fusion import FusionSystem

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["optim.rays=256", "field.hashgrid.levels=4", "field.hashgrid.log2_table_size=12",
        "field.hashgrid.max_resolution=64", "render.num_steps=32", "render.occupancy.resolution=16",
        "export.resolution=32", "logging.tensorboard=false", "logging.progress=false", "logging.turntable_frames=2"]
# every non-input view corrupted by big blotches: plenty of positive pixels at 24²
PERTURB = PerturbConfig(color_views=[1, 2, 3], kinds=["blotch"], blotch_count=3, blotch_size=0.3, seed=0)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_object_folder(tmp_path_factory.mktemp("clean"), "ellipsoid", views=4, res=24)


@pytest.fixture(scope="module")
def perturbed(clean, tmp_path_factory):
    dst = tmp_path_factory.mktemp("perturbed") / "ellipsoid"
    perturb_object(clean, dst, PERTURB)
    return dst


def _terms(system: FusionSystem, step: int, seed: int = 0) -> dict:
    """One training step's loss terms, with a fixed ray batch."""
    system.on_fit_start()
    rays = system.sampler.sample(system.cfg.optim.rays, torch.Generator().manual_seed(seed))
    origins, dirs = rays_for_pixels(system.c2w[rays.view], system.K[rays.view], rays.pix)
    system.renderer.update_step(step)
    return system.loss_terms(system.renderer(origins, dirs, rays.view), rays, step)


def test_config_loads_and_changes_only_the_supervision():
    default, sup = load_fusion_config("fusion/default"), load_fusion_config("fusion/supervised_conflict")
    assert default.loss.conflict_supervision == 0  # off by default: default results unchanged
    assert sup.loss.conflict_supervision > 0 and sup.loss.conflict_supervision_masks == "perturb/corruption"
    sup.loss.conflict_supervision, sup.name = 0.0, default.name
    assert sup == default


def test_supervision_without_conflict_maps_is_refused_at_load():
    with pytest.raises(Nova3DError, match="conflict_supervision needs conflict maps"):
        load_fusion_config("fusion/supervised_conflict", ["loss.conflict_maps=false"])
    with pytest.raises(Nova3DError, match="conflict_supervision"):
        load_fusion_config("fusion/default", ["loss.conflict_supervision=-1"])


def test_bce_known_values_and_empty_selection():
    c, y = torch.tensor([0.5, 0.9, 0.1, 0.3]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    keep = torch.tensor([True, True, True, False])
    expected = -(np.log(0.5) + np.log(0.9) + np.log(0.9)) / 3
    assert float(L.conflict_supervision(c, y, keep)) == pytest.approx(expected, rel=1e-5)
    assert float(L.conflict_supervision(c, y, torch.zeros(4, dtype=torch.bool))) == 0.0


def test_masks_attach_at_the_fit_resolution(perturbed):
    views = load_views(perturbed)
    truth = torch.from_numpy(load_corruption_masks(perturbed)).float()
    full = attach_corruption(views, "perturb/corruption")
    assert torch.equal(full.corruption, truth) and truth[1:].sum() > 20 and truth[0].sum() == 0
    half = full.downsample(12)  # area fractions of the 2x2 blocks: soft targets
    assert torch.allclose(half.corruption, truth.reshape(4, 12, 2, 12, 2).mean((2, 4)))
    assert torch.equal(attach_corruption(views.downsample(12), "perturb/corruption").corruption, half.corruption)


def test_weight_zero_adds_no_term_and_changes_nothing(perturbed):
    cfg = load_fusion_config("fusion/default", TINY)
    torch.manual_seed(0)
    plain = _terms(FusionSystem(cfg, load_views(perturbed)), step=300)
    torch.manual_seed(0)
    with_masks = _terms(FusionSystem(cfg, attach_corruption(load_views(perturbed), "perturb/corruption")), step=300)
    assert "conflict_supervision" not in plain and "conflict" in plain
    assert plain.keys() == with_masks.keys()
    for k in plain:  # the masks ride along without touching the default loss
        assert torch.equal(plain[k], with_masks[k]), k


def test_supervision_gradients_reach_only_the_conflict_net(perturbed):
    cfg = load_fusion_config("fusion/supervised_conflict", TINY)
    torch.manual_seed(0)
    system = FusionSystem(cfg, load_views(perturbed))  # attaches the folder's masks itself
    assert system.views.corruption is not None
    terms = _terms(system, step=0)  # supervised from the first step
    bce = terms["conflict_supervision"]
    assert bce > 0.1 and system.loss_weights()["conflict_supervision"] == cfg.loss.conflict_supervision
    bce.backward()
    field_ = system.renderer.field
    grads = [p.grad for p in field_.conflict_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    # the conflict net reads detached inputs: the oracle cannot reshape colour or geometry
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in field_.geometry.parameters())


def test_supervision_lowers_the_bce_on_corrupted_rays(perturbed):
    """A few optimiser steps on the BCE alone move the rendered conflict towards the truth."""
    cfg = load_fusion_config("fusion/supervised_conflict", TINY)
    torch.manual_seed(0)
    system = FusionSystem(cfg, load_views(perturbed))
    opt = torch.optim.Adam(system.renderer.field.conflict_parameters(), lr=3e-2)
    first = None
    for _ in range(15):
        opt.zero_grad()
        bce = _terms(system, step=0)["conflict_supervision"]
        first = float(bce.detach()) if first is None else first
        bce.backward()
        opt.step()
    assert float(bce.detach()) < 0.8 * first


def test_missing_masks_fail_with_one_line(clean, tmp_path, capsys):
    cfg = load_fusion_config("fusion/supervised_conflict", TINY)
    with pytest.raises(Nova3DError, match="needs the true corruption masks"):
        FusionSystem(cfg, load_views(clean))
    out = tmp_path / "out"
    assert cli_main(["fuse", "--views", str(clean), "--out", str(out), "--experiment", "fusion/supervised_conflict", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the true corruption masks" in err[0] and str(clean) in err[0]
    assert not list(out.glob("mesh.*"))


def test_conflict_sheet_off_mask_row(tmp_path):
    V, tile = 3, 40
    conflict = torch.zeros(V, 16, 16)
    conflict[1] = 1.0  # fires everywhere; only the left half is truly corrupted
    truth = torch.zeros(V, 16, 16, dtype=torch.bool)
    truth[1, :, :8] = True
    path = conflict_sheet(torch.rand(V, 3, 24, 24), conflict, tmp_path / "s.png", truth=truth, tile=tile,
                          off_mask=True)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[0] == 4 * (tile + 14)
    lo, hi = np.round(VIRIDIS[[0, 255]] * 255).astype(int)
    x, y = sheet_tile_origin(3, 1, tile)
    assert (np.abs(image[y + 5, x + 5] - lo) <= 1).all()  # on the mask: not a false positive
    assert (np.abs(image[y + 5, x + tile - 5] - hi) <= 1).all()  # off the mask: shown
    faint = conflict * 0.02  # a learned map at a short budget: stretched so its false positives show
    path = conflict_sheet(torch.rand(V, 3, 24, 24), faint, tmp_path / "f.png", truth=truth, tile=tile, off_mask=True)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    x, y = sheet_tile_origin(1, 1, tile)
    assert (np.abs(image[y + 5, x + tile - 5] - lo) <= 6).all()  # the conflict row keeps the 0..1 scale
    x, y = sheet_tile_origin(3, 1, tile)
    assert (np.abs(image[y + 5, x + tile - 5] - hi) <= 1).all() and (np.abs(image[y + 5, x + 5] - lo) <= 1).all()
    with pytest.raises(Nova3DError, match="off_mask needs truth"):
        conflict_sheet(torch.rand(V, 3, 24, 24), conflict, tmp_path / "t.png", off_mask=True)
