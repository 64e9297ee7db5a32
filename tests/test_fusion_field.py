"""Fusion building blocks: hash grid, SDF/colour/conflict fields, NeuS rendering, occupancy
grid and pose refinement. Tiny sizes: the whole file runs in well under a minute on CPU."""
import math

import pytest
import torch

from nova3d.cameras import OrbitSpec, look_at_c2w, orbit_cameras, pixel_rays
from nova3d.fusion.field import FieldConfig, FusionField, SDFNetwork, sh_encode
from nova3d.fusion.hashgrid import PRIMES, HashGrid, HashGridConfig, level_resolutions
from nova3d.fusion.occupancy import OccupancyConfig
from nova3d.fusion.poses import PoseRefiner, pose_error, rays_for_pixels, se3_from_vector, so3_exp
from nova3d.fusion.render import NeuSRenderer, RenderConfig, ray_aabb

# 2 dense levels (5^3, 8^3 <= 1024 rows) and 2 hashed ones.
TINY_GRID = HashGridConfig(levels=4, features_per_level=2, log2_table_size=10, base_resolution=4,
                           max_resolution=24)
RADIUS = 0.4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_field(**kw) -> FusionField:
    cfg = dict(num_views=4, hashgrid=TINY_GRID, sdf_hidden=32, feature_dim=7, color_hidden=32,
               conflict_hidden=16, view_embed_dim=4, sphere_radius=RADIUS)
    cfg.update(kw)
    return FusionField(FieldConfig(**cfg))


def tiny_renderer(field=None, occupancy=True, **kw) -> NeuSRenderer:
    cfg = dict(num_steps=128, variance_init=0.6,  # inv_s ~ 400: a crisp surface
               occupancy=OccupancyConfig(resolution=24) if occupancy else None)
    cfg.update(kw)
    return NeuSRenderer(field or tiny_field(), RenderConfig(**cfg))


def camera_rays(res=12, views=4):
    cams = orbit_cameras(OrbitSpec(num_views=views, resolution=res, elevation_deg=10.0))
    o, d = pixel_rays(cams.c2w, cams.K, res, res)
    view = torch.arange(views)[:, None].expand(views, res * res).reshape(-1)
    return cams, o.reshape(-1, 3), d.reshape(-1, 3), view


def sphere_hits(o, d, r=RADIUS):
    """Analytic ray-sphere intersection: impact parameter [N] and first hit distance [N]."""
    b = (o * d).sum(-1)
    impact = (o - b[:, None] * d).norm(dim=-1)
    return impact, -b - (r * r - impact * impact).clamp_min(0).sqrt()


# --- hash grid -------------------------------------------------------------------------

def naive_hashgrid(grid: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """Per level, per corner, per point-free formulas: the reference the fast path must match."""
    cfg, T = grid.cfg, 2**grid.cfg.log2_table_size
    out, offset = [], 0
    for res in level_resolutions(cfg):
        n = (res + 1) ** 3
        size = min(n, T)
        pos = x * res
        base = torch.minimum(pos.floor(), torch.tensor(res - 1.0))
        frac = pos - base
        base = base.long()
        feat = torch.zeros(x.shape[0], cfg.features_per_level)
        for c in range(8):
            bit = torch.tensor([(c >> 2) & 1, (c >> 1) & 1, c & 1])
            v = base + bit
            if n <= T:
                idx = v[:, 0] + v[:, 1] * (res + 1) + v[:, 2] * (res + 1) ** 2
            else:
                h = (v[:, 0] * PRIMES[0]) ^ (v[:, 1] * PRIMES[1]) ^ (v[:, 2] * PRIMES[2])
                idx = (h % 2**32) % T  # tiny-cuda-nn's uint32 arithmetic
            w = torch.where(bit.bool(), frac, 1 - frac).prod(-1)
            feat = feat + w[:, None] * grid.table[offset + idx]
        out.append(feat)
        offset += size
    return torch.cat(out, dim=-1)


def test_hashgrid_matches_naive_and_has_dense_and_hashed_levels():
    torch.manual_seed(0)
    grid = HashGrid(TINY_GRID)
    with torch.no_grad():
        grid.table.normal_()  # O(1) values so any mismatch shows
    assert 0 < grid.num_dense < TINY_GRID.levels
    x = torch.cat([torch.rand(500, 3), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]])])
    fast = grid(x)
    assert fast.shape == (503, TINY_GRID.levels * TINY_GRID.features_per_level)
    torch.testing.assert_close(fast, naive_hashgrid(grid, x), rtol=1e-5, atol=1e-5)


def test_hashgrid_gradients_reach_table_and_input():
    torch.manual_seed(0)
    grid = HashGrid(TINY_GRID).double()
    x = torch.rand(3, 3, dtype=torch.float64) * 0.8 + 0.1
    grid(x).square().sum().backward()
    touched = (grid.table.grad.abs().sum(-1) > 0).sum()
    assert 0 < touched <= 3 * 8 * TINY_GRID.levels
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: grid(p), (x,), eps=1e-6, atol=1e-5)


# --- fields ----------------------------------------------------------------------------

def test_sphere_prior_init_is_exact_sphere_with_unit_gradients():
    torch.manual_seed(0)
    geo = tiny_field().geometry
    x = (torch.rand(400, 3) * 2 - 1) * 0.75
    out = geo(x)
    torch.testing.assert_close(out.sdf, x.norm(dim=-1) - RADIUS, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.grad.norm(dim=-1), torch.ones(400), rtol=0, atol=1e-4)
    assert out.feature.shape == (400, 7) and out.grad.shape == (400, 3)


def test_idr_init_is_a_rough_sphere():
    torch.manual_seed(0)
    geo = SDFNetwork(FieldConfig(hashgrid=TINY_GRID, sdf_hidden=128, sdf_layers=1,
                                 geometric_init="idr", sphere_radius=RADIUS))
    x = (torch.rand(2000, 3) * 2 - 1) * 0.75
    out = geo(x)
    r = x.norm(dim=-1)
    assert (out.sdf[r < 0.1] < 0).all() and (out.sdf[r > 0.75] > 0).all()
    assert (out.sdf - (r - RADIUS)).abs().mean() < 0.1
    assert (out.grad.norm(dim=-1) - 1).abs().mean() < 0.25


def test_finite_difference_gradient_matches_analytic_and_level_masking():
    torch.manual_seed(0)
    x = (torch.rand(50, 3) * 2 - 1) * 0.6
    ana = tiny_field().geometry
    fd = tiny_field(grad_type="finite_difference").geometry
    fd.load_state_dict(ana.state_dict())
    torch.testing.assert_close(fd(x).grad, ana(x).grad, rtol=0, atol=2e-3)

    prog = tiny_field(level_start=1, level_every=10).geometry
    F = TINY_GRID.features_per_level
    assert int(prog.level_mask.sum()) == F
    prog.update_step(25)
    assert int(prog.level_mask.sum()) == 3 * F


def test_field_outputs_and_no_grad_eval():
    torch.manual_seed(0)
    field = tiny_field()
    x = torch.rand(10, 3) - 0.5
    d = torch.nn.functional.normalize(torch.randn(10, 3), dim=-1)
    out = field(x, d, torch.randint(0, 4, (10,)))
    assert out.rgb.shape == (10, 3) and ((out.rgb > 0) & (out.rgb < 1)).all()
    torch.testing.assert_close(out.conflict, torch.full((10,), 0.05), rtol=0, atol=1e-6)
    with torch.no_grad():  # analytic normals still work, and nothing keeps a graph
        ev = field(x, d, None)
    assert ev.sdf.grad_fn is None and ev.grad.grad_fn is None
    torch.testing.assert_close(ev.grad, out.grad)
    assert sh_encode(d).shape == (10, 16)


# --- rendering and occupancy ---------------------------------------------------------

def test_render_sphere_matches_analytic_intersection():
    torch.manual_seed(0)
    renderer = tiny_renderer(occupancy=False).eval()
    _, o, d, view = camera_rays()
    out = renderer(o, d, view)
    impact, t_hit = sphere_hits(o, d)
    hit, miss = impact < 0.9 * RADIUS, impact > 1.1 * RADIUS
    assert hit.sum() > 50 and miss.sum() > 50
    assert out.opacity[hit].min() > 0.99 and out.opacity[miss].max() < 0.01
    assert (out.depth[hit] - t_hit[hit]).abs().max() < 0.01
    torch.testing.assert_close(out.rgb[miss], torch.ones(int(miss.sum()), 3), rtol=0, atol=0.01)
    # Rendered normals point back at the camera on hit rays.
    assert ((torch.nn.functional.normalize(out.normal[hit], dim=-1) * d[hit]).sum(-1) < -0.3).all()
    for name in ("rgb", "normal", "opacity", "depth", "conflict"):
        assert getattr(out, name).shape[0] == o.shape[0]
    assert out.sdf_grad.shape == (out.num_samples, 3)


def test_occupancy_grid_marks_the_surface_and_prunes_samples():
    torch.manual_seed(0)
    plain = tiny_renderer(occupancy=False).eval()
    pruned = tiny_renderer(field=plain.field).eval()
    pruned.update_occupancy()
    occ = pruned.occupancy
    centres = occ.cell_centres()
    dist = (centres.norm(dim=-1) - RADIUS).abs()
    assert occ.occ[dist < occ.cell_size / 2].all()  # cells the sphere passes through
    assert not occ.occ[dist > 0.25].any()  # far outside and deep inside: skipped
    assert occ.occupied_fraction < 0.3
    _, o, d, view = camera_rays()
    a, b = plain(o, d, view), pruned(o, d, view)
    assert b.num_samples < 0.5 * a.num_samples
    torch.testing.assert_close(b.opacity, a.opacity, rtol=0, atol=0.01)
    torch.testing.assert_close(b.rgb, a.rgb, rtol=0, atol=0.01)
    # All rays miss: white, nothing sampled.
    far = pruned(torch.tensor([[0.0, -3.0, 2.0]]), torch.tensor([[0.0, 0.0, 1.0]]), view[:1])
    assert far.num_samples == 0 and torch.equal(far.rgb, torch.ones(1, 3))
    assert pruned.occupancy.maybe_update(16, pruned.field.geometry.sdf, 20.0, 0.01)
    assert not pruned.occupancy.maybe_update(17, pruned.field.geometry.sdf, 20.0, 0.01)


def test_conflict_is_trusted_on_input_view_and_chunked_render_matches():
    torch.manual_seed(0)
    renderer = tiny_renderer(chunk=100).eval()
    _, o, d, view = camera_rays(res=8)
    out = renderer(o, d, view)
    impact, _ = sphere_hits(o, d)
    hit = impact < 0.9 * RADIUS
    assert (out.conflict[view == 0] == 0).all()
    torch.testing.assert_close(out.conflict[hit & (view > 0)], 0.05 * out.opacity[hit & (view > 0)],
                               rtol=0, atol=1e-4)
    chunked = renderer.render_chunked(o, d, view)
    torch.testing.assert_close(chunked.rgb, out.rgb.detach())
    torch.testing.assert_close(chunked.depth, out.depth.detach())
    # Conflict gradients stay in the conflict network (detached inputs and weights).
    renderer.train()
    renderer(o, d, view).conflict.sum().backward()
    assert renderer.field.conflict_net[-1].bias.grad.abs() > 0
    assert all(p.grad is None or not p.grad.any() for p in renderer.field.geometry.parameters())


# --- poses -----------------------------------------------------------------------------

def test_rays_for_pixels_matches_pixel_rays():
    cams = orbit_cameras(OrbitSpec(num_views=3, resolution=6, elevation_deg=20.0))
    o, d = pixel_rays(cams.c2w, cams.K, 6, 6)
    j, i = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    pix = torch.stack([i, j], -1).reshape(-1, 2) + 0.5
    view = torch.arange(3).repeat_interleave(36)
    ro, rd = rays_for_pixels(cams.c2w[view], cams.K[view], pix.repeat(3, 1))
    torch.testing.assert_close(ro, o.reshape(-1, 3))
    torch.testing.assert_close(rd, d.reshape(-1, 3), rtol=0, atol=1e-6)


def test_se3_exp_and_pose_error():
    R = so3_exp(torch.tensor([0.0, 0.0, math.pi / 2]))
    torch.testing.assert_close(R @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]),
                               rtol=0, atol=1e-6)
    T = se3_from_vector(torch.tensor([[0.1, -0.2, 0.3, 0.01, 0.02, 0.03]]))
    torch.testing.assert_close(T[0, :3, :3] @ T[0, :3, :3].T, torch.eye(3), rtol=0, atol=1e-6)
    c2w = look_at_c2w(torch.tensor([[0.0, -1.5, 0.0]]))
    rot_deg, trans = pose_error(c2w, c2w @ T)
    assert abs(float(rot_deg) - math.degrees(math.sqrt(0.14))) < 1e-3
    assert abs(float(trans) - math.sqrt(0.0014)) < 1e-6


def test_pose_refiner_identity_fixed_view_and_gradients_through_rays():
    torch.manual_seed(0)
    cams, _, _, _ = camera_rays(res=8)
    refiner = PoseRefiner(4, fixed_view=0, start_step=5)
    torch.testing.assert_close(refiner(cams.c2w), cams.c2w)
    with torch.no_grad():
        refiner.delta.normal_(0, 0.01)
    assert refiner(cams.c2w, step=4) is cams.c2w  # disabled before start_step
    refined = refiner(cams.c2w, step=5)
    torch.testing.assert_close(refined[0], cams.c2w[0])  # input view never moves
    assert not torch.allclose(refined[1:], cams.c2w[1:])

    renderer = tiny_renderer(occupancy=False, num_steps=64)
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    view = torch.arange(4).repeat_interleave(16)
    pix = torch.full((64, 2), 4.0) + torch.randn(64, 2)  # around the image centre: on the sphere
    o, d = rays_for_pixels(refiner(cams.c2w)[view], cams.K[view], pix)
    renderer(o, d, view).rgb.sum().backward()
    grad = refiner.delta.grad
    assert (grad[0] == 0).all() and (grad[1:].abs().sum(-1) > 0).all()
    before = refiner.delta.detach().clone()
    opt.step()
    assert torch.equal(refiner.delta[0], before[0])
    torch.testing.assert_close(refiner(cams.c2w)[0], cams.c2w[0])
    rot, trans = pose_error(refiner(cams.c2w), cams.c2w)
    assert rot[0] < 1e-3 and trans[0] < 1e-6 and (rot[1:] > 0).all()


@pytest.mark.parametrize("mode", ["none", "affine", "mlp"])
def test_color_view_modes(mode):
    """How much a view may change the colours: nothing ("none"), a colour transform that is the
    identity at init and always for the reference view ("affine"), anything ("mlp")."""
    torch.manual_seed(0)
    field = tiny_field(color_view_mode=mode)
    p = torch.rand(32, 3) - 0.5
    n = torch.nn.functional.normalize(torch.randn(32, 3), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(32, 3), dim=-1)
    feat = torch.randn(32, 7)

    def rgb(view):
        return field.color(p, n, d, feat, torch.full((32,), view))

    if mode == "affine":
        torch.testing.assert_close(rgb(2), rgb(0))  # identity at init
        with torch.no_grad():
            field.view_embedding.weight.normal_(0, 0.2)
        transform = field.view_embedding.weight[2].view(3, 4).detach()
        base = rgb(0)  # the reference view stays the identity
        torch.testing.assert_close(rgb(2), base + base @ transform[:, :3].T + transform[:, 3])
    elif mode == "none":
        assert field.view_embedding is None
        torch.testing.assert_close(rgb(2), rgb(0))
    else:
        assert not torch.allclose(rgb(2), rgb(0))
    with pytest.raises(ValueError, match="color_view_mode"):
        tiny_field(color_view_mode="per_view")


def test_pose_refiner_without_depth_keeps_the_distance_along_the_viewing_axis():
    cams, _, _, _ = camera_rays(res=8)
    refiner = PoseRefiner(4, fixed_view=0, refine_depth=False)
    with torch.no_grad():
        refiner.delta.copy_(torch.tensor([0.0, 0.0, 0.0, 0.01, -0.02, 0.05]).expand(4, 6))
    refined = refiner(cams.c2w)
    shift = refined[1:, :3, 3] - cams.c2w[1:, :3, 3]  # world units
    back = cams.c2w[1:, :3, 2]  # opengl camera z (pointing away from the object), world frame
    assert (shift * back).sum(-1).abs().max() < 1e-6  # nothing along the viewing axis ...
    torch.testing.assert_close(shift.norm(dim=-1), torch.full((3,), 0.05 ** 0.5 * 0.1), atol=1e-6, rtol=0)  # ... x, y kept
    assert torch.equal(refined[0], cams.c2w[0])


# --- end to end ------------------------------------------------------------------------

def test_fitting_box_masks_lowers_mask_loss():
    torch.manual_seed(0)
    renderer = tiny_renderer(num_steps=64, variance_init=0.3, occupancy=OccupancyConfig(resolution=16, update_every=5))
    _, o, d, view = camera_rays(res=12)
    _, _, target = ray_aabb(o, d, 0.25)  # silhouettes of the box [-0.25, 0.25]^3
    target = target.float()
    bce = torch.nn.functional.binary_cross_entropy

    def mask_loss():
        renderer.eval()
        with torch.no_grad():
            opacity = renderer(o, d, view).opacity
        renderer.train()
        return float(bce(opacity.clamp(1e-4, 1 - 1e-4), target)), ((opacity > 0.5) == (target > 0)).float().mean()

    opt = torch.optim.Adam(renderer.parameters(), lr=1e-2)
    start, start_acc = mask_loss()
    for step in range(25):
        renderer.update_step(step)
        idx = torch.randint(0, o.shape[0], (128,))
        out = renderer(o[idx], d[idx], view[idx])
        eik = (out.sdf_grad.norm(dim=-1) - 1).square().mean()
        loss = bce(out.opacity.clamp(1e-4, 1 - 1e-4), target[idx]) + 0.1 * eik
        opt.zero_grad()
        loss.backward()
        opt.step()
    end, end_acc = mask_loss()
    assert end < 0.5 * start and end_acc > max(start_acc, 0.95)


@pytest.mark.gpu
def test_render_on_gpu_matches_cpu():
    torch.manual_seed(0)
    renderer = tiny_renderer().eval()
    renderer.update_occupancy()
    _, o, d, view = camera_rays(res=8)
    cpu = renderer(o, d, view)
    gpu = renderer.cuda()(o.cuda(), d.cuda(), view.cuda())
    torch.testing.assert_close(gpu.rgb.cpu(), cpu.rgb, rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu.opacity.cpu(), cpu.opacity, rtol=0, atol=1e-4)
