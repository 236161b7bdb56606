"""Model registry following timm's convention.

A model is a function ``fn(num_classes, **kwargs) -> nn.Module`` decorated with :func:`register_model`;
:func:`create_model` builds one by name. The registry is our own (not timm's) because several of our names
(``resnet50``, ``efficientnet_b0``, ...) are also timm names with different defaults.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable

from torch import nn

ModelFn = Callable[..., nn.Module]

_MODEL_ENTRYPOINTS: dict[str, ModelFn] = {}


class UnknownModelError(ValueError):
    """Raised by :func:`create_model` for a name that is not registered; the message lists the choices."""


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


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with a ``num_classes``-way classifier.

    Extra keyword arguments go to the model function (e.g. ``drop_rate``, ``in_chans``).
    Raises :class:`UnknownModelError` for an unregistered name.
    """
    if name not in _MODEL_ENTRYPOINTS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _MODEL_ENTRYPOINTS[name](num_classes=num_classes, **kwargs)
