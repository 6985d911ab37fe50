"""Offline passes between the stages of a pipeline, and datasets that read their outputs.

A pass is a named, reusable step registered with :func:`register_pass`; it reads the weights a
previous stage ended with and writes files under its own folder ``<work_dir>/<pass name>/``:

| kind | writes |
|---|---|
| ``pseudo_labels`` | ``labels/<sample>.png`` (trainIds; 255 where the confidence is below the threshold) and ``confidence/<sample>.npz`` (``confidence``: float16 max-softmax), at the dataset's original image size; with per-class thresholds also ``thresholds.json`` |
| ``class_prototypes`` | ``prototypes.pt``: ``prototypes`` K×C (mean of L2-normalised ``tap`` features over the pixels of each class in the labels), ``counts`` K |

Options (``options`` of the pass; an unknown key is an error):

* ``pseudo_labels``: ``thresholds: fixed`` (default; the pass's ``threshold`` for every class) or
  ``class_quantile`` (CBST / SPCL: a first sweep over the split computes, per predicted class, the
  ``quantile`` (0.5) of the confidences at the network's input size, capped at ``cap`` (0.9),
  from histograms of ``bins`` (10000) bins, see :mod:`udaseg.adapt.thresholds`; the second sweep
  writes the labels with these thresholds).
* ``class_prototypes``: ``tap`` (``enc_last``); ``mask: label`` (default) or
  ``label_and_prediction`` (SPCL's code: only pixels whose label equals the model's argmax on the
  feature grid; a class without such a pixel falls back to its label-only mean); ``average:
  pixels`` (default: one mean over every pixel of the set) or ``images`` (SPCL's code: the mean,
  over the images that contain the class, of each image's class mean).

Every file is written to a temporary name and renamed, so an interrupted pass leaves only whole
files; a pass started again skips the samples whose files are there (``resume``), and writes
``pass.json`` when it is complete. Progress is shown with a progress bar.

:class:`PseudoLabelledDataset` turns a dataset into one labelled by a ``pseudo_labels`` pass: its
labels go through the dataset's own pipeline (resize, crop, flip) with the image, as ground truth
would (``data.target.pseudo_labels: <folder>``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from udaseg.config.schema import Config, DatasetConfig, PassConfig
from udaseg.errors import UserError

DONE_FILE = "pass.json"
IGNORE_INDEX = 255


@dataclass
class PassContext:
    """What a pass runs with: its settings, the config of the stage it precedes, the weights to use."""

    spec: PassConfig
    run_cfg: Config  # the config of the stage that the pass feeds
    weights_cfg: Config  # the config the weights were trained with
    weights: Path  # a udaseg checkpoint (the previous stage's final weights)
    out_dir: Path
    resume: bool = True
    progress: bool = True


OfflinePass = Callable[[PassContext], dict]
PASSES: dict[str, OfflinePass] = {}


def register_pass(kind: str) -> Callable[[OfflinePass], OfflinePass]:
    def decorator(fn: OfflinePass) -> OfflinePass:
        PASSES[kind] = fn
        return fn
    return decorator


def pass_done(out_dir: Path) -> bool:
    return (out_dir / DONE_FILE).is_file()


def run_pass(ctx: PassContext) -> dict:
    """Run (or finish) pass ``ctx.spec``; a completed pass with ``resume`` is not run again."""
    if ctx.spec.kind not in PASSES:
        from udaseg.config.loader import closest

        hint = closest(ctx.spec.kind, PASSES)
        suffix = f"; did you mean '{hint}'?" if hint else f"; kinds: {', '.join(sorted(PASSES))}"
        raise UserError(f"offline pass '{ctx.spec.name}': unknown kind '{ctx.spec.kind}'{suffix}")
    if ctx.resume and pass_done(ctx.out_dir):
        return json.loads((ctx.out_dir / DONE_FILE).read_text())
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    summary = PASSES[ctx.spec.kind](ctx)
    record = {"name": ctx.spec.name, "kind": ctx.spec.kind, "weights": str(ctx.weights), **summary}
    write_atomic(ctx.out_dir / DONE_FILE, lambda path: path.write_text(json.dumps(record, indent=2)))
    return record


# -- files ------------------------------------------------------------------------------------
def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temp_path)`` next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp_path = Path(temp)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


def _save_png(label: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8), mode="L").save(path, format="PNG")


def _save_npz(confidence: np.ndarray, path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez_compressed(handle, confidence=confidence.astype(np.float16))


def sample_name(dataset, index: int) -> str:
    if hasattr(dataset, "sample_name"):
        return dataset.sample_name(index)
    return dataset.samples[index].name


def output_stem(name: str) -> str:
    """The relative file stem of a sample's outputs (its name without the image suffix)."""
    return str(Path(name).with_suffix(""))


def label_file(folder: Path, name: str) -> Path:
    return Path(folder) / "labels" / f"{output_stem(name)}.png"


def confidence_file(folder: Path, name: str) -> Path:
    return Path(folder) / "confidence" / f"{output_stem(name)}.npz"


# -- weights ----------------------------------------------------------------------------------
def load_pass_model(ctx: PassContext) -> torch.nn.Module:
    """The segmentor of ``ctx.weights`` (student or teacher, ``spec.model``) in eval mode."""
    from udaseg.engine.init_from import initial_weights
    from udaseg.engine.trainer import build_segmentor

    cfg = dataclasses.replace(ctx.weights_cfg, model=dataclasses.replace(ctx.weights_cfg.model, pretrained="",
                                                                         init_from=""))
    weights = initial_weights(ctx.weights, cfg.model.name, cfg.model.num_classes, ctx.spec.model)
    segmentor = build_segmentor(cfg)
    prefix = "segmentor."
    segmentor.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return segmentor.eval()


def pass_dataset(ctx: PassContext, default: Optional[DatasetConfig], labelled: bool):
    """The pass's dataset: ``spec.dataset`` or ``default``, without random crop and flip."""
    from udaseg.data import build_dataset

    spec = ctx.spec.dataset or default
    if spec is None:
        raise UserError(f"offline pass '{ctx.spec.name}' needs a dataset (set its 'dataset')")
    spec = dataclasses.replace(spec, crop_size=None, flip=False, labelled=labelled, pseudo_labels="",
                               rcs=dataclasses.replace(spec.rcs, enabled=False))
    return build_dataset(spec, ctx.run_cfg.data.mean, ctx.run_cfg.data.std)


def _device(cfg: Config) -> torch.device:
    from udaseg.engine import distributed as dist

    return dist.local_device(cfg.train.device)


# -- the built-in passes ----------------------------------------------------------------------
PASS_OPTIONS = {
    "pseudo_labels": {"thresholds": "fixed", "quantile": 0.5, "cap": 0.9, "bins": 10000},
    "class_prototypes": {"tap": "enc_last", "mask": "label", "average": "pixels"},
}
THRESHOLD_RULES = ("fixed", "class_quantile")
PROTOTYPE_MASKS = ("label", "label_and_prediction")
PROTOTYPE_AVERAGES = ("pixels", "images")
THRESHOLDS_FILE = "thresholds.json"


def check_pass_options(spec: PassConfig) -> dict:
    """The options of a built-in pass over their defaults; an unknown key names the closest valid one.
    Passes registered elsewhere take their options as given."""
    from udaseg.config.loader import closest

    if spec.kind not in PASS_OPTIONS:
        return dict(spec.options)
    defaults = PASS_OPTIONS[spec.kind]
    for key in spec.options:
        if key not in defaults:
            hint = closest(key, defaults)
            suffix = f"; did you mean '{hint}'?" if hint else f"; options: {', '.join(sorted(defaults))}"
            raise UserError(f"offline pass '{spec.name}': unknown option '{key}'{suffix}")
    return {**defaults, **spec.options}


def pass_options(ctx: PassContext) -> dict:
    return check_pass_options(ctx.spec)


def _choice(ctx: PassContext, options: dict, key: str, choices: tuple[str, ...]) -> str:
    value = options[key]
    if value not in choices:
        raise UserError(f"offline pass '{ctx.spec.name}': option '{key}' must be one of {', '.join(choices)}, "
                        f"got {value!r}")
    return value


def _pass_logits(model, image: torch.Tensor, eval_cfg, out_size) -> torch.Tensor:
    from udaseg.models.inference import predict_logits

    with torch.no_grad():
        return predict_logits(model, image, mode=eval_cfg.mode, crop_size=eval_cfg.crop_size, stride=eval_cfg.stride,
                              flip=eval_cfg.flip, out_size=tuple(out_size), batch_windows=eval_cfg.batch_windows)


def class_thresholds(ctx: PassContext, model, dataset, eval_cfg, options: dict, device) -> torch.Tensor:
    """Per-class thresholds (:mod:`udaseg.adapt.thresholds`) from a sweep at the input size; kept
    in ``thresholds.json`` so an interrupted pass does not sweep again."""
    from udaseg.adapt.thresholds import ClassConfidenceHistogram

    path = ctx.out_dir / THRESHOLDS_FILE
    if ctx.resume and path.is_file():
        return torch.tensor(json.loads(path.read_text())["thresholds"])
    bins = int(options["bins"])
    if bins < 1:
        raise UserError(f"offline pass '{ctx.spec.name}': option 'bins' must be >= 1, got {bins}")
    histogram = ClassConfidenceHistogram(ctx.weights_cfg.model.num_classes, bins)
    for index in tqdm(range(len(dataset)), desc=f"pass {ctx.spec.name} (thresholds)", disable=not ctx.progress,
                      dynamic_ncols=True):
        image = dataset[index]["image"].unsqueeze(0).to(device)
        confidence, label = F.softmax(_pass_logits(model, image, eval_cfg, image.shape[-2:]).float(), dim=1).max(dim=1)
        histogram.add(confidence, label)
    thresholds = histogram.thresholds(float(options["quantile"]), float(options["cap"]))
    record = {"thresholds": thresholds.tolist(), "pixels": histogram.counts.sum(dim=1).tolist(),
              "quantile": float(options["quantile"]), "cap": float(options["cap"]), "bins": bins}
    write_atomic(path, lambda p: p.write_text(json.dumps(record, indent=2)))
    return thresholds


@register_pass("pseudo_labels")
def pseudo_label_pass(ctx: PassContext) -> dict:
    """Pseudo-labels and confidences of a whole split (default: the stage's target set)."""
    from udaseg.evaluation.evaluator import inference_model

    options = pass_options(ctx)
    rule = _choice(ctx, options, "thresholds", THRESHOLD_RULES)
    device = _device(ctx.run_cfg)
    dataset = pass_dataset(ctx, ctx.run_cfg.data.target, labelled=False)
    eval_cfg = ctx.weights_cfg.eval
    num_classes = ctx.weights_cfg.model.num_classes
    model = inference_model(load_pass_model(ctx).to(device), eval_cfg, num_classes)
    if rule == "class_quantile":
        thresholds = class_thresholds(ctx, model, dataset, eval_cfg, options, device).to(device)
    else:
        thresholds = torch.full((num_classes,), float(ctx.spec.threshold), device=device)
    written = skipped = 0
    kept = total = 0
    for index in tqdm(range(len(dataset)), desc=f"pass {ctx.spec.name}", disable=not ctx.progress,
                      dynamic_ncols=True):
        name = sample_name(dataset, index)
        label_path, confidence_path = label_file(ctx.out_dir, name), confidence_file(ctx.out_dir, name)
        if ctx.resume and label_path.is_file() and confidence_path.is_file():
            skipped += 1
            continue
        original = dataset.load_arrays(index)["image"]
        image = dataset[index]["image"].unsqueeze(0).to(device)
        logits = _pass_logits(model, image, eval_cfg, original.shape[:2])
        confidence, label = F.softmax(logits.float(), dim=1).max(dim=1)
        label = label[0]
        label = torch.where(confidence[0] < thresholds[label], IGNORE_INDEX, label).to(torch.uint8)
        kept += int((label != IGNORE_INDEX).sum())
        total += label.numel()
        write_atomic(confidence_path, lambda path: _save_npz(confidence[0].cpu().numpy(), path))
        write_atomic(label_path, lambda path: _save_png(label.cpu().numpy(), path))
        written += 1
    return {"samples": len(dataset), "written": written, "skipped": skipped,
            "kept_fraction_of_written": kept / total if total else None,
            **({"thresholds": thresholds.tolist()} if rule == "class_quantile" else {})}


@register_pass("class_prototypes")
def class_prototype_pass(ctx: PassContext) -> dict:
    """Per-class mean of L2-normalised features (tap ``options.tap``) over a labelled set (default:
    the stage's source set); labels are brought to the feature grid by nearest-neighbour resizing
    (legacy ``nearest``: the top-left pixel of each cell). ``options.mask`` and ``options.average``
    choose the pixels and the averaging (module docstring). Classes without a pixel get a zero row
    and count 0."""
    options = pass_options(ctx)
    mask_rule = _choice(ctx, options, "mask", PROTOTYPE_MASKS)
    per_image = _choice(ctx, options, "average", PROTOTYPE_AVERAGES) == "images"
    tap = str(options["tap"])
    device = _device(ctx.run_cfg)
    dataset = pass_dataset(ctx, ctx.run_cfg.data.source, labelled=True)
    model = load_pass_model(ctx).to(device)
    classes = ctx.weights_cfg.model.num_classes
    # [0]: the chosen mask, [1]: label only (the fallback of classes the chosen mask never holds)
    sums: list[Optional[torch.Tensor]] = [None, None]
    counts = [torch.zeros(classes, dtype=torch.float64), torch.zeros(classes, dtype=torch.float64)]
    for index in tqdm(range(len(dataset)), desc=f"pass {ctx.spec.name}", disable=not ctx.progress,
                      dynamic_ncols=True):
        item = dataset[index]
        with torch.no_grad():
            out = model(item["image"].unsqueeze(0).to(device), taps=(tap,))
        features = out.features[tap].float()
        size = tuple(features.shape[-2:])
        labels = F.interpolate(item["label"][None, None].float(), size=size, mode="nearest").long().flatten()
        masks = [labels, labels]
        if mask_rule == "label_and_prediction":
            logits = out.logits.float()
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
            prediction = logits.argmax(dim=1).flatten().cpu()
            masks[0] = torch.where(prediction == labels, labels, IGNORE_INDEX)
        features = F.normalize(features, dim=1)[0].flatten(1).double().cpu()  # C×N
        for j, mask in enumerate(masks):
            if sums[j] is None:
                sums[j] = torch.zeros(classes, features.shape[0], dtype=torch.float64)
            valid = mask < classes
            image_sums = torch.zeros(classes, features.shape[0], dtype=torch.float64)
            image_sums.index_add_(0, mask[valid], features[:, valid].T)
            image_counts = torch.bincount(mask[valid], minlength=classes).double()
            if per_image:
                present = image_counts > 0
                sums[j][present] += image_sums[present] / image_counts[present, None]
                counts[j] += present.double()
            else:
                sums[j] += image_sums
                counts[j] += image_counts
            if mask_rule == "label":
                break
    assert sums[0] is not None
    prototypes = sums[0] / counts[0].clamp_min(1)[:, None]
    fallback = (counts[0] == 0) & (counts[1] > 0) if mask_rule != "label" else torch.zeros(classes, dtype=torch.bool)
    if fallback.any():
        prototypes[fallback] = sums[1][fallback] / counts[1][fallback, None]
    final_counts = torch.where(fallback, counts[1], counts[0])
    out_path = ctx.out_dir / "prototypes.pt"
    write_atomic(out_path, lambda path: torch.save({"prototypes": prototypes.float(), "counts": final_counts}, path))
    return {"samples": len(dataset), "classes_seen": int((final_counts > 0).sum()),
            "classes_from_labels_only": [int(k) for k in torch.nonzero(fallback).flatten()]}


# -- reading pass outputs ---------------------------------------------------------------------
class PseudoLabelledDataset(torch.utils.data.Dataset):
    """``dataset`` with its labels read from a ``pseudo_labels`` pass folder.

    Every sample's label file must exist (checked up front: the error names the first missing file)
    and match the image's size.
    """

    def __init__(self, dataset, folder: Path) -> None:
        if not hasattr(dataset, "load_arrays") or not hasattr(dataset, "transform"):
            raise UserError(f"dataset {type(dataset).__name__} cannot take offline pseudo-labels")
        self.dataset = dataset
        self.folder = Path(folder)
        self.classes = dataset.classes
        self.names = [sample_name(dataset, i) for i in range(len(dataset))]
        for name in self.names:
            path = label_file(self.folder, name)
            if not path.is_file():
                raise UserError(f"offline pseudo-label file not found: {path} (run the pass that writes "
                                f"{self.folder}, or fix data.*.pseudo_labels)")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = dict(self.dataset.load_arrays(index))
        path = label_file(self.folder, self.names[index])
        try:
            with Image.open(path) as im:
                label = np.asarray(im, dtype=np.uint8)
        except OSError as error:
            raise UserError(f"cannot read offline pseudo-label {path}: {error}") from None
        if label.shape != arrays["image"].shape[:2]:
            raise UserError(f"offline pseudo-label {path} is {label.shape[1]}x{label.shape[0]}, its image "
                            f"{arrays['image'].shape[1]}x{arrays['image'].shape[0]}")
        arrays["label"] = label
        return self.dataset.transform(arrays, index)
