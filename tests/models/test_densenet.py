"""DenseNet-BC against Huang et al. 2017 (Table 2), with parameters and multiply-accumulates derived by hand."""
import pytest
import torch
from torch import nn

from models import create_model
from models.densenet import DenseNet
from scoring import count_model
from tests.models.test_architectures import bn, conv, n_params


def densenet_bc_params(depth: int, k: int, num_classes: int) -> int:
    """Parameters from the layer shapes: stem, 3 blocks of bottleneck layers, 2 transitions (θ = 0.5), BN + FC."""
    layers = (depth - 4) // 6
    total, channels = conv(3, 2 * k, 3), 2 * k
    for block in range(3):
        if block:
            total += bn(channels) + conv(channels, channels // 2, 1)
            channels //= 2
        for _ in range(layers):  # BN-ReLU-conv1×1(4k)-BN-ReLU-conv3×3(k), then k more channels
            total += bn(channels) + conv(channels, 4 * k, 1) + bn(4 * k) + conv(4 * k, k, 3)
            channels += k
    return total + bn(channels) + channels * num_classes + num_classes


def test_densenet_bc_100_parameters():
    # k = 12, 16 layers a block; a layer reading c channels has 2c + 48c + 2·48 + 48·12·9 = 50c + 5,280 parameters.
    #   stem     3·24·9                                                     =     648   (24 channels out)
    #   block 1  c = 24, 36, …, 204:  Σc = 16·24 + 12·120 = 1,824;  50·1,824 + 16·5,280 = 175,680   (216 out)
    #   trans 1  2·216 + 216·108                                            =  23,760   (108 out)
    #   block 2  Σc = 16·108 + 1,440 = 3,168;  50·3,168 + 84,480            = 242,880   (300 out)
    #   trans 2  2·300 + 300·150                                            =  45,600   (150 out)
    #   block 3  Σc = 16·150 + 1,440 = 3,840;  50·3,840 + 84,480            = 276,480   (342 out)
    #   head     2·342 + 342·100 + 100                                      =  34,984
    #   total    648 + 175,680 + 23,760 + 242,880 + 45,600 + 276,480 + 34,984 = 800,032
    hand = 648 + 175_680 + 23_760 + 242_880 + 45_600 + 276_480 + 684 + 34_300
    model = create_model("densenet_bc_100", num_classes=100)
    assert n_params(model) == densenet_bc_params(100, 12, 100) == hand == 800_032
    assert round(n_params(model) / 1e6, 1) == 0.8  # Table 2: 0.8M
    assert n_params(model) == n_params(create_model("densenet_bc", num_classes=100))  # the default is BC-100, k=12


@pytest.mark.parametrize("depth, k, published", [(100, 12, 0.8), (250, 24, 15.3), (190, 40, 25.6)])
def test_densenet_bc_matches_the_published_sizes(depth, k, published):
    # Table 2's counts are the CIFAR-10 models' (10 classes): with 100 classes BC-250 has 15.5M, BC-190 25.8M.
    with torch.device("meta"):
        model = create_model("densenet_bc", num_classes=10, depth=depth, growth_rate=k)
    assert n_params(model) == densenet_bc_params(depth, k, 10)
    assert round(n_params(model) / 1e6, 1) == published


def test_densenet_bc_structure():
    model = create_model("densenet_bc_100", num_classes=100)
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (3, 24, (3, 3))
    blocks, transitions = model.features[0::2], model.features[1::2]
    assert [len(block) for block in blocks] == [16, 16, 16]
    assert [(t.conv.in_channels, t.conv.out_channels) for t in transitions] == [(216, 108), (300, 150)]
    layer = blocks[0][0]
    assert [type(m).__name__ for m in layer.children()] == [
        "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Dropout"]
    assert (layer.conv1.out_channels, layer.conv2.out_channels, layer.conv2.kernel_size) == (48, 12, (3, 3))
    assert layer.dropout.p == 0.0
    assert isinstance(transitions[0].pool, nn.AvgPool2d) and model.fc.in_features == 342


def test_densenet_bc_100_forward_shape():
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert model.features(model.conv1(x)).shape == (2, 342, 8, 8)  # 32×32 halved by each transition
    assert out.shape == (2, 100) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, message", [({"depth": 99}, "6n\\+4"), ({"depth": 4}, "6n\\+4"),
                                             ({"compression": 0.0}, "compression")])
def test_densenet_bc_rejects_a_bad_shape(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseNet(**{"depth": 100, "growth_rate": 12, "num_classes": 10, **kwargs})


def test_densenet_bc_100_counted_dense_by_the_scorer():
    # Multiply-accumulates by hand, positions × out channels × (in channels · kernel area), 1024/256/64 positions
    # in the blocks: stem 1024·24·27 = 663,552; 1×1 convs 48·Σc at each resolution: 1024·48·1,824 +
    # 256·48·3,168 + 64·48·3,840 = 140,378,112; 3×3 convs 16·(1024 + 256 + 64)·12·48·9 = 111,476,736;
    # transitions 1024·216·108 + 256·300·150 = 35,407,872; FC 342·100 = 34,200. Total 287,960,472.
    hand = 663_552 + 140_378_112 + 111_476_736 + 35_407_872 + 34_200
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=100).eval()
    with torch.no_grad():  # a random init can hold exact zeros, which the counter (rightly) skips
        for param in model.parameters():
            param[param == 0] = 1e-3
    count = count_model(model, torch.randn(1, 3, 32, 32), freebie=False)
    assert sum(row["mults"] for row in count.layers if row["sparsity"] is not None) == hand == 287_960_472
    # Every bottleneck's second BN folds into its 1×1 conv (48 layers × 48 channels keep 1 of 2 parameters), and
    # so does the stem's BN (layer 1's first), although the concatenation reads the stem's output raw: every
    # later reader of those 24 channels is a BN counted unfolded, whose affine absorbs the inverse scale.
    folded = sorted(row["name"] for row in count.layers if row["note"].startswith("folded into"))
    assert len(folded) == 49 and "features.0.0.bn1" in folded
    assert count.params == n_params(model) - 48 * 48 - 24 == 797_704
    assert count.ops > count.mults > hand
