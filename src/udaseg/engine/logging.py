"""Run logging: metrics as JSON lines, TensorBoard when installed, and a progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, work_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(work_dir) / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional extra: udaseg[tb]

                self._writer = SummaryWriter(str(Path(work_dir) / "tensorboard"))
            except Exception:  # tensorboard missing or broken: JSON lines are enough
                self._writer = None

    def log(self, iteration: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, "kind": kind, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


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


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train") -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                unit="it", smoothing=0.1)
