"""Tiny fake datasets in the official layouts (a few images of a few pixels each)."""

from __future__ import annotations

import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

H, W = 6, 8


def write_rgb(path: Path, seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def write_gray(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L").save(path)


def write_png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 48-bit RGB PNG (as SYNTHIA's GT/LABELS files), written by hand since Pillow cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def label_from(values, h: int = H, w: int = W) -> np.ndarray:
    """A label whose pixels cycle through ``values`` in row-major order."""
    flat = np.resize(np.asarray(values), h * w)
    return flat.reshape(h, w)


def make_gta(root: Path, labels: list[np.ndarray]) -> Path:
    for i, lbl in enumerate(labels, start=1):
        write_rgb(root / "images" / f"{i:05d}.png", seed=i)
        write_gray(root / "labels" / f"{i:05d}.png", lbl)
    return root


def make_synthia(root: Path, labels: list[np.ndarray]) -> Path:
    for i, lbl in enumerate(labels):
        write_rgb(root / "RGB" / f"{i:07d}.png", seed=i)
        stack = np.stack([lbl, np.full_like(lbl, 1000 + i), np.zeros_like(lbl)], axis=-1).astype(np.uint16)
        write_png16_rgb(root / "GT" / "LABELS" / f"{i:07d}.png", stack)
    return root


def make_cityscapes(root: Path, split: str, labels: dict[str, list[np.ndarray]], kind: str = "labelIds") -> Path:
    for city, city_labels in labels.items():
        for j, lbl in enumerate(city_labels):
            stem = f"{city}_{j:06d}_000019"
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=j)
            write_gray(root / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png", lbl)
    return root


def make_darkzurich(root: Path) -> Path:
    for seq, frames in (("GOPR0356", 2), ("GOPR0364", 1)):
        for f in range(frames):
            write_rgb(root / "rgb_anon" / "train" / "night" / seq / f"{seq}_frame_{f:06d}_rgb_anon.png", seed=f)
    day_seq = "GOPR0351"
    rows = []
    for k, (seq, f) in enumerate((("GOPR0356", 0), ("GOPR0356", 1), ("GOPR0364", 0))):
        write_rgb(root / "rgb_anon" / "train" / "day" / day_seq / f"{day_seq}_frame_{k:06d}_rgb_anon.png",
                  seed=100 + k)
        rows.append(f"train/night/{seq}/{seq}_frame_{f:06d},train/day/{day_seq}/{day_seq}_frame_{k:06d}")
    (root / "corresp" / "train" / "night").mkdir(parents=True)
    (root / "corresp" / "train" / "night" / "pairs.csv").write_text("\n".join(rows) + "\n")
    for f in range(2):
        stem = f"GOPR0356_frame_{f:06d}"
        write_rgb(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png", seed=f)
        write_gray(root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelTrainIds.png", label_from([0, 1, 255]))
    write_rgb(root / "rgb_anon" / "test" / "night" / "GOPR0000" / "GOPR0000_frame_000000_rgb_anon.png")
    return root


def make_acdc(root: Path, counts: dict[str, int]) -> Path:
    for cond, n in counts.items():
        for f in range(n):
            stem = f"GOPR0475_frame_{f:06d}"
            write_rgb(root / "rgb_anon" / cond / "train" / "GOPR0475" / f"{stem}_rgb_anon.png", seed=f)
            write_gray(root / "gt" / cond / "train" / "GOPR0475" / f"{stem}_gt_labelTrainIds.png", label_from([f, 10]))
    return root


def make_bdd(root: Path, old: bool = False) -> Path:
    for name in ("0a0a0b1a-7c39d841", "0a0b16e2-93f8c456"):
        if old:
            write_rgb(root / "seg" / "images" / "train" / f"{name}.jpg")
            write_gray(root / "seg" / "labels" / "train" / f"{name}_train_id.png", label_from([13, 0, 255]))
        else:
            write_rgb(root / "images" / "10k" / "train" / f"{name}.jpg")
            write_gray(root / "labels" / "sem_seg" / "masks" / "train" / f"{name}.png", label_from([13, 0, 255]))
    return root


def make_mapillary(root: Path, ids: list[np.ndarray], split: str = "training", v12: bool = True) -> Path:
    label_dir = root / split / ("v1.2/labels" if v12 else "labels")
    palette = [0] * 768
    for i, lbl in enumerate(ids):
        name = f"__CRyFzoDOXn6unQ6a3DnQ{i}"
        write_rgb(root / split / "images" / f"{name}.jpg", seed=i)
        label_dir.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(np.asarray(lbl, dtype=np.uint8), mode="P")
        im.putpalette(palette)
        im.save(label_dir / f"{name}.png")
    return root


def make_folder(root: Path, classes: list[str], labels: list[np.ndarray], extra_yaml: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text("classes: [" + ", ".join(classes) + "]\n" + extra_yaml)
    for i, lbl in enumerate(labels):
        write_rgb(root / "images" / f"img{i}.jpg", seed=i)
        write_gray(root / "labels" / f"img{i}.png", lbl)
    return root


@pytest.fixture
def fake():
    return types.SimpleNamespace(
        write_rgb=write_rgb, write_gray=write_gray, write_png16_rgb=write_png16_rgb, label_from=label_from,
        gta=make_gta, synthia=make_synthia, cityscapes=make_cityscapes, darkzurich=make_darkzurich,
        acdc=make_acdc, bdd=make_bdd, mapillary=make_mapillary, folder=make_folder, H=H, W=W)
