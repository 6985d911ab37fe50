"""``udaseg analyze``: feature diagnostics of one or more checkpoints on a source and a target set.

For every checkpoint (each built from its own config) on the same two labelled datasets:

1. pixel embeddings at the chosen tap on the source and the target images: exact class centres and
   spreads over every labelled feature cell, and a class-balanced uniform sample per class;
2. CCD and PDD per class in each domain, and the source–target cosine of each class centre
   (:mod:`udaseg.analysis.distances`);
3. target evaluation as ``udaseg eval`` does it: per-class IoU and accuracy, the confusion matrix;
4. the reliability of the pseudo-labelling model (the EMA teacher when saved) on the target;
5. a joint t-SNE of the source and target samples.

Written to ``--out``: ``report.html`` (self-contained), ``analysis.json`` (all numbers),
``tsne.png``, ``iou.png``, ``ccd.png``, ``pdd.png``, ``similarity.png``, ``reliability.png`` and per
checkpoint ``confusion_<label>.png`` / ``.json``.

The datasets come from ``--config`` or the first checkpoint's config: the source is ``data.source``
without its training augmentation (no crop, flip or rare class sampling), the target is
``data.val[0]``; ``--source`` / ``--target NAME[:SPLIT]`` choose others.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from udaseg.analysis.calibration import ReliabilityAccumulator
from udaseg.analysis.distances import (
    centre_cosine_similarity,
    class_centre_distance,
    pixel_discrimination_distance,
)
from udaseg.analysis.embeddings import (
    AnalysisModel,
    DomainFeatures,
    FeatureTap,
    extract_features,
    load_analysis_model,
    require_labels,
    resolve_tap,
    tap_channels,
)
from udaseg.config.schema import Config, DatasetConfig
from udaseg.errors import UserError


# -- inputs -----------------------------------------------------------------------------------
def _check_numbers(args: argparse.Namespace) -> None:
    for key in ("max_images", "per_class", "metric_pixels", "bins"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.min_pixels < 0:
        raise UserError(f"--min-pixels must be >= 0, got {args.min_pixels}")
    if args.per_class > args.metric_pixels:
        raise UserError(f"--per-class {args.per_class} exceeds --metric-pixels {args.metric_pixels} "
                        f"(the t-SNE sample is drawn from the metric sample)")
    if not 0.0 < args.min_ratio <= 1.0:
        raise UserError(f"--min-ratio must lie in (0, 1], got {args.min_ratio}")
    if args.perplexity <= 0:
        raise UserError(f"--perplexity must be > 0, got {args.perplexity}")
    if args.name and len(args.name) != len(args.checkpoint):
        raise UserError(f"{len(args.name)} --name values for {len(args.checkpoint)} checkpoints")


def _dataset_spec(base: Optional[DatasetConfig], choice: Optional[str], role: str,
                  root: Optional[str] = None) -> DatasetConfig:
    if choice:
        name, _, split = choice.partition(":")
        if not name:
            raise UserError(f"--{role} expects NAME[:SPLIT], got {choice!r}")
        spec = copy.deepcopy(base) if base is not None and base.name == name else DatasetConfig(name=name)
        spec.split = split or spec.split
    elif base is not None:
        spec = copy.deepcopy(base)
    else:
        raise UserError(f"the config has no {role} dataset ({'data.val is empty' if role == 'target' else 'data.source'}); "
                        f"give one with --{role} NAME[:SPLIT]")
    if root:
        spec.root = root
    spec.labelled = True
    spec.crop_size, spec.flip, spec.rcs.enabled = None, False, False
    return spec


def _build_labelled(cfg: Config, spec: DatasetConfig):
    from udaseg.data import build_dataset

    dataset = build_dataset(spec, cfg.data.mean, cfg.data.std)
    require_labels(dataset[0], f"{spec.name}:{spec.split}", "udaseg analyze")
    return dataset


def select_indices(count: int, limit: int, seed: int) -> list[int]:
    """All indices when ``count <= limit``, else a seeded random subset of ``limit``, in order."""
    if count <= limit:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:limit].tolist())


def _class_indices(requested: Optional[Sequence[str]], names: Sequence[str]) -> Optional[list[int]]:
    if not requested:
        return None
    chosen = []
    for value in requested:
        if value in names:
            chosen.append(list(names).index(value))
        elif value.isdigit() and int(value) < len(names):
            chosen.append(int(value))
        else:
            raise UserError(f"--classes: unknown class {value!r}; classes: {', '.join(names)}")
    return list(dict.fromkeys(chosen))


def _labels(paths: Sequence[str], names: Optional[Sequence[str]], models: Sequence[AnalysisModel]) -> list[str]:
    """The figure label of each checkpoint; a repeated label gets the checkpoint's folder and file name."""
    labels = list(names) if names else [m.label for m in models]
    seen: set[str] = set()
    unique = []
    for label, path in zip(labels, paths):
        if label in seen:
            label = f"{label} ({Path(path).parent.name}/{Path(path).name})"
        seen.add(label)
        unique.append(label)
    return unique


def _slug(label: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"
    candidate, n = slug, 2
    while candidate in taken:
        candidate, n = f"{slug}_{n}", n + 1
    taken.add(candidate)
    return candidate


# -- per model --------------------------------------------------------------------------------
def _mean(values: Sequence[float], classes: Optional[Sequence[int]] = None) -> float:
    picked = [values[c] for c in (classes if classes is not None else range(len(values)))]
    finite = [v for v in picked if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def feature_metrics(source: DomainFeatures, target: DomainFeatures) -> dict:
    """CCD and PDD per class in each domain and the per-class source–target centre cosine."""
    result: dict = {"ccd": {}, "pdd": {}, "ccd_mean": {}, "pdd_mean": {}}
    centres = {}
    for role, domain in (("source", source), ("target", target)):
        stats = domain.statistics
        centres[role] = stats.centres()
        ccd = class_centre_distance(centres[role], stats.intra_class_variance()).tolist()
        feats, labels = domain.reservoir.sample()
        pdd = pixel_discrimination_distance(feats, labels, centres[role]).tolist()
        result["ccd"][role], result["pdd"][role] = ccd, pdd
        result["ccd_mean"][role], result["pdd_mean"][role] = _mean(ccd), _mean(pdd)
    similarity = centre_cosine_similarity(centres["source"], centres["target"]).tolist()
    result["similarity"], result["similarity_mean"] = similarity, _mean(similarity)
    return result


@torch.no_grad()
def reliability_of(model: torch.nn.Module, dataset, indices: Sequence[int], cfg: Config, device: torch.device,
                   bins: int, threshold: float, progress: bool, desc: str) -> dict:
    """Confidence bins of ``model``'s predictions on labelled target images (evaluation inference)."""
    from tqdm import tqdm

    from udaseg.models.inference import predict_logits

    accumulator = ReliabilityAccumulator(bins, threshold)
    for index in tqdm(indices, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        item = dataset[index]
        label = item["label"].to(device)[None]
        logits = predict_logits(model, item["image"][None].to(device), mode=cfg.eval.mode,
                                crop_size=cfg.eval.crop_size, stride=cfg.eval.stride, flip=cfg.eval.flip,
                                out_size=tuple(label.shape[-2:]), batch_windows=cfg.eval.batch_windows)
        accumulator.update_from_logits(logits, label)
    return accumulator.summary()


def _tsne_points(source: DomainFeatures, target: DomainFeatures, per_class: int, min_pixels: int,
                 classes: Optional[list[int]], names: Sequence[str], label: str, warnings: list[str]):
    """The t-SNE sample of one model; too-few-pixel classes are an error when asked for by name,
    else left out of that domain with a warning."""
    feats, cls, dom = [], [], []
    for domain_id, (role, domain) in enumerate((("source", source), ("target", target))):
        counts = domain.reservoir.counts()
        chosen = classes if classes is not None else list(range(len(names)))
        kept = []
        for c in chosen:
            if counts[c] >= max(min_pixels, 1):
                kept.append(c)
            elif classes is not None:
                raise UserError(f"class '{names[c]}' has {counts[c]} {role} pixels at this tap in {domain.images} "
                                f"images ({label}), fewer than --min-pixels {min_pixels} for the t-SNE; "
                                f"use more images (--max-images), --label-rule nearest, or leave it out of --classes")
            else:
                warnings.append(f"{label}: class '{names[c]}' has {counts[c]} {role} pixels (< --min-pixels "
                                f"{min_pixels}); left out of the {role} t-SNE points")
        f, l = domain.reservoir.sample(per_class, kept)
        feats.append(f)
        cls.append(l)
        dom.append(torch.full((l.numel(),), domain_id))
    labels = torch.cat(cls)
    if labels.unique().numel() < 2:
        raise UserError(f"{label}: fewer than two classes have --min-pixels {min_pixels} sampled pixels; "
                        f"nothing to compare in a t-SNE (use more images or --no-tsne)")
    return torch.cat(feats).numpy(), labels.numpy(), torch.cat(dom).numpy()


def analyze_model(model: AnalysisModel, tap: FeatureTap, data_cfg: Config, datasets: dict, dataset_names: dict,
                  indices: dict, args: argparse.Namespace, device: torch.device,
                  names: Sequence[str]) -> tuple[dict, dict]:
    """Everything about one checkpoint: the JSON entry and the domain features (for the t-SNE)."""
    from udaseg.evaluation.evaluator import evaluate

    progress = not args.no_progress
    num_classes = data_cfg.model.num_classes
    net = model.teacher if args.teacher else model.student
    if net is None:
        raise UserError(f"{model.path} holds no EMA teacher (method '{model.method}'); drop --teacher")
    net = net.to(device).eval()
    domains = {}
    for role in ("source", "target"):
        domains[role] = extract_features(
            net, datasets[role], indices[role], tap, device, name=dataset_names[role], num_classes=num_classes,
            capacity=args.metric_pixels, seed=args.seed, label_rule=args.label_rule, min_ratio=args.min_ratio,
            progress=progress, desc=f"{model.label}: {role} features")
    subset = torch.utils.data.Subset(datasets["target"], indices["target"])
    evaluation = evaluate(net.segmentor, subset, data_cfg.eval, num_classes, device, names, progress=progress,
                          desc=f"{model.label}: target eval")
    pseudo_labeller = model.teacher if model.teacher is not None else model.student
    pseudo_labeller.to(device).eval()
    reliability = reliability_of(pseudo_labeller.segmentor, datasets["target"], indices["target"], data_cfg, device,
                                 args.bins, model.cfg.method.self_training.pseudo_threshold, progress,
                                 f"{model.label}: reliability")
    reliability["model"] = "teacher" if model.teacher is not None else "student"
    entry = {
        "label": model.label,
        "checkpoint": str(model.path),
        "method": model.method,
        "model": model.cfg.model.name,
        "iteration": model.iteration,
        "evaluated": "teacher" if args.teacher else "student",
        "tap": tap.describe(),
        "tap_channels": tap_channels(net, tap),
        "pixels": {role: d.pixels for role, d in domains.items()},
        "sampled": {role: d.reservoir.counts() for role, d in domains.items()},
        "target_eval": {"miou": evaluation["miou"], "macc": evaluation["macc"], "aacc": evaluation["pixel_accuracy"],
                        "iou": evaluation["iou"], "accuracy": evaluation["accuracy"],
                        "protocol_classes": evaluation["classes"], "confusion_matrix": evaluation["confusion_matrix"]},
        "reliability": reliability,
        **feature_metrics(domains["source"], domains["target"]),
    }
    net.to("cpu")
    pseudo_labeller.to("cpu")
    return entry, domains


# -- command ----------------------------------------------------------------------------------
def run_analyze(args: argparse.Namespace) -> int:
    from udaseg.config import load_config
    from udaseg.engine import distributed as dist
    from udaseg.engine.trainer import check_writable

    _check_numbers(args)
    out = Path(args.out)
    paths = [Path(p) for p in args.checkpoint]
    config_override = load_config(args.config, args.overrides) if args.config else None
    models = [load_analysis_model(p, config_override, args.overrides) for p in paths]
    for model, label in zip(models, _labels(args.checkpoint, args.name, models)):
        model.label = label
    taps = [resolve_tap(m, args.tap) for m in models]  # every checkpoint must have the tap before any work
    if args.teacher:
        for m in models:
            if m.teacher is None:
                raise UserError(f"{m.path} holds no EMA teacher (method '{m.method}'); drop --teacher")
    data_cfg = config_override or models[0].cfg
    num_classes = data_cfg.model.num_classes
    for m in models:
        if m.cfg.model.num_classes != num_classes:
            raise UserError(f"{m.path} predicts {m.cfg.model.num_classes} classes, the data config has {num_classes}")
    check_writable(out)

    specs = {"source": _dataset_spec(data_cfg.data.source, args.source, "source", args.source_root),
             "target": _dataset_spec(data_cfg.data.val[0] if data_cfg.data.val else None, args.target, "target",
                                     args.target_root)}
    datasets = {role: _build_labelled(data_cfg, spec) for role, spec in specs.items()}
    dataset_names = {role: f"{spec.name}:{spec.split}" for role, spec in specs.items()}
    class_set = datasets["target"].classes
    if class_set.num_classes != num_classes:
        raise UserError(f"dataset {dataset_names['target']} has {class_set.num_classes} classes, "
                        f"the models predict {num_classes}")
    names = list(class_set.names)
    tsne_classes = _class_indices(args.classes, names)
    indices = {role: select_indices(len(d), args.max_images, args.seed) for role, d in datasets.items()}
    device = dist.local_device(args.device or data_cfg.train.device)

    entries, warnings, tsne_panels = [], [], []
    taken: set[str] = set()
    total = len(models)
    for position, tap in enumerate(taps):
        model = models.pop(0)  # each network is released once analysed
        print(f"udaseg analyze: [{position + 1}/{total}] {model.label} ({model.path}), tap {tap.describe()}",
              flush=True)
        entry, domains = analyze_model(model, tap, data_cfg, datasets, dataset_names, indices, args, device, names)
        entry["slug"] = _slug(model.label, taken)
        if not args.no_tsne:
            points = _tsne_points(domains["source"], domains["target"], args.per_class, args.min_pixels,
                                  tsne_classes, names, model.label, warnings)
            from udaseg.analysis.tsne import tsne_embedding

            print(f"udaseg analyze: t-SNE of {len(points[1])} pixels of {model.label}", flush=True)
            coords = tsne_embedding(points[0], args.seed, args.perplexity)
            tsne_panels.append({"label": model.label, "coords": coords, "classes": points[1], "domains": points[2]})
            entry["tsne"] = {"points": int(len(points[1])), "classes": sorted(int(c) for c in np.unique(points[1]))}
        entries.append(entry)
    for line in warnings:
        print(f"udaseg analyze: warning: {line}", file=sys.stderr)
    files = write_report(out, entries, names, class_set.palette, tsne_panels, warnings, {
        "tap": args.tap, "teacher": args.teacher, "label_rule": args.label_rule, "min_ratio": args.min_ratio,
        "per_class": args.per_class, "metric_pixels": args.metric_pixels, "min_pixels": args.min_pixels,
        "max_images": args.max_images, "perplexity": args.perplexity, "bins": args.bins, "seed": args.seed,
        "eval": {"mode": data_cfg.eval.mode, "protocol": data_cfg.eval.protocol},
        "source": {"dataset": dataset_names["source"], "images": len(indices["source"])},
        "target": {"dataset": dataset_names["target"], "images": len(indices["target"])},
    })
    print(f"udaseg analyze: wrote {len(files)} files to {out}; open {out / 'report.html'}")
    return 0


def write_report(out: Path, entries: list[dict], names: Sequence[str], palette, tsne_panels: list[dict],
                 warnings: list[str], settings: dict) -> list[str]:
    """Figures, per-model confusion files, ``analysis.json`` and ``report.html``; returns the file names."""
    from udaseg.analysis import plots
    from udaseg.analysis.report import render_html, write_bytes, write_json
    from udaseg.evaluation.metrics import normalised_confusion

    figures: dict[str, str] = {}
    files: list[str] = []

    def save(key: str, file: str, data: bytes) -> None:
        write_bytes(out / file, data)
        figures[key] = file
        files.append(file)

    for entry in entries:
        counts = entry["target_eval"]["confusion_matrix"]
        normalised = normalised_confusion(counts)
        stem = f"confusion_{entry['slug']}"
        write_json(out / f"{stem}.json", {"model": entry["label"], "classes": list(names), "rows": "ground truth",
                                           "columns": "prediction", "counts": counts, "normalised": normalised})
        write_bytes(out / f"{stem}.png", plots.confusion_figure(np.asarray(normalised, dtype=float), names,
                                                                f"{entry['label']} (target)"))
        entry["files"] = {"confusion_json": f"{stem}.json", "confusion_png": f"{stem}.png"}
        files += [f"{stem}.png", f"{stem}.json"]
    if tsne_panels:
        save("tsne", "tsne.png", plots.tsne_figure(tsne_panels, names, palette))
    labels = [e["label"] for e in entries]
    protocol = entries[0]["target_eval"]["protocol_classes"]
    iou = {f"{e['label']} ({100 * e['target_eval']['miou']:.1f})":
           [100 * e["target_eval"]["iou"][c] for c in protocol] for e in entries}
    save("iou", "iou.png", plots.grouped_bars_figure(iou, [names[c] for c in protocol], "IoU (%)",
                                                      "per-class IoU on the target (legend: mIoU)"))
    for key, title in (("ccd", "class centre distance (target, lower is better)"),
                       ("pdd", "pixel discrimination distance (target, lower is better)")):
        save(key, f"{key}.png", plots.grouped_bars_figure({e["label"]: e[key]["target"] for e in entries}, names,
                                                          key.upper(), title))
    save("similarity", "similarity.png", plots.grouped_bars_figure(
        {e["label"]: e["similarity"] for e in entries}, names, "cosine",
        "source–target cosine similarity of class centres (higher is closer)", reference=1.0))
    save("reliability", "reliability.png", plots.reliability_figure(
        [{"label": label, "model": e["reliability"]["model"], "summary": e["reliability"]}
         for label, e in zip(labels, entries)]))
    files += ["analysis.json", "report.html"]
    report = {"classes": list(names), "settings": settings, "models": entries, "warnings": warnings,
              "files": files}
    write_json(out / "analysis.json", report)
    from udaseg.analysis.report import json_safe

    write_bytes(out / "report.html", render_html(out, json_safe(report), figures).encode())
    return files
