"""``udaseg demo``: adaptation on the embedded digits benchmark, end to end, on a CPU.

Builds (or loads) the digits benchmark, trains a source-only model and an adapted model with the
same small network and budget, evaluates both on the target validation split, prints the
per-class IoU with the gain, and writes a report folder:

- ``predictions.png``: image | ground truth | source only | adapted, for a few validation images;
- ``per_class_iou.png``: per-class IoU of both models;
- ``training_curves.png``: training losses and validation mIoU over iterations;
- ``index.md`` and ``index.html``: a summary linking the above; ``results.json``: the numbers.
"""

from __future__ import annotations

import argparse
import html
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from udaseg.config import load_config, scale_iteration_counts
from udaseg.config.schema import Config
from udaseg.errors import UserError

DEFAULT_METHOD = "sepico_distcl"
QUICK_ITERATIONS = 600  # --quick; without it each run trains for its preset's iterations
SAMPLES = 6


def demo_config(preset: str, domain: str, out: Path, run_name: str, iterations: Optional[int], seed: int,
                data_root: Optional[str], digits_size: Optional[Sequence[int]] = None) -> Config:
    """A digits preset set up for one demo/benchmark run (target domain, budget, seed, folders)."""
    cfg = load_config(preset)
    if iterations:
        scale_iteration_counts(cfg, iterations)
    iterations = cfg.train.iterations
    cfg.train.seed = seed
    cfg.train.work_dir = str(out / "runs" / run_name)
    cfg.train.eval_interval = max(iterations // 6, 1)
    cfg.train.checkpoint_interval = iterations
    cfg.train.log_interval = max(iterations // 60, 1)
    for spec in [cfg.data.target, *cfg.data.val]:
        if spec is not None:
            spec.name = domain
    for spec in [cfg.data.source, cfg.data.target, *cfg.data.val]:
        if spec is None:
            continue
        if data_root:
            spec.root = data_root
        if digits_size:
            spec.options.update(train_size=int(digits_size[0]), val_size=int(digits_size[1]))
    return cfg


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the demo report needs matplotlib: pip install 'udaseg[bench]'") from None
    return plt


def run_demo(args: argparse.Namespace) -> int:
    from udaseg.engine.trainer import check_writable
    plt = _require_matplotlib()
    out = Path(args.out)
    check_writable(out)
    method = args.method or DEFAULT_METHOD
    iterations = getattr(args, "iterations", None) or (QUICK_ITERATIONS if args.quick else None)
    presets = {"source_only": "digits_source_only", "adapted": f"digits_{method}"}
    results, configs = {}, {}
    for run_name, preset in presets.items():
        configs[run_name] = demo_config(preset, args.domain, out, run_name, iterations, args.seed, args.data_root,
                                        getattr(args, "digits_size", None))
    iterations = configs["adapted"].train.iterations
    jobs = max(1, min(getattr(args, "jobs", None) or os.cpu_count() or 1, len(presets)))
    print(f"training {' and '.join(f'{n} ({p})' for n, p in presets.items())}: {iterations} iterations each, "
          f"target {args.domain}, {jobs} at a time", flush=True)
    from udaseg.bench import run_parallel

    # run_parallel passes the first item of each job through: here the run's name
    for run_name, _, result in run_parallel([(name, p, configs[name]) for name, p in presets.items()], jobs):
        results[run_name] = result
        print(f"finished {run_name}: target mIoU {100 * result['evaluation']['miou']:.1f}", flush=True)

    names, iou_src, iou_ada = _per_class(results)
    table = _gain_table(names, iou_src, iou_ada)
    print()
    print(table)
    _plot_iou(plt, out / "per_class_iou.png", names, iou_src, iou_ada, method)
    _plot_curves(plt, out / "training_curves.png", configs)
    _plot_predictions(plt, out / "predictions.png", configs)
    summary = {
        "domain": args.domain, "method": method, "iterations": iterations, "seed": args.seed,
        "classes": names, "source_only": {"miou": _miou(iou_src), "iou": iou_src},
        "adapted": {"miou": _miou(iou_ada), "iou": iou_ada},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    _write_summary(out, summary, table)
    print(f"\nreport written to {out}/index.html")
    return 0


def _per_class(results: dict) -> tuple[list[str], list[float], list[float]]:
    def student(result):
        evaluation = result["evaluation"]
        key = next(k for k in evaluation if k.startswith("student/"))
        return evaluation[key]

    src, ada = student(results["source_only"]), student(results["adapted"])
    names = src.get("names") or [str(i) for i in range(len(src["iou"]))]
    return names, [_nan(v) for v in src["iou"]], [_nan(v) for v in ada["iou"]]


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def _miou(iou: list[float]) -> float:
    values = [v for v in iou if v == v]
    return float(sum(values) / len(values)) if values else float("nan")


def _gain_table(names: list[str], src: list[float], ada: list[float]) -> str:
    lines = [f"{'class':<12}{'source only':>12}{'adapted':>10}{'gain':>8}", "-" * 42]
    for name, a, b in zip(names, src, ada):
        lines.append(f"{name:<12}{100 * a:>12.1f}{100 * b:>10.1f}{100 * (b - a):>+8.1f}")
    lines.append("-" * 42)
    ma, mb = _miou(src), _miou(ada)
    lines.append(f"{'mIoU':<12}{100 * ma:>12.1f}{100 * mb:>10.1f}{100 * (mb - ma):>+8.1f}")
    return "\n".join(lines)


def _plot_iou(plt, path: Path, names, src, ada, method: str) -> None:
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.bar(x - 0.2, [100 * v for v in src], 0.4, label="source only")
    ax.bar(x + 0.2, [100 * v for v in ada], 0.4, label=method)
    ax.set_xticks(x, names)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(plt, path: Path, configs: dict[str, Config]) -> None:
    from udaseg.engine.logging import read_metrics

    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(9, 3.2))
    for run_name, cfg in configs.items():
        records = read_metrics(Path(cfg.train.work_dir) / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        for key in sorted({k for r in train for k in r if k.endswith("ce") or k.endswith("loss")}):
            xs = [r["iteration"] for r in train if key in r]
            ax_loss.plot(xs, [r[key] for r in train if key in r], label=f"{run_name}: {key}")
        evals = [r for r in records if r["kind"] == "eval" and r.get("model") == "student"]
        ax_iou.plot([r["iteration"] for r in evals], [100 * r["miou"] for r in evals], marker="o", label=run_name)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_title("training losses")
    ax_loss.legend(fontsize=6)
    ax_iou.set_xlabel("iteration")
    ax_iou.set_title("target validation mIoU (%)")
    ax_iou.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_predictions(plt, path: Path, configs: dict[str, Config]) -> None:
    from udaseg.data import build_dataset
    from udaseg.data.labels import colorize
    from udaseg.engine.commands import load_segmentor_for_inference
    from udaseg.models.inference import predict_logits

    models = {}
    for run_name, cfg in configs.items():
        _, segmentor = load_segmentor_for_inference(Path(cfg.train.work_dir) / "latest.pt", None, [])
        models[run_name] = segmentor.eval()
    cfg = configs["adapted"]
    dataset = build_dataset(cfg.data.val[0], cfg.data.mean, cfg.data.std)
    palette = dataset.classes.palette
    count = min(SAMPLES, len(dataset))
    fig, axes = plt.subplots(count, 4, figsize=(6.4, 1.6 * count), squeeze=False)
    for row, index in enumerate(np.linspace(0, len(dataset) - 1, count).astype(int)):
        item = dataset[int(index)]
        panels = [dataset.images[int(index)], colorize(item["label"].numpy(), palette)]
        with torch.no_grad():
            for run_name in ("source_only", "adapted"):
                logits = predict_logits(models[run_name], item["image"].unsqueeze(0))
                panels.append(colorize(logits.argmax(1)[0].numpy(), palette))
        for col, (panel, title) in enumerate(zip(panels, ["image", "ground truth", "source only", "adapted"])):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].axis("off")
            if row == 0:
                axes[row, col].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_summary(out: Path, summary: dict, table: str) -> None:
    gain = 100 * (summary["adapted"]["miou"] - summary["source_only"]["miou"])
    md = [
        "# udaseg demo",
        "",
        f"Target domain: `{summary['domain']}`; method: `{summary['method']}`; "
        f"{summary['iterations']} iterations; seed {summary['seed']}.",
        "",
        f"Target validation mIoU: source only {100 * summary['source_only']['miou']:.1f}, "
        f"adapted {100 * summary['adapted']['miou']:.1f} ({gain:+.1f}).",
        "",
        "```",
        table,
        "```",
        "",
        "![predictions](predictions.png)",
        "",
        "![per-class IoU](per_class_iou.png)",
        "",
        "![training curves](training_curves.png)",
        "",
        "Numbers: [results.json](results.json). Runs (configs, checkpoints, metrics): `runs/`.",
    ]
    (out / "index.md").write_text("\n".join(md) + "\n")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>udaseg demo</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}} pre{{background:#f4f4f4;padding:1em}}</style>
</head><body>
<h1>udaseg demo</h1>
<p>Target domain <code>{html.escape(summary['domain'])}</code>, method <code>{html.escape(summary['method'])}</code>,
{summary['iterations']} iterations, seed {summary['seed']}.</p>
<p>Target validation mIoU: source only {100 * summary['source_only']['miou']:.1f},
adapted {100 * summary['adapted']['miou']:.1f} ({gain:+.1f}).</p>
<pre>{html.escape(table)}</pre>
<h2>Predictions</h2><img src="predictions.png" alt="predictions">
<h2>Per-class IoU</h2><img src="per_class_iou.png" alt="per-class IoU">
<h2>Training</h2><img src="training_curves.png" alt="training curves">
<p><a href="results.json">results.json</a></p>
</body></html>
"""
    (out / "index.html").write_text(page)
