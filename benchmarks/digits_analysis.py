"""Feature analysis of source only, DACS and SePiCo DistCL on the digits benchmark, in one command.

    python benchmarks/digits_analysis.py --write docs/DIGITS.md

1. trains each preset with ``train.iterations=N`` (one at a time, ``--threads`` torch threads each)
   into ``WORK/<preset>``, unless a finished run of that budget is already there;
2. runs ``udaseg analyze`` on the final checkpoints (students; features at ``--tap``), source
   ``digits-clean:val`` against the preset's target validation split;
3. with ``--write``: copies the figures into ``docs/images/analysis/<domain>/`` and replaces the
   section between ``<!-- digits_analysis_<domain>:start -->`` and ``<!-- digits_analysis_<domain>:end -->``
   of the markdown file with the command, the budget and the numbers of ``analysis.json``.

Re-running with another recipe or budget re-trains only what is missing (the work folder name holds
the budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PRESETS = ["digits_source_only", "digits_dacs", "digits_sepico_distcl"]
LABELS = {"digits_source_only": "source only", "digits_dacs": "DACS", "digits_sepico_distcl": "SePiCo DistCL"}
FIGURES = ["tsne.png", "iou.png", "ccd.png", "pdd.png", "similarity.png", "reliability.png"]


def marker(domain: str) -> str:
    return f"digits_analysis_{domain}"


def udaseg(args: list[str], threads: int, log: Path | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "udaseg.cli", *args]
    print("$ udaseg " + " ".join(args), flush=True)
    if log is None:
        result = subprocess.run(command, env=env, check=False)
    else:
        with open(log, "w") as handle:
            result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        sys.exit(f"digits_analysis: 'udaseg {args[0]}' failed (exit {result.returncode})"
                 + (f"; see {log}" if log else ""))


def finished(work_dir: Path, iterations: int) -> bool:
    import torch

    latest = work_dir / "latest.pt"
    if not latest.is_file():
        return False
    state = torch.load(latest, map_location="cpu", weights_only=True)
    return int(state.get("iteration", -1)) == iterations


def train_all(args: argparse.Namespace) -> list[Path]:
    checkpoints = []
    for preset in args.presets:
        work_dir = args.work / f"{preset}_{args.domain}_{args.iterations}it"
        if finished(work_dir, args.iterations):
            print(f"{preset}: finished run in {work_dir}", flush=True)
        else:
            work_dir.mkdir(parents=True, exist_ok=True)
            udaseg(["train", "--config", preset, f"train.iterations={args.iterations}", f"train.work_dir={work_dir}",
                    f"train.seed={args.seed}", f"data.target.name={args.domain}"]
                   + ([] if args.domain == "digits-photo" else [f"data.val=[{{name: {args.domain}, split: val}}]"]),
                   args.threads, work_dir / "train.log")
        checkpoints.append(work_dir / "latest.pt")
    return checkpoints


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{scale * value:.{digits}f}"


def markdown(report: dict, command: str, args: argparse.Namespace, image_dir: str) -> str:
    models = report["models"]
    settings = report["settings"]
    lines = [
        f"## Feature analysis on `{args.domain}`: source only, DACS, SePiCo DistCL",
        "",
        f"Produced by one command (it trains what is missing, then runs `udaseg analyze`):",
        "",
        f"```\n{command}\n```",
        "",
        f"Budget: **{args.iterations} iterations** per run (batch 8 + 8, seed {args.seed}, the presets' other "
        f"settings), trained one at a time with {args.threads} torch thread on the shared 2-core CPU machine; "
        f"the final students are analysed. Source `{settings['source']['dataset']}` "
        f"({settings['source']['images']} images), target `{settings['target']['dataset']}` "
        f"({settings['target']['images']} images); embeddings at tap `{settings['tap']}` (for the digits "
        f"DeepLab-V2 that is the last encoder stage, stride 4, which SePiCo's projection head also reads); "
        f"labels on the feature grid by the `{settings['label_rule']}` rule (min ratio {settings['min_ratio']}). "
        f"The analysis itself (three checkpoints, t-SNE included) took {args.analysis_minutes:.1f} min wall "
        f"time and {args.analysis_cpu_minutes:.1f} min of CPU time with {args.threads} thread on that machine "
        f"(load average {args.load_average:.1f} when it started).",
        "",
        "| model | mIoU | mAcc | aAcc | CCD ↓ (target) | PDD ↓ (target) | CCD (source) | src–tgt centre cos ↑ | "
        "pseudo-labeller ECE | ≥δ pixels / right |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        ev, rel = m["target_eval"], m["reliability"]
        lines.append(f"| {m['label']} | {fmt(ev['miou'], 100)} | {fmt(ev['macc'], 100)} | {fmt(ev['aacc'], 100)} | "
                     f"{fmt(m['ccd_mean']['target'], 1, 2)} | {fmt(m['pdd_mean']['target'], 1, 3)} | "
                     f"{fmt(m['ccd_mean']['source'], 1, 2)} | {fmt(m['similarity_mean'], 1, 3)} | "
                     f"{rel['model']} {fmt(rel['ece'], 100)}% | {fmt(rel['coverage'], 100, 0)}% / "
                     f"{fmt(rel['precision'], 100, 0)}% |")
    lines += ["", "Means over the 11 classes; per-class values are in the figures and in `analysis.json`.", ""]
    captions = {
        "tsne.png": "t-SNE of 256 pixels per class and domain (dots: `digits-clean`, crosses: the target)",
        "iou.png": "Per-class IoU on the target",
        "ccd.png": "Class centre distance per class on the target (lower is better)",
        "pdd.png": "Pixel discrimination distance per class on the target (lower is better)",
        "similarity.png": "Cosine of the source and target centre of each class",
        "reliability.png": "Reliability of the pseudo-labelling model (the EMA teacher where there is one) on the "
                           "target: pixel accuracy per confidence bin, δ = 0.968 in red",
    }
    for name in FIGURES:
        lines += [f"![{name}]({image_dir}/{name})", "", f"*{captions[name]}.*", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--domain", default="digits-photo", help="target domain: digits-photo | digits-night")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tap", default="decoder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "digits_analysis")
    parser.add_argument("--write", type=Path, help="markdown file whose analysis section is replaced")
    parser.add_argument("--images", type=Path, default=None,
                        help="where --write copies the figures (default: docs/images/analysis/<domain>)")
    args = parser.parse_args(argv)

    checkpoints = train_all(args)
    out = args.work / f"report_{args.domain}_{args.iterations}it"
    analyze = ["analyze", "--source", "digits-clean:val", "--out", str(out), "--tap", args.tap, "--seed",
               str(args.seed), "--no-progress"]
    for preset, checkpoint in zip(args.presets, checkpoints):
        analyze += ["--checkpoint", str(checkpoint), "--name", LABELS.get(preset, preset)]
    start, cpu_start, load = time.perf_counter(), _child_cpu_seconds(), os.getloadavg()[0]
    udaseg(analyze, args.threads)
    args.analysis_minutes = (time.perf_counter() - start) / 60
    args.analysis_cpu_minutes = (_child_cpu_seconds() - cpu_start) / 60
    args.load_average = load
    print(f"report: {out / 'report.html'} ({args.analysis_minutes:.1f} min)")
    if args.write:
        args.images = args.images or ROOT / "docs" / "images" / "analysis" / args.domain
        report = json.loads((out / "analysis.json").read_text())
        args.images.mkdir(parents=True, exist_ok=True)
        for name in FIGURES:
            shutil.copyfile(out / name, args.images / name)
        from udaseg.bench import write_section

        command = "python benchmarks/digits_analysis.py --write docs/DIGITS.md" + (
            f" --iterations {args.iterations}" if args.iterations != 600 else "") + (
            f" --domain {args.domain}" if args.domain != "digits-photo" else "")
        image_dir = os.path.relpath(args.images, args.write.parent)
        write_section(args.write, marker(args.domain), markdown(report, command, args, image_dir))
        print(f"updated {args.write} and {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
