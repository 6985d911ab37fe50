"""Where a training iteration's time goes: the network passes a method needs against everything else.

    python benchmarks/breakdown.py                         # CPU, tiny networks, 2 × 128², every method
    python benchmarks/breakdown.py --setting paper --crop 256 --families deeplabv2 --methods dacs
    python benchmarks/breakdown.py --write docs/BENCHMARKS.md

Each method runs in its own process on the synthetic in-memory data of ``benchmarks/iteration.py``.
:class:`PassMeter` wraps the network entry points for the run: every outermost forward of the
student, the EMA teacher or another network (DAFormer's frozen ImageNet encoder for FD) is timed and
counted, and so are the backward calls and the optimiser step. "Ours" is the iteration's wall time
minus those: statistics, sampling, crops, FDA, ClassMix, augmentation, EMA, pseudo-labels, losses,
data collation. On a GPU every timed region is bracketed by a synchronisation, so the split is exact
there as well (at the price of the syncs the measurement adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

MARKER = "breakdown"
METHODS = ["source_only", "dacs", "daformer", "sepico_protocl", "sepico_bankcl", "sepico_distcl", "t2sda", "pgpc",
           "mic", "hrda"]
NETWORK_KEYS = ("student forward", "teacher forward", "other forward", "backward", "optimiser")

# Network passes per iteration in the official code of each method (training, after the warm-ups), from
# the specs in the project's design notes: (student forwards with backward, teacher forwards, other forwards).
OFFICIAL_PASSES = {
    "source_only": (1, 0, 0),
    "dacs": (2, 1, 0),
    "daformer": (2, 1, 1),  # + the frozen ImageNet encoder on the source for FD
    "sepico_protocl": (3, 4, 0),  # teacher: full target, cropped target, source logits (debug only), source features; no FD
    "sepico_bankcl": (3, 4, 0),
    "sepico_distcl": (3, 4, 0),
    "t2sda": (3, 2, 1),  # DAFormer + student pass on the FDA pseudo-target, teacher pass on the source
    "pgpc": (3, 2, 1),  # DAFormer + student pass on the strong target (anchors), teacher pass on the source (bank)
    "mic": (3, 1, 1),  # DAFormer + the masked target step
    "hrda": (2, 1, 1),  # as DAFormer; the teacher's pass is one sliding-window inference over detail windows
}


class PassMeter:
    """Times and counts network passes while installed.

    ``student`` and ``teacher`` are the :class:`~udaseg.adapt.step.UDAModel` instances of the run;
    a forward of any other segmentor outside them (the frozen ImageNet copy) is an "other forward".
    Nested calls (a segmentor inside ``UDAModel``, HRDA's context and detail branches) belong to the
    outermost pass.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.student: Any = None
        self.teacher: Any = None
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._depth = 0
        self._restore: list[tuple[Any, str, Any]] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, key: Callable[..., str], fn: Callable) -> Callable:
        meter = self

        def wrapper(*args, **kwargs):
            if meter._depth:
                return fn(*args, **kwargs)
            name = key(*args)
            meter._depth += 1
            meter._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                meter._sync()
                meter.seconds[name] += time.perf_counter() - start
                meter.counts[name] += 1
                meter._depth -= 1

        return wrapper

    def _patch(self, owner: Any, attribute: str, key: Callable[..., str]) -> None:
        original = getattr(owner, attribute)
        self._restore.append((owner, attribute, original))
        setattr(owner, attribute, self._timed(key, original))

    def _model_key(self, model: Any, *_: Any) -> str:
        if model is self.student:
            return "student forward" if torch.is_grad_enabled() else "student forward (no grad)"
        if model is self.teacher:
            return "teacher forward"
        return "other forward"

    def install(self, trainer: Any) -> "PassMeter":
        from udaseg.adapt.step import UDAModel
        from udaseg.models.hrda import HRDASegmentor
        from udaseg.models.segmentor import Segmentor

        self.student = trainer.model
        self.teacher = trainer.teacher.module if trainer.teacher is not None else None
        for cls in (UDAModel, Segmentor, HRDASegmentor):
            self._patch(cls, "forward", self._model_key)
        self._patch(torch.Tensor, "backward", lambda *_: "backward")
        self._patch(torch.autograd, "backward", lambda *_: "backward")
        self._patch(trainer.optimizer, "step", lambda *_: "optimiser")
        if trainer.teacher is not None:
            self._patch(trainer.teacher, "update", lambda *_: "EMA update")
        return self

    def uninstall(self) -> None:
        while self._restore:
            owner, attribute, original = self._restore.pop()
            setattr(owner, attribute, original)

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()


def measure_iterations(trainer: Any, iterations: int, warmup: int, start: int = 0) -> dict:
    """Per-iteration wall time, network seconds and pass counts, averaged over ``iterations``."""
    meter = PassMeter(trainer.device).install(trainer)
    totals, seconds, counts = [], defaultdict(list), defaultdict(list)
    try:
        for it in range(start, start + warmup + iterations):
            meter.reset()
            meter._sync()
            begin = time.perf_counter()
            trainer.train_iteration(it)
            meter._sync()
            elapsed = time.perf_counter() - begin
            if it < start + warmup:
                continue
            totals.append(elapsed)
            for name in set(meter.seconds) | set(seconds):
                seconds[name].append(meter.seconds.get(name, 0.0))
                counts[name].append(meter.counts.get(name, 0))
    finally:
        meter.uninstall()
    mean = statistics.fmean
    result = {"time": mean(totals), "times": totals, "seconds": {k: mean(v) for k, v in seconds.items()},
              "counts": {k: mean(v) for k, v in counts.items()}}
    network = sum(v for k, v in result["seconds"].items() if k.startswith(NETWORK_KEYS))
    result["network"] = network
    result["ours"] = result["time"] - network
    return result


def _child(method: str, family: str, setting: str, device: str, iterations: int, warmup: int, crop: int) -> dict:
    import tempfile

    import iteration as bench_iteration

    bench_iteration._register_synthetic_dataset()
    from udaseg.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_iteration._config(method, family, setting, "eager", device, Path(tmp), crop)
        trainer = Trainer(cfg, progress=False)
        return measure_iterations(trainer, iterations, warmup)


def _run_child(argv: list[str], threads: int) -> dict:
    command = [sys.executable, __file__, *(["--threads", str(threads)] if threads else []), "--child", *argv]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def passes_text(counts: dict) -> str:
    """"student 2 · teacher 1 · other 1 / backward 2" from a run's mean counts."""
    def n(key: str) -> str:
        value = counts.get(key, 0)
        return f"{value:g}"
    parts = [f"S {n('student forward')}", f"T {n('teacher forward')}"]
    if counts.get("student forward (no grad)"):
        parts.append(f"S-nograd {n('student forward (no grad)')}")
    if counts.get("other forward"):
        parts.append(f"I {n('other forward')}")
    return " · ".join(parts) + f" / B {n('backward')}"


def official_text(method: str) -> str:
    if method not in OFFICIAL_PASSES:
        return "–"
    s, t, o = OFFICIAL_PASSES[method]
    return " · ".join([f"S {s}", f"T {t}"] + ([f"I {o}"] if o else []))


def format_rows(results: dict) -> list[str]:
    lines = ["| model | method | s / iter | network fwd | network bwd | optimiser | ours | ours % | EMA | "
             "passes (ours) | passes (official) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for (label, method), r in results.items():
        sec = r["seconds"]
        forward = sum(v for k, v in sec.items() if "forward" in k)
        lines.append(
            f"| {label} | {method} | {r['time']:.3f} | {forward:.3f} | {sec.get('backward', 0):.3f} "
            f"| {sec.get('optimiser', 0):.3f} | {r['ours']:.3f} | {100 * r['ours'] / r['time']:.1f} "
            f"| {sec.get('EMA update', 0):.3f} | {passes_text(r['counts'])} | {official_text(method)} |")
    return lines


def main() -> int:
    import iteration as bench_iteration

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--setting", choices=sorted(bench_iteration.SETTINGS), default="cpu-small")
    parser.add_argument("--families", nargs="+", default=["daformer", "deeplabv2"])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m in bench_iteration.PRESETS])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--crop", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", help="markdown file whose 'breakdown' section is replaced")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        method, family, setting, device, iterations, warmup, crop = args.child
        print(json.dumps(_child(method, family, setting, device, int(iterations), int(warmup), int(crop))))
        return 0
    results = {}
    for family in args.families:
        model, crop, batch = bench_iteration.SETTINGS[args.setting][family]
        label = f"{model} {batch}×{args.crop or crop}²"
        for method in args.methods:
            print(f"{label} {method}", file=sys.stderr, flush=True)
            child = [method, family, args.setting, args.device, str(args.iterations), str(args.warmup), str(args.crop)]
            results[(label, method)] = _run_child(child, args.threads)
    table = format_table(results, args)
    print(table)
    if args.write:
        from udaseg.bench import write_section

        write_section(Path(args.write), MARKER, table)
    return 0


def format_table(results: dict, args: argparse.Namespace) -> str:
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, shared" if args.device == "cpu" else args.device
    command = (f"python benchmarks/breakdown.py --setting {args.setting} --families {' '.join(args.families)} "
               f"--iterations {args.iterations} --warmup {args.warmup} --threads {args.threads}"
               f"{f' --crop {args.crop}' if args.crop else ''}")
    return "\n".join([f"`{command}` on {machine}, torch {torch.__version__}; mean over {args.iterations} iterations "
                      f"after {args.warmup} warm-up, each method in its own process.", "", *format_rows(results)])


if __name__ == "__main__":
    sys.exit(main())
