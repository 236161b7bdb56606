"""models/layers.py and digits_cnn without torchvision: the same layers, parameter draws and names as torchvision's
conv1x1 / conv3x3 and Conv2dNormActivation built them, so existing checkpoints and bundles still load."""
import pytest
import torch
from torchvision.models.resnet import conv1x1 as torchvision_conv1x1, conv3x3 as torchvision_conv3x3

from models import create_model
from models.layers import conv1x1, conv3x3


@pytest.mark.parametrize("ours, theirs", [(conv1x1, torchvision_conv1x1), (conv3x3, torchvision_conv3x3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_convs_equal_torchvisions(ours, theirs, stride):
    torch.manual_seed(0)
    built = ours(5, 7, stride)
    torch.manual_seed(0)
    reference = theirs(5, 7, stride)
    assert repr(built) == repr(reference)
    assert torch.equal(built.weight, reference.weight) and built.bias is None is reference.bias


def test_digits_cnn_keeps_the_state_dict_keys_and_layer_names_of_conv2d_norm_activation():
    model = create_model("digits_cnn", num_classes=10)
    assert list(model.state_dict()) == [
        "conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv1.1.running_mean", "conv1.1.running_var",
        "conv1.1.num_batches_tracked",
        "conv2.0.weight", "conv2.1.weight", "conv2.1.bias", "conv2.1.running_mean", "conv2.1.running_var",
        "conv2.1.num_batches_tracked",
        "conv3.0.weight", "conv3.1.weight", "conv3.1.bias", "conv3.1.running_mean", "conv3.1.running_var",
        "conv3.1.num_batches_tracked",
        "fc.weight", "fc.bias"]
    assert [name for name, _ in model.named_modules()] == [
        "", "conv1", "conv1.0", "conv1.1", "conv1.2", "conv2", "conv2.0", "conv2.1", "conv2.2", "pool",
        "conv3", "conv3.0", "conv3.1", "conv3.2", "global_pool", "flatten", "fc"]
    assert all(model.get_submodule(f"conv{i}.2").inplace for i in (1, 2, 3))  # torchvision's ReLU(inplace=True)
