"""The ``udaseg`` command line: train, eval, predict, prepare, demo, bench, analyze."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

from udaseg import __version__
from udaseg.engine.signals import TrainingInterrupted
from udaseg.errors import UserError

# Each subcommand names the module and function that runs it, imported only when used so that
# ``udaseg --help`` stays fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("udaseg.engine.commands", "train", "train a model from a preset or config file"),
    "eval": ("udaseg.engine.commands", "evaluate", "evaluate a checkpoint: per-class IoU and accuracy, mIoU, confusion matrix"),
    "predict": ("udaseg.engine.commands", "predict", "write label, colour and overlay PNGs for images"),
    "prepare": ("udaseg.data.prepare", "run_prepare", "convert dataset labels and write class statistics"),
    "demo": ("udaseg.demo", "run_demo", "build the digits benchmark, adapt to it and write a report"),
    "bench": ("udaseg.bench", "run_bench", "adaptation-quality benchmark on the digits domains"),
    "analyze": ("udaseg.analysis.commands", "run_analyze",
                "diagnostics of checkpoints: t-SNE, CCD/PDD, confusion, calibration, one HTML report"),
}


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="preset name or YAML file")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint file, or from the latest one in the work dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds an earlier run (deletes that run's files)")
    p.add_argument("--stage", help="run one stage of a pipeline (with the offline passes before it)")
    p.add_argument("--list", action="store_true", help="list the shipped presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-4")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="preset name or YAML file (default: the checkpoint's config)")
    p.add_argument("--checkpoint", required=True, help="checkpoint file")
    p.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher instead of the student")
    p.add_argument("--out", help="JSON file for the results (default: next to the checkpoint)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", "-c", help="preset name or YAML file (default: the checkpoint's config)")
    p.add_argument("--format", choices=["default", "darkzurich"], default="default",
                   help="'darkzurich' writes the Dark Zurich test-server submission layout")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def _add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="gta5 | synthia | cityscapes | darkzurich | acdc | bdd100k | mapillary | folder | digits")
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--out", help="output folder (digits export)")
    p.add_argument("--nproc", type=int, default=2, help="worker processes")
    p.add_argument("--force", action="store_true", help="convert files again even if the output exists")
    p.add_argument("--seed", type=int, default=0, help="digits: generation seed")
    p.add_argument("--resize", type=int, nargs=2, metavar=("W", "H"),
                   help="also write a cache of images and labels resized to this scale (a preset's data.*.resize)")
    p.add_argument("--no-keep-ratio", dest="keep_ratio", action="store_false",
                   help="with --resize: the preset's keep_ratio is false")
    p.add_argument("--split", default="train", help="with --resize: the split to cache")
    p.add_argument("--cache", help="with --resize: cache folder (default <root>/resized_<W>x<H>)")


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a shorter run")
    p.add_argument("--out", default="runs/demo", help="report folder")
    p.add_argument("--data-root", help="where the digits benchmark is cached")
    p.add_argument("--domain", default="digits-photo", help="target domain: digits-photo | digits-night")
    p.add_argument("--method", default=None, help="adaptation preset to compare against source-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=None, help="training budget per run (overrides --quick)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at the same time (default: one per core, at most 2)")
    p.add_argument("--digits-size", type=int, nargs=2, metavar=("TRAIN", "VAL"), help=argparse.SUPPRESS)


def _add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", default="digits", help="benchmark suite (digits)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=None, help="training budget per run")
    p.add_argument("--methods", nargs="+", default=None, help="presets to run (default: all)")
    p.add_argument("--domains", nargs="+", default=["digits-photo", "digits-night"])
    p.add_argument("--out", default="runs/bench", help="folder for the runs and results")
    p.add_argument("--report", default="docs/BENCHMARKS.md", help="markdown file to update")
    p.add_argument("--data-root", help="where the digits benchmark is cached")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (worker processes)")
    p.add_argument("--collect", action="store_true", help="only tabulate the runs that have finished; train nothing")
    p.add_argument("--split", choices=["val", "dev"], default="val",
                   help="where to evaluate: the validation split (reported) or the held-out dev split (for tuning)")
    p.add_argument("--digits-size", type=int, nargs=2, metavar=("TRAIN", "VAL"), help=argparse.SUPPRESS)


def _add_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="checkpoint file; repeat to compare several (one t-SNE panel, one bar each)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="label of each checkpoint in the figures (default: its config name)")
    p.add_argument("--config", "-c", help="preset or YAML file giving the datasets (default: the first "
                                          "checkpoint's config)")
    p.add_argument("--source", metavar="NAME[:SPLIT]", help="source dataset (default: data.source)")
    p.add_argument("--target", metavar="NAME[:SPLIT]", help="labelled target dataset (default: data.val[0])")
    p.add_argument("--source-root", metavar="DIR", help="root folder of the source dataset")
    p.add_argument("--target-root", metavar="DIR", help="root folder of the target dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tap", default="decoder",
                   help="embedding: encoder | decoder | projection[:HEAD] | enc1..enc4 | enc_fused (default: decoder)")
    p.add_argument("--teacher", action="store_true", help="embed and evaluate with the EMA teacher")
    p.add_argument("--max-images", type=int, default=500, help="images per domain (a seeded subset; default 500)")
    p.add_argument("--per-class", type=int, default=256, help="t-SNE pixels per class and domain (default 256)")
    p.add_argument("--metric-pixels", type=int, default=2000,
                   help="sampled pixels per class and domain that estimate PDD (default 2000)")
    p.add_argument("--min-pixels", type=int, default=20,
                   help="a class needs this many sampled pixels in a domain to enter the t-SNE (default 20)")
    p.add_argument("--classes", nargs="+", metavar="CLASS", help="t-SNE classes (names or indices; default: all)")
    p.add_argument("--label-rule", choices=["ratio", "nearest"], default="ratio",
                   help="how labels reach the feature grid (default: ratio, as the contrastive losses)")
    p.add_argument("--min-ratio", type=float, default=0.75, help="ratio rule: share a class must cover in a cell")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--bins", type=int, default=10, help="confidence bins of the reliability diagram")
    p.add_argument("--no-tsne", action="store_true", help="skip the t-SNE")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset, the samples and the t-SNE")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: the config's train.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for the configs")


ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": _add_train, "eval": _add_eval, "predict": _add_predict, "prepare": _add_prepare,
    "demo": _add_demo, "bench": _add_bench, "analyze": _add_analyze,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udaseg",
        description="Unsupervised domain adaptive semantic segmentation (SePiCo, T2S-DA, DACS, DAFormer).",
    )
    parser.add_argument("--version", action="version", version=f"udaseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](p)
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], Optional[int]]:
    module_name, func_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        return getattr(module, func_name)
    except (ImportError, AttributeError) as err:
        if isinstance(err, ImportError) and err.name and not err.name.startswith("udaseg"):
            raise UserError(f"'udaseg {command}' needs the package '{err.name}'; install it with pip") from None
        raise UserError(f"'udaseg {command}' is not available in this version of udaseg") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        result = _handler(args.command)(args)
    except UserError as err:
        print(f"udaseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"udaseg {args.command}: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print(f"udaseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
