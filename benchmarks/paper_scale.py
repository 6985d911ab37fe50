"""Every paper preset for 2 iterations at its real crop sizes, on synthetic data, on the CPU.

    python benchmarks/paper_scale.py                                  # every non-digits preset
    python benchmarks/paper_scale.py --presets dacs_deeplabv2_gta2cs --timeout 1800
    python benchmarks/paper_scale.py --write docs/BENCHMARKS.md

Each preset runs in its own process (so its peak resident memory is its own) with its network at
random initialisation (no pretrained file is read), its batch size, model options and crop sizes,
and in-memory random images of the size its pipeline hands to the step: the crop where the preset
crops, the resized image where it does not (SePiCo's class-balanced cropping picks the crop inside
the step). Rare class sampling is off and warm-ups that switch a method's own terms on later
(SePiCo's, PGPC's) are set to 0, so both iterations run the whole method. A shape or memory problem
at the papers' sizes shows here before a GPU is rented. Each row also splits the time into network
passes and the rest (``benchmarks/breakdown.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MARKER = "paper_scale"
# Warm-ups (0-based iteration at which a method's own terms start) set to 0 here.
WARMUP_FIELDS = ("warmup_iters",)


def paper_presets() -> list[str]:
    from udaseg.config import list_presets

    return [p for p in list_presets() if not p.startswith(("digits", "_"))]


def _image_size(spec) -> list[int]:
    """[height, width] of what the data pipeline hands to the step."""
    if spec.crop_size:
        return list(spec.crop_size)
    if spec.resize and not spec.keep_ratio:
        return [spec.resize[1], spec.resize[0]]
    if spec.resize:  # keep-ratio scale of the target frames (Cityscapes-like 2:1 fits the [w, h] box)
        return [spec.resize[1], spec.resize[0]]
    return [1024, 2048]


def _register_synthetic_dataset() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import iteration as bench_iteration

    bench_iteration._register_synthetic_dataset()


def preset_config(name: str, work_dir: Path):
    from udaseg.config import load_config
    from udaseg.config.schema import MethodConfig

    overrides = ["model.pretrained=", "data.workers=0", f"train.work_dir={work_dir}", "train.iterations=1000000",
                 "train.eval_interval=1000000", "train.checkpoint_interval=1000000", "train.device=cpu"]
    cfg = load_config(name, overrides)
    for spec in (cfg.data.source, cfg.data.target):
        if spec is None:
            continue
        size = _image_size(spec)
        spec.name, spec.resize, spec.pseudo_labels = "synthetic", None, ""
        spec.crop_size = list(spec.crop_size) if spec.crop_size else None
        spec.rcs.enabled = False
        spec.options = {"size": size, "count": 2 * cfg.data.batch_size, "classes": cfg.model.num_classes}
    cfg.data.val = []
    own = getattr(cfg.method, cfg.method.name, None)  # the method's section, with its defaults when unset
    if isinstance(getattr(own, "base", None), str) and own.base in MethodConfig.__open_sections__():
        getattr(cfg.method, own.base)  # the base method's section (PGPC under HRDA or MIC)
    for section in cfg.method.sections.values():  # combined presets (PGPC on HRDA) carry several sections
        for field_name in WARMUP_FIELDS:
            if hasattr(section, field_name):
                setattr(section, field_name, 0)
    return cfg


def _describe(cfg) -> str:
    def size(spec) -> str:
        if spec is None:
            return "–"
        h, w = spec.options["size"]
        return f"{h}×{w}"

    return f"{cfg.model.name}, batch {cfg.data.batch_size}, source {size(cfg.data.source)}, target {size(cfg.data.target)}"


def measure(name: str, iterations: int) -> dict:
    """Run in a subprocess: ``iterations`` training iterations of preset ``name`` and the peak RSS."""
    import breakdown

    _register_synthetic_dataset()
    from udaseg.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset_config(name, Path(tmp))
        trainer = Trainer(cfg, progress=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = breakdown.measure_iterations(trainer, iterations, warmup=0)
    result.update(peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before_mib=before,
                  setting=_describe(cfg))
    return result


def _run_child(name: str, iterations: int, threads: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--threads", str(threads), "--child", name, str(iterations)]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {timeout:.0f} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_row(name: str, r: dict) -> str:
    if not r:
        return f"| {name} | – | – | – | – | – | – | not run yet |"
    if "error" in r:
        return f"| {name} | – | – | – | – | – | – | {r['error']} |"
    import breakdown

    times = " / ".join(f"{t:.0f}" for t in r["times"])
    return (f"| {name} | {r['setting']} | {times} | {100 * r['ours'] / r['time']:.1f} "
            f"| {breakdown.passes_text(r['counts'])} | {r['before_mib']:,.0f} | {r['peak_mib']:,.0f} | ok |")


def format_table(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"`nice -n 10 python benchmarks/paper_scale.py --threads {args.threads} --timeout {args.timeout:.0f}"
        f"{' --presets ...' if args.presets else ''}` on {platform.machine()} CPU, {os.cpu_count()} cores "
        f"(shared with other jobs), torch {torch.__version__}, fp32, random weights, synthetic data. Seconds of "
        "iterations 1 and 2 (the first includes first-touch allocations); \"ours %\": the share of the two "
        "iterations outside the network forwards, backwards and the optimiser step; RSS before the first "
        "iteration (networks, EMA teacher, ImageNet copy) and at the peak; passes as in the breakdown above "
        "(mean over the two iterations).",
        "",
        "| preset | network, batch, images into the step | s / it (1 / 2) | ours % | passes per iteration | "
        "RSS before MiB | peak RSS MiB | status |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    lines += [format_row(name, r) for name, r in results.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", help="presets to run (default: every non-digits preset)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per preset")
    parser.add_argument("--results", help="JSON lines file: finished presets are appended and not run again")
    parser.add_argument("--write", help="markdown file whose 'paper_scale' section is replaced")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the table of --results, every paper preset listed")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return 0
    results: dict[str, dict] = {}
    store = Path(args.results) if args.results else None
    if store and store.exists():
        for line in store.read_text().splitlines():
            record = json.loads(line)
            results[record["preset"]] = record["result"]
    for name in [] if args.report_only else args.presets or paper_presets():
        if name in results and "error" not in results[name]:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = _run_child(name, args.iterations, args.threads, args.timeout)
        print(f"  {format_row(name, results[name])}", file=sys.stderr, flush=True)
        if store:
            with store.open("a") as f:
                f.write(json.dumps({"preset": name, "result": results[name]}) + "\n")
    if args.report_only:
        results = {name: results.get(name, {}) for name in sorted(paper_presets(), key=lambda n: not results.get(n))}
    table = format_table(results, args)
    print(table)
    if args.write:
        from udaseg.bench import write_section

        write_section(Path(args.write), MARKER, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
