"""nova3d.eval.generated_views: the scores of generated views against the truth, on known answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from nova3d.eval import generated_views as gv


def _views(v=4, res=16, seed=0) -> gv.Views:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(v, 1, res, res)
    masks[:, :, 4:12, 4:12] = 1.0
    rgb = torch.where(masks > 0, torch.rand(v, 3, res, res, generator=g) * 0.8, torch.ones(v, 3, res, res))
    normals = F.normalize(torch.randn(v, 3, res, res, generator=g), dim=1)
    return gv.Views(rgb, normals, masks)


def test_identical_views_score_perfectly_and_the_input_view_is_left_out_of_means():
    true = _views()
    s = gv.score_views(true, true)
    assert min(s.psnr) == pytest.approx(100.0)  # mse clamped at 1e-10
    assert max(s.normal_error_deg) == pytest.approx(0.0, abs=0.1) and min(s.ssim) == pytest.approx(1.0)
    assert s.mask_iou == [1.0] * 4  # RGB foreground (not white) = normal foreground
    worse = gv.Views(true.rgb.clone(), true.normals.clone(), true.masks)
    worse.rgb[1:] = 1.0  # everything but the input view wiped to white
    m = gv.score_views(worse, true).means()
    assert m["psnr"] < 20 and gv.score_views(worse, true).psnr[0] == pytest.approx(100.0)


def test_normal_error_is_the_angle_on_the_true_foreground_only():
    true = _views()
    flipped = gv.Views(true.rgb, -true.normals, true.masks)
    assert gv.score_views(flipped, true).normal_error_deg == pytest.approx([180.0] * 4, abs=0.1)
    off = true.normals.clone()
    off[:, :, :4] = -off[:, :, :4]  # rows 0-3 are background: they must not count
    assert max(gv.normal_error_per_view(off, true.normals, true.masks)) == pytest.approx(0.0, abs=0.1)
    quarter = torch.zeros_like(true.normals)
    quarter[:, 2] = 1.0
    side = torch.zeros_like(true.normals)
    side[:, 0] = 1.0
    assert gv.normal_error_per_view(quarter, side, true.masks) == pytest.approx([90.0] * 4, abs=1e-3)


def test_mask_iou_sees_rgb_and_normals_disagree():
    true = _views()
    shifted = gv.Views(true.rgb, true.normals, torch.roll(true.masks, 4, dims=-1))  # normals 4 px to the right
    iou = gv.score_views(shifted, true).mask_iou
    assert iou == pytest.approx([32 / 96] * 4)  # 8x4 overlap of two 8x8 squares: 32 / (128 - 32)


def test_baselines():
    true = _views()
    rep = gv.input_repeated(true)
    for v in range(4):
        assert torch.equal(rep.rgb[v], true.rgb[0]) and torch.equal(rep.normals[v], true.normals[0])
    mean = gv.mean_views([true, _views(seed=1)])
    assert mean.rgb.shape == true.rgb.shape and torch.allclose(mean.normals.norm(dim=1), torch.ones(4, 16, 16))
    assert torch.equal(mean.normals[0, :, 0, 0], torch.tensor([0.0, 0.0, 1.0]))  # background: facing the camera
    assert math.isfinite(gv.score_views(mean, true).mean("psnr"))
