"""A worker function's signature: the JSON Schema it declares, and how one
JSON argument becomes a Python call.

The mapping mirrors how :meth:`jobd.Executor.submit` turns ``*args`` and
``**kwargs`` into one JSON value (none is ``null``, one positional argument is
the value itself, several are an array, keyword arguments an object), so that
``pool.submit("f", *args, **kwargs)`` calls ``f(*args, **kwargs)`` on the
worker. For a function with parameters ``p1..pn`` (a parameter named ``ctx``,
or annotated :class:`jobd.Context`, is left out: it receives the job's
context):

- no parameters: the argument must be ``null``;
- one positional parameter: it receives the whole value (``null`` leaves it
  at its default if it has one). If its annotation is not a JSON object type,
  the keyword form ``{"p1": value}`` is accepted too;
- otherwise an array is spread over the positional parameters, an object
  over the keyword ones, and ``null`` calls with no arguments.

The declared schema says exactly that, from the annotations: ``str``
``int`` ``float`` ``bool`` ``None``, ``list[T]``, ``tuple[...]``,
``dict[str, T]``, ``Literal``, ``Optional``/unions, ``TypedDict``, ``Enum``
and ``Any`` (or no annotation) map to their JSON Schema; any other annotation
is refused at declaration, naming the parameter, so that jobd never
advertises a schema that is not the function's.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JsonSchema = dict[str, Any]

_SCALARS: dict[Any, JsonSchema] = {
    str: {"type": "string"},
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    type(None): {"type": "null"},
}


class SignatureError(TypeError):
    """A function's signature cannot be served as declared."""


def annotation_schema(annotation: Any, where: str) -> JsonSchema:
    """The JSON Schema of one annotation (``{}`` accepts any JSON)."""
    if annotation is inspect.Parameter.empty or annotation is Any or annotation is object:
        return {}
    if annotation is None:
        return {"type": "null"}
    if annotation in _SCALARS:
        return dict(_SCALARS[annotation])
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return annotation_schema(args[0], where)
    if origin is typing.Union or origin is types.UnionType:
        options = [annotation_schema(a, where) for a in args]
        if any(not o for o in options):
            return {}
        return merge(options)
    if origin is typing.Literal:
        values = list(args)
        for value in values:
            if not isinstance(value, str | int | float | bool | type(None)):
                raise SignatureError(f"{where}: Literal values must be JSON scalars")
        return {"enum": values}
    if annotation in (list, Sequence) or origin in (list, Sequence, typing.Sequence):
        schema: JsonSchema = {"type": "array"}
        if args:
            schema["items"] = annotation_schema(args[0], where)
        return schema
    if annotation is tuple or origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": annotation_schema(args[0], where)}
        return {
            "type": "array",
            "prefixItems": [annotation_schema(a, where) for a in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if annotation in (dict, Mapping) or origin in (dict, Mapping, typing.Mapping):
        schema = {"type": "object"}
        if args:
            if args[0] is not str:
                raise SignatureError(f"{where}: JSON object keys are strings, not {args[0]!r}")
            schema["additionalProperties"] = annotation_schema(args[1], where)
        return schema
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        return {"enum": values}
    if isinstance(annotation, type) and typing.is_typeddict(annotation):
        hints = typing.get_type_hints(annotation)
        required = sorted(getattr(annotation, "__required_keys__", hints))
        return {
            "type": "object",
            "properties": {k: annotation_schema(v, f"{where}.{k}") for k, v in hints.items()},
            "required": required,
            "additionalProperties": False,
        }
    raise SignatureError(
        f"{where}: no JSON Schema for the annotation {annotation!r}; annotate with JSON types "
        "(str, int, float, bool, None, list, tuple, dict[str, ...], Literal, TypedDict, Enum) "
        "or declare the function with an explicit schema="
    )


def _accepts_object(schema: JsonSchema) -> bool:
    """Whether a value valid against ``schema`` may be a JSON object."""
    if not schema:
        return True
    if "anyOf" in schema:
        return any(_accepts_object(s) for s in schema["anyOf"])
    kind = schema.get("type")
    if kind is None:
        return "enum" not in schema
    kinds = kind if isinstance(kind, list) else [kind]
    return "object" in kinds


@dataclass(frozen=True)
class Binding:
    """How one function is called with one JSON argument, and its schema."""

    schema: JsonSchema
    call: Callable[[Any, Any], tuple[tuple[Any, ...], dict[str, Any]]]
    """``call(value, ctx) -> (args, kwargs)`` for the function."""
    takes_ctx: bool


def bind(fn: Callable[..., Any], context_type: type, derive: bool = True) -> Binding:
    """The binding of ``fn``: its derived schema and its argument mapping.

    With ``derive=False`` (the function declares its own schema) an
    annotation without a JSON Schema is no error: it accepts anything here.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as err:
        raise SignatureError(f"{name}: cannot read its signature: {err}") from None
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as err:
        raise SignatureError(f"{name}: cannot resolve its annotations: {err}") from None
    ctx_name: str | None = None
    params: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        annotation = hints.get(param.name, inspect.Parameter.empty)
        if param.name == "ctx" or annotation is context_type:
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise SignatureError(f"{name}: the context parameter cannot be positional-only")
            if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise SignatureError(f"{name}: the context parameter must be a plain parameter")
            ctx_name = param.name
            continue
        params.append(param.replace(annotation=annotation))
    takes_ctx = ctx_name is not None

    def with_ctx(kwargs: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if ctx_name is not None:
            if ctx_name in kwargs:
                raise TypeError(f"the argument {ctx_name!r} is reserved for the job's context")
            kwargs[ctx_name] = ctx
        return kwargs

    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    keyword = [p for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)]
    var_positional = next((p for p in params if p.kind is P.VAR_POSITIONAL), None)
    var_keyword = next((p for p in params if p.kind is P.VAR_KEYWORD), None)

    def schema_of(param: inspect.Parameter) -> JsonSchema:
        try:
            return annotation_schema(param.annotation, f"{name}({param.name})")
        except SignatureError:
            if derive:
                raise
            return {}

    if not params:
        return Binding({"type": "null"}, lambda value, ctx: ((), with_ctx({}, ctx)), takes_ctx)

    if len(params) == 1 and positional:
        (only,) = positional
        inner = schema_of(only)
        options: list[JsonSchema] = [inner]
        keyword_form = only.kind is P.POSITIONAL_OR_KEYWORD and not _accepts_object(inner)
        if keyword_form:
            options.append(
                {
                    "type": "object",
                    "properties": {only.name: inner},
                    "required": [only.name],
                    "additionalProperties": False,
                }
            )
        has_default = only.default is not P.empty
        if has_default and inner and not _allows_null(inner):
            options.append({"type": "null"})
        schema = merge(options)

        def call_one(value: Any, ctx: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if value is None and has_default:
                return (), with_ctx({}, ctx)
            if keyword_form and isinstance(value, dict) and list(value) == [only.name]:
                value = value[only.name]
            return (value,), with_ctx({}, ctx)

        return Binding(schema, call_one, takes_ctx)

    forms: list[JsonSchema] = []
    required_keyword_only = any(p.kind is P.KEYWORD_ONLY and p.default is P.empty for p in params)
    if (positional or var_positional) and not required_keyword_only:
        array: JsonSchema = {"type": "array"}
        prefix = [schema_of(p) for p in positional]
        if prefix:
            array["prefixItems"] = prefix
        required_positional = sum(1 for p in positional if p.default is P.empty)
        if required_positional:
            array["minItems"] = required_positional
        if var_positional is not None:
            array["items"] = schema_of(var_positional)
        else:
            array["maxItems"] = len(positional)
        forms.append(array)
    required_positional_only = any(
        p.kind is P.POSITIONAL_ONLY and p.default is P.empty for p in params
    )
    if (keyword or var_keyword) and not required_positional_only:
        obj: JsonSchema = {
            "type": "object",
            "properties": {p.name: schema_of(p) for p in keyword},
        }
        required = [p.name for p in keyword if p.default is P.empty]
        if required:
            obj["required"] = required
        obj["additionalProperties"] = schema_of(var_keyword) if var_keyword is not None else False
        forms.append(obj)
    # One positional argument that is not an array or an object (as
    # ``submit(f, 5)`` sends it) is the first parameter, when the others
    # may be left out.
    scalar_first = False
    if (
        positional
        and all(
            p.default is not P.empty or p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
            for p in params[1:]
        )
        and params[0] is positional[0]
    ):
        scalar = _scalar_part(schema_of(positional[0]))
        if scalar is not None:
            forms.append(scalar)
            scalar_first = True
    if all(p.default is not P.empty or p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) for p in params):
        forms.append({"type": "null"})
    if not forms:
        raise SignatureError(
            f"{name}: its parameters can be given neither as an array nor as an object "
            "(required positional-only and keyword-only parameters together)"
        )
    schema = merge(forms)

    def call_many(value: Any, ctx: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if value is None:
            return (), with_ctx({}, ctx)
        if isinstance(value, list):
            return tuple(value), with_ctx({}, ctx)
        if isinstance(value, dict):
            return (), with_ctx(dict(value), ctx)
        if scalar_first:
            return (value,), with_ctx({}, ctx)
        raise TypeError(
            f"{name} takes its arguments as an array (positional) or an object (keyword), "
            f"not {type(value).__name__}"
        )

    return Binding(schema, call_many, takes_ctx)


_UNMERGEABLE = frozenset({"anyOf", "oneOf", "allOf", "not", "enum", "const", "$ref"})


def merge(forms: list[JsonSchema]) -> JsonSchema:
    """One schema accepting any of ``forms``.

    Forms of different JSON types merge into one schema with a list of
    types (JSON Schema applies ``items`` only to arrays, ``properties`` only
    to objects, ...), which keeps jobd's error messages precise ("args[0]:
    "x" is not of type "integer""); forms that cannot merge that way are
    alternatives (``anyOf``).
    """
    if len(forms) == 1:
        return forms[0]
    merged: JsonSchema = {}
    kinds: list[str] = []
    for form in forms:
        kind = form.get("type")
        these = [kind] if isinstance(kind, str) else kind
        if not isinstance(these, list) or _UNMERGEABLE & set(form) or set(these) & set(kinds):
            return {"anyOf": forms}
        for key, value in form.items():
            if key != "type":
                if key in merged:
                    return {"anyOf": forms}
                merged[key] = value
        kinds.extend(these)
    return {"type": kinds, **merged}


_SCALAR_TYPES = ["string", "number", "integer", "boolean"]


def _scalar_part(schema: JsonSchema) -> JsonSchema | None:
    """The part of ``schema`` that is neither an array, an object nor null
    (None when nothing is left, or it cannot be told apart)."""
    if not schema:
        return {"type": ["string", "number", "boolean"]}
    kind = schema.get("type")
    if kind is None or _UNMERGEABLE & set(schema):
        return None
    kinds = [k for k in ([kind] if isinstance(kind, str) else kind) if k in _SCALAR_TYPES]
    if not kinds:
        return None
    return {
        "type": kinds[0] if len(kinds) == 1 else kinds,
        **{k: v for k, v in schema.items() if k != "type"},
    }


def _allows_null(schema: JsonSchema) -> bool:
    if not schema:
        return True
    if "anyOf" in schema:
        return any(_allows_null(s) for s in schema["anyOf"])
    if "enum" in schema:
        return None in schema["enum"]
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    return "null" in kinds
