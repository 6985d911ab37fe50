"""The typed configuration of a udaseg run.

Every preset under ``config/presets`` and every ``key.sub=value`` override is checked against
these dataclasses. Defaults follow the official code of DAFormer / SePiCo / T2S-DA where the
papers and code disagree (see the method docs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from udaseg.errors import UserError

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


@dataclass
class RCSConfig:
    """Rare class sampling (DAFormer): temperature softmax over class frequencies."""

    enabled: bool = False
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5


@dataclass
class DatasetConfig:
    """One dataset split and its pipeline (resize -> random crop -> flip -> normalise)."""

    name: str = "digits-clean"
    root: str = ""
    split: str = "train"
    labelled: bool = True
    resize: Optional[list[int]] = None  # [width, height] scale, see keep_ratio
    keep_ratio: bool = True
    crop_size: Optional[list[int]] = None  # [height, width]
    cat_max_ratio: float = 1.0
    flip: bool = False
    rcs: RCSConfig = field(default_factory=RCSConfig)
    options: dict = field(default_factory=dict)  # dataset-specific extras (e.g. ACDC condition)

    def validate(self) -> None:
        for key in ("resize", "crop_size"):
            value = getattr(self, key)
            if value is not None and (len(value) != 2 or min(value) <= 0):
                raise UserError(f"config key '{key}' expects two positive ints, got {value!r}")
        if not 0.0 < self.cat_max_ratio <= 1.0:
            raise UserError(f"config key 'cat_max_ratio' must lie in (0, 1], got {self.cat_max_ratio}")


@dataclass
class DataConfig:
    source: DatasetConfig = field(default_factory=DatasetConfig)
    target: Optional[DatasetConfig] = None
    val: list[DatasetConfig] = field(default_factory=list)
    batch_size: int = 2
    workers: int = 0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


@dataclass
class ModelConfig:
    name: str = "daformer_mitb0"
    num_classes: int = 19
    pretrained: str = ""  # path to ImageNet backbone weights (official file), '' for random init
    options: dict = field(default_factory=dict)  # constructor overrides (e.g. drop_path_rate)


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 6e-5
    head_lr_mult: float = 10.0  # for every parameter whose name contains "head"
    weight_decay: float = 0.01
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    no_decay_keys: list[str] = field(default_factory=lambda: ["norm", "pos_block"])
    power: float = 1.0  # poly decay power
    min_lr: float = 0.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6


@dataclass
class TrainConfig:
    iterations: int = 40000
    seed: int = 0
    work_dir: str = "runs/default"
    eval_interval: int = 1000
    checkpoint_interval: int = 1000
    keep_last: int = 2
    log_interval: int = 50
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    backward_per_group: bool = True  # back-propagate after each view group (lower peak memory)
    deterministic: bool = False


@dataclass
class FeatureDistanceConfig:
    """DAFormer's thing-class ImageNet feature distance."""

    enabled: bool = False
    weight: float = 0.005
    classes: list[int] = field(default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])
    scale_min_ratio: float = 0.75


@dataclass
class SelfTrainingConfig:
    """The DACS / DAFormer mean-teacher self-training base."""

    ema_alpha: float = 0.999
    pseudo_threshold: float = 0.968
    ignore_top: int = 0  # rows at the top of target images whose pseudo-label weight is 0
    ignore_bottom: int = 0
    mix: Literal["class", "none"] = "class"
    color_jitter_prob: float = 0.8  # probability that colour jitter is applied
    color_jitter_strength: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    feature_distance: FeatureDistanceConfig = field(default_factory=FeatureDistanceConfig)


@dataclass
class SePiCoConfig:
    """SePiCo (Xie et al., TPAMI 2023). Defaults are the official code's."""

    variant: Literal["proto", "bank", "dist"] = "dist"
    temperature: float = 100.0
    weight: float = 1.0  # lambda_cl
    reg_weight: float = 1.0  # relative weight of L_reg (effective lambda_reg = weight * reg_weight)
    warmup_iters: int = 3000  # L_w: contrastive terms start at this 0-based iteration
    proj_dim: int = 512
    feature: str = "auto"  # encoder tap the projection head reads: auto | enc4 | enc_fused | encN
    bank_size: int = 200
    bank_negatives: Literal["exp_of_mean", "mean_of_exp"] = "exp_of_mean"
    covariance: Literal["diagonal", "full"] = "diagonal"
    label_min_ratio: float = 0.75
    class_balanced_crop: bool = True
    crop_candidates: int = 10
    crop_cat_max_ratio: float = 0.75
    target_crop_size: Optional[list[int]] = None  # [h, w]; None: the source crop size
    source_loss: bool = True
    target_loss: bool = True
    dark: bool = False  # Cityscapes -> Dark Zurich day/night fusion and class re-weighting
    dark_train_scale: float = 0.05
    dark_test_scale: float = 0.16


@dataclass
class T2SDAConfig:
    """T2S-DA (pulling target to source). Defaults are the paper's, with the spec's choices."""

    weight: float = 0.1  # lambda
    temperature: float = 0.2
    loss: Literal["infonce", "mse"] = "infonce"
    proj_dim: int = 256
    feature: str = "enc_last"  # projector input tap: enc_last | encN | enc_fused | decoder
    proj_final_act: bool = True
    fda_beta: float = 0.01
    fda_window: Literal["official", "paper"] = "official"
    base_queries: int = 128
    negatives: int = 1024
    unreliable_quantile: float = 0.5
    quantile_per_image: bool = False
    reweight: bool = True  # dynamic re-weighting (DRW)
    reweight_beta: float = 0.5
    absent_class_weight: Literal["max", "mean"] = "max"
    target_negatives: bool = True  # DENPS: half the negatives from unreliable target pixels
    class_balanced_queries: bool = True  # CBQS
    reduction: Literal["mean", "paper_sum"] = "mean"
    source_ce_on_pseudo_target: bool = False
    label_downsample: Literal["ratio", "nearest"] = "ratio"
    label_min_ratio: float = 0.75
    domain_generalisation: bool = False
    dg_translations: list[str] = field(default_factory=lambda: ["fda", "weather", "cartoon", "style_stats"])
    dg_reference_dir: str = ""  # folder of reference images for the DG FDA translation
    dg_weights: str = ""  # folder with the AdaIN and/or Style Augmentation release files


@dataclass
class MICConfig:
    """MIC (masked image consistency) added to a self-training base. Defaults are the official code's."""

    base: Literal["dacs", "daformer", "sepico", "t2sda"] = "daformer"  # the method MIC is added to
    block_size: int = 32  # mask block b in pixels; must divide the crop (32 on 512² crops, 64 on 1024²)
    mask_ratio: float = 0.7  # r, the masked fraction of blocks
    weight: float = 1.0  # lambda_m
    images: Literal["target", "source_and_target", "source"] = "target"
    color_augmentation: bool = True  # fresh colour jitter + blur before masking
    quality_weight: bool = True  # False: weight 1 instead of the teacher's confidence ratio

    def validate(self) -> None:
        if self.block_size < 1:
            raise UserError(f"config key 'method.mic.block_size' must be a positive number of pixels, "
                            f"got {self.block_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"config key 'method.mic.mask_ratio' must lie in [0, 1), got {self.mask_ratio}")
        if self.weight < 0:
            raise UserError(f"config key 'method.mic.weight' must be >= 0, got {self.weight}")


@dataclass
class MethodConfig:
    name: Literal["source_only", "target_oracle", "dacs", "daformer", "sepico", "t2sda", "mic"] = "source_only"
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    sepico: SePiCoConfig = field(default_factory=SePiCoConfig)
    t2sda: T2SDAConfig = field(default_factory=T2SDAConfig)
    mic: MICConfig = field(default_factory=MICConfig)


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: Optional[list[int]] = None  # sliding window [h, w]
    stride: Optional[list[int]] = None
    flip: bool = False
    protocol: Literal["19", "16", "13", "all"] = "all"  # class subset the mIoU averages over
    batch_windows: int = 8
    # Dark Zurich test-time class re-weighting of SePiCo's official code (s = 0.16); None: off.
    class_prior_scale: Optional[float] = None


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reference: dict = field(default_factory=dict)  # published numbers this preset reproduces
