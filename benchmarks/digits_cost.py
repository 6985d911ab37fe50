"""Seconds per training iteration of digits presets, measured side by side in one process.

    PYTHONPATH=src python benchmarks/digits_cost.py digits_dacs digits_rccr
    PYTHONPATH=src python benchmarks/digits_cost.py digits_dacs digits_rccr \
        "digits_rccr method.rccr.confidence_threshold=0" --metric rccr.anchors

Each argument is a preset, optionally followed by overrides (one quoted argument). Every run trains
on the real digits data with its own trainer; the runs take turns in blocks of ``--block``
iterations, so a shared machine's load falls on all of them alike. The first block is left out
(warm-up). Reported: the median seconds per iteration and the ratio to the first run. Evaluation
and checkpoints are off; the runs write to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from udaseg.config import load_config
    from udaseg.engine.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help='a preset, or "preset key=value ..." (the first is the reference)')
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--metric", help="also report the mean of this logged metric (e.g. rccr.anchors)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="digits_cost_"))
    trainers, times, anchors = {}, {}, {}
    for index, run in enumerate(args.runs):
        preset, *overrides = run.split()
        cfg = load_config(preset, [f"train.work_dir={work / str(index)}", f"train.iterations={args.iterations}",
                                   "train.eval_interval=1000000", "train.checkpoint_interval=1000000", *overrides])
        trainers[run] = Trainer(cfg, progress=False)
        times[run], anchors[run] = [], []
    for start in range(0, args.iterations, args.block):
        for run, trainer in trainers.items():
            for it in range(start, min(start + args.block, args.iterations)):
                begin = time.perf_counter()
                result = trainer.train_iteration(it)
                times[run].append(time.perf_counter() - begin)
                anchors[run].append(result.metrics.get(args.metric) if args.metric else None)
    reference = statistics.median(times[args.runs[0]][args.block:])
    print(f"| run | median s/iter | × {args.runs[0]} |")
    print("|---|---|---|")
    for run in args.runs:
        median = statistics.median(times[run][args.block:])
        print(f"| {run} | {median:.3f} | {median / reference:.2f} |")
    for run in args.runs:
        seen = [a for a in anchors[run] if a is not None]
        if seen:
            print(f"{run}: {args.metric} mean {statistics.mean(seen):.1f}, last block "
                  f"{statistics.mean(seen[-args.block:]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
