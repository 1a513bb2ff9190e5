"""YAML mapping -> typed dataclass tree, strictly: an unknown key or a value of the wrong type is
a RecipeError naming the dotted key (`train.max_steps`) and the file. The recipe's schema lives
in recipe.py; this is the generic machinery under it."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from llm_maker.errors import RecipeError



def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check `value` against a (simple) annotation; returns (ok, coerced value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads "3e-4" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return True, value


def parse_dataclass(cls: type, data: Any, where: str, recipe_file: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{recipe_file}: `{where or 'top level'}` must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise RecipeError(
            f"{recipe_file}: unknown key `{key}`; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = parse_dataclass(tp, value, key, recipe_file)
            continue
        if typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise RecipeError(f"{recipe_file}: `{key}` must be a list, got {value!r}")
            if dataclasses.is_dataclass(item_tp):
                kwargs[name] = [parse_dataclass(item_tp, v, f"{key}[{i}]", recipe_file) for i, v in enumerate(value)]
            else:
                items = []
                for i, v in enumerate(value):
                    ok, v2 = _type_ok(v, item_tp)
                    if not ok:
                        raise RecipeError(f"{recipe_file}: `{key}[{i}]` must be {item_tp.__name__}, got {v!r}")
                    items.append(v2)
                kwargs[name] = items
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise RecipeError(f"{recipe_file}: `{key}` has the wrong type: got {value!r}, expected {_type_name(tp)}")
        kwargs[name] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(a.__name__ for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))
