"""How the views of an image UNet talk to each other: multi-view attention + GTA, as processors.

An image UNet (`UNet2DConditionModel`) denoises each view on its own; nova3d.models.image_unet
flattens the domain-major videos `[D*B, V, C, h, w]` to `[D*B*V, C, h, w]` rows `d*(B*V) + b*V + v`,
so every spatial self-attention (`transformer_blocks.*.attn1`) sees `[(D*B*V), HW, C]` exactly as
in SVD's UNet (nova3d.models.gta's layout contract). `MultiViewAttnProcessor` replaces that attn1
processor and computes

    out = attn1(x)                      pretrained self-attention within the view
        + spatial GTA branch            cross-domain, same view (gta.GTAAttnProcessor, unchanged)
        + mv_attn(x_views)              NEW multi-view attention across the V views of one video
          (+ temporal GTA branch)       ... and across the other domain's views (GTAAttnProcessor
                                        installed on mv_attn exactly as on SVD's temporal attention)

`mv_attn` is a diffusers `Attention` whose Q/K/V copy attn1's and whose output projection starts
at zero (Wonder3D / MVDream inflate the pretrained self-attention across views; the zero output
keeps the UNet exactly pretrained at step 0). It plays the part of SVD's temporal attention, which
the image prior lacks; the temporal GTA processor then wraps it as it wraps SVD's. Layouts:

* `dense` (default, Wonder3D / MVDream): one sequence of every view's tokens, `[D*B, V*HW, C]`;
* `orbit`: per pixel along the orbit, `[D*B*HW, V, C]`: SVD's temporal layout, cheaper.

A zero-initialised view embedding (per orbit index, view 0 = input view) is added to the time
embedding, as MVDream's camera embedding and Wonder3D's camera class embedding do: an image UNet
otherwise has no way to tell the views apart (SVD has its frame position embedding).

The number of views of the current forward pass is carried by one `ViewCount` shared by the UNet,
its processors and the view embedding (set by GTAImageUNet.forward): diffusers' Attention filters
unknown `cross_attention_kwargs` out by signature, so there is no other channel to the processors.
New parameters live under `gta_*` names (nova3d.models.gta.is_new_parameter: their own lr group).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from nova3d.models.gta import DomainEmbedding, GTAAttnProcessor, GTAConfig, GTAGuardedAttention

MV_LAYOUTS = ("dense", "orbit")
_IMAGE_ATTN1 = re.compile(r"(?:^|\.)transformer_blocks\.\d+\.attn1\.processor$")


@dataclass(frozen=True)
class MultiViewConfig:
    layout: str = "dense"  # MV_LAYOUTS (module docstring)
    view_embedding: bool = True  # zero-initialised per-view vector added to the time embedding

    def __post_init__(self) -> None:
        if self.layout not in MV_LAYOUTS:
            raise ValueError(f"multi-view layout must be one of {MV_LAYOUTS}, got {self.layout!r}")


class ViewCount:
    """Views per video in the forward pass under way (None outside one)."""

    def __init__(self) -> None:
        self.value: int | None = None

    def get(self) -> int:
        if self.value is None:
            raise RuntimeError("the number of views is unset: call the image UNet through GTAImageUNet.forward "
                               "with [N, views, C, h, w] samples")
        return self.value

    @contextlib.contextmanager
    def held(self, value: int | None) -> Iterator[None]:
        old, self.value = self.value, value
        try:
            yield
        finally:
            self.value = old


class ViewCheckpoint:
    """diffusers' gradient-checkpointing function (enable_gradient_checkpointing's argument) that
    recomputes a block in backward with the view count of its forward pass, which is over by then."""

    def __init__(self, views: ViewCount) -> None:
        self.views = views

    def __call__(self, module: nn.Module, *args):
        value = self.views.value
        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), self.views.held(value)))


def _copied_attention(attn: Attention) -> Attention:
    """A new diffusers Attention shaped like `attn`, Q/K/V copied, output projection zero."""
    w = attn.to_q.weight
    new = Attention(query_dim=attn.query_dim, heads=attn.heads, dim_head=attn.inner_dim // attn.heads,
                    bias=attn.to_q.bias is not None, out_bias=attn.to_out[0].bias is not None,
                    upcast_attention=attn.upcast_attention, processor=AttnProcessor2_0())
    if (new.to_q.weight.device, new.to_q.weight.dtype) != (w.device, w.dtype):  # a no-op .to() cannot run on
        new = new.to(w.device, w.dtype)  # fake tensors (bench/memory_ladder.py builds the UNet under FakeTensorMode)
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            getattr(new, name).load_state_dict(getattr(attn, name).state_dict())
        nn.init.zeros_(new.to_out[0].weight)
        if new.to_out[0].bias is not None:
            nn.init.zeros_(new.to_out[0].bias)
    return new


class MultiViewAttnProcessor(nn.Module):
    """attn1 of an image UNet: self-attention (+ spatial GTA) + multi-view attention (+ temporal GTA)."""

    protected = True  # GTAGuardedAttention refuses to replace it

    def __init__(self, attn: Attention, views: ViewCount, gta: GTAConfig, layout: str = "dense") -> None:
        super().__init__()
        if attn.to_k is None or attn.is_cross_attention:
            raise ValueError("multi-view attention only wraps self-attention layers (attn1)")
        if layout not in MV_LAYOUTS:
            raise ValueError(f"layout must be one of {MV_LAYOUTS}, got {layout!r}")
        self.views = views  # shared, not a submodule
        self.layout = layout
        cross = gta.active
        # Spatial GTA exactly as on SVD; without it, the pretrained processor alone.
        self.spatial = GTAAttnProcessor(attn, gta.num_domains, keys=gta.keys) if cross and gta.spatial \
            else AttnProcessor2_0()
        self.gta_mv_attn = _copied_attention(attn)
        if cross and gta.temporal:
            frames = gta.max_frames if gta.frame_embedding else 0
            self.gta_mv_attn.set_processor(GTAAttnProcessor(self.gta_mv_attn, gta.num_domains, frame_embed_len=frames,
                                                            keys=gta.keys))
            self.gta_mv_attn.__class__ = GTAGuardedAttention

    def forward(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        out = self.spatial(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None:
            return out
        return out + self.multiview(hidden_states)

    def multiview(self, x: Tensor) -> Tensor:
        """[(M*V), HW, C] rows of M videos of V views -> the multi-view branch, same shape."""
        v = self.views.get()
        n, hw, c = x.shape
        if n % v:
            raise ValueError(f"{n} rows are not whole videos of {v} views")
        m = n // v
        if self.layout == "dense":
            seq, tokens = x.unflatten(0, (m, v)).flatten(1, 2), hw  # [M, V*HW, C], view-major
        else:
            seq, tokens = x.unflatten(0, (m, v)).transpose(1, 2).flatten(0, 1), 1  # [M*HW, V, C]
        proc = self.gta_mv_attn.processor
        extra = {"frame_tokens": tokens} if isinstance(proc, GTAAttnProcessor) else {}
        y = proc(self.gta_mv_attn, seq, **extra)
        if self.layout == "dense":
            return y.unflatten(1, (v, hw)).flatten(0, 1)
        return y.unflatten(0, (m, hw)).transpose(1, 2).flatten(0, 1)


class ViewEmbedding(nn.Module):
    """Zero-initialised per-view vector added to the UNet time embedding (via a forward hook)."""

    def __init__(self, views: ViewCount, max_views: int, dim: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.views = views
        self.embedding = nn.Embedding(max_views, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, emb: Tensor) -> Tensor:  # [M*V, dim], rows view-minor
        v = self.views.get()
        if v > self.embedding.num_embeddings:
            raise ValueError(f"{v} views > max_frames={self.embedding.num_embeddings}")
        ids = torch.arange(emb.shape[0], device=emb.device) % v
        return emb + self.embedding(ids).to(emb.dtype)

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self(output)  # a bound method, so deepcopy (EMA) rebinds it


def install_multiview(unet: nn.Module, gta: GTAConfig, mv: MultiViewConfig) -> nn.Module:
    """Install multi-view attention, GTA, the domain and view embeddings on an image UNet, in place.

    Call after loading pretrained weights (Q/K/V are copied from them)."""
    if getattr(unet, "gta_config", None) is not None:
        raise RuntimeError("GTA is already installed on this UNet")
    views = ViewCount()
    modules = dict(unet.named_modules())
    names = [n for n in unet.attn_processors if _IMAGE_ATTN1.search(n)]
    if not names:
        raise ValueError("no transformer self-attention layers found; is this a UNet2DConditionModel?")
    for name in names:  # layer by layer: set_attn_processor would recurse into the new mv_attn layers
        attn = modules[name.removesuffix(".processor")]
        attn.set_processor(MultiViewAttnProcessor(attn, views, gta, mv.layout))
        if type(attn) is Attention:
            attn.__class__ = GTAGuardedAttention
    w = unet.time_embedding.linear_2.weight
    if gta.active and gta.domain_embedding:
        unet.gta_domain_embedding = DomainEmbedding(gta.num_domains, w.shape[0], w.device, w.dtype)
        unet.time_embedding.register_forward_hook(unet.gta_domain_embedding.hook)
    if mv.view_embedding:
        unet.gta_view_embedding = ViewEmbedding(views, gta.max_frames, w.shape[0], w.device, w.dtype)
        unet.time_embedding.register_forward_hook(unet.gta_view_embedding.hook)
    unet.gta_views, unet.gta_config, unet.mv_config = views, gta, mv
    return unet


def multiview_processors(unet: nn.Module) -> dict[str, MultiViewAttnProcessor]:
    """{processor name: processor} of the installed multi-view processors."""
    return {n: p for n, p in unet.attn_processors.items() if isinstance(p, MultiViewAttnProcessor)}
