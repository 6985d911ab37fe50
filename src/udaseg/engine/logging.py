"""Run logging: metrics as JSON lines, a plain ``train.log``, TensorBoard when installed, progress.

``metrics.jsonl`` holds one JSON object per line: ``iteration``, ``kind`` (``train`` / ``eval``),
``timestamp`` (Unix time of the record) and the values; train records add ``iter_time``, the
seconds the logged iteration took. Non-finite numbers are written as ``null``, so every line is
valid JSON.

``train.log`` is the human-readable account of a run: start, resume, periodic losses, every
evaluation, interruptions and the end, one timestamped line each. On a terminal the trainer shows a
progress bar; when stdout is redirected it prints the same periodic lines as ``train.log`` instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

from tqdm import tqdm

from udaseg.engine.run_folder import json_safe


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard.

    ``purge_step``: on resume, TensorBoard drops the events logged at or after this step.
    """

    def __init__(self, work_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 purge_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(work_dir) / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional extra: udaseg[tb]

                self._writer = SummaryWriter(str(Path(work_dir) / "tensorboard"), purge_step=purge_step)
            except Exception:  # tensorboard missing or broken: JSON lines are enough
                self._writer = None

    def log(self, iteration: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = json_safe({"iteration": iteration, "kind": kind, "timestamp": round(time.time(), 3), **values})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class RunLog:
    """``train.log``: timestamped plain lines, optionally echoed to a stream (stdout by default)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, text: str, echo: bool = False, stream: Optional[TextIO] = None, bar: Optional[tqdm] = None) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(f"{stamp} {text}\n")
        if echo:
            if bar is not None and not bar.disable:
                bar.write(text, file=stream or sys.stdout)
            else:
                print(text, file=stream or sys.stdout, flush=True)


def read_metrics(path: Path, kind: Optional[str] = None) -> list[dict]:
    records = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                record = json.loads(line)
                if kind is None or record.get("kind") == kind:
                    records.append(record)
    return records


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train") -> tqdm:
    """A progress bar, shown only when ``enabled`` and stdout is a terminal."""
    return tqdm(total=total, initial=initial, disable=not (enabled and stdout_is_terminal()), desc=desc,
                dynamic_ncols=True, unit="it", smoothing=0.1)


def format_values(values: dict, limit: int = 6) -> str:
    """``ce 0.532  pseudo_ce 0.121`` — the first ``limit`` numeric values, 3 significant digits."""
    shown = [(k, v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "  ".join(f"{k} {v:.3g}" for k, v in shown[:limit])
