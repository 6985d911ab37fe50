"""``udaseg prepare``: convert dataset labels to trainIds and write the class statistics.

For GTA5, SYNTHIA, Cityscapes (from ``*_gtFine_labelIds.png``) and Mapillary every raw label file
gets a ``*_labelTrainIds.png`` next to it. For every dataset with labelled training images (a
``folder`` dataset of your own included) the three class-statistics files of rare class sampling
are written to the dataset root
(``sample_class_stats.json``, ``sample_class_stats_dict.json``, ``samples_with_class.json``; format in
``udaseg.data.sampling``). Only the train split is counted.

The work is resumable: converted files that exist are kept (``--force`` converts again), and every
output is written to a temporary file and renamed, so an interrupted run leaves no broken file.
``udaseg prepare digits --out DIR`` exports the embedded digits benchmark as a folder dataset.
``--resize W H`` also writes a cache of the images and labels already resized to a preset's scale
(``udaseg.data.resized_cache``), which the training pipeline reads instead of decoding the originals.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from udaseg.config.schema import IMAGENET_MEAN, IMAGENET_STD, DatasetConfig
from udaseg.data.datasets import DATASETS, SegmentationDataset, read_label_values, write_label_png
from udaseg.data.labels import ID_TABLES, map_ids, trainid_table
from udaseg.data.sampling import (
    SAMPLES_WITH_CLASS_FILE,
    STATS_DICT_FILE,
    STATS_FILE,
    build_stats_files,
    class_pixel_counts,
    stats_entry,
)
from udaseg.errors import UserError

PREPARABLE = ("gta5", "synthia", "cityscapes", "mapillary", "acdc", "bdd100k", "darkzurich", "folder")
ALIASES = {"gta": "gta5", "dark_zurich": "darkzurich", "dz": "darkzurich", "bdd": "bdd100k"}
STATS_FILES = (STATS_FILE, STATS_DICT_FILE, SAMPLES_WITH_CLASS_FILE)

# (raw label, its reader, its id table, converted output, label read otherwise, force, need counts,
#  class count, the value the label files use for "ignore")
Job = tuple[Optional[str], str, Optional[str], Optional[str], Optional[str], bool, bool, int, int]


def _process(job: Job) -> tuple[str, Optional[dict[int, int]], int, bool]:
    """Convert one label (unless done) and count its classes.

    Returns ``(recorded file, class counts or None, unmapped pixels, whether a file was written)``.
    """
    raw, reader, table_name, converted, label_file, force, need_counts, num_classes, ignore = job
    if converted is not None and raw is not None and table_name is not None and (force or not Path(converted).exists()):
        label, n_unmapped = map_ids(read_label_values(Path(raw), reader), ID_TABLES[table_name])
        write_label_png(Path(converted), label)
        return converted, class_pixel_counts(label), n_unmapped, True
    source = converted if converted is not None else label_file
    if source is None:
        raise UserError(f"no label file for {raw}")
    if not need_counts:
        return source, None, 0, False
    label, n_unmapped = map_ids(read_label_values(Path(source), "index"), trainid_table(num_classes, ignore))
    return source, class_pixel_counts(label, num_classes), n_unmapped, False


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _jobs(dataset: SegmentationDataset, force: bool, need_counts: bool, ignore: int = 255) -> list[Job]:
    def text(path: Optional[Path]) -> Optional[str]:
        return str(path) if path is not None else None

    num_classes = dataset.classes.num_classes
    return [(text(s.raw_label), s.raw_reader, s.raw_table, text(s.converted), text(s.label), force, need_counts,
             num_classes, ignore) for s in dataset.samples]


def _run_pool(jobs: list[Job], nproc: int, desc: str) -> list[tuple[str, Optional[dict[int, int]], int, bool]]:
    """Run the jobs in order, in ``nproc`` processes, with a progress bar on a terminal."""
    results = []
    with tqdm(total=len(jobs), desc=desc, unit="file", file=sys.stderr, disable=None) as bar:
        if nproc <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_process(job))
                bar.update()
        else:
            with multiprocessing.get_context().Pool(nproc) as pool:
                for result in pool.imap(_process, jobs, chunksize=max(1, len(jobs) // (nproc * 16))):
                    results.append(result)
                    bar.update()
    return results


def prepare_dataset(name: str, root: Path, nproc: int = 2, force: bool = False) -> dict[str, Any]:
    """Convert labels and write class statistics for dataset ``name`` at ``root``; returns a summary."""
    cfg = DatasetConfig(name=name, root=str(root), split="train", labelled=True)
    dataset = DATASETS[name](cfg, IMAGENET_MEAN, IMAGENET_STD)
    ignore = 255
    if name == "folder":
        from udaseg.data.datasets import load_class_file

        _, ignore = load_class_file(root / "classes.yaml")
    stats_done = all((root / f).is_file() for f in STATS_FILES) and not force
    jobs = _jobs(dataset, force, need_counts=not stats_done, ignore=ignore)
    results = _run_pool(jobs, nproc, f"prepare {name}")
    written = sum(1 for r in results if r[3])
    unmapped = sum(r[2] for r in results)
    files_unmapped = sum(1 for r in results if r[2])
    if not stats_done:
        documents = build_stats_files(stats_entry(counts, file) for file, counts, _, _ in results if counts)
        for file_name, data in documents.items():
            _write_json(root / file_name, data)
    return {"files": len(results), "converted": written, "stats_written": not stats_done,
            "unmapped_pixels": unmapped, "files_with_unmapped": files_unmapped}


def _prepare_digits(args: argparse.Namespace) -> int:
    if not args.out:
        raise UserError("prepare digits needs --out DIR (the folder the benchmark is exported to)")
    try:
        digits = importlib.import_module("udaseg.data.digits")
    except ModuleNotFoundError as err:
        if err.name != "udaseg.data.digits":
            raise
        raise UserError("the digits benchmark (udaseg.data.digits) is not available in this installation") from None
    digits.export_folder(Path(args.out), args.seed, Path(args.root) if args.root else None)
    print(f"digits benchmark exported to {args.out}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """Entry point of ``udaseg prepare``."""
    name = ALIASES.get(args.dataset, args.dataset)
    if name == "digits":
        return _prepare_digits(args)
    if name not in PREPARABLE:
        raise UserError(f"cannot prepare dataset '{args.dataset}'; choose from {', '.join(PREPARABLE + ('digits',))}")
    if not args.root:
        raise UserError(f"prepare {name} needs --root (the dataset folder)")
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {args.nproc}")
    root = Path(args.root).expanduser()
    if name == "darkzurich":
        # Dark Zurich ships trainIds and its training split is unlabelled: nothing to convert or count.
        DATASETS[name](DatasetConfig(name=name, root=str(root), split="train", labelled=False),
                       IMAGENET_MEAN, IMAGENET_STD)
        if getattr(args, "resize", None):
            _write_resized_cache(name, root, args)
            return 0
        print(f"prepare darkzurich: labels already are trainIds and the train split is unlabelled; nothing to do")
        return 0
    _report(name, root, prepare_dataset(name, root, args.nproc, args.force))
    if getattr(args, "resize", None):
        _write_resized_cache(name, root, args)
    return 0


def _write_resized_cache(name: str, root: Path, args: argparse.Namespace) -> None:
    from udaseg.data.resized_cache import write_cache

    width, height = args.resize
    cache = Path(args.cache).expanduser() if args.cache else root / f"resized_{width}x{height}"
    labelled = not (name == "darkzurich" and args.split == "train")
    done = write_cache(name, root, cache, [width, height], args.keep_ratio, args.split, labelled, args.nproc, args.force)
    print(f"prepare {name}: {done['files']} {args.split} images resized to ({width}, {height}) in {cache} "
          f"({done['written']} written); use it with data.<stream>.resized_cache={cache}")


def _report(name: str, root: Path, summary: dict[str, Any]) -> None:
    line = f"prepare {name}: {summary['files']} label files, {summary['converted']} converted"
    line += ", class statistics written" if summary["stats_written"] else ", class statistics up to date"
    print(line + f" ({root})")
    if summary["unmapped_pixels"]:
        print(f"prepare {name}: {summary['unmapped_pixels']} pixels in {summary['files_with_unmapped']} files had "
              f"values outside the id map and were set to 255 (ignore)", file=sys.stderr)
