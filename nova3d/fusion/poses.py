"""Per-view camera pose refinement (DESIGN.md §4 "Pose refinement") and rays for pixels.

Each view v gets a correction xi_v = (omega, tau) in R^6: a rotation vector and a
translation, mapped to SE(3) as SO(3) x R^3 (Rodrigues for omega, tau used as is; the
"SO3xR3" mode of nerfstudio's CameraOptimizer). Corrections are RIGHT-multiplied,
c2w' = c2w @ T(xi): they act in the camera's own (opengl) axes, i.e. the camera turns
about its own centre and moves along its own right/up/back axes. Corrections start at zero
(identity) and the input view's stays zero: it is masked out of the forward pass, so its
gradient is exactly zero and no optimiser can move it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nova3d.cameras import convert_c2w


def skew(w: Tensor) -> Tensor:
    """[..., 3] -> [..., 3, 3] cross-product matrices."""
    x, y, z = w.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).reshape(*w.shape[:-1], 3, 3)


def so3_exp(omega: Tensor) -> Tensor:
    """Rotation vectors [..., 3] -> rotation matrices [..., 3, 3] (Rodrigues, safe at 0)."""
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    small = theta2 < 1e-8
    # Taylor series near 0 keep values and gradients finite (the other branch is unused there).
    safe2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe2.sqrt()
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / safe2)
    W = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a * W + b * (W @ W)


def se3_from_vector(xi: Tensor) -> Tensor:
    """[..., 6] (omega, tau) -> [..., 4, 4] rigid transforms [[exp(omega), tau], [0, 1]]."""
    top = torch.cat([so3_exp(xi[..., :3]), xi[..., 3:, None]], dim=-1)  # [..., 3, 4]
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=xi.dtype, device=xi.device)
    return torch.cat([top, bottom.expand(*xi.shape[:-1], 1, 4)], dim=-2)


class PoseRefiner(nn.Module):
    """Learned SE(3) corrections of `num_views` cameras; `fixed_view` never moves."""

    def __init__(self, num_views: int, fixed_view: int | None = 0, start_step: int = 0,
                 refine_depth: bool = True):
        """refine_depth False: no translation along the camera's viewing axis. For cameras
        looking at the object that is the distance to it, which trades off against the
        object's scale (a gauge the views cannot fix): left free it drifts (measured: cameras
        moved outwards by 0.011 on average where the perturbation had none)."""
        super().__init__()
        self.start_step = start_step
        self.delta = nn.Parameter(torch.zeros(num_views, 6))
        mask = torch.ones(num_views, 6)
        if fixed_view is not None:
            mask[fixed_view] = 0.0
        if not refine_depth:
            mask[:, 5] = 0.0  # opengl camera z (back)
        self.register_buffer("mask", mask, persistent=False)

    def enabled(self, step: int | None) -> bool:
        return step is None or step >= self.start_step

    def corrections(self) -> Tensor:
        """[V, 4, 4] the current corrections (identity for the fixed view)."""
        return se3_from_vector(self.delta * self.mask)

    def forward(self, c2w: Tensor, step: int | None = None) -> Tensor:
        """c2w [V, 4, 4] (opengl) -> refined [V, 4, 4]; unchanged before `start_step`."""
        if not self.enabled(step):
            return c2w
        return c2w @ self.corrections().to(c2w)


def rays_for_pixels(c2w: Tensor, K: Tensor, pix: Tensor) -> tuple[Tensor, Tensor]:
    """Rays through arbitrary pixel positions, differentiable w.r.t. c2w.

    c2w [N, 4, 4] (opengl) and K [N, 3, 3] are each ray's camera (index the view tensors
    with the rays' view ids); pix [N, 2] are pixel coordinates (x right, y down, pixel-edge
    origin as nova3d.cameras: the centre of pixel (i, j) is (i + 0.5, j + 0.5)).
    Returns origins and unit directions, each [N, 3]; at pixel centres they equal
    nova3d.cameras.pixel_rays.
    """
    cv = convert_c2w(c2w, "opengl", "opencv")  # pinhole back-projection is K^-1 in OpenCV axes
    uv1 = torch.cat([pix, torch.ones_like(pix[:, :1])], dim=-1)[..., None]
    d_cam = torch.linalg.solve_triangular(K.to(pix), uv1, upper=True)  # [N, 3, 1]
    dirs = nn.functional.normalize((cv[:, :3, :3] @ d_cam)[..., 0], dim=-1)
    return cv[:, :3, 3], dirs


def pose_error(c2w_a: Tensor, c2w_b: Tensor) -> tuple[Tensor, Tensor]:
    """[V, 4, 4] x2 -> rotation angle between them in degrees [V], camera-centre distance [V]."""
    R = c2w_a[..., :3, :3].transpose(-1, -2) @ c2w_b[..., :3, :3]
    cos = (R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0
    # atan2(sin, cos) stays accurate for small angles, where acos(cos) loses them in float32.
    sin = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                       R[..., 1, 0] - R[..., 0, 1]], dim=-1).norm(dim=-1) / 2.0
    return torch.rad2deg(torch.atan2(sin, cos)), (c2w_a[..., :3, 3] - c2w_b[..., :3, 3]).norm(dim=-1)
