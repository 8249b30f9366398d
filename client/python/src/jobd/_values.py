"""Python values to and from ``google.protobuf.Value``, the JSON jobd carries.

A job's arguments and its result are JSON. The mapping is JSON's own:
``None``, ``bool``, ``int``, ``float``, ``str``, lists (and tuples) and dicts
with string keys; anything else is refused with a ``TypeError`` naming where
it was, rather than guessed at (a ``datetime`` or a ``set`` has no one obvious
JSON form). Numbers travel as doubles (as in JSON): an integer beyond 2**53
would be rounded, so it is refused (send it as a string); on the way back an
integral number within 2**53 becomes an ``int``, so ``3`` stays ``3`` (and
``3.0`` becomes ``3``, as it would through JSON itself).

How ``submit(fn, *args, **kwargs)`` becomes one JSON value is
:func:`call_args`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

MAX_EXACT_INT = 2**53
"""The largest integer a double (and so the wire) carries exactly."""

MAX_DEPTH = 64
"""Nesting deeper than this is refused: protobuf decoders stop at 100 levels."""


def to_value(obj: Any) -> struct_pb2.Value:
    """The protobuf ``Value`` of a JSON-like Python object."""
    value = struct_pb2.Value()
    _fill(value, obj, 0, "args")
    return value


def fill_value(value: struct_pb2.Value, obj: Any, where: str = "value") -> None:
    """Sets ``value`` (a message field) to ``obj``, in place."""
    _fill(value, obj, 0, where)


def _fill(value: struct_pb2.Value, obj: Any, depth: int, where: str) -> None:
    # The common scalar types first, and by exact type: this runs once per
    # argument and result, so it is kept free of isinstance chains for them.
    kind = type(obj)
    if kind is str:
        value.string_value = obj
    elif kind is int:
        if -MAX_EXACT_INT <= obj <= MAX_EXACT_INT:
            value.number_value = obj
        else:
            raise ValueError(
                f"{where}: the integer {obj} is beyond 2**53 and would lose precision "
                "as a JSON number; send it as a string"
            )
    elif kind is float:
        if math.isfinite(obj):
            value.number_value = obj
        else:
            raise ValueError(f"{where}: {obj!r} is not a JSON number")
    elif obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif kind is bool:
        value.bool_value = obj
    elif depth >= MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    elif isinstance(obj, Mapping):
        struct = value.struct_value
        struct.SetInParent()
        fields = struct.fields
        for key, item in obj.items():
            if type(key) is not str:
                raise TypeError(
                    f"{where}: a JSON object's keys are strings, not {type(key).__name__} ({key!r})"
                )
            _fill(fields[key], item, depth + 1, f"{where}.{key}")
    elif isinstance(obj, list | tuple):
        items = value.list_value
        items.SetInParent()
        values = items.values
        for index, item in enumerate(obj):
            _fill(values.add(), item, depth + 1, f"{where}[{index}]")
    elif isinstance(obj, bool):
        value.bool_value = bool(obj)
    elif isinstance(obj, int):
        _fill(value, int(obj), depth, where)
    elif isinstance(obj, float):
        _fill(value, float(obj), depth, where)
    elif isinstance(obj, str):
        value.string_value = str(obj)
    else:
        raise TypeError(
            f"{where}: {type(obj).__name__} is not JSON (use None, bool, int, float, str, "
            "list, tuple or dict with str keys)"
        )


def from_value(value: struct_pb2.Value) -> Any:
    """The Python object of a protobuf ``Value`` (an unset one is ``None``)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and -MAX_EXACT_INT <= number <= MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "struct_value":
        return {key: from_value(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    if kind == "bool_value":
        return value.bool_value
    return None


def call_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The one JSON value a call's arguments become, as ``jobctl`` does it.

    No arguments is ``null``; one positional argument is that value itself;
    several are an array; keyword arguments alone are an object. Both kinds
    at once have no JSON form every function would read the same way, so
    they are refused.
    """
    if kwargs:
        if args:
            raise TypeError(
                "pass a job either positional or keyword arguments, not both: they become "
                "one JSON value (positional: a value or an array; keyword: an object)"
            )
        return dict(kwargs)
    if not args:
        return None
    if len(args) == 1:
        return args[0]
    return list(args)
