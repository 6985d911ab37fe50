"""The typed configuration of a udaseg run.

Every preset under ``config/presets`` and every ``key.sub=value`` override is checked against
these dataclasses. Defaults follow the official code of DAFormer / SePiCo / T2S-DA where the
papers and code disagree (see the method docs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from udaseg.errors import UserError

# Field metadata of settings counted in training iterations: a shorter or longer budget scales them
# (``udaseg.config.scale_iteration_counts``), so a warm-up keeps its share of the run.
ITERATION_COUNT = {"unit": "iterations"}

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def require(ok: bool, path: str, name: str, value: Any, why: str) -> None:
    """Raise the one-line ``UserError`` ``config key '<path>.<name>' <why>, got <value>`` unless ``ok``."""
    if not ok:
        raise UserError(f"config key '{_key(path, name)}' {why}, got {value!r}")


def require_range(path: str, name: str, value: float, low: Optional[float] = None, high: Optional[float] = None,
                  low_open: bool = False, high_open: bool = False) -> None:
    """``low <= value <= high`` (``<`` where open); either bound may be ``None``."""
    ok = True
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if ok:
        return
    if low is not None and high is not None:
        why = f"must lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        why = f"must be {'>' if low_open else '>='} {low:g}"
    else:
        why = f"must be {'<' if high_open else '<='} {high:g}"
    require(False, path, name, value, why)


def require_pair(path: str, name: str, value: Optional[list], optional: bool = True) -> None:
    """Two positive ints (``[h, w]`` or ``[w, h]``)."""
    if value is None and optional:
        return
    require(value is not None and len(value) == 2 and min(value) > 0, path, name, value, "expects two positive ints")


@dataclass
class RCSConfig:
    """Rare class sampling (DAFormer): temperature softmax over class frequencies."""

    enabled: bool = False
    temperature: float = 0.01
    min_pixels: int = 3000
    min_crop_ratio: float = 0.5  # a multiple of min_pixels (HRDA's 1024 crops use 2.0)

    def validate(self, path: str = "rcs") -> None:
        require_range(path, "temperature", self.temperature, 0.0, low_open=True)
        require_range(path, "min_pixels", self.min_pixels, 0)
        require_range(path, "min_crop_ratio", self.min_crop_ratio, 0.0)


@dataclass
class DatasetConfig:
    """One dataset split and its pipeline (resize -> random crop -> flip -> normalise)."""

    name: str = "digits-clean"
    root: str = ""
    split: str = "train"
    labelled: bool = True
    monitor_labels: bool = False  # unlabelled stream: load labels only to measure pseudo-label accuracy
    resize: Optional[list[int]] = None  # [width, height] scale, see keep_ratio
    keep_ratio: bool = True
    crop_size: Optional[list[int]] = None  # [height, width]
    cat_max_ratio: float = 1.0
    flip: bool = False
    # 'fixed': (x - data.mean) / data.std; 'per_image': each image by its own per-channel mean and std;
    # null: as data.source (whose null is 'fixed')
    normalization: Optional[Literal["fixed", "per_image"]] = None
    rcs: RCSConfig = field(default_factory=RCSConfig)
    options: dict = field(default_factory=dict)  # dataset-specific extras (e.g. ACDC condition)
    pseudo_labels: str = ""  # folder of an offline 'pseudo_labels' pass: labels are read from there
    # [top, bottom, left, right] px of each loaded image whose pseudo-labels get weight 0, marked before
    # resize / crop / flip (HRDA / MIC crop_pseudo_margins: [30, 240, 30, 30] on Cityscapes); null: none
    pseudo_margins: Optional[list[int]] = None
    resized_cache: str = ""  # folder of pre-resized images and labels ('udaseg prepare ... --resize W H')

    alias: str = ""  # the key of this set's results when evaluated (default: name:split, plus root if repeated)

    def validate(self, path: str = "") -> None:
        for key in ("resize", "crop_size"):
            require_pair(path, key, getattr(self, key))
        require_range(path, "cat_max_ratio", self.cat_max_ratio, 0.0, 1.0, low_open=True)
        margins = self.pseudo_margins
        require(margins is None or (len(margins) == 4 and min(margins) >= 0), path, "pseudo_margins", margins,
                "expects four ints >= 0 [top, bottom, left, right]")
        require(not self.resized_cache or self.resize is not None, path, "resized_cache", self.resized_cache,
                "needs a resize (the cache holds images resized for one)")
        require(not (self.resized_cache and self.pseudo_labels), path, "resized_cache", self.resized_cache,
                "cannot be combined with pseudo_labels (offline pseudo-labels have the originals' size)")
        require(not (self.resized_cache and margins), path, "resized_cache", self.resized_cache,
                "cannot be combined with pseudo_margins (the margins are in the originals' pixels)")


@dataclass
class DataConfig:
    source: DatasetConfig = field(default_factory=DatasetConfig)
    target: Optional[DatasetConfig] = None
    val: list[DatasetConfig] = field(default_factory=list)
    batch_size: int = 2
    workers: int = 0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def validate(self, path: str = "data") -> None:
        require_range(path, "batch_size", self.batch_size, 1)
        require_range(path, "workers", self.workers, 0)
        require(len(self.mean) == 3, path, "mean", self.mean, "expects three values (R, G, B in 0-255 units)")
        require(len(self.std) == 3 and min(self.std) > 0, path, "std", self.std,
                "expects three positive values (R, G, B in 0-255 units)")
        self._resolve_normalization(path)

    def _resolve_normalization(self, path: str) -> None:
        """Streams without a normalisation take the source's; one set explicitly must agree with it."""
        self.source.normalization = self.source.normalization or "fixed"
        chosen = self.source.normalization
        others = [("target", self.target), *((f"val[{i}]", spec) for i, spec in enumerate(self.val))]
        for name, spec in others:
            if spec is None:
                continue
            if spec.normalization is None:
                spec.normalization = chosen
            require(spec.normalization == chosen, f"{path}.{name}", "normalization", spec.normalization,
                    f"differs from {path}.source.normalization ({chosen!r}); a model must see its inputs "
                    "normalised one way")


@dataclass
class ModelConfig:
    name: str = "daformer_mitb0"
    num_classes: int = 19
    pretrained: str = ""  # path to ImageNet backbone weights (official file), '' for random init
    options: dict = field(default_factory=dict)  # constructor overrides (e.g. drop_path_rate)
    init_from: str = ""  # a udaseg checkpoint whose weights (only) start the run
    init_from_model: Literal["student", "teacher"] = "student"  # which of its models

    def validate(self, path: str = "model") -> None:
        require_range(path, "num_classes", self.num_classes, 1, 255)


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
    warmup_iters: int = field(default=1500, metadata=ITERATION_COUNT)
    warmup_ratio: float = 1e-6
    # Length of the poly decay as a multiple of train.iterations: 1 decays to min_lr at the last
    # iteration; > 1 stops training early on the curve (SPCL: a 62,500 horizon stopped at 40,000).
    schedule_horizon: float = 1.0

    def validate(self, path: str = "optim") -> None:
        require_range(path, "lr", self.lr, 0.0, low_open=True)
        require_range(path, "head_lr_mult", self.head_lr_mult, 0.0)
        require_range(path, "weight_decay", self.weight_decay, 0.0)
        require_range(path, "momentum", self.momentum, 0.0, 1.0)
        require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), path, "betas", self.betas,
                "expects two values in [0, 1)")
        require_range(path, "power", self.power, 0.0)
        require_range(path, "min_lr", self.min_lr, 0.0)
        require_range(path, "warmup_iters", self.warmup_iters, 0)
        require_range(path, "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        require_range(path, "schedule_horizon", self.schedule_horizon, 1.0)


@dataclass
class TrainConfig:
    iterations: int = 40000
    seed: int = 0
    work_dir: str = ""  # '' -> runs/<config name>
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
    eval_teacher: Literal["final", "every"] = "final"  # evaluate the EMA teacher at the end or at every eval

    def validate(self, path: str = "train") -> None:
        for key in ("iterations", "eval_interval", "checkpoint_interval", "log_interval", "keep_last"):
            require_range(path, key, getattr(self, key), 1)
        require_range(path, "seed", self.seed, 0)
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None, path, "device", self.device,
                "expects auto, cpu, cuda or cuda:N")


@dataclass
class FeatureDistanceConfig:
    """DAFormer's thing-class ImageNet feature distance.

    ``enabled=None``: on for ``daformer``, off for the other methods. ``classes=None``: the
    Cityscapes thing classes (:data:`CITYSCAPES_THING_CLASSES`) for a 19-class model; any other
    class set must name its thing classes.
    """

    enabled: Optional[bool] = None
    weight: float = 0.005
    classes: Optional[list[int]] = None
    scale_min_ratio: float = 0.75


CITYSCAPES_THING_CLASSES = [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]  # light, sign, person .. bicycle
FEATURE_DISTANCE_METHODS = ("daformer",)  # methods whose official recipe includes FD

# EMA teacher momentum of each method's official code; methods not listed use DAFormer's 0.999.
EMA_ALPHA_BY_METHOD = {"dacs": 0.99}
DAFORMER_EMA_ALPHA = 0.999


@dataclass
class SelfTrainingConfig:
    """The DACS / DAFormer mean-teacher self-training base.

    ``ema_alpha=None`` takes the method's official value (:data:`EMA_ALPHA_BY_METHOD`): 0.99 for
    ``dacs`` (the DACS release), 0.999 for DAFormer and the methods built on it.
    """

    ema_alpha: Optional[float] = None
    pseudo_threshold: float = 0.968
    ignore_top: int = 0  # rows at the top of target images whose pseudo-label weight is 0
    ignore_bottom: int = 0
    mix: Literal["class", "none"] = "class"
    mix_exclude_classes: list[int] = field(default_factory=list)  # classes ClassMix never pastes
    confidence_weight: Literal["batch", "image"] = "batch"  # one quality weight per batch (code) or image
    color_jitter_prob: float = 0.8  # probability that colour jitter is applied
    color_jitter_strength: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.15, 1.15])
    augmentation_draws: Literal["shared", "per_view"] = "shared"  # jitter/blur on-off: one draw per iteration or per view
    feature_distance: FeatureDistanceConfig = field(default_factory=FeatureDistanceConfig)

    def validate(self, path: str = "self_training") -> None:
        if self.ema_alpha is not None:
            require_range(path, "ema_alpha", self.ema_alpha, 0.0, 1.0)
        require_range(path, "pseudo_threshold", self.pseudo_threshold, 0.0)  # above 1: no pixel is confident
        require_range(path, "ignore_top", self.ignore_top, 0)
        require_range(path, "ignore_bottom", self.ignore_bottom, 0)
        require_range(path, "color_jitter_prob", self.color_jitter_prob, 0.0, 1.0)
        require_range(path, "color_jitter_strength", self.color_jitter_strength, 0.0, 0.5)
        require_range(path, "blur_prob", self.blur_prob, 0.0, 1.0)
        require(len(self.blur_sigma) == 2 and 0 < self.blur_sigma[0] <= self.blur_sigma[1], path, "blur_sigma",
                self.blur_sigma, "expects [low, high] with 0 < low <= high")


@dataclass
class MethodConfig:
    """The method to train and its settings.

    ``name`` is any registered method (:mod:`udaseg.methods`). Besides the shared ``self_training``
    base, each method owns a section ``method.<section>`` declared where the method is registered;
    those live in ``sections`` and read as attributes (``cfg.method.sepico``), with defaults when
    a preset does not set them.
    """

    name: str = "source_only"
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    sections: dict = field(default_factory=dict)

    @staticmethod
    def __open_sections__(missing: Optional[str] = None) -> dict:
        from udaseg.methods import method_sections

        return method_sections(missing)

    def __getattr__(self, key: str):
        sections = self.__dict__.get("sections")
        if key.startswith("_") or sections is None:
            raise AttributeError(key)
        if key not in sections:
            known = MethodConfig.__open_sections__(key)
            if key not in known:
                raise AttributeError(f"no config section 'method.{key}'; sections: {', '.join(sorted(known))}")
            sections[key] = known[key]()
        return sections[key]

    def section_items(self) -> dict:
        """Sections to write out: those set explicitly plus the active method's own (with defaults)."""
        from udaseg.methods import method_entry

        items = dict(self.sections)
        own = method_entry(self.name).section
        if own is not None and own not in items:
            items[own] = getattr(self, own)
        return items

    def validate(self) -> None:
        from udaseg.methods import method_entry

        method_entry(self.name)


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

    def validate(self, path: str = "eval") -> None:
        require_pair(path, "crop_size", self.crop_size)
        require_pair(path, "stride", self.stride)
        if self.mode == "slide" and (self.crop_size is None or self.stride is None):
            raise UserError(f"config key '{_key(path, 'mode')}' is 'slide', which needs {_key(path, 'crop_size')} "
                            f"and {_key(path, 'stride')} (the window and its step, [h, w])")
        require_range(path, "batch_windows", self.batch_windows, 1)
        if self.class_prior_scale is not None:
            require_range(path, "class_prior_scale", self.class_prior_scale, 0.0)


@dataclass
class PassConfig:
    """An offline pass run before a stage, on the previous stage's final weights.

    Its files go to ``<train.work_dir>/<name>/``. ``dataset`` defaults to the stage's target set
    (``pseudo_labels``) or source set (``class_prototypes``), always without random crop and flip.
    """

    name: str = ""
    kind: str = "pseudo_labels"  # pseudo_labels | class_prototypes | a registered pass
    dataset: Optional[DatasetConfig] = None
    model: Literal["student", "teacher"] = "teacher"
    threshold: float = 0.0  # pseudo_labels: pixels whose max softmax is below it become 255
    options: dict = field(default_factory=dict)  # kind-specific extras (class_prototypes: tap)

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UserError(f"offline pass name {self.name!r} must be a plain folder name")


@dataclass
class StageConfig:
    """One stage of a pipeline: an ordinary training run in ``<train.work_dir>/<name>/``.

    ``config`` is a partial config (same keys as a preset) that updates the run's config for this
    stage; ``{work_dir}`` in its strings stands for the pipeline's ``train.work_dir``. A stage
    starts from the previous stage's final weights (``model.init_from``) unless it sets its own.
    """

    name: str = ""
    before: list[PassConfig] = field(default_factory=list)  # offline passes run before the stage
    config: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UserError(f"stage name {self.name!r} must be a plain folder name")


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
    stages: list[StageConfig] = field(default_factory=list)  # a pipeline of training runs (engine.pipeline)

    def __post_init__(self) -> None:
        resolve_method_defaults(self)


def resolve_method_defaults(cfg: Config) -> None:
    """Fill the settings left empty ("the method's own value") from ``cfg.method.name``, and the run
    folder from the config's name (``runs/<name>``)."""
    if not cfg.train.work_dir:
        cfg.train.work_dir = f"runs/{cfg.name}"
    self_training = cfg.method.self_training
    if self_training.ema_alpha is None:
        self_training.ema_alpha = EMA_ALPHA_BY_METHOD.get(cfg.method.name, DAFORMER_EMA_ALPHA)
    fd = self_training.feature_distance
    if fd.enabled is None:
        fd.enabled = cfg.method.name in FEATURE_DISTANCE_METHODS
    key = "method.self_training.feature_distance"
    if fd.classes is None and cfg.model.num_classes == 19:
        fd.classes = list(CITYSCAPES_THING_CLASSES)
    if fd.enabled and fd.classes is None:
        raise UserError(f"config key '{key}.classes' must list the thing classes of this "
                        f"{cfg.model.num_classes}-class model (the default is Cityscapes' 19-class set), or set "
                        f"{key}.enabled=false")
    if fd.enabled:
        outside = [c for c in fd.classes if not 0 <= c < cfg.model.num_classes]
        require(not outside, key, "classes", fd.classes,
                f"must hold class indices of the {cfg.model.num_classes}-class model")
