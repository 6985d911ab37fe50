"""Data loading throughput for GTA5-sized images.

Writes a few synthetic 1914×1052 GTA5 images (PNG) with Cityscapes-labelId labels to a temporary
folder and measures how many training items per second the DAFormer source pipeline delivers
(decode -> labelId to trainId mapping -> resize to (1280, 720) -> 512×512 crop with
cat_max_ratio 0.75 -> flip -> normalised tensor) with 0, 1 and 2 DataLoader workers.

    python benchmarks/data_throughput.py [--images 12] [--items 24] [--write docs/BENCHMARKS.md]

Each worker setting is measured twice, reading the original PNGs and reading the resized cache of
``udaseg prepare gta5 --resize 1280 720``.

The first batch of every run (worker start-up) is not timed. With ``--write`` the table replaces the
section between ``<!-- data_throughput:start -->`` and ``<!-- data_throughput:end -->`` of the file
(the section is appended, or the file created, when missing).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from udaseg.config.schema import IMAGENET_MEAN, IMAGENET_STD, DatasetConfig
from udaseg.data import build_dataset
from udaseg.data.resized_cache import write_cache

START = "<!-- data_throughput:start -->"
END = "<!-- data_throughput:end -->"
GTA_SIZE = (1914, 1052)  # width, height
LABEL_IDS = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33, 0, 1], dtype=np.uint8)


def synthetic_gta(root: Path, count: int, seed: int = 0) -> None:
    """GTA5-layout images: smooth colour fields with noise (PNG sizes near real renders) and
    labels made of rectangles of Cityscapes label ids."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    width, height = GTA_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(1, count + 1):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([np.sin(xs / (150 + 40 * c) + ys / 230 + phase[c]) for c in range(3)], axis=-1)
        noise = rng.normal(0, 12, (height, width, 3))
        image = np.clip(127 + 90 * base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:05d}.png")
        label = np.full((height, width), 7, dtype=np.uint8)
        for _ in range(40):
            y0, x0 = rng.integers(0, height - 50), rng.integers(0, width - 50)
            h, w = rng.integers(20, 400), rng.integers(20, 600)
            label[y0:y0 + h, x0:x0 + w] = rng.choice(LABEL_IDS)
        Image.fromarray(label, mode="L").save(root / "labels" / f"{i:05d}.png")


def measure(root: Path, workers: int, items: int, batch_size: int, cache: Path | None = None) -> float:
    """Items per second through the pipeline, after the first batch (``cache``: a resized cache)."""
    cfg = DatasetConfig(name="gta5", root=str(root), resize=[1280, 720], crop_size=[512, 512],
                        cat_max_ratio=0.75, flip=True, resized_cache=str(cache or ""))
    dataset = build_dataset(cfg, IMAGENET_MEAN, IMAGENET_STD)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=items + batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for batch in iterator:
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def markdown(rows: list[tuple[str, int, float]], images: int, items: int) -> str:
    cores = os.cpu_count()
    lines = [
        "## Data loading throughput (GTA5-sized images)",
        "",
        f"`python benchmarks/data_throughput.py --write docs/BENCHMARKS.md`: {images} synthetic 1914×1052 GTA5 "
        f"PNGs with labelId labels, {items} items per run, through decode → labelId→trainId → resize (1280, 720) → "
        f"512² crop (cat_max_ratio 0.75) → flip → normalised tensor, batch size 2. "
        f"Machine: {cores} CPU cores shared with other jobs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; absolute numbers are noisy, compare rows only. \"resized cache\": the "
        "images and labels read from the cache `udaseg prepare gta5 --resize 1280 720` writes "
        "(`data.source.resized_cache`), the same items without decoding the originals.",
        "",
        "| read from | DataLoader workers | images/s | ms/image |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {source} | {w} | {rate:.2f} | {1000 / rate:.0f} |" for source, w, rate in rows]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    section = f"{START}\n{body}\n{END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="synthetic images to write")
    parser.add_argument("--items", type=int, default=24, help="timed items per worker setting")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--write", type=Path, help="markdown file whose data_throughput section is updated")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "gta"
        synthetic_gta(root, args.images)
        write_cache("gta5", root, root / "resized", [1280, 720], nproc=1)
        rows = []
        for w in args.workers:  # interleaved, so that both sources see the same machine load
            rows.append(("original PNGs", w, measure(root, w, args.items, args.batch_size)))
            rows.append(("resized cache", w, measure(root, w, args.items, args.batch_size, root / "resized")))
        rows.sort(key=lambda row: row[0] != "original PNGs")
    table = markdown(rows, args.images, args.items)
    print(table)
    if args.write:
        write_section(args.write, table)


if __name__ == "__main__":
    main()
