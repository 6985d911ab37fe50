"""The ``udaseg`` command line: train, eval, predict, prepare, demo, bench, analyze."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

from udaseg import __version__
from udaseg.errors import UserError

# Each subcommand names the module and function that runs it, imported only when used so that
# ``udaseg --help`` stays fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("udaseg.engine.commands", "train", "train a model from a preset or config file"),
    "eval": ("udaseg.engine.commands", "evaluate", "evaluate a checkpoint: per-class IoU and mIoU"),
    "predict": ("udaseg.engine.commands", "predict", "write label, colour and overlay PNGs for images"),
    "prepare": ("udaseg.data.prepare", "run_prepare", "convert dataset labels and write class statistics"),
    "demo": ("udaseg.demo", "run_demo", "build the digits benchmark, adapt to it and write a report"),
    "bench": ("udaseg.bench", "run_bench", "adaptation-quality benchmark on the digits domains"),
    "analyze": ("udaseg.analysis.commands", "run_analyze", "feature diagnostics: t-SNE, class distances"),
}


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="preset name or YAML file")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint file, or from the latest one in the work dir")
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
    p.add_argument("dataset", help="gta5 | synthia | cityscapes | darkzurich | acdc | bdd100k | mapillary | digits")
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--out", help="output folder (digits export)")
    p.add_argument("--nproc", type=int, default=2, help="worker processes")
    p.add_argument("--force", action="store_true", help="convert files again even if the output exists")
    p.add_argument("--seed", type=int, default=0, help="digits: generation seed")


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
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", "-c")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")


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
    except KeyboardInterrupt:
        print(f"udaseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
