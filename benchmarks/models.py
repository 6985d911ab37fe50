"""Forward+backward time and peak memory of the segmentation networks.

Each (model, mode) runs in its own subprocess, so peak memory and compilation caches do not leak from
one measurement into the next. Modes: ``eager`` (fp32), ``bf16`` (autocast bfloat16), ``compile``
(``torch.compile`` with the default inductor backend, fp32; its first iteration, which includes the
compilation, is reported separately).

One iteration = forward with the ``decoder`` tap, cross-entropy against random labels at the logits'
resolution, backward, ``zero_grad``. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak resident set size on CPU (it includes the interpreter and PyTorch, ~300 MiB).

    python benchmarks/models.py                       # CPU: tiny models, 2×128²
    python benchmarks/models.py --device cuda         # paper models: R101 at 2×512², MiT-B5 at 2×640²
    python benchmarks/models.py --write docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

START, END = "<!-- models:start -->", "<!-- models:end -->"
CPU_MODELS = {"deeplabv2_tiny": 128, "daformer_tiny": 128, "segformer_tiny": 128}
CUDA_MODELS = {"deeplabv2_r101_v1c": 512, "deeplabv2_r101": 512, "daformer_mitb5": 640, "segformer_mitb5": 640}


def measure(name: str, mode: str, device: str, batch: int, size: int, iters: int, warmup: int,
            threads: int = 0) -> Dict:
    """Run in the worker process: build the model and time ``iters`` training iterations."""
    import torch
    import torch.nn.functional as F

    from udaseg.models import build_model, count_parameters

    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(name, 19).to(device).train()
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = count_parameters(model)
    step_model = torch.compile(model) if mode == "compile" else model
    x = torch.randn(batch, 3, size, size, device=device)
    stride = model.output_stride
    labels = torch.randint(0, 19, (batch, -(-size // stride), -(-size // stride)), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=(mode == "bf16")):
            out = step_model(x, taps=("decoder",))
        F.cross_entropy(out.logits.float(), labels).backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: List[float] = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"model": name, "mode": mode, "device": device, "batch": batch, "size": size, "params_m": params / 1e6,
            "first_s": first, "median_s": times[len(times) // 2], "peak_mib": peak_mib}


def run_worker(args: argparse.Namespace, name: str, mode: str, size: int) -> Dict:
    command = [sys.executable, __file__, "--worker", name, mode, str(size), "--device", args.device,
               "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "mode": mode, "size": size, "error": f"timeout after {args.timeout}s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"model": name, "mode": mode, "size": size, "error": last[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine_description(device: str, threads: int) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, PyTorch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} logical cores, {threads or torch.get_num_threads()} torch thread(s), PyTorch {torch.__version__}"


def markdown(rows: List[Dict], args: argparse.Namespace, machine: str) -> str:
    lines = [
        "## Models: forward + backward",
        "",
        f"Machine: {machine}. One iteration = forward (with the `decoder` tap) + cross-entropy + backward, "
        f"batch {args.batch}; median of {args.iters} iterations after {args.warmup} warm-up. "
        f"Command: `python benchmarks/models.py{' --device cuda' if args.device == 'cuda' else ''}`.",
        "",
        "| model | input | params (M) | mode | median s/iter | vs eager | first iter s | peak MiB |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    eager = {r["model"]: r["median_s"] for r in rows if r.get("mode") == "eager" and "error" not in r}
    for r in rows:
        shape = f"{args.batch}×{r['size']}²"
        if "error" in r:
            lines.append(f"| {r['model']} | {shape} | | {r['mode']} | {r['error']} | | | |")
            continue
        ratio = f"{eager[r['model']] / r['median_s']:.2f}×" if r["model"] in eager else ""
        lines.append(f"| {r['model']} | {shape} | {r['params_m']:.2f} | {r['mode']} | {r['median_s']:.4f} | {ratio} "
                     f"| {r['first_s']:.2f} | {r['peak_mib']:.0f} |")
    if args.device == "cpu":
        lines += ["", "On CPU the peak is the process's resident set size (interpreter and PyTorch included); "
                  "absolute CPU times depend on the load of a shared machine, compare the ratios. "
                  "\"vs eager\" > 1 means faster than eager. \"first iter\" of `compile` includes the compilation. "
                  "The paper-size networks (DeepLab-V2 R101 at 2×512², DAFormer/SegFormer MiT-B5 at 2×640²) "
                  "are measured with `--device cuda` on a GPU."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the models markers, or append it; other sections stay as they are."""
    block = f"{START}\n{section}{END}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nMeasured results; each section names its command and machine.\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--models", nargs="*", help="model names (default: tiny models on CPU, paper models on CUDA)")
    parser.add_argument("--size", type=int, help="square input size for every model (default per model)")
    parser.add_argument("--modes", default="eager,bf16,compile")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per measurement (0: PyTorch's default); 1 keeps shared machines stable")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per (model, mode) measurement")
    parser.add_argument("--write", type=Path, help="update the models section of this markdown file")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        name, mode, size = args.worker
        print(json.dumps(measure(name, mode, args.device, args.batch, int(size), args.iters, args.warmup,
                                 args.threads)))
        return
    defaults = CUDA_MODELS if args.device == "cuda" else CPU_MODELS
    models = {m: args.size or defaults.get(m, 128) for m in (args.models or defaults)}
    rows = []
    for name, size in models.items():
        for mode in args.modes.split(","):
            row = run_worker(args, name, mode.strip(), size)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    section = markdown(rows, args, machine_description(args.device, args.threads))
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    main()
