"""Architectures registered by name: ``create_model(name, num_classes=...)`` (timm's convention).

Importing the package registers every model module below.
"""
from . import digits_cnn, resnet_cifar, timm_models, wide_resnet  # noqa: F401  (registration side effects)
from .registry import UnknownModelError, create_model, list_models, register_model

__all__ = ["UnknownModelError", "create_model", "list_models", "register_model"]
