"""The fields of de-conflict fusion (DESIGN.md §4): SDF, colour and conflict networks.

World units throughout: the object sits in the unit box centred at 0 and the field covers
the cube [-bound, bound]^3. Positions enter the networks as x / bound (in [-1, 1]) and the
hash grid as (x / bound + 1) / 2 (in [0, 1]). SDF > 0 outside, < 0 inside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nova3d.fusion.hashgrid import HashGrid, HashGridConfig


@dataclass
class FieldConfig:
    num_views: int = 16
    bound: float = 0.75  # half-size of the field's cube; cameras at radius 1.5 stay outside it
    hashgrid: HashGridConfig = field(default_factory=HashGridConfig)
    # SDF network: [x / bound, hash features] -> MLP -> (sdf, geometry feature)
    sdf_hidden: int = 64
    sdf_layers: int = 2  # hidden layers
    feature_dim: int = 15
    sphere_radius: float = 0.4  # geometric init: sdf ~ |x| - r (world units)
    # "prior": sdf = MLP + (|x| - r) with the MLP's sdf output zero at init (threestudio's
    # sdf_bias="sphere"): exactly a sphere with unit gradients at step 0. "idr": IDR /
    # instant-nsr-pl weight init, a sphere only on average over random weights (with 64 hidden
    # units its radius varies by ~15% with direction).
    geometric_init: str = "prior"
    grad_type: str = "analytic"  # "analytic" (double backward) or "finite_difference"
    fd_eps: float = 1e-3  # world units, central differences
    # Progressive level masking (instant-nsr-pl ProgressiveBandHashGrid): `level_start` levels
    # active at step 0, one more every `level_every` steps; None = all levels from the start.
    level_start: int | None = None
    level_every: int = 500
    # Colour network: [x / bound, normal, SH(view dir), geometry feature (, view embedding)] -> rgb
    color_hidden: int = 64
    color_layers: int = 2
    view_embed_dim: int = 8
    # How a view's learned embedding shapes its colours (COLOR_VIEW_MODES):
    #   "affine": a per-view colour transform rgb -> A_v rgb + b_v (exposure / white balance),
    #             identity at init and fixed for the reference view; it explains global colour
    #             changes, never local ones, so a local disagreement stays an error;
    #   "mlp":    the embedding is a colour-net input (NeRF-W's appearance code): a view can
    #             explain away any disagreement, local ones included, so conflicts never show;
    #   "none":   one colour field for all views.
    color_view_mode: str = "mlp"
    sh_degree: int = 4  # 16 coefficients, as instant-nsr-pl's SphericalHarmonics encoding
    # Conflict network: [rgb, geometry feature, SH(ray dir), view embedding, x / bound] -> (0, 1)
    conflict_hidden: int = 32
    conflict_layers: int = 2
    conflict_init: float = 0.05  # every sample starts (almost) trusted
    # The conflict net only reads the state of the other networks: with detached inputs the
    # down-weighted colour loss cannot reshape colour or geometry to look conflicting.
    conflict_detach: bool = True
    reference_view: int = 0  # whose embedding colours points seen from no particular view


@dataclass
class GeometryOutput:
    sdf: Tensor  # [P]
    feature: Tensor  # [P, feature_dim]
    grad: Tensor | None  # [P, 3] d sdf / d x in world units (None when not asked for)


@dataclass
class FieldOutput:
    sdf: Tensor  # [P]
    grad: Tensor  # [P, 3]
    normal: Tensor  # [P, 3] grad / |grad|
    feature: Tensor  # [P, feature_dim]
    rgb: Tensor  # [P, 3] in (0, 1)
    conflict: Tensor  # [P] in (0, 1)


def sh_encode(dirs: Tensor, degree: int = 4) -> Tensor:
    """Real spherical harmonics of unit directions [P, 3] -> [P, degree^2] (degree 1..4)."""
    if not 1 <= degree <= 4:
        raise ValueError(f"sh_degree must be 1..4, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, 0.28209479177387814)]
    if degree > 1:
        out += [-0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
                0.31539156525252005 * (2 * zz - xx - yy), -1.0925484305920792 * x * z,
                0.5462742152960396 * (xx - yy)]
    if degree > 3:
        out += [-0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * x * y * z,
                -0.4570457994644658 * y * (4 * zz - xx - yy),
                0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
                -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
                -0.5900435899266435 * x * (xx - 3 * yy)]
    return torch.stack(out, dim=-1)


def mlp(dim_in: int, hidden: int, layers: int, dim_out: int, act: type[nn.Module] = nn.ReLU,
        **act_kwargs) -> nn.Sequential:
    """`layers` hidden layers of width `hidden`, linear output."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(dim_in if i == 0 else hidden, hidden), act(**act_kwargs)]
    mods.append(nn.Linear(hidden if layers else dim_in, dim_out))
    return nn.Sequential(*mods)


class SDFNetwork(nn.Module):
    """Hash grid + MLP with IDR geometric initialisation (sdf ~ |x| - r at step 0)."""

    def __init__(self, cfg: FieldConfig):
        super().__init__()
        self.cfg = cfg
        self.encoding = HashGrid(cfg.hashgrid)
        # Softplus(beta=100): a smooth ReLU, so second derivatives (eikonal) exist (NeuS, IDR).
        self.net = mlp(3 + self.encoding.output_dim, cfg.sdf_hidden, cfg.sdf_layers,
                       1 + cfg.feature_dim, nn.Softplus, beta=100)
        self.register_buffer("level_mask", torch.ones(self.encoding.output_dim), persistent=False)
        if cfg.geometric_init == "idr":
            self._idr_init()
        elif cfg.geometric_init == "prior":
            nn.init.zeros_(self.net[-1].weight[:1])
            nn.init.zeros_(self.net[-1].bias[:1])
        else:
            raise ValueError(f"unknown geometric_init {cfg.geometric_init!r}; expected 'prior' or 'idr'")
        self.update_step(0)

    @torch.no_grad()
    def _idr_init(self) -> None:
        # IDR / instant-nsr-pl sphere init. Hidden layers see only the raw coordinates at
        # first (hash-feature weights zero), so the network is |x / bound| * c - r with c ~ 1
        # on average; scaling the last layer by `bound` gives |x| - r in world units.
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        for i, layer in enumerate(linears[:-1]):
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2) / math.sqrt(layer.out_features))
            nn.init.zeros_(layer.bias)
            if i == 0:
                layer.weight[:, 3:] = 0.0
        last = linears[-1]
        nn.init.normal_(last.weight[:1], math.sqrt(math.pi) / math.sqrt(last.in_features) * self.cfg.bound,
                        1e-4)
        last.bias[:1] = -self.cfg.sphere_radius

    def update_step(self, step: int) -> None:
        """Progressive level masking: levels beyond the current one contribute zeros."""
        cfg, hg = self.cfg, self.cfg.hashgrid
        if cfg.level_start is None:
            active = hg.levels
        else:
            active = min(hg.levels, cfg.level_start + max(step, 0) // max(cfg.level_every, 1))
        self.level_mask.zero_()[: active * hg.features_per_level] = 1.0

    def _eval(self, points: Tensor) -> tuple[Tensor, Tensor]:
        xn = points / self.cfg.bound
        enc = self.encoding((xn + 1.0) / 2.0) * self.level_mask
        out = self.net(torch.cat([xn, enc], dim=-1))
        sdf = out[:, 0]
        if self.cfg.geometric_init == "prior":
            sdf = sdf + points.norm(dim=-1) - self.cfg.sphere_radius
        return sdf, out[:, 1:]

    def sdf(self, points: Tensor) -> Tensor:
        """[P, 3] -> [P]: SDF only (occupancy updates, marching cubes)."""
        return self._eval(points)[0]

    def forward(self, points: Tensor, with_grad: bool = True) -> GeometryOutput:
        """points [P, 3] world -> GeometryOutput. Graphs for higher-order gradients are built
        only when grad mode is on (training); under no_grad the outputs are detached."""
        if not with_grad:
            return GeometryOutput(*self._eval(points), None)
        if self.cfg.grad_type == "finite_difference":
            return self._forward_fd(points)
        if self.cfg.grad_type != "analytic":
            raise ValueError(f"unknown grad_type {self.cfg.grad_type!r}")
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Points carrying pose gradients are differentiated as they are; plain ones get a leaf.
            x = points if points.requires_grad else points.detach().requires_grad_(True)
            sdf, feature = self._eval(x)
            (grad,) = torch.autograd.grad(sdf, x, torch.ones_like(sdf), create_graph=create_graph)
        if not create_graph:
            sdf, feature = sdf.detach(), feature.detach()
        return GeometryOutput(sdf, feature, grad)

    def _forward_fd(self, points: Tensor) -> GeometryOutput:
        eps = self.cfg.fd_eps
        offsets = torch.cat([torch.eye(3), -torch.eye(3)]).to(points) * eps  # [6, 3]
        sdf, feature = self._eval(points)
        shifted = self.sdf((points[:, None, :] + offsets).reshape(-1, 3)).view(-1, 2, 3)
        return GeometryOutput(sdf, feature, (shifted[:, 0] - shifted[:, 1]) / (2 * eps))


COLOR_VIEW_MODES = ("affine", "mlp", "none")


class FusionField(nn.Module):
    """SDF, colour and conflict networks with per-view embeddings."""

    def __init__(self, cfg: FieldConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or FieldConfig()
        if cfg.color_view_mode not in COLOR_VIEW_MODES:
            raise ValueError(f"field.color_view_mode must be one of {list(COLOR_VIEW_MODES)}, "
                             f"got {cfg.color_view_mode!r}")
        self.geometry = SDFNetwork(cfg)
        sh = cfg.sh_degree**2
        # The colour side's per-view embedding: a colour-net input ("mlp") or the rows of a
        # per-view [3, 4] colour transform ("affine", zero = identity); none for "none".
        embed_dim = {"mlp": cfg.view_embed_dim, "affine": 12, "none": 0}[cfg.color_view_mode]
        self.view_embedding = nn.Embedding(cfg.num_views, embed_dim) if embed_dim else None
        # Its own embedding: the conflict net's gradients never touch the colour's.
        self.conflict_embedding = nn.Embedding(cfg.num_views, cfg.view_embed_dim)
        nn.init.normal_(self.conflict_embedding.weight, 0.0, 0.1)
        if cfg.color_view_mode == "mlp":
            nn.init.normal_(self.view_embedding.weight, 0.0, 0.1)
        elif cfg.color_view_mode == "affine":
            nn.init.zeros_(self.view_embedding.weight)
        mlp_embed = cfg.view_embed_dim if cfg.color_view_mode == "mlp" else 0
        self.color_net = mlp(6 + sh + cfg.feature_dim + mlp_embed, cfg.color_hidden, cfg.color_layers, 3)
        self.conflict_net = mlp(3 + cfg.feature_dim + sh + cfg.view_embed_dim + 3,
                                cfg.conflict_hidden, cfg.conflict_layers, 1)
        # Zero last weights: conflict starts at `conflict_init` everywhere and still learns.
        last = self.conflict_net[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(cfg.conflict_init / (1 - cfg.conflict_init)))

    def update_step(self, step: int) -> None:
        self.geometry.update_step(step)

    def _views(self, view: Tensor | None, n: int, device: torch.device) -> Tensor:
        if view is None:
            return torch.full((n,), self.cfg.reference_view, dtype=torch.long, device=device)
        return view.long()

    def color_parameters(self) -> list[nn.Parameter]:
        return [*self.color_net.parameters(),
                *(self.view_embedding.parameters() if self.view_embedding is not None else [])]

    def conflict_parameters(self) -> list[nn.Parameter]:
        return [*self.conflict_net.parameters(), *self.conflict_embedding.parameters()]

    def color(self, points: Tensor, normals: Tensor, dirs: Tensor, feature: Tensor,
              view: Tensor | None = None) -> Tensor:
        """[P, 3] x3, [P, F], view [P] (None: reference view) -> rgb [P, 3] (in (0, 1) except
        where an "affine" view transform leads out of it; the reference view's never does)."""
        mode = self.cfg.color_view_mode
        views = self._views(view, points.shape[0], points.device)
        x = [points / self.cfg.bound, normals, sh_encode(dirs, self.cfg.sh_degree), feature]
        if mode == "mlp":
            x.append(self.view_embedding(views))
        rgb = torch.sigmoid(self.color_net(torch.cat(x, dim=-1)))
        if mode == "affine":
            # The reference view's colours define the texture: its transform stays the identity.
            delta = self.view_embedding(views).view(-1, 3, 4) * (views != self.cfg.reference_view)[:, None, None]
            rgb = rgb + (delta[..., :3] @ rgb[..., None])[..., 0] + delta[..., 3]
        return rgb

    def conflict(self, rgb: Tensor, feature: Tensor, dirs: Tensor, points: Tensor,
                 view: Tensor | None = None) -> Tensor:
        """rgb [P, 3], feature [P, F], ray dirs [P, 3], points [P, 3], view [P] -> [P] in (0, 1)."""
        if self.cfg.conflict_detach:
            rgb, feature, dirs, points = rgb.detach(), feature.detach(), dirs.detach(), points.detach()
        emb = self.conflict_embedding(self._views(view, points.shape[0], points.device))
        x = torch.cat([rgb, feature, sh_encode(dirs, self.cfg.sh_degree), emb,
                       points / self.cfg.bound], dim=-1)
        return torch.sigmoid(self.conflict_net(x)).squeeze(-1)

    def forward(self, points: Tensor, dirs: Tensor, view: Tensor | None = None) -> FieldOutput:
        """Samples [P, 3] on rays with unit directions [P, 3] from views [P] -> FieldOutput."""
        geo = self.geometry(points, with_grad=True)
        normal = nn.functional.normalize(geo.grad, dim=-1)
        rgb = self.color(points, normal, dirs, geo.feature, view)
        conflict = self.conflict(rgb, geo.feature, dirs, points, view)
        return FieldOutput(geo.sdf, geo.grad, normal, geo.feature, rgb, conflict)
