"""Model registry following timm's convention.

A model is a function ``fn(num_classes, **kwargs) -> nn.Module`` decorated with :func:`register_model`;
:func:`create_model` builds one by name. The registry is our own (not timm's) because several of our names
(``resnet50``, ``efficientnet_b0``, ...) are also timm names with different defaults.

Keyword arguments read from a file someone else wrote (an entry's ``model.kwargs``) are checked first by
:func:`check_model_kwargs`: each must be a parameter of the registered function (any name, when it takes
``**kwargs``); hold a plain value: None, bool, int, float, str or a flat list of at most :data:`MAX_LIST` of them
(adaptive softmax cutoffs and widths), since the architecture's structure comes from the function, not from the
file; every number at most ``max(MAX_ARGUMENT, num_classes)`` in magnitude, since model arguments are rates,
sizes and multipliers, a size at most the class count (a vocabulary), and timm expands a ``depth_multiplier`` of
10**6 into millions of block definitions before it builds anything; and never be one that makes a builder read
files or fetch weights. Those are refused by name whatever the function accepts, because timm's builders honour
them: a name that has one of :data:`FILE_LOADING_WORDS` among its ``_``-separated words (``pretrained``,
``pretrained_cfg``, ``pretrained_cfg_overlay``, ``checkpoint_path``, ``cache_dir``, ...), whose first word is
``weights`` (torchvision's ``weights``, ``weights_backbone``; ``tie_weights`` is a structure choice and stays
allowed), or whose last word is ``path`` / ``paths`` (``drop_path_rate`` is a regularizer and stays allowed).
"""
from __future__ import annotations

import fnmatch
import inspect
import reprlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

ModelFn = Callable[..., nn.Module]

_MODEL_ENTRYPOINTS: dict[str, ModelFn] = {}


#: Words of a keyword argument's name that mark it as reading files or weights (see the module docstring).
FILE_LOADING_WORDS = frozenset({"pretrained", "checkpoint", "file", "filename", "dir", "url", "cache", "hub"})
#: Values a keyword argument from a file may hold (or a flat list of at most MAX_LIST of them); the largest
#: magnitude of a number among them, unless the class count is larger.
_PLAIN_VALUES = (type(None), bool, int, float, str)
MAX_LIST, MAX_ARGUMENT = 64, 10_000


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name that is not registered; the message lists the choices."""


class ModelArgumentError(ValueError):
    """Raised by :func:`check_model_kwargs` for a keyword argument an entry may not pass; the message says why."""


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn`` under its function name (decorator). Registering a name twice is an error."""
    name = fn.__name__
    if name in _MODEL_ENTRYPOINTS:
        raise ValueError(f"model {name!r} is registered twice "
                         f"({fn.__module__} and {_MODEL_ENTRYPOINTS[name].__module__})")
    _MODEL_ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(fnmatch.filter(_MODEL_ENTRYPOINTS, pattern))


def _loads_files(key: str) -> bool:
    """Whether keyword argument ``key`` would make a model builder read a file or fetch weights."""
    words = key.lower().split("_")
    return bool(FILE_LOADING_WORDS.intersection(words)) or words[-1] in ("path", "paths") or words[0] == "weights"


def check_model_kwargs(name: str, kwargs: Mapping[str, Any], num_classes: int) -> None:
    """Check keyword arguments read from a file before :func:`create_model` gets them (see the module docstring).

    Raises :class:`UnknownModelError` for an unregistered ``name`` and :class:`ModelArgumentError` for an
    argument the function does not take, a structured value, a number out of range, or one that loads files or
    weights.
    """
    parameters = inspect.signature(_entrypoint(name)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = [p for p, spec in parameters.items() if p != "num_classes" and spec.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    limit = max(MAX_ARGUMENT, num_classes)
    for key, value in kwargs.items():
        shown = f"model argument {reprlib.repr(key)}"
        if not isinstance(key, str) or key == "num_classes":
            raise ModelArgumentError(f"{shown} is not allowed: the class count is num_classes, given by the task")
        if _loads_files(key):
            raise ModelArgumentError(f"{shown} is not allowed: it would make {name} read a file or fetch weights, and "
                                     "a model is rebuilt from the entry's own weights only")
        if key not in named and not takes_any:
            raise ModelArgumentError(f"model {name} takes no argument {reprlib.repr(key)}; its arguments: "
                                     f"{', '.join(named) or 'none besides num_classes'}")
        items = value if isinstance(value, list) and len(value) <= MAX_LIST else [value]
        if not all(isinstance(item, _PLAIN_VALUES) for item in items):
            raise ModelArgumentError(f"{shown}={reprlib.repr(value)} is not a plain value (null, bool, number, string, "
                                     f"or a flat list of at most {MAX_LIST} of them)")
        if any(isinstance(item, (int, float)) and not isinstance(item, bool) and not abs(item) <= limit
               for item in items):
            raise ModelArgumentError(f"{shown}={reprlib.repr(value)} is out of range: numbers are at most {limit:,} in "
                                     "magnitude (rates, sizes, multipliers; a size at most the class count)")


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier.

    Extra keyword arguments go to the model function (e.g. ``drop_rate``, ``in_chans``).
    Raises :class:`UnknownModelError` for an unregistered name.
    """
    model_fn = _entrypoint(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return model_fn(num_classes=num_classes, **kwargs)


def _entrypoint(name: str) -> ModelFn:
    """The function registered as ``name``; :class:`UnknownModelError` lists the choices."""
    if name not in _MODEL_ENTRYPOINTS:
        raise UnknownModelError(f"unknown model {reprlib.repr(name)}; choose one of: {', '.join(list_models())}")
    return _MODEL_ENTRYPOINTS[name]
