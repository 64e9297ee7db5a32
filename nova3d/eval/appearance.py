"""Image metrics between rendered and reference views: PSNR, SSIM, LPIPS.

Protocol (DESIGN.md §4): every view composited on white, 256^2, values in [0, 1].
PSNR comes from torchmetrics with data_range = 1, per view, capped at `psnr_max_db` (default
100 dB, i.e. MSE 1e-10): identical views would give inf, and one identical object would turn the
set's mean into inf; the number of capped views is recorded. SSIM (11x11 Gaussian, sigma 1.5),
per view then averaged, in one of two variants (the protocol names it):
  "torchmetrics"       torchmetrics 1.9 with data_range = 1 and no border crop (the SSIM map over
                       the whole reflect-padded image, as torchmetrics computes it since 2024);
  "torchmetrics_2023"  what SyncDreamer's eval_nvs.py got from `structural_similarity_index_measure
                       (pr, gt)` with the 2023 torchmetrics defaults: data range inferred per image
                       pair (max of the two images' max - min) and the SSIM map cropped by the 5-px
                       padding border before averaging. Differs by a few percent, either way
                       (docs/evaluation.md).
LPIPS is torchmetrics' LearnedPerceptualImagePatchSimilarity(net_type="vgg", normalize=True).
Its linear heads ship inside torchmetrics, but its VGG16 backbone is torchvision's ImageNet
checkpoint, fetched into the torch hub cache on first use. With no network here that fetch
cannot happen, so we look for the cached file first and never let torchvision try: without
it, LPIPS is reported as unavailable with the reason, never as a made-up number.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from nova3d.errors import Nova3DError

LpipsFn = Callable[[Tensor, Tensor], Tensor]  # ([V, 3, H, W], [V, 3, H, W]) in [0, 1] -> [V]
LPIPS_NET = "vgg"
_TV_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def composite(rgb: Tensor, alpha: Tensor, background: float = 1.0) -> Tensor:
    """Straight-alpha rgb [V, 3, H, W] over a grey level (1 = white) using alpha [V, 1, H, W]."""
    return rgb * alpha + background * (1 - alpha)


def lpips_backbone_path(net_type: str = LPIPS_NET) -> str:
    """Where torchvision caches the backbone checkpoint LPIPS(net_type) needs."""
    import torchvision

    url = getattr(torchvision.models, _TV_WEIGHTS[net_type]).DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def load_lpips(net_type: str = LPIPS_NET, device: str | torch.device = "cpu") -> tuple[LpipsFn | None, str | None]:
    """(LPIPS function, None) when its weights are available locally, else (None, reason).

    Never downloads: the torchmetrics module is only built once the backbone is in the cache.
    """
    path = lpips_backbone_path(net_type)
    if not os.path.isfile(path):
        return None, (f"LPIPS({net_type}) backbone weights are not in the torch hub cache ({path}) "
                      "and cannot be downloaded here; LPIPS not computed")
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True,
                                                       reduction="none").to(device)
    except Exception as err:  # a corrupt or partial checkpoint, a missing package
        return None, f"LPIPS({net_type}) could not be loaded from {path}: {type(err).__name__}: {err}"

    @torch.no_grad()
    def lpips(pred: Tensor, gt: Tensor) -> Tensor:
        metric.reset()
        return metric(pred.to(device), gt.to(device)).reshape(-1).cpu()

    return lpips, None


SSIM_VARIANTS = ("torchmetrics", "torchmetrics_2023")
PSNR_MAX_DB = 100.0
_SSIM_2023_CROP = 5  # (11 - 1) // 2: the reflect padding the 2023 code cropped off again


@dataclass(frozen=True)
class AppearanceResult:
    psnr: float  # mean over views of per-view PSNR (dB), each capped at psnr_max_db
    ssim: float
    lpips: float | None  # None when unavailable; see lpips_unavailable_reason
    lpips_unavailable_reason: str | None
    psnr_per_view: list[float]
    ssim_per_view: list[float]
    lpips_per_view: list[float] | None
    num_views: int
    image_size: tuple[int, int]  # (H, W)
    lpips_net: str = LPIPS_NET
    ssim_variant: str = "torchmetrics"
    psnr_max_db: float | None = PSNR_MAX_DB
    psnr_capped_views: int = 0  # views whose PSNR reached the cap (identical or nearly)
    views: list[int] | None = None  # which views were compared (None: all)

    def to_json(self) -> dict:
        out = asdict(self)
        # JSON has no inf: identical images give PSNR = inf, written as the string "inf".
        out["psnr"] = _json_float(self.psnr)
        out["psnr_per_view"] = [_json_float(x) for x in self.psnr_per_view]
        return out


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _check_images(pred: Tensor, gt: Tensor) -> None:
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise Nova3DError(f"expected two [V, 3, H, W] image stacks of one shape, got "
                          f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    for name, img in (("pred", pred), ("gt", gt)):
        if img.min() < 0 or img.max() > 1:
            raise Nova3DError(f"{name} images must be in [0, 1] (composite on white first)")


def psnr_per_view(pred: Tensor, gt: Tensor, max_db: float | None = None) -> Tensor:
    """[V] PSNR in dB of [V, 3, H, W] images in [0, 1]; identical views give inf, or `max_db`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    psnr = peak_signal_noise_ratio(pred.double(), gt.double(), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3)).float()
    return psnr if max_db is None else psnr.clamp(max=max_db)


def ssim_per_view(pred: Tensor, gt: Tensor, variant: str = "torchmetrics") -> Tensor:
    """[V] SSIM of [V, 3, H, W] images in [0, 1] by `variant` (module docstring)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    # float32: torchmetrics' float64 path is ~40x slower on CPU for no useful precision.
    if variant == "torchmetrics":
        return structural_similarity_index_measure(pred.float(), gt.float(), data_range=1.0,
                                                   reduction="none")
    if variant != "torchmetrics_2023":
        raise ValueError(f"unknown SSIM variant {variant!r}; expected one of {', '.join(SSIM_VARIANTS)}")
    c = _SSIM_2023_CROP
    out = []
    for p, g in zip(pred.float(), gt.float()):  # the data range is inferred per image pair
        _, full = structural_similarity_index_measure(p[None], g[None], data_range=None,
                                                      return_full_image=True)
        out.append(full[..., c:-c, c:-c].mean())
    return torch.stack(out)


def appearance_metrics(pred: Tensor, gt: Tensor, lpips: LpipsFn | None | str = "auto",
                       batch_size: int = 8, ssim_variant: str = "torchmetrics",
                       psnr_max_db: float | None = PSNR_MAX_DB, views: list[int] | None = None) -> AppearanceResult:
    """PSNR, SSIM and LPIPS between pred and gt, each [V, 3, H, W] in [0, 1], composited.

    lpips: "auto" loads torchmetrics' VGG LPIPS if its weights are cached; a callable is used
    as is; None skips LPIPS (reported unavailable, "disabled"). `views`: only these indices.
    """
    _check_images(pred, gt)
    pred, gt = pred.float().cpu(), gt.float().cpu()
    if views is not None:
        pred, gt = pred[views], gt[views]
    psnr, ssim = psnr_per_view(pred, gt, psnr_max_db), ssim_per_view(pred, gt, ssim_variant)
    reason = None
    if isinstance(lpips, str):
        if lpips != "auto":
            raise ValueError(f"lpips must be 'auto', a callable or None, not {lpips!r}")
        lpips, reason = load_lpips()
    elif lpips is None:
        reason = "LPIPS disabled by the caller"
    lp = None
    if lpips is not None:
        lp = torch.cat([lpips(pred[i:i + batch_size], gt[i:i + batch_size]).reshape(-1).float()
                        for i in range(0, len(pred), batch_size)])
    return AppearanceResult(
        psnr=float(psnr.mean()), ssim=float(ssim.mean()),
        lpips=None if lp is None else float(lp.mean()), lpips_unavailable_reason=reason,
        psnr_per_view=psnr.tolist(), ssim_per_view=ssim.tolist(),
        lpips_per_view=None if lp is None else lp.tolist(),
        num_views=len(pred), image_size=(pred.shape[2], pred.shape[3]), ssim_variant=ssim_variant,
        psnr_max_db=psnr_max_db,
        psnr_capped_views=0 if psnr_max_db is None else int((psnr >= psnr_max_db).sum()), views=views)
