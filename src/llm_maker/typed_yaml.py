"""YAML mapping -> typed dataclass tree, strictly: an unknown key or a value of the wrong type is
a RecipeError naming the dotted key (`train.max_steps`) and the file. The recipe's schema lives
in recipe.py; this is the generic machinery under it.

Annotations understood: bool, int, float (also from a string such as "3e-4"), str, `Literal[...]`
(a closed choice: any other value is an error listing the allowed ones), `Optional[X]`, `list[X]`
and nested dataclasses (also `Optional[Dataclass]`). A dataclass field whose metadata has
`NOT_YAML` is set by code, never read from the file (it is no valid key)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from llm_maker.errors import RecipeError

NOT_YAML = {"yaml": False}  # dataclasses.field(metadata=NOT_YAML): not a key of the file


def yaml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of `cls` that are keys of the file."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}


def literal_choices(tp: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal[...]` (or `Optional[Literal[...]]`) annotation; () otherwise."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(tp) for v in literal_choices(a))
    return ()


def describe_choices(choices: tuple[Any, ...]) -> str:
    """('ddp', 'fsdp2') -> 'ddp or fsdp2'; three or more -> 'one of a, b, c'."""
    names = [str(c) for c in choices]
    if len(names) <= 2:
        return " or ".join(names)
    return "one of " + ", ".join(names)


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
    if origin is Literal:
        # bool is an int and 1 == True: compare types too, so `yes` never matches a choice of 1
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp)), value
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


def _dataclass_of(tp: Any) -> Any:
    """The dataclass of `Dataclass` or `Optional[Dataclass]`; None for any other annotation."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _scalar(value: Any, tp: Any, key: str, recipe_file: str) -> Any:
    ok, coerced = _type_ok(value, tp)
    if ok:
        return coerced
    choices = literal_choices(tp)
    if choices:
        null = " (or null)" if type(None) in typing.get_args(tp) else ""
        raise RecipeError(f"{recipe_file}: `{key}` must be {describe_choices(choices)}{null}, got {value!r}")
    raise RecipeError(f"{recipe_file}: `{key}` has the wrong type: got {value!r}, expected {_type_name(tp)}")


def parse_dataclass(cls: type, data: Any, where: str, recipe_file: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{recipe_file}: `{where or 'top level'}` must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = yaml_fields(cls)
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
        nested = _dataclass_of(tp)
        if nested is not None:
            optional = nested is not tp
            kwargs[name] = None if (optional and value is None) else parse_dataclass(nested, value, key, recipe_file)
            continue
        if typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, list):
                raise RecipeError(f"{recipe_file}: `{key}` must be a list, got {value!r}")
            if dataclasses.is_dataclass(item_tp):
                kwargs[name] = [parse_dataclass(item_tp, v, f"{key}[{i}]", recipe_file) for i, v in enumerate(value)]
            else:
                kwargs[name] = [_scalar(v, item_tp, f"{key}[{i}]", recipe_file) for i, v in enumerate(value)]
            continue
        kwargs[name] = _scalar(value, tp, key, recipe_file)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(a.__name__ for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))
