"""Typed experiment configs and the layered loader.

Merge order (later wins): the dataclass defaults below <- the experiment's ancestors
(`parent:` chain, usually ending at base.yaml) <- the experiment file <- command-line
`key=value` overrides. The schema comes first, so a misspelt key or a wrong type fails at
start-up with one line naming the key and the file it came from.

Experiments are named by their path under `experiments/` without `.yaml`
("tiny", "ablations/no_gta"); a path to any .yaml file works too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nova3d.errors import Nova3DError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"
PARENT_KEY = "parent"
FUSION_DIR = "fusion"  # experiments under here use the fusion schema
AUTOENCODER_DIR = "autoencoder"  # ... and here the toy VAE's (nova3d.models.autoencoder)


class ConfigError(Nova3DError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    train_shards: str = "outputs/demo/shards/train-{000000..000000}.tar"  # brace pattern, dir or list file
    val_shards: Optional[str] = None  # None: validate on train_shards
    resolution: int = 256  # images are resized to this square size
    num_views: int = 16  # views used per sample, evenly spaced along the orbit (e.g. 6 of 16)
    random_start_view: bool = True  # training: roll the orbit to a random input view
    train_background: str = "random"  # "random" colour or "white"; evaluation is always white
    normal_frame: str = "input_view"  # frame of normal maps fed to the model (nova3d.cameras)
    # Take the VAE latents stored in the shards by data_prep/cache_latents.py instead of encoding the
    # views every step (saves 2 x num_views VAE encodes per object). Needs train_background=white and,
    # with normal_frame=input_view, random_start_view=false (nova3d.data.latent_cache says why).
    use_cached_latents: bool = False
    batch_size: int = 1  # per rank
    # All ranks together, per optimizer step: when set, batch_size becomes
    # global_batch_size / (world size x trainer.accumulate_grad_batches), which must divide (nova3d.slurm).
    global_batch_size: Optional[int] = None
    num_workers: Optional[int] = None  # None: SLURM_CPUS_PER_TASK - 1 under SLURM, else 1
    samples_per_epoch: int = 1000  # per rank: fixed so DDP ranks never wait on uneven shards
    shuffle_buffer: int = 64
    seed: int = 0


@dataclass
class ModelConfig:
    # The denoising UNet's family (nova3d.models.factory.BACKBONES): "svd" (the video prior,
    # UNetSpatioTemporalConditionModel) or "sd_image" (an image prior, Stable Diffusion's
    # UNet2DConditionModel with multi-view attention: nova3d.models.image_unet).
    backbone: str = "svd"
    pretrained: Optional[str] = None  # diffusers folder or hub id of the backbone; None: random `architecture`
    # Used when pretrained is None. svd: "tiny", "toy" or "svd_xt"; sd_image: "tiny", "toy", "sd21" or
    # "sd_image_variations" (the real shapes without weights).
    architecture: str = "tiny"
    # Folder with image_encoder/ + vae/ (an SVD diffusers folder, or nova3d.train_vae's conditioner):
    # the frozen CLIP + VAE come from here. None: from `pretrained`, else the architecture's random ones.
    conditioner: Optional[str] = None
    gta_spatial: bool = True  # cross-domain attention within each view
    gta_temporal: bool = True  # attention along the orbit across both domains
    gta_keys: str = "other_domains"  # GTA branch keys: other_domains | all_domains (models/gta.py)
    domains: list[str] = field(default_factory=lambda: ["rgb", "normal"])
    # sd_image only (null for svd): how the views meet in the new multi-view attention, "dense"
    # (every view's tokens, Wonder3D / MVDream; the default when null) or "orbit" (per pixel along
    # the orbit, SVD's temporal layout).
    multiview: Optional[str] = None
    gradient_checkpointing: bool = False
    # Start a NEW run from the UNet of an exported pipeline folder (`nova3d export`), e.g.
    # pretrained/toy, so a long recipe can be trained in pieces; its GTA layout must match. A run
    # that resumes from its own checkpoint ignores it (the checkpoint holds newer weights).
    init_from: Optional[str] = None


@dataclass
class SystemConfig:
    lr: float = 1.0e-5  # pretrained UNet weights
    lr_new: float = 1.0e-4  # GTA modules and the domain embedding
    weight_decay: float = 0.0
    warmup_steps: int = 500
    # After warm-up: "constant", or "cosine" down to lr_final_ratio x lr at trainer.max_steps.
    lr_schedule: str = "constant"
    lr_final_ratio: float = 0.1
    ema_decay: Optional[float] = None  # e.g. 0.9999; None disables EMA
    # What the denoiser learns to reproduce: a "sample" of the VAE posterior (what SVD's training
    # code does, sgm's DiagonalGaussianRegularizer; gta_full keeps it) or its "mode" (the mean). A
    # sample carries the posterior's noise, which no denoiser can predict: at low σ it is an
    # unlearnable part of the loss (the toy VAE's posterior std is ~0.17 against latents of ~0.9).
    diffusion_target: str = "sample"
    p_mean: float = 0.7  # training log-sigma ~ N(p_mean, p_std)
    p_std: float = 1.6
    noise_aug_strength: float = 0.02  # noise on the conditioning image latent (also an added time id)
    fps: int = 7  # as StableVideoDiffusionPipeline's argument: the UNet's fps time id is fps - 1
    motion_bucket_id: int = 127  # SVD's added time id; the pipeline's default
    cond_dropout: float = 0.1  # drop the image condition for classifier-free guidance
    loss_weights: dict[str, float] = field(default_factory=lambda: {"rgb": 1.0, "normal": 1.0})
    val_num_objects: int = 2
    val_sampling_steps: int = 25
    val_guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])  # min, max over frames
    val_guidance_schedule: str = "triangle"  # "triangle" (min at the input view), "linear" or "constant"
    # Validation sheets: frames per VAE decode call, per video; None = the whole orbit in one call
    # (the temporal decoder then sees every view together, as nova3d generate does by default).
    val_decode_chunk_size: Optional[int] = None
    # Validation loss: the EDM loss at these fixed σ (same noise every time), averaged, so runs compare.
    # Default: about the 10/30/50/70/90 % quantiles of the training σ for p_mean=0.7, p_std=1.6.
    val_sigmas: list[float] = field(default_factory=lambda: [0.25, 0.9, 2.0, 4.6, 16.0])


@dataclass
class TrainerConfig:
    max_steps: int = 10000
    # Wall-clock cap "DD:HH:MM:SS" on each launch's training (nova3d.piece_timer), e.g. to end a CPU
    # piece of a long recipe or a SLURM job in time; the run stops, checkpoints, and the next launch
    # resumes with the whole cap again. None: no cap.
    max_time: Optional[str] = None
    accelerator: str = "auto"
    devices: Any = 1  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"  # CPU runs switch to "32-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = 1.0
    val_check_interval: int = 1000  # in training steps
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 1000
    limit_val_batches: Optional[int] = None  # validation batches per rank; None: every validation object
    num_sanity_val_steps: int = 1  # validation batches run before training, to fail early (0: none)


@dataclass
class LoggingConfig:
    root: str = "runs"  # run dir: <root>/<experiment name>/<SLURM job id or "local">
    tensorboard: bool = True


@dataclass
class ExperimentConfig:
    name: str = "base"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---- the toy VAE (experiments/autoencoder/, nova3d.train_vae; built by nova3d.models.autoencoder)

VAE_KINDS = ("kl", "temporal")


@dataclass
class AutoencoderModelConfig:
    kind: str = "kl"  # VAE_KINDS: AutoencoderKL or SVD's AutoencoderKLTemporalDecoder (module docstring)
    block_out_channels: list[int] = field(default_factory=lambda: [32, 32, 64])  # 3 levels: latents at H/4
    layers_per_block: int = 1
    latent_channels: int = 4  # the GTA-UNet's in_channels are 2 x this
    # GroupNorm groups ("kl" only: the temporal VAE fixes 32). diffusers' default 32 on 32-channel layers is instance normalisation, which
    # removes each image's colour statistics (style transfer relies on it): at 32 the toy VAE
    # reconstructed shapes in grey (RGB 21.3 dB, normals off by 67 deg after 1000 steps).
    norm_num_groups: int = 8
    clip_projection_dim: int = 32  # the UNet's cross_attention_dim


@dataclass
class AutoencoderOptimConfig:
    lr: float = 5.0e-4
    warmup_steps: int = 100
    kl_weight: float = 1.0e-6  # SD's VAE weight: a near-deterministic code, rescaled afterwards
    # Training decodes a random window of this many consecutive orbit views per video (None: all
    # views): the temporal decoder's cost grows with the frames, its kernel spans 3 of them.
    frames_per_video: Optional[int] = 8
    scale_samples: int = 64  # objects whose latents set vae.config.scaling_factor (unit std)


@dataclass
class AutoencoderExperimentConfig:
    """experiments/autoencoder/*.yaml: what nova3d.train_vae trains."""

    name: str = "autoencoder"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    test_shards: Optional[str] = None  # reconstruction metrics on these after training (None: val shards)
    test_objects: int = 40
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    optim: AutoencoderOptimConfig = field(default_factory=AutoencoderOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def experiment_path(name: str, root: Path = EXPERIMENTS_DIR) -> Path:
    """The YAML file of an experiment name (or the path itself when it is a file)."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    return root / f"{name}.yaml"


def list_experiments(root: Path = EXPERIMENTS_DIR) -> list[str]:
    """Every experiment name under `root` (sbatch scripts and other files excluded)."""
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _chain(name: str, root: Path) -> list[tuple[Path, dict]]:
    """The experiment and its ancestors, oldest first."""
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    path = experiment_path(name, root)
    if not path.is_file():
        known = ", ".join(list_experiments(root)) or "none"
        raise ConfigError(f"{path}: experiment {name!r} not found (known: {known})")
    while True:
        if path in seen:
            cycle = " -> ".join(p.stem for p in seen + [path])
            raise ConfigError(f"{seen[0]}: parent cycle {cycle}")
        seen.append(path)
        data = _read_yaml(path)
        parent = data.pop(PARENT_KEY, None)
        chain.append((path, data))
        if parent is None:
            return chain[::-1]
        parent_path = experiment_path(str(parent), root)
        if not parent_path.is_file():
            raise ConfigError(f"{path}: parent {parent!r} not found (looked for {parent_path})")
        path = parent_path


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: bad key {key!r}: {reason}" if key else f"{source}: {reason}") from err


def schema_for(chain: list[tuple[Path, dict]], root: Path = EXPERIMENTS_DIR) -> type:
    """The config dataclass of an experiment chain: fusion runs live under `fusion/`, the toy VAE's
    under `autoencoder/`, diffusion training everywhere else."""
    def under(folder: str) -> bool:
        top = (root / folder).resolve()
        return any(top in path.resolve().parents for path, _ in chain)

    if under(FUSION_DIR):
        from nova3d.fusion.config import FusionExperimentConfig

        return FusionExperimentConfig
    if under(AUTOENCODER_DIR):
        return AutoencoderExperimentConfig
    return ExperimentConfig


def is_fusion_experiment(name: str, root: Path = EXPERIMENTS_DIR) -> bool:
    return schema_for(_chain(name, root), root).__name__ == "FusionExperimentConfig"


def load_experiment(name: str, overrides: Sequence[str] = (),
                    root: Path = EXPERIMENTS_DIR) -> Any:
    """Resolve an experiment: schema <- parents <- file <- `key=value` overrides.

    Experiments under `fusion/` are fusion runs (nova3d.fusion.config schema); the rest train
    the diffusion model (ExperimentConfig)."""
    chain = _chain(name, root)
    cfg = OmegaConf.structured(schema_for(chain, root))
    for path, data in chain:
        cfg = _merge(cfg, data, str(path))
    # The name is derived, never written in a file: it decides the run directory.
    cfg.name = chain[-1][0].stem if Path(name).suffix in (".yaml", ".yml") else name
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command line ({item})")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: Any) -> str:
    """The fully resolved config as YAML (what `nova3d config` prints and runs snapshot)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def slurm_cpus_per_task(default: int) -> int:
    """CPUs SLURM gave this task, else `default` (never os.cpu_count(): it ignores the allocation)."""
    value = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(value) if value and value.isdigit() else default
