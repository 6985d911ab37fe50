"""Time per training iteration and peak memory of each method's step, as ratios measured in one run.

    python benchmarks/iteration.py                       # CPU, small size, every method
    python benchmarks/iteration.py --write docs/BENCHMARKS.md
    python benchmarks/iteration.py --device cuda --setting paper --modes eager bf16 compile

Each (method, mode) is measured in its own subprocess (so peak memory is its own), in interleaved
rounds, and the median over rounds is reported. Data come from an in-memory synthetic dataset so
that the step, not image decoding, is measured. Ratios are relative to source-only and to DACS in the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SETTINGS = {
    # name: (model, crop, batch, extra)
    "cpu-small": {"daformer": ("daformer_tiny", 128, 2), "deeplabv2": ("deeplabv2_tiny", 128, 2)},
    "paper": {"daformer": ("daformer_mitb5", 640, 2), "deeplabv2": ("deeplabv2_r101_v1c", 512, 2)},
}
METHODS = ["source_only", "dacs", "daformer", "sepico_distcl", "sepico_bankcl", "t2sda", "pgpc", "pgpc_no_extra_pass"]
FAMILIES = ["daformer", "deeplabv2"]
MARKER = "iteration"


def _register_synthetic_dataset() -> None:
    from torch.utils.data import Dataset

    from udaseg.data import register_dataset
    from udaseg.data.labels import CITYSCAPES_CLASSES

    @register_dataset("synthetic")
    class SyntheticDataset(Dataset):
        """Random images with blocky labels, generated once and kept in memory.

        Options: ``size`` [H, W] (default: the crop size, else 128²), ``count`` (8), ``classes`` (19).
        """

        def __init__(self, cfg, mean, std):
            size = cfg.options.get("size") or cfg.crop_size or [128, 128]
            count = int(cfg.options.get("count", 8))
            classes = int(cfg.options.get("classes", 19))
            gen = torch.Generator().manual_seed(0)
            self.images = torch.randn(count, 3, *size, generator=gen)
            blocks = torch.randint(0, classes, (count, 1, size[0] // 32 + 1, size[1] // 32 + 1), generator=gen)
            labels = torch.nn.functional.interpolate(blocks.float(), scale_factor=32, mode="nearest")
            self.labels = labels[:, 0, : size[0], : size[1]].long()
            self.labelled = cfg.labelled
            self.classes = CITYSCAPES_CLASSES

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            item = {"image": self.images[index], "name": str(index), "index": index}
            if self.labelled:
                item["label"] = self.labels[index]
            return item


PRESETS = {
    "source_only": {"deeplabv2": "source_only_deeplabv2_gta2cs", "daformer": "source_only_daformer_mitb5_gta2cs"},
    "dacs": {"deeplabv2": "dacs_deeplabv2_gta2cs", "daformer": "dacs_deeplabv2_gta2cs"},
    "daformer": {"deeplabv2": "daformer_mitb5_gta2cs", "daformer": "daformer_mitb5_gta2cs"},
    "sepico_distcl": {"deeplabv2": "sepico_distcl_deeplabv2_gta2cs", "daformer": "sepico_distcl_daformer_gta2cs"},
    "sepico_bankcl": {"deeplabv2": "sepico_bankcl_deeplabv2_gta2cs", "daformer": "sepico_bankcl_daformer_gta2cs"},
    "sepico_protocl": {"deeplabv2": "sepico_protocl_deeplabv2_gta2cs", "daformer": "sepico_protocl_daformer_gta2cs"},
    "mic": {"deeplabv2": "mic_daformer_gta2cs", "daformer": "mic_daformer_gta2cs"},
    "t2sda": {"deeplabv2": "t2sda_deeplabv2_gta2cs", "daformer": "t2sda_daformer_gta2cs"},
    "pgpc": {"deeplabv2": "pgpc_daformer_gta2cs", "daformer": "pgpc_daformer_gta2cs"},
    "pgpc_no_extra_pass": {"deeplabv2": "pgpc_daformer_gta2cs", "daformer": "pgpc_daformer_gta2cs"},
}
# Extra overrides of a method's row. PGPC's default takes anchors from a separate student pass over the
# strongly augmented target and source bank entries from a no-grad teacher pass over the source; the
# no-extra-pass variant takes anchors from the ClassMix image and bank entries from the student's source pass.
METHOD_OVERRIDES = {
    "pgpc": ["method.pgpc.warmup_iters=0"],
    "pgpc_no_extra_pass": ["method.pgpc.warmup_iters=0", "method.pgpc.anchor_view=mixed", "method.pgpc.bank_features=student"],
}


def _config(method: str, family: str, setting: str, mode: str, device: str, work_dir: Path, crop: int = 0):
    """The method's GTA5 -> Cityscapes preset on another network size, with synthetic data."""
    from udaseg.config import load_config

    model, default_crop, batch = SETTINGS[setting][family]
    crop = crop or default_crop
    overrides = [
        f"model.name={model}", "model.pretrained=", "model.options={}", f"data.batch_size={batch}",
        "data.workers=0", f"train.work_dir={work_dir}", "train.iterations=1000000",
        "train.eval_interval=1000000", "train.checkpoint_interval=1000000", f"train.device={device}",
        f"train.amp={'bf16' if mode in ('bf16', 'compile') else 'none'}", f"train.compile={mode == 'compile'}",
        f"train.channels_last={mode != 'eager' and family == 'deeplabv2'}",
    ]
    if method.startswith("sepico"):  # contrastive terms on from the first iteration; target crop = source crop
        overrides += ["method.sepico.warmup_iters=0", f"method.sepico.target_crop_size=[{crop},{crop}]"]
    overrides += METHOD_OVERRIDES.get(method, [])
    cfg = load_config(PRESETS[method][family], overrides)
    for spec in (cfg.data.source, cfg.data.target):
        spec.name, spec.crop_size, spec.resize, spec.rcs.enabled = "synthetic", [crop, crop], None, False
        spec.options = {}
    cfg.data.val = []
    return cfg


def measure(method: str, family: str, setting: str, mode: str, device: str, iterations: int, warmup: int,
            crop: int = 0) -> dict:
    """Run in a subprocess: the median time of ``iterations`` steps after ``warmup`` and peak memory."""
    import tempfile

    _register_synthetic_dataset()
    from udaseg.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_config(method, family, setting, mode, device, Path(tmp), crop), progress=False)
        dev = trainer.device
        times = []
        for it in range(warmup + iterations):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_iteration(it)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if it >= warmup:
                times.append(time.perf_counter() - start)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"time": statistics.median(times), "peak_mib": peak}


def _run_child(args: list[str], threads: int) -> dict:
    argv = (["--threads", str(threads)] if threads else []) + ["--child", *args]
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu-small")
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--modes", nargs="+", default=["eager", "bf16"], choices=["eager", "bf16", "compile"])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", help="markdown file whose 'iteration' section is replaced")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads per run (0: torch's default)")
    parser.add_argument("--crop", type=int, default=0, help="square crop size (0: the setting's)")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        method, family, setting, mode, device, iterations, warmup, crop = args.child
        print(json.dumps(measure(method, family, setting, mode, device, int(iterations), int(warmup), int(crop))))
        return 0

    results: dict[tuple, list[dict]] = {}
    jobs = [(f, m, mode) for f in args.families for mode in args.modes for m in args.methods]
    for round_index in range(args.rounds):
        for family, method, mode in jobs:
            print(f"round {round_index + 1}/{args.rounds}: {family} {method} {mode}", file=sys.stderr, flush=True)
            child = [method, family, args.setting, mode, args.device, str(args.iterations), str(args.warmup),
                     str(args.crop)]
            results.setdefault((family, method, mode), []).append(_run_child(child, args.threads))
    table = format_table(results, args)
    print(table)
    if args.write:
        from udaseg.bench import write_section

        write_section(Path(args.write), MARKER, table)
    return 0


def _median_time(results: dict, key: tuple) -> float:
    return statistics.median(r["time"] for r in results[key]) if key in results else float("nan")


def format_table(results: dict, args) -> str:
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available()
               else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, shared")
    memory = "peak CUDA memory allocated" if args.device.startswith("cuda") else "peak process RSS"
    lines = [
        "## Training iteration cost",
        "",
        f"`python benchmarks/iteration.py --device {args.device} --setting {args.setting}"
        f"{'' if args.families == FAMILIES else ' --families ' + ' '.join(args.families)}"
        f"{'' if args.methods == METHODS else ' --methods ' + ' '.join(args.methods)}"
        f" --modes {' '.join(args.modes)}"
        f" --iterations {args.iterations} --rounds {args.rounds}{f' --crop {args.crop}' if args.crop else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}` on {machine}, torch {torch.__version__}. "
        f"Median seconds per iteration over {args.rounds} interleaved rounds of {args.iterations} iterations "
        f"(after {args.warmup} warm-up iteration{'s' if args.warmup != 1 else ''}), each (method, mode) in its own "
        f"process; {memory}. "
        "Ratios are against source-only, DACS and DAFormer (DACS + FD) with the same model and mode in the same "
        "run; the SePiCo and PGPC rows have the contrastive terms on (warm-up 0). `pgpc` is the default "
        "(anchors from a separate student pass over the strong target, source bank from a teacher pass); "
        "`pgpc_no_extra_pass` takes anchors from the ClassMix image and the source bank from the student's source "
        "pass (`method.pgpc.anchor_view=mixed method.pgpc.bank_features=student`).",
        "",
        "| model | mode | method | s / iter | × source-only | × DACS | × DAFormer | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if not args.device.startswith("cuda"):
        lines.insert(4, "The papers' settings (DAFormer MiT-B5 2×640², DeepLab-V2 R101 2×512²; eager, bf16 and "
                        "compiled) are measured with `--device cuda --setting paper --modes eager bf16 compile` "
                        "on a GPU; no GPU was available for the figures below.")
        lines.insert(5, "")
    for (family, method, mode), runs in results.items():
        model, crop, batch = SETTINGS[args.setting][family]
        crop = args.crop or crop
        t = statistics.median(r["time"] for r in runs)
        base, dacs, daformer = (_median_time(results, (family, name, mode)) for name in ("source_only", "dacs", "daformer"))
        peak = max(r["peak_mib"] for r in runs)
        lines.append(f"| {model} {batch}×{crop}² | {mode} | {method} | {t:.3f} | {t / base:.2f} | {t / dacs:.2f} "
                     f"| {t / daformer:.2f} | {peak:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
