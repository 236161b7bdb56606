"""The model registry: timm's register_model / create_model convention and its errors."""
import pytest
from torch import nn

from models import UnknownModelError, create_model, list_models, register_model

CONTRACT_MODELS = ["digits_cnn", "efficientnet_b0", "efficientnet_b0_cifar", "lstm_lm", "lstm_lm_baseline",
                   "mixnet_s", "mobilenetv2_140", "resnet18_cifar", "resnet50", "txl_micronet", "txl_teacher",
                   "wrn28_10"]


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
