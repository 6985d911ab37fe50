"""Data-parallel training over ``torch.distributed`` (launched with ``torchrun``).

Each rank holds a full model replica and a shard of every global batch. After the backward passes
of an iteration, gradients are averaged across ranks before the optimiser step. This is the
arithmetic of DistributedDataParallel, done once per iteration rather than hooked into each
backward, because a UDA step runs several forwards and partial backward passes per iteration (one
per view group) and reads some parameters in one group only. Batch-norm statistics stay per rank
unless ``train.sync_bn`` converts the model to SyncBatchNorm.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as torch_dist
from torch import nn


def is_enabled() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    return rank() == 0


def launched_with_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_from_environment(device_type: str) -> None:
    """Join the process group that torchrun set up (nccl on GPUs, gloo otherwise)."""
    if not launched_with_torchrun() or is_enabled():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch_dist.init_process_group(backend=backend)


def local_device(requested: str) -> torch.device:
    """The device of ``train.device`` (``auto`` picks CUDA when present); a clear error when absent."""
    from udaseg.errors import UserError

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device={requested} but CUDA is not available here; use train.device=cpu "
                            f"(or auto)")
        if ":" in requested and int(requested.split(":", 1)[1]) >= torch.cuda.device_count():
            raise UserError(f"train.device={requested} but this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device=mps but MPS is not available here; use train.device=cpu")
    if requested == "cuda" and launched_with_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return torch.device(requested)
    except RuntimeError:
        raise UserError(f"train.device={requested!r} is not a device (auto, cpu, cuda or cuda:N)") from None


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any of them (one tiny all-reduce under DDP)."""
    if not is_enabled():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_enabled():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def average_values(values: dict[str, float]) -> dict[str, float]:
    """Mean of each logged value over ranks (every rank must pass the same keys)."""
    if not is_enabled() or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return {k: float(v) / world_size() for k, v in zip(keys, tensor.tolist())}


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over ranks; parameters without a gradient on a rank count as zeros."""
    if not is_enabled():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_module(module: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not is_enabled():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        torch_dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if is_enabled():
        torch_dist.barrier()


def cleanup() -> None:
    if is_enabled():
        torch_dist.destroy_process_group()
