"""The model registry: timm's register_model / create_model convention and its errors."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch import nn

import conf

from models import ModelArgumentError, UnknownModelError, check_model_kwargs, create_model, list_models, register_model

CONTRACT_MODELS = ["densenet_bc", "densenet_bc_100", "digits_cnn", "efficientnet_b0", "efficientnet_b0_cifar",
                   "lstm_lm", "lstm_lm_baseline", "mixnet_s", "mobilenetv2_140", "resnet18_cifar", "resnet50",
                   "txl_micronet", "txl_teacher", "wrn28_10"]


def test_every_contract_model_is_registered():
    assert list_models() == CONTRACT_MODELS
    assert list_models("efficientnet*") == ["efficientnet_b0", "efficientnet_b0_cifar"]


def test_unknown_model_error_is_one_line_and_lists_choices():
    with pytest.raises(UnknownModelError) as info:
        create_model("resnet17", num_classes=10)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message and "'resnet17'" in message
    assert all(name in message for name in CONTRACT_MODELS)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_num_classes_must_be_a_positive_int(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        create_model("digits_cnn", num_classes=num_classes)


def test_registering_a_name_twice_fails():
    def digits_cnn(num_classes: int) -> nn.Module:
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="registered twice"):
        register_model(digits_cnn)
    assert create_model("digits_cnn", num_classes=3).fc.out_features == 3


def test_kwargs_reach_the_model_function():
    model = create_model("wrn28_10", num_classes=7, drop_rate=0.3)
    assert model.groups[0][0].dropout.p == 0.3
    assert model.fc.out_features == 7


@pytest.mark.parametrize("name, kwargs, message", [
    ("digits_cnn", {"width": 2}, r"model digits_cnn takes no argument 'width'; its arguments: in_chans"),
    ("wrn28_10", {"depth": 40}, r"model wrn28_10 takes no argument 'depth'; its arguments: in_chans, drop_rate"),
    ("resnet50", {"checkpoint_path": "/etc/passwd"}, r"'checkpoint_path' is not allowed: it would make resnet50 read"),
    ("resnet50", {"pretrained": True}, r"'pretrained' is not allowed"),
    ("mixnet_s", {"pretrained_cfg_overlay": "x"}, r"'pretrained_cfg_overlay' is not allowed"),
    ("efficientnet_b0", {"cache_dir": "/tmp"}, r"'cache_dir' is not allowed"),
    ("efficientnet_b0", {"weights": "IMAGENET1K_V1"}, r"'weights' is not allowed"),
    ("efficientnet_b0", {"weights_backbone": "x"}, r"'weights_backbone' is not allowed"),
    ("efficientnet_b0", {"model_path": "x"}, r"'model_path' is not allowed"),
    ("digits_cnn", {"num_classes": 3}, r"'num_classes' is not allowed: the class count is num_classes"),
    ("digits_cnn", {"in_chans": [[1], 2]}, r"in_chans'=\[\[1\], 2\] is not a plain value"),
    ("lstm_lm", {"cutoffs": list(range(65))}, r"cutoffs'=\[0, 1, 2, 3, 4, 5, \.\.\.\] is not a plain value \(null, "
                                              r"bool, number, string, or a flat list of at most 64 of them\)"),
    ("lstm_lm", {"cutoffs": [1000, 300_000]}, r"cutoffs'=\[1000, 300000\] is out of range: numbers are at most "
                                              r"267,735"),
    ("mobilenetv2_140", {"depth_multiplier": 10**6}, r"'depth_multiplier'=1000000 is out of range: numbers are at "
                                                      r"most 10,000"),
    ("nope", {}, r"unknown model 'nope'"),
])
def test_model_kwargs_from_a_file_are_checked(name, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        check_model_kwargs(name, kwargs, num_classes=267_735 if name == "lstm_lm" else 1000)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UnknownModelError if name == "nope" else ModelArgumentError)


@pytest.mark.parametrize("name, kwargs", [
    ("digits_cnn", {"in_chans": 1}),
    ("wrn28_10", {"drop_rate": 0.3, "in_chans": 3}),
    ("densenet_bc", {"depth": 190, "growth_rate": 40, "compression": 0.5, "drop_rate": 0.2}),
    ("resnet50", {"drop_path_rate": 0.1, "drop_rate": 0.2}),  # "path" is not its last word: a regularizer
    ("efficientnet_b0_cifar", {"in_chans": 3, "bn_eps": 1e-3, "global_pool": "avg"}),  # **kwargs: any other name
    ("digits_cnn", {}),
])
def test_model_kwargs_a_model_takes_are_accepted(name, kwargs):
    check_model_kwargs(name, kwargs, num_classes=1000)


@pytest.mark.parametrize("path", sorted((Path(conf.__file__).parent / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_passes_the_entry_check(path):
    """The kit's own model configs are what entries record: each passes at the WikiText-103 vocabulary (267,735
    classes, the largest task), and each but the language models' (cutoffs up to 25,000) at 10 classes."""
    spec = OmegaConf.to_container(OmegaConf.load(path))
    if spec["name"].startswith("$"):  # default.yaml: the task's default model, checked under its own name
        return
    check_model_kwargs(spec["name"], spec["kwargs"], num_classes=267_735)
    if spec["name"] not in ("txl_micronet", "txl_teacher"):
        check_model_kwargs(spec["name"], spec["kwargs"], num_classes=10)
