"""``model.init_from``: start a run from the weights of a udaseg checkpoint, nothing else.

The segmentor's weights must match exactly (same architecture and class count, checked first so
the error names what differs); the method's extra heads are taken where the checkpoint has them
with the same shapes and are left freshly initialised otherwise (a new method's projector).
Optimiser, schedule, iteration, data positions and method state are not restored: the run starts
at iteration 0. The EMA teacher starts as a copy of the loaded student.

An official release file (an mmseg ``state_dict``, e.g. a DAFormer, HRDA or MIC(HRDA) UDA
checkpoint with ``model.*`` / ``ema_model.*``) is converted by :func:`udaseg.models.load_pretrained`
(``init_from_model: teacher`` takes ``ema_model.*``); every segmentor weight must come from it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from udaseg.engine.checkpoint import load_checkpoint
from udaseg.errors import UserError

SEGMENTOR_PREFIX = "segmentor."
HEADS_PREFIX = "heads."


def initial_weights(path: Path, model_name: str, num_classes: int, use: str = "student") -> dict:
    """The model weights stored in checkpoint ``path`` (``use``: student or teacher), checked."""
    state = load_checkpoint(path)
    where = f"model.init_from={path}"
    if "model" not in state:
        raise UserError(f"{where} is not a udaseg checkpoint (no 'model' entry)")
    name, classes = state.get("model_name"), state.get("num_classes")
    if name is not None and name != model_name:
        raise UserError(f"{where} holds a '{name}' model, the config asks for '{model_name}'")
    if classes is not None and int(classes) != num_classes:
        raise UserError(f"{where} has {classes} classes, the config asks for {num_classes}")
    weights = state["model"] if use == "student" else state.get("teacher")
    if not weights:
        raise UserError(f"{where} holds no EMA teacher (model.init_from_model=teacher)")
    return weights


def is_release_file(state: dict) -> bool:
    """An official (mmseg) checkpoint rather than a udaseg one: a ``state_dict`` and no ``model`` entry."""
    return "model" not in state and isinstance(state.get("state_dict"), dict)


def load_release_weights(model: nn.Module, path: Path, model_name: str, use: str = "student") -> None:
    """Convert an official release file into ``model.segmentor``; refuse one that leaves a weight unfilled."""
    from udaseg.models import load_pretrained

    report = load_pretrained(model.segmentor, str(path), use_ema=use == "teacher")
    needed = [k for k in report.missing if not k.startswith("proj_head.")]
    if needed or report.mismatched:
        key = needed[0] if needed else report.mismatched[0][0]
        why = "missing" if needed else "of another shape"
        raise UserError(f"model.init_from={path} ({report.format}) does not fit model '{model_name}': "
                        f"key 'segmentor.{key}' is {why}")


def load_initial_weights(model: nn.Module, path: Path, model_name: str, num_classes: int,
                         use: str = "student") -> list[str]:
    """Load the checkpoint's weights into a ``UDAModel``; return the names of the heads taken over."""
    if is_release_file(load_checkpoint(path)):
        load_release_weights(model, path, model_name, use)
        return []
    weights = initial_weights(path, model_name, num_classes, use)
    segmentor = {k[len(SEGMENTOR_PREFIX):]: v for k, v in weights.items() if k.startswith(SEGMENTOR_PREFIX)}
    own = model.segmentor.state_dict()
    missing = [k for k in own if k not in segmentor]
    unexpected = [k for k in segmentor if k not in own]
    mismatched = [k for k in own if k in segmentor and tuple(segmentor[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        key = (missing or unexpected or mismatched)[0]
        why = "missing" if missing else "unexpected" if unexpected else "of another shape"
        raise UserError(f"model.init_from={path} does not fit model '{model_name}': key 'segmentor.{key}' is {why}")
    model.segmentor.load_state_dict(segmentor)
    taken = []
    for head, module in getattr(model, "heads", {}).items():
        prefix = f"{HEADS_PREFIX}{head}."
        stored = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        current = module.state_dict()
        if stored.keys() == current.keys() and all(stored[k].shape == current[k].shape for k in current):
            module.load_state_dict(stored)
            taken.append(head)
    return taken
