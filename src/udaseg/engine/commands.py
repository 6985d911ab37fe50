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
from udaseg.engine import distributed as dist
from udaseg.engine.checkpoint import load_checkpoint
from udaseg.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def format_iou_table(names: list[str], iou: list[float], miou: float, extra: Optional[dict[str, list[float]]] = None) -> str:
    """A plain-text table of per-class IoU (%) with optional further columns."""
    extra = extra or {}
    header = f"{'class':<16}{'IoU':>8}" + "".join(f"{k:>12}" for k in extra)
    lines = [header, "-" * len(header)]
    for i, name in enumerate(names):
        row = f"{name:<16}{_pct(iou[i]):>8}"
        row += "".join(f"{_pct(col[i]):>12}" for col in extra.values())
        lines.append(row)
    lines.append("-" * len(header))
    lines.append(f"{'mIoU':<16}{_pct(miou):>8}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


# -- train ------------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_presets()))
        return 0
    if not args.config and not args.resume:
        raise UserError("give a preset or config file with --config (see 'udaseg train --list')")
    cfg = load_config(args.config, args.overrides) if args.config else None
    resume = args.resume
    if cfg is None:
        state = load_checkpoint(Path(resume))
        cfg = config_from_checkpoint(state, Path(resume), args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return 0
    stage = getattr(args, "stage", None)
    if cfg.stages:
        return _train_pipeline(cfg, resume, stage)
    if stage:
        raise UserError(f"--stage {stage}: the config has no stages")
    from udaseg.engine.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    if dist.is_main():
        print(f"udaseg train: {cfg.name} ({cfg.method.name}, {cfg.model.name}) -> {cfg.train.work_dir}; "
              f"effective config in {Path(cfg.train.work_dir) / 'config.yaml'}")
    summary = trainer.train()
    if dist.is_main() and summary:
        print(f"final student mIoU on {summary['dataset']}: {100 * summary['miou']:.2f}")
    dist.cleanup()
    return 0


def _train_pipeline(cfg: Config, resume: Optional[str], stage: Optional[str]) -> int:
    from udaseg.engine.pipeline import run_pipeline

    if resume not in (None, "latest"):
        raise UserError("a pipeline resumes from its work dir: use --resume without a file "
                        "(or resume one stage's run with --resume <stage>/latest.pt and no --config)")
    summary = run_pipeline(cfg, resume=resume is not None, only_stage=stage)
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
def load_segmentor_for_inference(checkpoint: Path, config: Optional[str], overrides, use_teacher: bool = False):
    from udaseg.engine.trainer import build_segmentor, check_compatible

    state = load_checkpoint(checkpoint)
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
    results = {}
    for spec in cfg.data.val:
        dataset = build_dataset(spec, cfg.data.mean, cfg.data.std)
        names = list(dataset.classes.names)
        result = run_eval(segmentor, dataset, cfg.eval, cfg.model.num_classes, device, names,
                          desc=f"eval {spec.name}")
        results[f"{spec.name}/{spec.split}"] = result
        print(f"\n{spec.name} ({spec.split}, {len(dataset)} images)")
        table_names = names or [str(i) for i in range(cfg.model.num_classes)]
        print(format_iou_table(table_names, result["iou"], result["miou"]))
    out = Path(args.out) if args.out else checkpoint.with_suffix(".eval.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": str(checkpoint), "model": "teacher" if args.teacher else "student",
                                   "results": results}, indent=2))
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror})") from None
    print(f"\nresults written to {out}")
    return 0


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
    mean = np.asarray(cfg.data.mean, dtype=np.float32)
    std = np.asarray(cfg.data.std, dtype=np.float32)
    tensor = torch.from_numpy(((resized.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())
    return tensor, rgb


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
    for path in tqdm(files, desc="predict", dynamic_ncols=True):
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
