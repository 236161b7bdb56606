"""Architectures registered by name: ``create_model(name, num_classes=...)`` (timm's convention).

Importing the package registers every model module below.
"""
from . import (densenet, digits_cnn, lstm_lm, resnet_cifar, timm_models, transformer_xl,  # noqa: F401  (registration)
               wide_resnet)
from .registry import ModelArgumentError, UnknownModelError, check_model_kwargs, create_model, list_models, \
    register_model

__all__ = ["ModelArgumentError", "UnknownModelError", "check_model_kwargs", "create_model", "list_models",
           "register_model"]
