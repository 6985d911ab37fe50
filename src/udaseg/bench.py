"""``udaseg bench digits``: adaptation quality of every method on the digits benchmark.

For each target domain and seed it trains source-only, the target oracle, DACS and every other
method that has a ``digits_*`` preset, with one budget, and reports the final student's mIoU on the
target validation split (mean ± std over seeds) and the share of the source-only → oracle gap each
method closes, the per-class IoU (with the mean over the ten digit classes, so that a gain on the
background alone shows), and the curves of student and teacher mIoU and pseudo-label accuracy over
the run (``curves_<domain>.png`` next to the report). ``--split dev`` evaluates on the held-out dev
part of the target train split instead, for choosing settings without looking at ``val``.
Finished runs are stored and not repeated, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Optional

from udaseg.config import list_presets
from udaseg.errors import UserError

BASELINES = ["digits_source_only", "digits_target_oracle", "digits_dacs"]
MARKER = "digits_quality"


def available_methods() -> list[str]:
    presets = [p for p in list_presets() if p.startswith("digits_")]
    return BASELINES + sorted(p for p in presets if p not in BASELINES)


def run_bench(args: argparse.Namespace) -> int:
    if args.suite != "digits":
        raise UserError(f"unknown benchmark suite '{args.suite}'; available: digits")
    from udaseg.demo import demo_config

    methods = args.methods or available_methods()
    unknown = [m for m in methods if m not in list_presets()]
    if unknown:
        raise UserError(f"no preset named {unknown[0]!r}; digits presets: {', '.join(available_methods())}")
    out = Path(args.out)
    split = getattr(args, "split", "val")
    jobs = []
    for domain in args.domains:
        for preset in methods:
            for seed in args.seeds:
                cfg = demo_config(preset, domain, out / domain, f"{preset}-s{seed}",
                                  args.iterations or _preset_iterations(preset), seed, args.data_root,
                                  getattr(args, "digits_size", None))
                if split != "val":
                    evaluate_on_split(cfg, split)
                jobs.append((domain, preset, cfg))
    scores: dict[tuple[str, str], list[float]] = {}
    teacher_scores: dict[tuple[str, str], list[float]] = {}
    per_class: dict[tuple[str, str], list[list[float]]] = {}
    work_dirs: dict[tuple[str, str], list[Path]] = {}
    class_names: list[str] = []
    start = time.time()
    collect = getattr(args, "collect", False)
    if collect:
        from udaseg.experiments import stored_result

        found = [(d, p, stored_result(c)) for d, p, c in jobs]
        jobs_done = [(d, p, r) for d, p, r in found if r is not None]
        print(f"collecting {len(jobs_done)} of {len(jobs)} finished runs (nothing is trained)")
        runs = iter(jobs_done)
    else:
        runs = run_parallel(jobs, args.jobs)
    for done, (domain, preset, result) in enumerate(runs, start=1):
        miou = _student_miou(result)
        scores.setdefault((domain, preset), []).append(miou)
        teacher = _teacher_miou(result)
        if teacher is not None:
            teacher_scores.setdefault((domain, preset), []).append(teacher)
        student = _student_result(result)
        class_names = student.get("names") or class_names
        per_class.setdefault((domain, preset), []).append([_number(v) for v in student["iou"]])
        work_dirs.setdefault((domain, preset), []).append(Path(result.get("final_stage_dir")
                                                               or result["config"]["train"]["work_dir"]))
        for stage, evaluation in list(result.get("stages", {}).items())[:-1]:  # a pipeline's earlier stages
            scores.setdefault((domain, f"{preset}:{stage}"), []).append(_student_miou({"evaluation": evaluation}))
        print(f"[{done}/{len(jobs)}] {domain} {preset} seed {result['seed']}: mIoU {100 * miou:.1f}", flush=True)
    rows = [row for preset in methods for row in _stage_rows(scores, preset) + [preset]]
    table = format_table(scores, args.domains, rows, args.seeds, args.iterations, teacher_scores)
    if split != "val":
        table = table.replace("Target validation mIoU", f"Target {split}-split mIoU", 1)
    for domain in args.domains:
        table += "\n\n" + per_class_table(per_class, domain, methods, class_names)
    print(table)
    if args.report:
        command = "udaseg bench digits " + " ".join(
            [f"--seeds {' '.join(map(str, args.seeds))}", f"--domains {' '.join(args.domains)}",
             f"--methods {' '.join(methods)}"] + ([f"--iterations {args.iterations}"] if args.iterations else []))
        footer = f"\n\nCommand: `{command}`."
        if not collect:
            footer += (f" Wall time of this invocation: {time.time() - start:.0f} s (finished runs are reused, "
                       "so this is not the cost of the whole table).")
        report = Path(args.report)
        for domain in args.domains:
            figure = report.parent / "images" / f"curves_{domain}.png"
            if plot_curves(figure, domain, methods, work_dirs):
                footer += f"\n\n![curves on {domain}](images/{figure.name})"
        write_section(report, MARKER if split == "val" else f"{MARKER}_{split}", table + footer + "\n")
        print(f"table written to {args.report}")
    return 0


def _stage_rows(scores: dict, preset: str) -> list[str]:
    """Rows ``<preset>:<stage>`` of a pipeline preset's earlier stages, in stage order."""
    return list(dict.fromkeys(key for _, key in scores if key.startswith(f"{preset}:")))


def evaluate_on_split(cfg, split: str) -> None:
    """Point every validation entry at ``split`` of its domain (``dev``: the held-out train part)."""
    dev_fraction = (cfg.data.target.options or {}).get("dev_fraction", 0.0) if cfg.data.target else 0.0
    for spec in cfg.data.val:
        spec.split = split
        if split == "dev":
            if not dev_fraction:
                raise UserError("--split dev needs the target's options.dev_fraction > 0")
            spec.options["dev_fraction"] = dev_fraction


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def per_class_table(per_class: dict, domain: str, methods: list[str], names: list[str]) -> str:
    """Mean per-class IoU (%) over seeds of each method on ``domain``; 'digits' averages classes 1-10."""
    if not names:
        return ""
    lines = [f"Per-class IoU (%) on {domain}, final student, mean over seeds.", "",
             "| method | " + " | ".join(names) + " | digits |", "|---|" + "---|" * (len(names) + 1)]
    for preset in methods:
        runs = per_class.get((domain, preset))
        if not runs:
            continue
        means = [statistics.fmean(v) if all(x == x for x in v) else float("nan") for v in zip(*runs)]
        digit_mean = statistics.fmean(means[1:]) if len(means) > 1 else float("nan")
        cells = [f"{100 * v:.1f}" if v == v else "–" for v in means + [digit_mean]]
        lines.append(f"| {preset.removeprefix('digits_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_curves(work_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Student and teacher mIoU (first validation set) and pseudo-label accuracy over one run."""
    from udaseg.engine.logging import read_metrics

    records = read_metrics(work_dir / "metrics.jsonl")
    curves: dict[str, list[tuple[int, float]]] = {"student": [], "teacher": [], "pseudo_acc": [], "pseudo_miou": []}
    first_set = next((r.get("set") for r in records if r.get("kind") == "eval"), None)
    for record in records:
        if record.get("kind") == "eval" and record.get("set") == first_set and record.get("model") in curves:
            curves[record["model"]].append((record["iteration"], 100 * record["miou"]))
        elif record.get("kind") == "train":
            for key in ("pseudo_acc", "pseudo_miou"):
                if isinstance(record.get(key), (int, float)):
                    curves[key].append((record["iteration"], 100 * record[key]))
    return curves


def plot_curves(path: Path, domain: str, methods: list[str], work_dirs: dict) -> bool:
    """One panel per method: student/teacher mIoU and pseudo-label accuracy, one line per seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [m for m in methods if work_dirs.get((domain, m))]
    if not shown:
        return False
    columns = min(4, len(shown))
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False, sharey=True)
    styles = {"student": ("tab:blue", "-"), "teacher": ("tab:orange", "--"), "pseudo_acc": ("tab:green", ":"),
              "pseudo_miou": ("tab:red", ":")}
    for ax, preset in zip(axes.flat, shown):
        for seed_index, work_dir in enumerate(work_dirs[(domain, preset)]):
            for name, points in run_curves(work_dir).items():
                if points:
                    colour, style = styles[name]
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colour, linewidth=1, label=name if seed_index == 0 else None)
        ax.set_title(preset.removeprefix("digits_"), fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylim(0, 100)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("%", fontsize=8)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend.keys()), fontsize=7, loc="lower center", ncol=len(legend),
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"{domain}: target mIoU of student and teacher; pseudo-label pixel accuracy and mIoU "
                 "(per logged batch)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _run_one(job: tuple) -> tuple:
    import torch

    from udaseg.experiments import run_experiment

    domain, preset, cfg, threads = job
    if threads:
        torch.set_num_threads(threads)
    return domain, preset, run_experiment(cfg, progress=False)


def run_parallel(jobs: list[tuple], parallel: int):
    """Yield (domain, preset, result) as runs finish; ``parallel`` runs at a time in worker processes."""
    if parallel <= 1:
        from udaseg.experiments import run_experiment

        for domain, preset, cfg in jobs:
            yield domain, preset, run_experiment(cfg, progress=True)
        return
    import multiprocessing
    import os

    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")
    with context.Pool(parallel, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_run_one, [(d, p, c, threads) for d, p, c in jobs])


def _preset_iterations(preset: str) -> int:
    from udaseg.config import load_config

    return load_config(preset).train.iterations


def _student_miou(result: dict) -> float:
    evaluation = result["evaluation"]
    return float(evaluation["miou"])


def _student_result(result: dict) -> dict:
    """The final student's evaluation on the first validation set."""
    evaluation = result["evaluation"]
    return next(v for k, v in evaluation.items() if k.startswith("student/"))


def _teacher_miou(result: dict) -> Optional[float]:
    """The final EMA teacher's mIoU on the first validation set, when the method has a teacher."""
    teachers = [v["miou"] for k, v in result["evaluation"].items() if k.startswith("teacher/")]
    return float(teachers[0]) if teachers else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def format_table(scores, domains, methods, seeds, iterations: Optional[int], teacher_scores=None) -> str:
    teacher_scores = teacher_scores or {}
    budget = f"{iterations} iterations" if iterations else "each preset's iterations"
    lines = [f"Target validation mIoU (%) of the final student, mean ± std over seeds {list(seeds)}, {budget}. "
             "Gap closed = (method − source only) / (oracle − source only). In brackets: the final EMA teacher, "
             "for the methods that have one (the student is the headline).", ""]
    header = "| method | " + " | ".join(f"{d} mIoU | {d} gap closed" for d in domains) + " |"
    lines += [header, "|---|" + "---|---|" * len(domains)]
    for preset in methods:
        cells = []
        for domain in domains:
            values = scores.get((domain, preset), [])
            if not values:
                cells += ["–", "–"]
                continue
            mean, std = _mean_std(values)
            src = scores.get((domain, "digits_source_only"))
            ora = scores.get((domain, "digits_target_oracle"))
            gap = "–"
            if src and ora and preset not in ("digits_source_only", "digits_target_oracle"):
                s, o = statistics.fmean(src), statistics.fmean(ora)
                if o - s > 1e-9:
                    gap = f"{100 * (mean - s) / (o - s):.0f}%"
            spread = f" ± {100 * std:.1f}" if len(values) > 1 else ""
            if len(values) < len(seeds):
                spread += f" ({len(values)} seed{'s' if len(values) > 1 else ''})"
            teacher = teacher_scores.get((domain, preset))
            extra = f" [teacher {100 * statistics.fmean(teacher):.1f}]" if teacher else ""
            cells += [f"{100 * mean:.1f}{spread}{extra}", gap]
        lines.append(f"| {preset.removeprefix('digits_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` (append if absent)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
