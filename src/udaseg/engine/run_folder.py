"""The run folder: what a training run owns in ``train.work_dir`` and the rules for reusing it.

A fresh run refuses a folder that already holds anything, so an earlier run's checkpoints, logs
and best record are never overwritten or mixed with a new one by accident. ``--resume`` continues
the run in the folder; ``--overwrite`` deletes that run's files (and only those, see
:data:`RUN_FILES`) before a new run starts. Nothing is written or deleted until the config, the
data and the checkpoint to resume from have been checked (the trainer calls :func:`prepare` last).

On resume, interrupted writes are cleaned up (orphan ``.*.tmp`` / ``.*.link`` files), the log of
metrics is cut back to the resumed iteration so no record appears twice, and ``best.pt`` is made
to agree with ``best.json`` again.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal

from udaseg.errors import UserError

Mode = Literal["new", "resume", "overwrite"]

# Names a udaseg run writes into its folder (files, and the tensorboard folder).
RUN_FILES = ("config.yaml", "metrics.jsonl", "train.log", "latest.pt", "best.pt", "best.json", "result.json")
RUN_PATTERNS = (re.compile(r"^iter_\d+\.pt$"), re.compile(r"^.+\.eval\.json$"))
RUN_FOLDERS = ("tensorboard",)
ORPHAN_PATTERN = re.compile(r"^\..+\.(tmp|link)$")


def is_run_file(name: str) -> bool:
    return (name in RUN_FILES or name in RUN_FOLDERS or ORPHAN_PATTERN.match(name) is not None
            or any(p.match(name) for p in RUN_PATTERNS))


def entries(folder: Path) -> list[str]:
    """The names in ``folder`` (sorted); ``[]`` when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir())


def check_new_run(folder: Path, mode: Mode) -> None:
    """Refuse to start a fresh run in a folder that already holds files (before anything is written)."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"train.work_dir {folder} is a file, not a folder")
    names = entries(folder)
    if mode != "new" or not names:
        return
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    raise UserError(f"run folder {folder} is not empty ({shown}); continue that run with --resume, "
                    f"start over with --overwrite, or choose another train.work_dir")


def check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output directory {path} is not writable ({err.strerror})") from None


def remove_run_files(folder: Path) -> list[str]:
    """Delete the files of an earlier run (never other files); returns the names removed."""
    removed = []
    for name in entries(folder):
        if not is_run_file(name):
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(name)
    return removed


def remove_orphans(folder: Path) -> list[str]:
    """Delete the temporary files that an interrupted atomic write left behind."""
    removed = []
    for name in entries(folder):
        if ORPHAN_PATTERN.match(name) and (folder / name).is_file():
            (folder / name).unlink(missing_ok=True)
            removed.append(name)
    return removed


def keeps_record(record: dict, iteration: int) -> bool:
    """Whether a ``metrics.jsonl`` record belongs to the first ``iteration`` iterations of a run.

    Train records carry the 0-based index of their iteration; evaluations carry the number of
    iterations done when they ran (the checkpoint of iteration ``n`` is written after them).
    """
    at = record.get("iteration")
    if not isinstance(at, int):
        return True
    return at < iteration if record.get("kind") == "train" else at <= iteration


def truncate_metrics(path: Path, iteration: int) -> int:
    """Cut ``metrics.jsonl`` back to the records of the first ``iteration`` iterations (atomically).

    Returns the number of records dropped. A damaged last line (a kill mid-write) is dropped too.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if keeps_record(record, iteration):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.truncate.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def prepare(folder: Path, mode: Mode, resume_iteration: int = 0) -> list[str]:
    """Make ``folder`` ready for the run; returns one line per thing it changed (for the log)."""
    check_new_run(folder, mode)
    notes = []
    if mode == "overwrite":
        removed = remove_run_files(folder)
        if removed:
            notes.append(f"--overwrite: removed the earlier run's {', '.join(removed)}")
    check_writable(folder)
    if mode == "resume":
        orphans = remove_orphans(folder)
        if orphans:
            notes.append(f"removed {len(orphans)} unfinished temporary files ({', '.join(orphans[:3])})")
        dropped = truncate_metrics(folder / "metrics.jsonl", resume_iteration)
        if dropped:
            notes.append(f"metrics.jsonl: dropped {dropped} records after iteration {resume_iteration}")
    return notes


def json_safe(value: Any) -> Any:
    """``value`` with NaN / inf floats replaced by ``None``, so ``json.dumps`` writes valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        try:
            return json_safe(value.item())
        except (ValueError, RuntimeError):
            return value
    return value


def val_set_keys(specs: Iterable[Any]) -> list[str]:
    """One distinct key per evaluation set: its ``alias``, else ``name:split``; sets that would share
    a key get their root added (``name:split@root``), and ``#i`` if that is still not unique."""
    specs = list(specs)
    plain = [spec.alias or f"{spec.name}:{spec.split}" for spec in specs]
    keys = [f"{spec.name}:{spec.split}@{spec.root}" if not spec.alias and plain.count(key) > 1 else key
            for spec, key in zip(specs, plain)]
    counts = {key: keys.count(key) for key in keys}
    seen: dict[str, int] = {}
    unique = []
    for key in keys:
        if counts[key] > 1:
            seen[key] = seen.get(key, 0) + 1
            key = f"{key}#{seen[key]}"
        unique.append(key)
    return unique
