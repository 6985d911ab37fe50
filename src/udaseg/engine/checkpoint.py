"""Atomic, resumable checkpoints.

* :func:`save_checkpoint` writes to a temporary file in the target's folder, flushes and fsyncs it,
  then ``os.replace``-s it over the target: a crash leaves either the old file or the new one,
  never a truncated checkpoint.
* :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, so a checkpoint can hold
  tensors and plain Python containers/scalars only. RNG states are stored through
  :func:`capture_rng_state`, which converts them to such types.
* :class:`CheckpointManager` keeps ``iter_{n}.pt`` files (the last ``keep_last`` plus the best
  one), ``latest.pt`` and ``best.pt``. The two aliases are hard links to the iteration file where
  the file system allows it, else byte copies; both are put in place atomically.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from udaseg.errors import UserError

PathLike = Union[str, os.PathLike]
ITER_PATTERN = re.compile(r"^iter_(\d+)\.pt$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / file system
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via ``write(file_object)`` to a temp file next to ``path``, then rename over it."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(
            dir=folder, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        raise UserError(f"cannot write checkpoint folder {folder}: {error.strerror or error}") from None
    temp_path = Path(handle.name)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException as error:
        temp_path.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write checkpoint {path}: {error.strerror or error}") from None
        raise
    _fsync_dir(folder)


def save_checkpoint(path: PathLike, state: dict) -> Path:
    """``torch.save(state)`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    path = Path(path)
    _atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device, None] = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``.

    Raises ``UserError`` naming the file when it is missing, unreadable, corrupt or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if reason.startswith("Weights only load failed"):
            reason = "torch cannot read it with weights_only=True (damaged, or it holds pickled objects)"
        raise UserError(f"cannot read checkpoint {path} (corrupt or not a udaseg checkpoint): {reason}") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} does not hold a dict (got {type(state).__name__})")
    return state


def _atomic_alias(source: Path, alias: Path) -> None:
    """Make ``alias`` a hard link to (or, failing that, a copy of) ``source``, atomically."""
    temp = alias.parent / f".{alias.name}.{os.getpid()}.link"
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        _atomic_write(alias, lambda handle: _copy_into(source, handle))
        return
    try:
        os.replace(temp, alias)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {alias}: {error.strerror or error}") from None
    _fsync_dir(alias.parent)


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _copy_into(source: Path, handle: Any) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, handle)


class CheckpointManager:
    """Saves ``iter_{n}.pt`` into ``work_dir``, keeps the newest ``keep_last`` of them (and the best),
    and maintains ``latest.pt`` and ``best.pt``.

    The best metric and its iteration live in ``best.json`` next to the files, so they survive a
    restart. ``mode`` says whether a larger (``"max"``, e.g. mIoU) or smaller metric is better.
    """

    def __init__(self, work_dir: PathLike, keep_last: int = 2, mode: str = "max") -> None:
        if keep_last < 1:
            raise UserError(f"config key 'keep_last' must be >= 1, got {keep_last}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.work_dir = Path(work_dir)
        self.keep_last = keep_last
        self.mode = mode
        # The folder is created by the first save, so a run that fails its checks leaves nothing;
        # a folder that can never be created is reported now.
        existing = next((p for p in (self.work_dir, *self.work_dir.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise UserError(f"work dir {self.work_dir} is not writable: {existing} is a file")
        if self.work_dir.is_dir() and not os.access(self.work_dir, os.W_OK | os.X_OK):
            raise UserError(f"work dir is not writable: {self.work_dir}")
        self._best = self._read_best()

    @property
    def latest_path(self) -> Path:
        return self.work_dir / "latest.pt"

    @property
    def best_path(self) -> Path:
        return self.work_dir / "best.pt"

    def iteration_path(self, iteration: int) -> Path:
        return self.work_dir / f"iter_{iteration}.pt"

    @property
    def best(self) -> Optional[dict[str, Any]]:
        """``{"metric": value, "iteration": n, ...}`` of the best checkpoint so far, or ``None``.

        Besides the value, ``best.json`` names what was measured (``metric_name``, ``model``,
        ``dataset``) when the trainer said so.
        """
        return None if self._best is None else dict(self._best)

    def _read_best(self) -> Optional[dict[str, Any]]:
        record = self.work_dir / "best.json"
        if not record.is_file():
            return None
        try:
            data = json.loads(record.read_text())
            return {**data, "metric": float(data["metric"]), "iteration": int(data["iteration"])}
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"ignoring unreadable best-checkpoint record {record}")
            return None

    def repair_best(self) -> bool:
        """Make ``best.pt`` the iteration file ``best.json`` names again (after a kill between the two
        writes); returns whether it had to change anything."""
        if self._best is None:
            return False
        source = self.iteration_path(int(self._best["iteration"]))
        if not source.is_file():
            return False
        if self.best_path.is_file() and os.path.samefile(source, self.best_path):
            return False
        if self.best_path.is_file() and self.best_path.stat().st_size == source.stat().st_size and \
                _same_bytes(source, self.best_path):
            return False
        _atomic_alias(source, self.best_path)
        return True

    def _is_better(self, metric: float) -> bool:
        if math.isnan(metric):
            return False
        if self._best is None:
            return True
        if self.mode == "max":
            return metric > self._best["metric"]
        return metric < self._best["metric"]

    def iterations(self) -> list[int]:
        """Iterations of the ``iter_{n}.pt`` files present, ascending."""
        found = []
        for entry in self.work_dir.iterdir():
            match = ITER_PATTERN.match(entry.name)
            if match and entry.is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def save(self, iteration: int, state: dict, metric: Optional[float] = None,
             about: Optional[dict[str, Any]] = None) -> Path:
        """Write ``iter_{iteration}.pt``, update ``latest.pt`` (and ``best.pt`` if ``metric``
        improves on the best so far), then prune old iteration files. ``about`` describes the metric
        (e.g. ``{"metric_name": "miou", "model": "student", "dataset": "cityscapes:val"}``)."""
        path = save_checkpoint(self.iteration_path(iteration), state)
        _atomic_alias(path, self.latest_path)
        if metric is not None:
            self.update_best(iteration, float(metric), about)
        self.prune()
        return path

    def update_best(self, iteration: int, metric: float, about: Optional[dict[str, Any]] = None) -> bool:
        """Record ``metric`` for the saved ``iter_{iteration}.pt``; link it as ``best.pt`` if better.

        ``best.json`` is written first: a kill before ``best.pt`` follows leaves a record that
        :meth:`repair_best` completes (the iteration file it names is never pruned)."""
        if not self._is_better(metric):
            return False
        source = self.iteration_path(iteration)
        if not source.is_file():
            raise UserError(f"checkpoint file not found: {source}")
        self._best = {"metric": metric, "iteration": iteration, **(about or {})}
        payload = json.dumps(self._best).encode()
        _atomic_write(self.work_dir / "best.json", lambda handle: handle.write(payload))
        _atomic_alias(source, self.best_path)
        return True

    def prune(self) -> list[Path]:
        """Delete ``iter_{n}.pt`` files beyond the newest ``keep_last``, never the best one."""
        iterations = self.iterations()
        protected = set(iterations[-self.keep_last:])
        if self._best is not None:
            protected.add(int(self._best["iteration"]))
        removed = []
        for iteration in iterations:
            if iteration not in protected:
                path = self.iteration_path(iteration)
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def load_latest(
        self, map_location: Union[str, torch.device, None] = "cpu"
    ) -> Optional[tuple[Path, dict]]:
        """The newest checkpoint that loads, as ``(path, state)``; ``None`` when there is none.

        Candidates are the newest ``iter_{n}.pt``, then ``latest.pt`` (which mirrors it, or holds an
        older state if a run stopped between the two writes), then the older ``iter_{n}.pt`` files;
        an unreadable one is skipped with a warning.
        """
        candidates = [self.iteration_path(n) for n in reversed(self.iterations())]
        if self.latest_path.is_file():
            candidates.insert(1 if candidates else 0, self.latest_path)
        for path in candidates:
            try:
                return path, load_checkpoint(path, map_location=map_location)
            except UserError as error:
                warnings.warn(f"skipping checkpoint: {error}")
        return None

    def latest(self) -> Optional[Path]:
        """Path of the newest loadable checkpoint (see :meth:`load_latest`), or ``None``."""
        found = self.load_latest()
        return None if found is None else found[0]


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch CPU/CUDA RNG states as tensors and plain types.

    The result survives ``torch.save`` / ``torch.load(weights_only=True)``; restore it with
    :func:`restore_rng_state`.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`capture_rng_state` (keys that are absent are skipped)."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(v) for v in py["internal"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        nps = state["numpy"]
        keys = nps["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (nps["kind"], keys, int(nps["position"]), int(nps["has_gauss"]), float(nps["cached_gaussian"]))
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG states, this machine has "
                f"{torch.cuda.device_count()} devices; CUDA RNG not restored"
            )
