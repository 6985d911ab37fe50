"""Confusion-matrix segmentation metrics (mmseg conventions).

The matrix is K×K int64 with rows = ground truth and columns = prediction, accumulated with
``bincount`` on the tensors' device. Per class c:

    IoU_c = TP_c / (TP_c + FP_c + FN_c),   Acc_c = TP_c / (TP_c + FN_c)

from counts summed over the whole dataset (not averaged per image). A class whose union is empty
(absent from both predictions and labels) has IoU NaN and is left out of the mean; a class that is
only predicted has IoU 0 and counts. mIoU averages over a class subset (the protocol: all 19 classes,
SYNTHIA's 16 or 13) ignoring NaN.

For distributed evaluation sum ``.matrix`` across processes (``torch.distributed.all_reduce``), or
call :meth:`ConfusionMatrix.all_reduce`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch


class ConfusionMatrix:
    """Accumulates a K×K confusion matrix over batches of predictions and labels.

    Example::

        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 255]]))
        >>> cm.iou().tolist()
        [1.0, 1.0, nan]
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``label`` integer tensors of the same shape (e.g. B×H×W).

        Pixels whose label is ``ignore_index`` (or outside [0, K)) are skipped; predictions must lie
        in [0, K).
        """
        if pred.shape != label.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        k = self.num_classes
        pred = pred.reshape(-1).to(self.matrix.device, torch.int64)
        label = label.reshape(-1).to(self.matrix.device, torch.int64)
        valid = (label != self.ignore_index) & (label >= 0) & (label < k)
        pred, label = pred[valid], label[valid]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(f"predictions must lie in [0, {k}), got [{int(pred.min())}, {int(pred.max())}]")
        counts = torch.bincount(label * k + pred, minlength=k * k)
        self.matrix += counts.view(k, k)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts into this one (same class count); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the matrix over all processes when ``torch.distributed`` is initialised; returns self."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)
        return self

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        matrix = self.matrix.double()
        true_positive = matrix.diagonal()
        return true_positive, matrix.sum(dim=1), matrix.sum(dim=0)

    def intersection_and_union(self) -> tuple[torch.Tensor, torch.Tensor]:
        true_positive, label_count, pred_count = self._counts()
        return true_positive, label_count + pred_count - true_positive

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1] (float64, NaN where the union is empty)."""
        intersection, union = self.intersection_and_union()
        return intersection / union  # 0/0 -> NaN

    def class_accuracy(self) -> torch.Tensor:
        """Per-class recall TP / (TP + FN), NaN for classes without labelled pixels."""
        true_positive, label_count, _ = self._counts()
        return true_positive / label_count

    def miou(self, classes: Optional[Sequence[int]] = None) -> float:
        """Mean IoU over ``classes`` (all by default), NaN entries excluded; NaN if none is defined."""
        return _nanmean(self.iou(), classes)

    def mean_accuracy(self, classes: Optional[Sequence[int]] = None) -> float:
        return _nanmean(self.class_accuracy(), classes)

    def pixel_accuracy(self) -> float:
        """Correct pixels / labelled pixels over all classes (NaN when nothing was counted)."""
        total = float(self.matrix.sum())
        return float(self.matrix.diagonal().sum()) / total if total else math.nan

    def summary(
        self,
        class_names: Optional[Sequence[str]] = None,
        classes: Optional[Sequence[int]] = None,
    ) -> dict[str, float]:
        """Metrics in **percent**: ``mIoU``, ``mAcc`` (over ``classes``), ``aAcc``, and
        ``IoU.<name>`` for every class in ``classes`` (all classes by default)."""
        names = _class_names(class_names, self.num_classes)
        selected = list(range(self.num_classes)) if classes is None else list(classes)
        ious = self.iou().tolist()
        result = {
            "mIoU": 100.0 * self.miou(selected),
            "mAcc": 100.0 * self.mean_accuracy(selected),
            "aAcc": 100.0 * self.pixel_accuracy(),
        }
        for c in selected:
            result[f"IoU.{names[c]}"] = 100.0 * ious[c]
        return result

    def format_table(
        self,
        class_names: Optional[Sequence[str]] = None,
        classes: Optional[Sequence[int]] = None,
    ) -> str:
        """A plain-text table of per-class IoU and accuracy (percent) with the mean as last row."""
        names = _class_names(class_names, self.num_classes)
        selected = list(range(self.num_classes)) if classes is None else list(classes)
        ious, accs = self.iou().tolist(), self.class_accuracy().tolist()
        width = max([len("pixel accuracy")] + [len(names[c]) for c in selected])
        lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
        for c in selected:
            lines.append(f"{names[c]:<{width}}  {_pct(ious[c])}  {_pct(accs[c])}")
        lines.append("-" * (width + 16))
        lines.append(f"{'mean':<{width}}  {_pct(self.miou(selected))}  {_pct(self.mean_accuracy(selected))}")
        lines.append(f"{'pixel accuracy':<{width}}  {_pct(self.pixel_accuracy())}")
        return "\n".join(lines)


def normalised_confusion(matrix: Union[torch.Tensor, Sequence[Sequence[int]]]) -> list[list[float]]:
    """Row-normalised confusion matrix: entry (g, p) is the share of class g's labelled pixels predicted
    as p (rows sum to 1; NaN rows for classes without labelled pixels)."""
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


def format_mmseg_tables(names: Sequence[str], iou: Sequence[float], accuracy: Sequence[float], aacc: float,
                        miou: float, macc: float, classes: Optional[Sequence[int]] = None) -> str:
    """mmseg's evaluation printout: per-class IoU and Acc, then aAcc, mIoU and mAcc (percent, 2 decimals,
    centred cells as mmseg's PrettyTable prints them).

    ``iou`` and ``accuracy`` are fractions per class (NaN: undefined, printed ``nan`` as mmseg does);
    ``classes`` restricts the per-class rows to the protocol's subset (all by default). Example::

        per class results:
        +------------+-------+-------+
        |   Class    |  IoU  |  Acc  |
        +------------+-------+-------+
        | background | 97.10 | 99.02 |
        ...
        Summary:
        +-------+-------+-------+
        | aAcc  | mIoU  | mAcc  |
        +-------+-------+-------+
        | 95.31 | 41.22 | 52.87 |
        +-------+-------+-------+
    """
    selected = list(range(len(names))) if classes is None else list(classes)
    rows = [[names[c], _pct_plain(iou[c]), _pct_plain(accuracy[c])] for c in selected]
    return "\n".join(["per class results:", _ascii_table(["Class", "IoU", "Acc"], rows), "Summary:",
                      _ascii_table(["aAcc", "mIoU", "mAcc"], [[_pct_plain(aacc), _pct_plain(miou), _pct_plain(macc)]])])


def _pct_plain(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def _ascii_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {str(cell):^{w}} " for cell, w in zip(cells, widths)) + "|"

    return "\n".join([rule, line(header), rule, *[line(r) for r in rows], rule])


def _nanmean(values: torch.Tensor, classes: Optional[Sequence[int]]) -> float:
    if classes is not None:
        values = values[torch.as_tensor(list(classes), dtype=torch.long, device=values.device)]
    defined = values[~torch.isnan(values)]
    return float(defined.mean()) if defined.numel() else math.nan


def _class_names(class_names: Optional[Sequence[str]], num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return list(class_names)


def _pct(value: float) -> str:
    return f"{'n/a':>6}" if math.isnan(value) else f"{100.0 * value:6.2f}"
