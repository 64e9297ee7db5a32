"""Image metrics between rendered and reference views: PSNR, SSIM, LPIPS.

Protocol (DESIGN.md §4): every view composited on white, 256^2, values in [0, 1].
PSNR and SSIM come from torchmetrics with data_range = 1 (SSIM: 11x11 Gaussian, sigma 1.5);
each is computed per view and then averaged over views (PSNR of identical views is inf).
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


@dataclass(frozen=True)
class AppearanceResult:
    psnr: float  # mean over views of per-view PSNR (dB)
    ssim: float
    lpips: float | None  # None when unavailable; see lpips_unavailable_reason
    lpips_unavailable_reason: str | None
    psnr_per_view: list[float]
    ssim_per_view: list[float]
    lpips_per_view: list[float] | None
    num_views: int
    image_size: tuple[int, int]  # (H, W)
    lpips_net: str = LPIPS_NET

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


def psnr_per_view(pred: Tensor, gt: Tensor) -> Tensor:
    """[V] PSNR in dB of [V, 3, H, W] images in [0, 1]; inf for identical views."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(pred.double(), gt.double(), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3)).float()


def ssim_per_view(pred: Tensor, gt: Tensor) -> Tensor:
    """[V] SSIM of [V, 3, H, W] images in [0, 1] (torchmetrics defaults, data_range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    # float32: torchmetrics' float64 path is ~40x slower on CPU for no useful precision.
    return structural_similarity_index_measure(pred.float(), gt.float(), data_range=1.0,
                                               reduction="none")


def appearance_metrics(pred: Tensor, gt: Tensor, lpips: LpipsFn | None | str = "auto",
                       batch_size: int = 8) -> AppearanceResult:
    """PSNR, SSIM and LPIPS between pred and gt, each [V, 3, H, W] in [0, 1], composited.

    lpips: "auto" loads torchmetrics' VGG LPIPS if its weights are cached; a callable is used
    as is; None skips LPIPS (reported unavailable, "disabled").
    """
    _check_images(pred, gt)
    pred, gt = pred.float().cpu(), gt.float().cpu()
    psnr, ssim = psnr_per_view(pred, gt), ssim_per_view(pred, gt)
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
        num_views=len(pred), image_size=(pred.shape[2], pred.shape[3]))
