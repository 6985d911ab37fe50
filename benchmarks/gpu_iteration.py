"""DAFormer MiT-B5, 2 × 640² UDA iterations on a GPU: DACS, SePiCo DistCL, T2S-DA in eager, bf16, compiled.

    python benchmarks/gpu_iteration.py --write docs/BENCHMARKS.md        # on the GPU machine, a few minutes
    python benchmarks/gpu_iteration.py --setting cpu-small --crop 64 --iterations 2 --warmup 1   # CPU check

The device is the first CUDA device when there is one, else the CPU. Each (method, mode) runs in its
own process (``benchmarks/iteration.py``'s measurement: synthetic in-memory data, random weights, the
method's GTA5 → Cityscapes preset on MiT-B5 with 640² crops, SePiCo's contrastive terms on from the
first iteration), so the peak memory (``torch.cuda.max_memory_allocated``) is its own. The goal is
≤ 0.25 s/it with bf16 and ≤ 20 GB peak; the official DAFormer code trains at about 1.4 s/it on an
RTX 2080 Ti (16 h for 40k iterations, fp32).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import iteration as bench_iteration

MARKER = "gpu_iteration"
METHODS = ["dacs", "sepico_distcl", "t2sda"]
MODES = ["eager", "bf16", "compile"]
GOAL_SECONDS, GOAL_GB, OFFICIAL_SECONDS = 0.25, 20.0, 1.4


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def format_table(rows: list[tuple[str, str, dict]], args: argparse.Namespace, wall: float) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    model, crop, batch = bench_iteration.SETTINGS[args.setting]["daformer"]
    crop = args.crop or crop
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak process RSS"
    lines = [
        f"`python benchmarks/gpu_iteration.py --setting {args.setting}{f' --crop {args.crop}' if args.crop else ''} "
        f"--iterations {args.iterations} --warmup {args.warmup}` on {device}, torch {torch.__version__}, "
        f"{model} {batch}×{crop}², median of {args.iterations} iterations after {args.warmup} warm-up "
        f"(compilation included in the warm-up), {memory}; the whole run took {wall / 60:.1f} min.",
        "",
        "| method | mode | s / iter | × eager | peak GB | goal: bf16 ≤ 0.25 s/it, ≤ 20 GB | official DAFormer (RTX 2080 Ti) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    eager = {method: r["time"] for method, mode, r in rows if mode == "eager" and "time" in r}
    for method, mode, r in rows:
        if "error" in r:
            lines.append(f"| {method} | {mode} | – | – | – | {r['error']} | ≈ {OFFICIAL_SECONDS} s/it |")
            continue
        gb = r["peak_mib"] / 1024
        ok = "met" if r["time"] <= GOAL_SECONDS and gb <= GOAL_GB else "not met"
        lines.append(f"| {method} | {mode} | {r['time']:.3f} | {eager.get(method, float('nan')) / r['time']:.2f} "
                     f"| {gb:.1f} | {ok if mode == 'bf16' else ''} | ≈ {OFFICIAL_SECONDS} s/it (fp32) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--setting", choices=sorted(bench_iteration.SETTINGS), default="paper")
    parser.add_argument("--crop", type=int, default=0, help="square crop (0: the setting's, 640 for paper)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--write", help="markdown file whose 'gpu_iteration' section is replaced")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for mode in args.modes:
        for method in args.methods:
            print(f"{method} {mode} on {args.device}", file=sys.stderr, flush=True)
            child = [method, "daformer", args.setting, mode, args.device, str(args.iterations), str(args.warmup),
                     str(args.crop)]
            try:
                rows.append((method, mode, bench_iteration._run_child(child, args.threads)))
            except RuntimeError as error:
                rows.append((method, mode, {"error": str(error)[:120]}))
    table = format_table(rows, args, time.perf_counter() - start)
    print(table)
    if args.write:
        from udaseg.bench import write_section

        write_section(Path(args.write), MARKER, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
