"""GTA (Geometry-Temporal Alignment) attention for SVD's UNet, as diffusers attention processors.

Layout contract (the only thing the rest of the code must respect): the D domain videos of the
same objects are stacked **domain-major** on the batch axis, so the UNet input is
`[D*B, F, C, H, W]` with rows `d*B + b` (domain 0 = RGB, 1 = normals). Every other batch-like
axis the UNet creates inherits that order:

* spatial self-attention (`transformer_blocks.*.attn1`) sees `[(D*B*F), HW, C]`, rows
  `d*(B*F) + b*F + f`  -> reshape to `[D, B*F, HW, C]` pairs the same view of each domain;
* temporal self-attention (`temporal_transformer_blocks.*.attn1`) sees `[(D*B*HW), F, C]`,
  rows `d*(B*HW) + b*HW + s` -> reshape to `[D, B*HW, F, C]` pairs the same pixel.

Extra batch copies (CFG's uncond/cond) must therefore live *inside* each domain block:
`[D, (cfg, B)]`, never `[cfg, D, B]`.

GTA is an extra branch: `out = pretrained_attn(x) + W_out * attn(q(x), k(y), v(y))`. Which
tokens `y` the branch's queries see is `GTAConfig.keys`:

* `other_domains` (default): the paired tokens of the *other* domains only. The pretrained
  attention already covers the query's own domain, so the layer as a whole attends to both
  domains' tokens of the same view (spatial) or pixel (temporal), with one softmax per source.
* `all_domains`: the concatenation of every domain's paired tokens (one softmax over D*L keys,
  the Wonder3D-style joint attention and DESIGN.md's literal form).

Q/K/V start as copies of the pretrained ones and `W_out` (and every new embedding) starts at
zero, so at step 0 the model is exactly pretrained SVD. All new parameters live in modules
named `gta_*`.

Cost (bench/gta_step.py `--breakdown`): per layer the pretrained attention scores each of the
D*M query rows against L keys. `all_domains` adds D*L keys per row (the attention core triples,
GTA step 1.40x vanilla on the mid CPU config); `other_domains` adds (D-1)*L (the core doubles,
1.2x). Fusing the two branches (one Q/K/V matmul over concatenated weights, one output matmul,
strided SDPA views) measured within noise of this plain form, so the plain form stays.

Guard (issue 14): the attention layers that hold a GTA processor become `GTAGuardedAttention`
(same class otherwise, same state dict), whose `set_processor` refuses to replace a GTA processor
by anything else. Every diffusers path that swaps processors ends there: `set_attn_processor`,
`set_default_attn_processor` (diffusers refuses it already: it knows no GTA processor),
`enable_xformers_memory_efficient_attention`, `set_attention_slice`. Without the guard each of them silently drops the `gta_*` weights with an
info log. GTA already runs through scaled_dot_product_attention (flash / memory-efficient kernels
on GPU), so xformers brings nothing; to run without GTA, build with GTAConfig(spatial=False, temporal=False).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

NEW_PARAM_PREFIX = "gta_"  # any dotted-name segment starting with this marks a GTA (new) parameter
_SPATIAL_ATTN = re.compile(r"(?:^|\.)transformer_blocks\.\d+\.attn1\.processor$")
_TEMPORAL_ATTN = re.compile(r"(?:^|\.)temporal_transformer_blocks\.\d+\.attn1\.processor$")
GTA_KEYS = ("other_domains", "all_domains")


@dataclass(frozen=True)
class GTAConfig:
    # Spatial GTA: in each spatial self-attention, tokens of a view also attend to the tokens of
    # the same view in all domains (cross-domain attention, D*HW keys). Off = the ablation.
    spatial: bool = True
    # Temporal GTA: in each temporal self-attention, a pixel's frames also attend to that pixel's
    # frames in all domains along the orbit (D*F keys). Off = the ablation.
    temporal: bool = True
    # Number of domain videos stacked domain-major on the batch axis (0 = RGB, 1 = normals).
    # 1 = rgb_only ablation: nothing is installed and the UNet is vanilla SVD.
    num_domains: int = 2
    # Zero-initialised nn.Embedding(D, time_embed_dim) added to the UNet time embedding so one
    # shared UNet knows which domain a row denoises. Independent of the two GTA levels.
    domain_embedding: bool = True
    # Zero-initialised learned frame-index embedding added to the temporal GTA branch's Q/K input,
    # shared by all domains so frame t of RGB and frame t of normals carry the same code (on top
    # of SVD's own frame embedding, which is already identical across domains).
    frame_embedding: bool = True
    # Rows of that frame table: the most frames per video the model can be run with.
    max_frames: int = 32
    # Keys of the GTA branch: "other_domains" (the other domains' paired tokens; the pretrained
    # attention already sees the own domain) or "all_domains" (joint attention over every
    # domain's tokens, 1.5x the attention work of other_domains). See the module docstring.
    keys: str = "other_domains"

    def __post_init__(self) -> None:
        if self.num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {self.num_domains}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.keys not in GTA_KEYS:
            raise ValueError(f"keys must be one of {GTA_KEYS}, got {self.keys!r}")

    @classmethod
    def from_dict(cls, stored: dict) -> "GTAConfig":
        """A config saved with weights; files written before `keys` existed used all_domains."""
        return cls(**{"keys": "all_domains", **stored})

    @property
    def active(self) -> bool:
        """Whether anything cross-domain can happen (needs at least two domains)."""
        return self.num_domains > 1


def _copied_linear(src: nn.Linear) -> nn.Linear:
    """A new Linear with `src`'s weights, on its device/dtype (meta included)."""
    w = src.weight
    new = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if src.bias is not None:
            new.bias.copy_(src.bias)
    return new


def _zero_linear(like: nn.Linear) -> nn.Linear:
    w = like.weight
    new = nn.Linear(like.in_features, like.out_features, bias=like.bias is not None,
                    device=w.device, dtype=w.dtype)
    nn.init.zeros_(new.weight)
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


class GTAAttnProcessor(nn.Module):
    """Pretrained self-attention plus a zero-initialised cross-domain branch.

    An nn.Module (like diffusers' IPAdapterAttnProcessor2_0) so `Attention.set_processor`
    registers it as the child `processor` and its weights reach state_dict and optimisers.
    The same class serves both levels: the sequence axis L is HW (spatial) or F (temporal).
    """

    protected = True  # GTAGuardedAttention refuses to replace it (its weights would be dropped)

    def __init__(self, attn: Attention, num_domains: int, frame_embed_len: int = 0,
                 keys: str = "other_domains") -> None:
        super().__init__()
        if attn.to_k is None or attn.is_cross_attention:
            raise ValueError("GTA only wraps self-attention layers (attn1)")
        if keys not in GTA_KEYS:
            raise ValueError(f"keys must be one of {GTA_KEYS}, got {keys!r}")
        self.num_domains = num_domains
        self.keys = keys
        self.heads = attn.heads
        self.scale = attn.scale
        self.pretrained = AttnProcessor2_0()  # stateless; computes the unchanged SVD path
        self.gta_to_q = _copied_linear(attn.to_q)
        self.gta_to_k = _copied_linear(attn.to_k)
        self.gta_to_v = _copied_linear(attn.to_v)
        self.gta_to_out = _zero_linear(attn.to_out[0])
        w = attn.to_q.weight
        self.gta_frame_embed = (
            nn.Parameter(torch.zeros(frame_embed_len, attn.query_dim, device=w.device, dtype=w.dtype))
            if frame_embed_len > 0 else None
        )

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # [D*M, L, C]
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        frame_tokens: int = 1,
        **kwargs,
    ) -> torch.Tensor:  # [D*M, L, C]
        out = self.pretrained(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states is not None or self.num_domains == 1:
            return out
        return out + self.gta_branch(hidden_states, frame_tokens)

    def gta_branch(self, x: torch.Tensor, frame_tokens: int = 1) -> torch.Tensor:
        """Attention of every domain's rows to the paired rows of the other (or all) domains.

        x: [D*M, L, C] -> [D*M, L, C_out]. frame_tokens: consecutive tokens per frame along L (1 for
        SVD's temporal layers; H*W for the image prior's dense multi-view layout, which flattens
        every view's tokens into one sequence, nova3d.models.multiview), for the frame embedding.
        """
        if x.ndim != 3:
            raise ValueError(f"GTA expects [batch, tokens, channels], got {tuple(x.shape)}")
        n, length, c = x.shape
        d = self.num_domains
        if n % d:
            raise ValueError(f"batch-like axis {n} is not divisible by num_domains={d}; "
                             "stack domain videos domain-major on the batch axis")
        m = n // d
        x_qk = x
        if self.gta_frame_embed is not None:
            frames = length // frame_tokens
            if frames * frame_tokens != length:
                raise ValueError(f"{length} tokens are not whole frames of {frame_tokens} tokens")
            if frames > self.gta_frame_embed.shape[0]:
                raise ValueError(f"{frames} frames > max_frames={self.gta_frame_embed.shape[0]}")
            # Same code for frame t in every domain (and every row): broadcast [L, C].
            codes = self.gta_frame_embed[:frames]
            x_qk = x + (codes if frame_tokens == 1 else codes.repeat_interleave(frame_tokens, 0)).to(x.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, S, H*Dh] -> [B, H, S, Dh]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        # Per domain [D, M, L, C]; row m of each domain is the same view/pixel of one object.
        q = self.gta_to_q(x_qk).unflatten(0, (d, m))
        k = self.gta_to_k(x_qk).unflatten(0, (d, m))
        v = self.gta_to_v(x).unflatten(0, (d, m))
        if self.keys == "all_domains":
            # One joint sequence per pair: [M, D*L, C]; every query sees the same D*L keys.
            def joint(t: torch.Tensor) -> torch.Tensor:
                return t.transpose(0, 1).flatten(1, 2)
            o = F.scaled_dot_product_attention(heads(joint(q)), heads(joint(k)), heads(joint(v)),
                                               scale=self.scale)
            o = o.transpose(1, 2).flatten(2).unflatten(1, (d, length)).transpose(0, 1)  # [D, M, L, C]
        else:
            # Domain e's rows see domains e+1, ..., e+D-1 (mod D): keys [D, M, (D-1)*L, C].
            def others(t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t.roll(-s, dims=0) for s in range(1, d)], dim=2)
            o = F.scaled_dot_product_attention(heads(q.flatten(0, 1)), heads(others(k).flatten(0, 1)),
                                               heads(others(v).flatten(0, 1)), scale=self.scale)
            o = o.transpose(1, 2).flatten(2)  # [D*M, L, C]
        return self.gta_to_out(o.reshape(n, length, -1).to(x.dtype))


class DomainEmbedding(nn.Module):
    """Zero-initialised per-domain vector added to the UNet time embedding (via a forward hook)."""

    def __init__(self, num_domains: int, dim: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_domains = num_domains
        self.embedding = nn.Embedding(num_domains, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # [D*B, dim] -> [D*B, dim]
        n = emb.shape[0]
        if n % self.num_domains:
            raise ValueError(f"batch {n} is not divisible by num_domains={self.num_domains}")
        ids = torch.arange(self.num_domains, device=emb.device).repeat_interleave(n // self.num_domains)
        return emb + self.embedding(ids).to(emb.dtype)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # A bound method (not a closure) so deepcopy (EMA) rebinds it to the copied module.
        return self(output)


def _gta_layer_names(processor_names: Iterable[str], gta: GTAConfig) -> dict[str, str]:
    """{processor name: 'spatial'|'temporal'} for the self-attentions GTA replaces."""
    chosen = {}
    for name in processor_names:
        if gta.spatial and _SPATIAL_ATTN.search(name):
            chosen[name] = "spatial"
        elif gta.temporal and _TEMPORAL_ATTN.search(name):
            chosen[name] = "temporal"
    return chosen


class GTAProcessorReplaced(RuntimeError):
    """Something tried to replace a GTA attention processor (which would drop its trained weights)."""


class GTAGuardedAttention(Attention):
    """diffusers' Attention whose GTA processor cannot be replaced by a non-GTA one (module docstring)."""

    def set_processor(self, processor) -> None:
        current = self.__dict__.get("_modules", {}).get("processor")
        if getattr(current, "protected", False) and type(processor) is not type(current):
            raise GTAProcessorReplaced(
                f"refusing to replace a GTA attention processor by {type(processor).__name__}: its trained gta_* "
                "weights would be dropped (set_attn_processor / set_default_attn_processor / xformers). GTA already uses scaled_dot_product_attention; to run without GTA build "
                "the UNet with GTAConfig(spatial=False, temporal=False)")
        super().set_processor(processor)


def install_gta(unet: nn.Module, gta: GTAConfig) -> nn.Module:
    """Install GTA in place on a diffusers `UNetSpatioTemporalConditionModel`; returns it.

    Call after loading pretrained weights (Q/K/V are copied from them). Sets `unet.gta_config`.
    """
    if getattr(unet, "gta_config", None) is not None:
        raise RuntimeError("GTA is already installed on this UNet")
    if not gta.active:
        unet.gta_config = gta
        return unet  # single domain: nothing cross-domain exists, keep vanilla SVD exactly
    processors = unet.attn_processors
    chosen = _gta_layer_names(processors, gta)
    if (gta.spatial or gta.temporal) and not chosen:
        raise ValueError("no spatial/temporal self-attention layers found; is this an SVD UNet?")
    modules = dict(unet.named_modules())
    for name, level in chosen.items():
        attn = modules[name.removesuffix(".processor")]
        frames = gta.max_frames if (level == "temporal" and gta.frame_embedding) else 0
        processors[name] = GTAAttnProcessor(attn, gta.num_domains, frame_embed_len=frames, keys=gta.keys)
    unet.set_attn_processor(processors)  # by layer name; untouched layers keep their processor
    for name in chosen:  # from now on, replacing these processors is an error
        attn = modules[name.removesuffix(".processor")]
        if type(attn) is Attention:
            attn.__class__ = GTAGuardedAttention
    if gta.domain_embedding:
        w = unet.time_embedding.linear_2.weight
        unet.gta_domain_embedding = DomainEmbedding(gta.num_domains, w.shape[0], w.device, w.dtype)
        unet.time_embedding.register_forward_hook(unet.gta_domain_embedding.hook)
    unet.gta_config = gta
    return unet


def is_new_parameter(name: str) -> bool:
    """True for GTA parameters (a dotted-name segment starts with `gta_`)."""
    return any(part.startswith(NEW_PARAM_PREFIX) for part in name.split("."))


def split_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained, new) parameters by name, for separate learning-rate groups."""
    pretrained, new = [], []
    for name, p in module.named_parameters():
        (new if is_new_parameter(name) else pretrained).append(p)
    return pretrained, new


def gta_processor_names(unet: nn.Module) -> dict[str, str]:
    """{processor name: 'spatial'|'temporal'} of the installed GTA processors."""
    out = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, GTAAttnProcessor):
            out[name] = "spatial" if _SPATIAL_ATTN.search(name) else "temporal"
    return out


def stack_domains(videos: Sequence[torch.Tensor]) -> torch.Tensor:
    """D tensors [B, ...] (RGB first) -> [D*B, ...] in the domain-major UNet layout."""
    return torch.cat(list(videos), dim=0)


def split_domains(x: torch.Tensor, num_domains: int) -> torch.Tensor:
    """[D*B, ...] -> [D, B, ...] (inverse of `stack_domains`)."""
    if x.shape[0] % num_domains:
        raise ValueError(f"batch {x.shape[0]} is not divisible by num_domains={num_domains}")
    return x.unflatten(0, (num_domains, -1))
