"""Load run configs: presets shipped with the package, YAML files, and command-line overrides.

A preset may start from others with ``base: <preset>`` or ``base: [<preset>, ...]`` (merged in
order); its own keys then update theirs. Presets whose names start with ``_`` are building blocks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from udaseg.config.loader import apply_overrides_to_dict, closest, deep_merge, from_dict, load_yaml, to_dict
from udaseg.config.schema import Config
from udaseg.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"

__all__ = ["Config", "load_config", "list_presets", "preset_path", "config_to_yaml", "to_dict",
           "scale_iteration_counts"]


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        hint = closest(name, list_presets())
        suffix = f"; did you mean '{hint}'?" if hint else "; see 'udaseg train --list'"
        raise UserError(f"unknown preset '{name}'{suffix}")
    return path


def _resolve(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    looks_like_file = name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path
    path = Path(name_or_path) if looks_like_file else preset_path(name_or_path)
    data = load_yaml(str(path))
    if not looks_like_file:
        data.setdefault("name", name_or_path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        if base in seen or base == name_or_path:
            raise UserError(f"preset '{name_or_path}' inherits from itself through '{base}'")
        merged = deep_merge(merged, _resolve(str(base), seen + (name_or_path,)))
    merged = deep_merge(merged, data)
    merged["name"] = data.get("name", Path(name_or_path).stem)
    return merged


def load_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a preset (by name) or a YAML file, apply ``key.sub=value`` overrides, validate."""
    data = _resolve(name_or_path) if name_or_path else {}
    return from_dict(Config, apply_overrides_to_dict(data, overrides, Config))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def scale_iteration_counts(cfg: Config, iterations: int) -> None:
    """Set ``train.iterations`` and scale every setting counted in iterations (warm-ups, switch-on
    points: fields marked with :data:`udaseg.config.schema.ITERATION_COUNT`) by the same factor."""
    factor = iterations / max(cfg.train.iterations, 1)
    cfg.train.iterations = iterations
    cfg.method.section_items()  # materialises the active method's section, defaults included

    def visit(node) -> None:
        for spec in dataclasses.fields(node):
            value = getattr(node, spec.name)
            if spec.metadata.get("unit") == "iterations" and isinstance(value, int):
                setattr(node, spec.name, int(round(value * factor)))
            elif dataclasses.is_dataclass(value):
                visit(value)
            elif isinstance(value, dict):  # method sections
                for item in value.values():
                    if dataclasses.is_dataclass(item):
                        visit(item)

    visit(cfg)
