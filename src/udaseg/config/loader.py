"""Typed configs: build nested dataclasses from plain dicts, with errors that name the key.

A config is a tree of dataclasses. ``from_dict`` builds one from the dict a YAML file gives,
checking every key and the type of every value; ``apply_overrides`` applies ``a.b.c=value``
strings from the command line; ``to_dict`` turns it back into plain data for saving.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import types
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from udaseg.errors import UserError

_NONE_TYPE = type(None)


def closest(name: str, options: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return matches[0] if matches else None


def _unknown_key_error(path: str, key: str, valid: typing.Iterable[str]) -> UserError:
    valid = list(valid)
    where = f"{path}.{key}" if path else key
    hint = closest(key, valid)
    if hint is not None:
        return UserError(f"unknown config key '{where}'; did you mean '{(path + '.') if path else ''}{hint}'?")
    return UserError(f"unknown config key '{where}'; valid keys here: {', '.join(sorted(valid))}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is _NONE_TYPE:
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (ints to floats etc.)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and _NONE_TYPE in args:
            return None
        errors = []
        for arg in args:
            if arg is _NONE_TYPE:
                continue
            try:
                return _convert(value, arg, path)
            except UserError as err:
                errors.append(err)
        candidates = [arg for arg in args if arg is not _NONE_TYPE]
        if len(errors) == 1 and len(candidates) == 1 and dataclasses.is_dataclass(candidates[0]) \
                and isinstance(value, dict):
            raise errors[0]  # an optional section: its own error names the key inside it
        raise UserError(f"config key '{path}' expects {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = closest(str(value), [str(a) for a in allowed])
            suffix = f"; did you mean '{hint}'?" if hint else ""
            raise UserError(f"config key '{path}' expects {_type_name(tp)}, got {value!r}{suffix}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config key '{path}' expects a mapping ({tp.__name__}), got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{path}' expects {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{path}' expects a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{path}' expects bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{path}' expects int, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '3e-3' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"config key '{path}' expects float, got {value!r}")
        if not math.isfinite(number):
            raise UserError(f"config key '{path}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{path}' expects str, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"config key '{path}' expects {_type_name(tp)}, got {value!r}")


def open_sections(cls: type, missing: str | None = None) -> dict[str, type]:
    """Sections a dataclass accepts besides its fields (``__open_sections__``: a method's config
    section under ``method.``); they are stored in its ``sections`` field. ``missing`` names a key
    that was not found, so the provider may look further (installed plugins)."""
    hook = getattr(cls, "__open_sections__", None)
    return hook(missing) if callable(hook) else {}


def _field_names(cls: type, missing: str | None = None) -> dict[str, Any]:
    sections = open_sections(cls, missing)
    names: dict[str, Any] = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if sections:
        names.pop("sections", None)
        names.update(sections)
    return names


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``UserError``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section '{path or '<root>'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    sections = open_sections(cls)
    fields = _field_names(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if sections and key not in fields:
            sections = open_sections(cls, str(key))
            fields = _field_names(cls)
        if key in sections and key not in hints:
            kwargs.setdefault("sections", {})[key] = _convert(value, sections[key], where)
            continue
        if key not in fields:
            raise _unknown_key_error(path, str(key), fields)
        kwargs[key] = _convert(value, hints[key], where)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        if "path" in inspect.signature(validate).parameters:
            validate(path=path)
        else:
            validate()
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and hasattr(obj, "section_items"):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "sections"}
        out.update({k: to_dict(v) for k, v in obj.section_items().items()})
        return out
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=1e-4'`` -> (['optim', 'lr'], 1e-4). The value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def merge_into(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def check_override_path(cls: type, keys: list[str]) -> None:
    """Raise a helpful error when an override names a key that the schema does not have."""
    tp: Any = cls
    for depth, key in enumerate(keys):
        while get_origin(tp) in (Union, types.UnionType):
            non_none = [a for a in get_args(tp) if a is not _NONE_TYPE]
            tp = non_none[0]
        if not dataclasses.is_dataclass(tp):
            return
        names = _field_names(tp)
        if key not in names and open_sections(tp):
            names = _field_names(tp, key)
        if key not in names:
            raise _unknown_key_error(".".join(keys[:depth]), key, names)
        hints = get_type_hints(tp)
        tp = hints[key] if key in hints else names[key]


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return data


def apply_overrides_to_dict(data: dict, overrides: typing.Sequence[str], schema: type | None = None) -> dict:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied (checked against ``schema``)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        if schema is not None:
            check_override_path(schema, keys)
        merge_into(out, keys, value)
    return out
