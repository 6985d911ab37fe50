"""Files of an analysis: JSON numbers and one self-contained HTML page.

The page embeds every figure (PNG as a ``data:`` URI) and its own CSS, so it can be opened or sent
alone; it also links each figure and JSON file written next to it, by relative path.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from udaseg.errors import UserError

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
figure { margin: 0.8em 0; } figcaption { font-size: 0.85em; color: #444; max-width: 900px; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { font-size: 0.85em; color: #555; max-width: 900px; }
.warn { color: #a33; font-size: 0.85em; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def json_safe(value: Any) -> Any:
    """NaN and infinities become ``None``; tuples become lists (strict JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({err.strerror or err})") from None


def write_json(path: Path, value: Any) -> None:
    write_bytes(path, (json.dumps(json_safe(value), indent=1, allow_nan=False) + "\n").encode())


def _fmt(value: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{scale * value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(folder: Path, file: str, caption: str) -> str:
    data = base64.b64encode((folder / file).read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(file)}">'
            f'<figcaption>{caption} <a href="{html.escape(file)}">{html.escape(file)}</a></figcaption></figure>')


def render_html(folder: Path, report: dict, figures: dict[str, str]) -> str:
    """The HTML page for ``report`` (the analysis JSON) with the figures written in ``folder``."""
    names = report["classes"]
    models = report["models"]
    settings = report["settings"]
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>udaseg analysis</title>"
             f"<style>{CSS}</style></head><body><h1>udaseg analysis</h1>"]
    parts.append(
        f"<p class='note'>Source: <code>{esc(settings['source']['dataset'])}</code> "
        f"({settings['source']['images']} images); target: <code>{esc(settings['target']['dataset'])}</code> "
        f"({settings['target']['images']} images). Embeddings at tap <code>{esc(settings['tap'])}</code>, "
        f"labels on the feature grid by the <code>{esc(settings['label_rule'])}</code> rule; up to "
        f"{settings['metric_pixels']} pixels per class and domain estimate PDD, {settings['per_class']} of them "
        f"per class and domain enter the t-SNE. All numbers: <a href='analysis.json'>analysis.json</a>.</p>")
    rows = []
    for m in models:
        ev, rel = m["target_eval"], m["reliability"]
        rows.append([esc(m["label"]), esc(m["method"]), str(m["iteration"]), esc(m["evaluated"]),
                     _fmt(ev["miou"], 100), _fmt(ev["macc"], 100), _fmt(ev["aacc"], 100),
                     _fmt(m["ccd_mean"]["target"], 1, 3), _fmt(m["pdd_mean"]["target"], 1, 3),
                     _fmt(m["similarity_mean"], 1, 3), f"{esc(rel['model'])}: {_fmt(rel['ece'], 100)}",
                     f"{_fmt(rel['coverage'], 100, 0)} / {_fmt(rel['precision'], 100, 0)}",
                     f"<a href='{esc(m['files']['confusion_json'])}'>json</a>"])
    parts.append("<h2>Summary (target)</h2>")
    parts.append(_table(["model", "method", "iteration", "features of", "mIoU", "mAcc", "aAcc", "CCD ↓", "PDD ↓",
                         "src–tgt cos ↑", "ECE %", "≥δ pixels % / right %", "confusion"], rows))
    parts.append("<p class='note'>CCD: mean over other classes of (mean squared distance of a class's pixels to "
                 "their centre) / (squared distance between the centres). PDD: 1 − mean over a class's pixels of "
                 "cos(x, own centre) / Σ cos(x, other centres) (T2S-DA Eq. 20). Lower is more discriminative for "
                 "both. src–tgt cos: cosine between the source and target centre of each class, averaged. "
                 "ECE and the share of pixels above the pseudo-label threshold δ (and how many of them are right) "
                 "are for the model that makes pseudo-labels (the EMA teacher when there is one).</p>")
    for key, title, caption in (
            ("tsne", "t-SNE of pixel embeddings", "Class-balanced pixel samples; dots: source, crosses: target."),
            ("iou", "Per-class IoU", "On the target; the legend gives each model's mIoU."),
            ("ccd", "Class centre distance (CCD)", "Per class on the target; lower is more discriminative."),
            ("pdd", "Pixel discrimination distance (PDD)", "Per class on the target; lower is more discriminative."),
            ("similarity", "Source–target similarity", "Cosine of each class's source and target centres; "
                                                      "higher means the domains' class features are closer."),
            ("reliability", "Reliability of the pseudo-labels", "Pixel accuracy of the pseudo-labelling model "
                                                                "per confidence bin on the target; the diagonal "
                                                                "is perfect calibration, the red line δ.")):
        if key in figures:
            parts.append(f"<h2>{esc(title)}</h2>" + _figure(folder, figures[key], caption))
    parts.append("<h2>Confusion matrices (target)</h2>")
    for m in models:
        parts.append(_figure(folder, m["files"]["confusion_png"],
                             f"{esc(m['label'])}: row-normalised (% of each ground-truth class); counts in "
                             f"<a href='{esc(m['files']['confusion_json'])}'>{esc(m['files']['confusion_json'])}</a>."))
    parts.append("<h2>Per class (target)</h2>")
    header = ["class"] + [f"{m['label']} {what}" for m in models for what in ("IoU", "CCD", "PDD", "cos")]
    rows = []
    for c, name in enumerate(names):
        row = [esc(name)]
        for m in models:
            row += [_fmt(m["target_eval"]["iou"][c], 100), _fmt(m["ccd"]["target"][c], 1, 3),
                    _fmt(m["pdd"]["target"][c], 1, 3), _fmt(m["similarity"][c], 1, 3)]
        rows.append(row)
    parts.append(_table(header, rows))
    if report.get("warnings"):
        parts.append("<h2>Warnings</h2>" + "".join(f"<p class='warn'>{esc(w)}</p>" for w in report["warnings"]))
    parts.append("<h2>Files</h2><ul>" + "".join(f"<li><a href='{esc(f)}'>{esc(f)}</a></li>"
                                               for f in report["files"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
