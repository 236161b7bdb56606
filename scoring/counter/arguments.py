"""Argument binding: an executed op's arguments by their aten schema names, and the overload of torch's composite
recurrent functions that a call fits. Imports torch and :mod:`scoring.rules` only."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from scoring.rules import UnsupportedOpError

#: Argument names and defaults of each op's schema, filled on first use.
_SCHEMAS: dict[Any, list[tuple[str, Any]]] = {}


def arguments(func: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of an executed op by their schema names, defaults filled in."""
    schema = _SCHEMAS.get(func)
    if schema is None:
        schema = _SCHEMAS[func] = [(a.name, a.default_value if a.has_default_value() else None)
                                   for a in func._schema.arguments]
    return {**dict(schema), **dict(zip((name for name, _ in schema), args)), **kwargs}


def _fits(schema: Any, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """Whether positional ``args`` match the tensor / tensor-list / scalar types of ``schema``'s arguments."""
    if len(args) > len(schema.arguments) or any(a.kwarg_only for a in schema.arguments[:len(args)]):
        return False
    for argument, value in zip(schema.arguments, args):
        kind = str(argument.type)
        if kind == "Tensor" and not isinstance(value, torch.Tensor):
            return False
        if kind == "Tensor[]" and not (isinstance(value, (list, tuple))
                                       and all(isinstance(v, torch.Tensor) for v in value)):
            return False
        if kind in ("bool", "int", "float") and isinstance(value, (torch.Tensor, list, tuple)):
            return False
    return set(kwargs) <= {a.name for a in schema.arguments}


def bind(key: str, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a call of torch's composite function ``key`` (``torch.lstm``, ...) by their aten schema
    names, the overload chosen by the argument types (``lstm.input`` or ``lstm.data``)."""
    packet = getattr(torch.ops.aten, key)
    for name in packet.overloads():
        overload = getattr(packet, name)
        if not name.endswith("out") and _fits(overload._schema, args, kwargs):
            return arguments(overload, args, kwargs)
    raise UnsupportedOpError(f"torch.{key} was called with arguments that fit none of its aten schemas; "
                             "call it as torch.nn's recurrent modules do")
