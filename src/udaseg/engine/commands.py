"""``udaseg train``, ``udaseg eval`` and ``udaseg predict``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from udaseg.config import config_to_yaml, list_presets, load_config
from udaseg.config.loader import from_dict
from udaseg.config.schema import Config
from udaseg.data.transforms import image_statistics, normalize
from udaseg.engine import distributed as dist
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# -- train ------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_presets()))
        return 0
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # '--resume key=value': the override was read as --resume's optional value
        args.overrides = [args.resume, *args.overrides]
        args.resume = "latest"
    if not args.config and not args.resume:
        raise UserError("give a preset or config file with --config (see 'udaseg train --list')")
    if args.resume and getattr(args, "overwrite", False):
        raise UserError("--resume and --overwrite exclude each other")
    cfg = load_config(args.config, args.overrides) if args.config else None
    resume = args.resume
    if cfg is None:
        if resume == "latest":
            raise UserError("--resume without --config needs a checkpoint file (e.g. --resume runs/NAME/latest.pt), "
                            "or give the run's config with --config")
        state = load_checkpoint(Path(resume))
        cfg = config_from_checkpoint(state, Path(resume), args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return 0
    stage = getattr(args, "stage", None)
    if cfg.stages:
        return _train_pipeline(cfg, resume, stage, getattr(args, "overwrite", False))
    if stage:
        raise UserError(f"--stage {stage}: the config has no stages")
    from udaseg.engine.trainer import Trainer

    trainer = Trainer(cfg, resume=resume, overwrite=getattr(args, "overwrite", False))
    if trainer.finished:
        if dist.is_main():
            print(f"udaseg train: the run in {cfg.train.work_dir} is already finished (iteration {trainer.iteration} "
                  f"of {cfg.train.iterations}); nothing to train. Evaluate it with 'udaseg eval --checkpoint "
                  f"{Path(cfg.train.work_dir) / 'latest.pt'}'")
        dist.cleanup()
        return 0
    if dist.is_main():
        print(f"udaseg train: {cfg.name} ({cfg.method.name}, {cfg.model.name}) -> {cfg.train.work_dir}; "
              f"effective config in {Path(cfg.train.work_dir) / 'config.yaml'}, log in "
              f"{Path(cfg.train.work_dir) / 'train.log'}")
    summary = trainer.train()
    if dist.is_main() and summary:
        print(f"final student mIoU on {summary['dataset']}: {100 * summary['miou']:.2f}")
        teacher = summary.get(f"teacher/{summary['dataset']}")
        if teacher is not None:
            print(f"final teacher mIoU on {summary['dataset']}: {100 * teacher['miou']:.2f}")
    dist.cleanup()
    return 0


def _train_pipeline(cfg: Config, resume: Optional[str], stage: Optional[str], overwrite: bool = False) -> int:
    from udaseg.engine.pipeline import run_pipeline

    if resume not in (None, "latest"):
        raise UserError("a pipeline resumes from its work dir: use --resume without a file "
                        "(or resume one stage's run with --resume <stage>/latest.pt and no --config)")
    summary = run_pipeline(cfg, resume=resume is not None, only_stage=stage, overwrite=overwrite)
    if dist.is_main() and summary:
        print(f"final student mIoU on {summary['dataset']}: {100 * summary['miou']:.2f}")
    dist.cleanup()
    return 0


def config_from_checkpoint(state: dict, path: Path, overrides=()) -> Config:
    if "config" not in state:
        raise UserError(f"{path} holds no config; pass --config")
    from udaseg.config.loader import apply_overrides_to_dict

    data = apply_overrides_to_dict(state["config"], overrides, Config)
    return from_dict(Config, data)


# -- shared by eval / predict -----------------------------------------------------------------
def is_udaseg_checkpoint(state: dict) -> bool:
    return isinstance(state.get("model"), dict) and ("model_name" in state or "config" in state)


def load_segmentor_for_inference(checkpoint: Path, config: Optional[str], overrides, use_teacher: bool = False):
    """``(cfg, segmentor)`` from a udaseg checkpoint, or from an official release checkpoint
    (DAFormer / SePiCo / HRDA / MIC mmseg files) converted on load, which needs ``--config``."""
    from udaseg.engine.trainer import build_segmentor, check_compatible

    state = load_checkpoint(checkpoint)
    if not is_udaseg_checkpoint(state):
        return load_release_checkpoint(checkpoint, config, overrides, use_teacher)
    cfg = load_config(config, overrides) if config else config_from_checkpoint(state, checkpoint, overrides)
    check_compatible(state, cfg, checkpoint)
    cfg.model.pretrained = ""
    segmentor = build_segmentor(cfg)
    source = state["model"]
    if use_teacher:
        if not state.get("teacher"):
            raise UserError(f"{checkpoint} holds no EMA teacher")
        source = state["teacher"]
    prefix = _segmentor_prefix(source)
    weights = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    missing, unexpected = segmentor.load_state_dict(weights, strict=False)
    if missing:
        raise UserError(f"{checkpoint} does not match model '{cfg.model.name}': {len(missing)} missing keys "
                        f"(first: {missing[0]})")
    return cfg, segmentor


def load_release_checkpoint(checkpoint: Path, config: Optional[str], overrides, use_teacher: bool = False):
    """An official release file (mmseg ``state_dict``; UDA files with ``model.*`` / ``ema_model.*``)
    loaded into the segmentor of ``config``; the key report is printed, and a file that leaves any
    segmentor weight unfilled is refused."""
    from udaseg.engine.trainer import build_segmentor
    from udaseg.models import load_pretrained

    if not config:
        raise UserError(f"{checkpoint} is not a udaseg checkpoint; to use an official release file give the "
                        f"config of its model with --config (e.g. --config daformer_mitb5_gta2cs)")
    cfg = load_config(config, overrides)
    cfg.model.pretrained = ""
    segmentor = build_segmentor(cfg)
    report = load_pretrained(segmentor, str(checkpoint), use_ema=use_teacher)
    needed = [k for k in report.missing if not k.startswith("proj_head.")]
    print(f"converted release checkpoint: {report.summary()}")
    if needed or report.mismatched:
        detail = (f"{len(needed)} weights missing (e.g. {', '.join(needed[:2])})" if needed else
                  f"{len(report.mismatched)} shape mismatches (e.g. {report.mismatched[0][0]}: "
                  f"{list(report.mismatched[0][1])} vs {list(report.mismatched[0][2])})")
        raise UserError(f"{checkpoint} ({report.format}) does not fit model '{cfg.model.name}' of {config}: {detail}")
    return cfg, segmentor


def _segmentor_prefix(state: dict) -> str:
    for key in state:
        idx = key.find("segmentor.")
        if idx >= 0:
            return key[: idx + len("segmentor.")]
    return ""


# -- eval -------------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace) -> int:
    from udaseg.data import build_dataset
    from udaseg.evaluation.evaluator import evaluate as run_eval

    checkpoint = Path(args.checkpoint)
    cfg, segmentor = load_segmentor_for_inference(checkpoint, args.config, args.overrides, args.teacher)
    if not cfg.data.val:
        raise UserError("the config has no evaluation dataset (data.val is empty)")
    device = dist.local_device(cfg.train.device)
    segmentor.to(device)
    from udaseg.engine.checks import check_class_count
    from udaseg.engine.logging import stdout_is_terminal
    from udaseg.engine.run_folder import json_safe, val_set_keys

    results = {}
    datasets = [build_dataset(spec, cfg.data.mean, cfg.data.std) for spec in cfg.data.val]
    for position, (spec, dataset) in enumerate(zip(cfg.data.val, datasets)):
        check_class_count(dataset, f"data.val[{position}]", spec, cfg.model.num_classes,
                          fix=f"the checkpoint's model predicts {cfg.model.num_classes}; evaluate on data with its classes")
    for key, spec, dataset in zip(val_set_keys(cfg.data.val), cfg.data.val, datasets):
        names = list(dataset.classes.names)
        result = run_eval(segmentor, dataset, cfg.eval, cfg.model.num_classes, device, names,
                          progress=stdout_is_terminal(), desc=f"eval {key}")
        results[key] = result
        print(f"\n{spec.name} ({spec.split}, {len(dataset)} images)")
        print(format_eval_tables(result))
    # the teacher's results get their own file, so evaluating both keeps both
    default_suffix = ".teacher.eval.json" if args.teacher else ".eval.json"
    out = Path(args.out) if args.out else checkpoint.with_suffix(default_suffix)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        document = {"checkpoint": str(checkpoint), "model": "teacher" if args.teacher else "student",
                    "results": results}
        out.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False))
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror})") from None
    print(f"\nresults written to {out}")
    for key, result in results.items():
        written = write_confusion_files(out, key, result)
        print(f"confusion matrix of {key}: {', '.join(str(p) for p in written)}")
    return 0


def format_eval_tables(result: dict) -> str:
    """mmseg's printout (per-class IoU and Acc, then aAcc / mIoU / mAcc) of an evaluator result."""
    from udaseg.evaluation.metrics import format_mmseg_tables

    return format_mmseg_tables(result["names"], result["iou"], result["accuracy"], result["pixel_accuracy"],
                               result["miou"], result["macc"], result["classes"])


def write_confusion_files(out: Path, key: str, result: dict) -> list[Path]:
    """``<out stem>.<dataset>_<split>.confusion.json`` (counts and row-normalised shares) and, when
    matplotlib is installed, the matching ``.png`` of the normalised matrix."""
    from udaseg.analysis.report import write_bytes, write_json
    from udaseg.evaluation.metrics import normalised_confusion

    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    base = f"{stem}.{key.replace('/', '_').replace(':', '_')}.confusion"
    json_path, png_path = out.parent / f"{base}.json", out.parent / f"{base}.png"
    normalised = normalised_confusion(result["confusion_matrix"])
    write_json(json_path, {"classes": result["names"], "rows": "ground truth", "columns": "prediction",
                           "counts": result["confusion_matrix"], "normalised": normalised})
    written = [json_path]
    try:
        import matplotlib  # noqa: F401  (optional extra)
    except ImportError:
        return written
    from udaseg.analysis.plots import confusion_figure

    write_bytes(png_path, confusion_figure(np.asarray(normalised), result["names"], key))
    return written + [png_path]


# -- predict ----------------------------------------------------------------------------------
def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return files


def _prepare_image(path: Path, cfg: Config) -> tuple[torch.Tensor, np.ndarray]:
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({err})") from None
    resized = rgb
    spec = cfg.data.val[0] if cfg.data.val else None
    if spec is not None and spec.resize:
        resized = _resize_like_pipeline(rgb, spec.resize, spec.keep_ratio)
    pixels = torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1).copy())
    if (spec or cfg.data.source).normalization == "per_image":
        mean, std = image_statistics(pixels)
    else:
        mean, std = cfg.data.mean, cfg.data.std
    return normalize(pixels, mean, std), rgb


def _resize_like_pipeline(rgb: np.ndarray, scale: list[int], keep_ratio: bool) -> np.ndarray:
    h, w = rgb.shape[:2]
    if keep_ratio:
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
        size = (int(w * factor + 0.5), int(h * factor + 0.5))
    else:
        size = (scale[0], scale[1])
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def predict(args: argparse.Namespace) -> int:
    from udaseg.data.labels import colorize
    from udaseg.models.inference import predict_logits

    cfg, segmentor = load_segmentor_for_inference(Path(args.checkpoint), args.config, args.overrides)
    files = list_images(Path(args.input))
    out = Path(args.out)
    from udaseg.engine.trainer import check_writable

    check_writable(out)
    device = dist.local_device(cfg.train.device)
    from udaseg.evaluation.evaluator import inference_model

    segmentor = inference_model(segmentor.to(device).eval(), cfg.eval, cfg.model.num_classes)
    palette = _palette(cfg)
    root = Path(args.input) if Path(args.input).is_dir() else Path(args.input).parent
    for path in tqdm(files, desc="predict", dynamic_ncols=True, disable=None):  # no bar when redirected
        tensor, rgb = _prepare_image(path, cfg)
        with torch.no_grad():
            logits = predict_logits(segmentor, tensor.unsqueeze(0).to(device), mode=cfg.eval.mode,
                                    crop_size=cfg.eval.crop_size, stride=cfg.eval.stride, flip=cfg.eval.flip,
                                    out_size=rgb.shape[:2], batch_windows=cfg.eval.batch_windows)
        label = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        rel = path.relative_to(root).with_suffix(".png")
        if args.format == "darkzurich":
            _write_darkzurich(out, rel, label)
            continue
        colour = colorize(label, palette)
        overlay = (0.5 * rgb.astype(np.float32) + 0.5 * colour.astype(np.float32)).astype(np.uint8)
        for folder, array in (("labels", label), ("color", colour), ("overlay", overlay)):
            target = out / folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(target)
    print(f"wrote predictions for {len(files)} images to {out}")
    return 0


def _palette(cfg: Config):
    """The palette of the config's evaluation dataset, or Cityscapes' when it cannot be opened here."""
    from udaseg.data import build_dataset
    from udaseg.data.labels import CITYSCAPES_CLASSES

    if cfg.data.val:
        try:
            return build_dataset(cfg.data.val[0], cfg.data.mean, cfg.data.std).classes.palette
        except UserError:
            pass
    return CITYSCAPES_CLASSES.palette


def _write_darkzurich(out: Path, rel: Path, label: np.ndarray) -> None:
    """Dark Zurich test-server layout: labelTrainIds, labelTrainIds_invalid and confidence folders."""
    name = rel.name
    for folder in ("labelTrainIds", "labelTrainIds_invalid", "confidence"):
        target = out / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(target)
