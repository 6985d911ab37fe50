"""The analysis figures (matplotlib, drawn off-screen with the Agg canvas; no global pyplot state)."""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np

from udaseg.errors import UserError

DPI = 90


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the analysis plots need matplotlib; install it with 'pip install udaseg[bench]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    """The figure as an adaptive 256-colour PNG (a fifth of the RGB file's size for scatter plots)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    buffer.seek(0)
    with Image.open(buffer) as image:
        paletted = image.convert("RGB").quantize(colors=256)
    out = io.BytesIO()
    paletted.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _colours(palette: Sequence[Sequence[int]]) -> list[tuple[float, float, float]]:
    return [tuple(v / 255.0 for v in rgb) for rgb in palette]  # type: ignore[misc]


def tsne_figure(panels: Sequence[dict], class_names: Sequence[str], palette: Sequence[Sequence[int]]) -> bytes:
    """One panel per model: ``{"label", "coords": N×2, "classes": N, "domains": N (0 source, 1 target)}``."""
    colours = _colours(palette)
    fig = _figure(4.2 * len(panels) + 1.6, 4.4)
    shown: set[int] = set()
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        coords, classes, domains = panel["coords"], panel["classes"], panel["domains"]
        for domain, marker, size in ((0, "o", 5), (1, "x", 7)):
            mask = domains == domain
            ax.scatter(coords[mask, 0], coords[mask, 1], c=[colours[c] for c in classes[mask]], marker=marker,
                       s=size, linewidths=0.6, alpha=0.7)
        shown.update(int(c) for c in np.unique(classes))
        ax.set_title(panel["label"], fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="s", linestyle="", color=colours[c], label=class_names[c]) for c in sorted(shown)]
    handles += [Line2D([], [], marker="o", linestyle="", color="0.3", label="source"),
                Line2D([], [], marker="x", linestyle="", color="0.3", label="target")]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.subplots_adjust(right=1 - 1.5 / (4.2 * len(panels) + 1.6), wspace=0.05)
    return _png(fig)


def confusion_figure(normalised: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction), values in %."""
    k = len(class_names)
    size = max(4.0, 0.42 * k + 1.5)
    fig = _figure(size + 0.8, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.nan_to_num(normalised) * 100, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=90, fontsize=7)
    ax.set_yticklabels(class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=10)
    if k <= 20:
        for r in range(k):
            for c in range(k):
                value = normalised[r, c]
                if not math.isnan(value) and value >= 0.005:
                    ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if value > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of the class's pixels")
    return _png(fig)


def grouped_bars_figure(values: dict[str, Sequence[Optional[float]]], class_names: Sequence[str], ylabel: str,
                        title: str, reference: Optional[float] = None) -> bytes:
    """Bars per class, one bar per model (``values``: label -> value per class; None/NaN: no bar)."""
    k, models = len(class_names), list(values)
    fig = _figure(max(6.0, 0.55 * k * max(1, len(models)) ** 0.5 + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(models))
    for m, label in enumerate(models):
        row = np.array([math.nan if v is None else float(v) for v in values[label]])
        ax.bar(np.arange(k) - 0.4 + width * (m + 0.5), np.nan_to_num(row, nan=0.0), width, label=label)
    if reference is not None:
        ax.axhline(reference, color="0.4", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(k))
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", linewidth=0.3)
    return _png(fig)


def reliability_figure(panels: Sequence[dict]) -> bytes:
    """One panel per model: ``{"label", "model", "summary"}`` with a reliability summary
    (:meth:`ReliabilityAccumulator.summary`)."""
    fig = _figure(3.4 * len(panels), 3.4)
    for i, panel in enumerate(panels):
        summary = panel["summary"]
        edges = np.asarray(summary["bin_edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        accuracy = np.array([math.nan if v is None else v for v in summary["accuracy"]])
        confidence = np.array([math.nan if v is None else v for v in summary["confidence"]])
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.bar(centres, np.nan_to_num(accuracy), width=edges[1] - edges[0], edgecolor="0.2", linewidth=0.5,
               color="#4c72b0", label="accuracy")
        ax.plot(centres, confidence, "o", color="#dd8452", markersize=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="0.4", linewidth=0.8)
        ax.axvline(summary["threshold"], color="#c44e52", linewidth=0.8, label=f"δ = {summary['threshold']:g}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"{panel['model']} confidence")
        if i == 0:
            ax.set_ylabel("pixel accuracy")
        ax.set_title(f"{panel['label']}\nECE {100 * summary['ece']:.1f}%, ≥δ: {100 * summary['coverage']:.0f}% "
                     f"of pixels, {100 * summary['precision']:.0f}% right", fontsize=8)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
    return _png(fig)
