"""The traced counter against hand-written op lists and against torch's own numbers."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from scoring import UnsupportedOpError, count_model
from scoring.counter.facts import CONSTANT, DYNAMIC, FactMap
from scoring.oplist import Activation, Add, Conv2D, DepthwiseConv2D, FullyConnected, GlobalAvg, Scale, count_oplist
from tests.scoring.helpers import FakeQuant, quantize_weight, set_grid_weights


def _act_quant(bits):
    return FakeQuant(bits) if bits else nn.Identity()


class SmallNet(nn.Module):
    """conv-BN-ReLU, depthwise-BN-SiLU, squeeze-excite, pointwise-BN, conv+bias-ReLU, residual, pool, linear.

    With ``bits`` every conv/linear input passes an activation quantizer (inputs of 8×8 etc. stay as is)."""

    def __init__(self, bits: int | None = None):
        super().__init__()
        self.q0, self.q1, self.q2, self.q3, self.q4, self.q5 = (_act_quant(bits) for _ in range(6))
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(self.q0(x))))
        x = F.silu(self.bn2(self.dw(self.q1(x))))
        gate = x.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.se_expand(self.q3(F.relu(self.se_reduce(self.q2(gate))))))
        x = x * gate
        x = self.bn3(self.pw(self.q4(x)))
        x = x + F.relu(self.conv2(self.q5(x)))
        return self.fc(self.q5(x.mean((2, 3))))


def small_net_oplist(model: SmallNet, *, bits, input_bits, act_bits, bias_bits):
    """SmallNet written by hand: weights at ``bits``, conv/linear multiplies at ``max(bits, input_bits)``,
    ops on unquantized activations at ``act_bits``; each layer's sparsity measured from ``model``."""
    def weighted(module):
        weight = module.weight
        return dict(sparsity=Fraction(int((weight == 0).sum()), weight.numel()), bits=bits, input_bits=input_bits,
                    bias_bits=bias_bits, bias=True)  # every conv has a bias or a folded BN

    return [
        Conv2D(16, 3, 3, 16, padding=1, **weighted(model.conv1)),
        Activation(16, 16, "relu", bits=act_bits),
        DepthwiseConv2D(16, 3, 16, stride=2, padding=1, **weighted(model.dw)),
        Activation(8, 16, "swish", bits=act_bits),
        GlobalAvg(8, 16, bits=act_bits),
        Conv2D(1, 1, 16, 4, **weighted(model.se_reduce)),
        Activation(1, 4, "relu", bits=act_bits),
        Conv2D(1, 1, 4, 16, **weighted(model.se_expand)),
        Activation(1, 16, "sigmoid", bits=act_bits),
        Scale(8, 16, bits=act_bits),
        Conv2D(8, 1, 16, 24, **weighted(model.pw)),
        Conv2D(8, 3, 24, 24, padding=1, **weighted(model.conv2)),
        Activation(8, 24, "relu", bits=act_bits),
        Add(8, 24),
        GlobalAvg(8, 24, bits=act_bits),
        FullyConnected(24, 10, **weighted(model.fc)),
    ]


def build_small_net(sparsity: Fraction, bits: int | None) -> SmallNet:
    """SmallNet with every conv/linear pruned to ``sparsity`` (rounded per layer) and, with ``bits``,
    weights and conv/linear inputs quantized."""
    torch.manual_seed(0)
    model = SmallNet(bits)
    for module in (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        set_grid_weights(module.weight, bits or 8, sparsity)
        if bits:
            quantize_weight(module, bits)
    return model


@pytest.mark.parametrize("sparsity", [Fraction(0), Fraction(1, 2), Fraction(3, 4)])
@pytest.mark.parametrize("bits, freebie", [(None, False), (None, None), (8, None), (4, None)])
def test_traced_count_equals_the_op_list(sparsity, bits, freebie):
    model = build_small_net(sparsity, bits)
    count = count_model(model, torch.randn(2, 3, 16, 16), freebie=freebie)
    assert count.freebie == (bits is None and freebie is None)
    default = 16 if count.freebie else 32
    expected = count_oplist(small_net_oplist(model, bits=bits or default, input_bits=bits or default,
                                             act_bits=default, bias_bits=default))
    quantizers = sum(isinstance(m, FakeQuant) for m in model.modules())
    assert count.mults == expected.mults
    assert count.adds == expected.adds
    assert count.param_bits == expected.param_bits + 32 * quantizers  # one 32-bit scale per quantizer
    assert count.ops == pytest.approx(float(expected.ops), rel=1e-12)
    rows = {layer["name"]: layer for layer in count.layers}
    for name in ("conv1", "dw", "se_reduce", "se_expand", "pw", "conv2", "fc"):
        weight = getattr(model, name).weight
        assert rows[name]["sparsity"] == pytest.approx(float((weight == 0).sum()) / weight.numel())
        assert rows[name]["weight_bits"] == (bits or default)


def test_parameters_equal_torch_count_after_batch_norm_folding():
    model = SmallNet()
    count = count_model(model, torch.randn(1, 3, 16, 16), freebie=False)
    torch_params = sum(p.numel() for p in model.parameters())
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # Each BN follows a bias-less conv: its 2 params per channel become 1 folded bias per channel.
    assert count.params == torch_params - sum(bn.num_features for bn in batch_norms)


def test_dot_product_multiplies_equal_torch_flop_counter():
    model = SmallNet().eval()
    x = torch.randn(2, 3, 16, 16)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model(x)
    count = count_model(model, x)
    dot_mults = sum(layer["mults"] for layer in count.layers if layer["sparsity"] is not None)
    assert dot_mults == flops.get_total_flops() / 2 / x.shape[0]


def test_masked_weights_and_parametrized_quantizers_count_like_plain_sparse_weights():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    set_grid_weights(plain[0].weight, 4, Fraction(1, 2))
    masked = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    masked.load_state_dict(plain.state_dict())

    class Mask(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    mask = (plain[0].weight != 0).float()
    with torch.no_grad():
        masked[0].weight.add_(1.0 - mask)  # nonzero where the mask removes it
    parametrize.register_parametrization(masked[0], "weight", Mask(mask))
    x = torch.randn(3, 8, 8, 8)
    a, b = count_model(plain, x), count_model(masked, x)
    assert (a.mults, a.adds, a.param_bits) == (b.mults, b.adds, b.param_bits)
    quantize_weight(masked[0], 4)  # now mask, then a 4-bit quantizer with one 32-bit scale
    c = count_model(masked, x)
    nonzeros = int(mask.sum())
    assert not c.freebie
    assert c.param_bits == nonzeros * 4 + mask.numel() + 16 * 32 + 32  # weights, mask, 32-bit bias, scale
    assert (c.mults, c.adds) == (a.mults, a.adds)


def test_a_declared_mask_counts_its_bits_only_where_it_covers_the_executed_weight():
    """micronet_mask_bits (scoring/protocol.py) travels through a later quantizer to the conv that stores it."""
    class BlockMask(nn.Module):
        micronet_mask_bits = 2  # two blocks: the first 8 filters, the last 8

        def forward(self, w):
            return w * torch.cat([torch.ones(8, 8, 3, 3), torch.zeros(8, 8, 3, 3)])

    class Shift(nn.Module):
        def forward(self, w):
            return w + 1.0  # nonzero where the mask removed it: the mask no longer describes the weight

    conv = nn.Conv2d(8, 16, 3, bias=False)
    set_grid_weights(conv.weight, 4, Fraction(0))
    parametrize.register_parametrization(conv, "weight", BlockMask())
    quantize_weight(conv, 4)
    x = torch.randn(1, 8, 5, 5)
    assert count_model(conv, x).param_bits == 576 * 4 + 2 + 32  # kept weights, 2 mask bits, one scale
    conv = nn.Conv2d(8, 16, 3, bias=False)
    set_grid_weights(conv.weight, 4, Fraction(0))
    parametrize.register_parametrization(conv, "weight", BlockMask())
    parametrize.register_parametrization(conv, "weight", Shift())
    with torch.no_grad():
        conv.parametrizations.weight.original[:, :, 0, 0] = -1.0  # 64 zeros in kept filters after the shift
    assert count_model(conv, x, freebie=False).param_bits == (1152 - 64) * 32 + 1152  # 1 mask bit per weight


def test_a_few_zeros_are_stored_dense_but_still_skipped():
    conv = nn.Conv2d(4, 8, 3, bias=False)
    with torch.no_grad():
        conv.weight[conv.weight == 0] = 0.5
        conv.weight[0, 0, 0, 0] = 0  # one zero: a mask (288 bits) would cost more than it saves (32 bits)
    count = count_model(conv, torch.randn(1, 4, 5, 5), freebie=False)
    assert count.param_bits == 288 * 32
    assert count.mults == 287 * 9
    with torch.no_grad():
        conv.weight[:4] = 0  # half the filters: now the mask pays
    count = count_model(conv, torch.randn(1, 4, 5, 5), freebie=False)
    assert count.param_bits == 144 * 32 + 288
    assert (count.mults, count.adds) == (144 * 9, (36 - 1) * 9 * 4)  # empty filters cost no additions


def test_op_width_is_the_widest_input_and_additions_use_the_accumulator():
    conv = nn.Conv2d(4, 4, 1, bias=False)
    set_grid_weights(conv.weight, 3, Fraction(0))  # no weight rounds to zero
    quantize_weight(conv, 3, scale_count=0)
    model = nn.Sequential(FakeQuant(5, scale_count=0), conv)
    x = torch.randn(1, 4, 2, 2)
    count = count_model(model, x)
    (row,) = count.layers
    assert (row["weight_bits"], row["input_bits"]) == (3, 5)
    assert (count.mults, count.adds) == (64, 48)
    assert count.ops == 64 * 5 / 32 + 48
    assert count_model(model, x, accumulator_bits=16).ops == 64 * 5 / 32 + 48 * 16 / 32


def test_scales_stored_below_16_bits_cancel_the_freebie():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    quantizer = FakeQuant(16, scale_count=4)  # 16-bit weights alone would keep the freebie
    parametrize.register_parametrization(model[0], "weight", quantizer)
    x = torch.randn(1, 4)
    quantizer.micronet_scale_bits = 16
    count = count_model(model, x)
    assert count.freebie and count.param_bits == 16 * 16 + 4 * 16  # 16 weights, 4 scales, all at 16 bits
    quantizer.micronet_scale_bits = 8  # the 4 scales stored in 8 bits: a tensor quantized below 16 bits
    count = count_model(model, x)
    assert not count.freebie
    assert count.param_bits == 16 * 16 + 4 * 8
    assert count.ops == 16 + 12  # 16 mults at 32 bits (the unquantized input, freebie lost), 4·3 adds
    with pytest.raises(ValueError, match="'0.parametrizations.weight.0' stores its scales in 8 bits"):
        count_model(model, x, freebie=True)
    quantizer.micronet_scale_count = 0  # nothing stored narrow: the freebie stays
    assert count_model(model, x).freebie
    quantizer.micronet_scale_bits = 0
    with pytest.raises(ValueError, match="micronet_scale_bits=0"):
        count_model(model, x)


def test_freebie_is_automatic_and_refused_below_16_bits():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    x = torch.randn(1, 4)
    assert count_model(model, x).param_bits == 16 * 16
    assert count_model(model, x, freebie=False).param_bits == 16 * 32
    quantize_weight(model[0], 8, scale_count=0)
    assert count_model(model, x).param_bits == 16 * 8
    with pytest.raises(ValueError, match="0.parametrizations.weight.0' quantizes to 8 bits"):
        count_model(model, x, freebie=True)


def test_unfoldable_batch_norm_counts_two_params_per_channel_and_its_ops():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1, bias=False))
    count = count_model(model, torch.randn(2, 3, 5, 5), freebie=False)
    bn = count.layers[0]
    assert (bn["params"], bn["mults"], bn["adds"], bn["note"]) == (6, 75, 75, "not folded")


def test_batch_norm_after_a_conv_with_bias_adds_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    count = count_model(model, torch.randn(1, 3, 5, 5), freebie=False)
    assert count.params == 3 * 4 + 4
    assert count.adds == 2 * 100 + 100  # (L-1)·N + N bias adds; the folded BN merges into that bias
    assert [(layer["name"], layer["ops"], layer["note"]) for layer in count.layers][1] == (
        "1", 0, "folded into 0")  # shown, at no cost


class Spectral(nn.Module):
    def forward(self, x):
        return torch.fft.rfft2(x).abs()


def test_an_op_without_rule_fails_loudly_naming_op_and_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), Spectral())
    with pytest.raises(UnsupportedOpError, match=r"aten\._fft_r2c \(in layer '1', Spectral\).*scoring/rules\.py"):
        count_model(model, torch.randn(1, 1, 8, 8))


class Branchy(nn.Module):
    """Runs an extra conv only for batches whose sum is positive (input-dependent compute)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.extra = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = self.extra(x)
        return x


def test_ops_are_averaged_per_example_over_batches():
    torch.manual_seed(0)
    model = Branchy()
    positive, negative = torch.full((3, 1, 6, 6), 1.0), torch.full((1, 1, 6, 6), -1.0)
    with torch.no_grad():
        model.stem.bias.fill_(0)
        model.stem.weight.abs_()
    long, short = count_model(model, positive), count_model(model, negative)
    assert long.mults > short.mults
    both = count_model(model, [(positive, torch.zeros(3)), (negative, torch.zeros(1))])
    assert both.mults == (3 * long.mults + 1 * short.mults) / 4
    assert both.adds == (3 * long.adds + 1 * short.adds) / 4
    assert both.param_bits == long.param_bits > short.param_bits  # each parameter once, over all batches
    assert both.examples == 4


def test_in_place_ops_count_like_their_out_of_place_twins():
    class Net(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.inplace = inplace
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            if self.inplace:
                y += x
                return F.hardtanh_(F.silu(y, inplace=True), 0, 6).relu_()
            return F.relu(F.hardtanh(F.silu(y + x), 0, 6))

    x = torch.randn(1, 2, 3, 3)
    a, b = count_model(Net(False), x), count_model(Net(True), x)
    # conv 36 mults, 18 + 18 adds (dot products, bias); add 18; SiLU 3 mults + 1 add, ReLU6 (a clip) 1, ReLU 1
    assert (a.mults, a.adds) == (b.mults, b.adds) == (36 + 18 * 3 + 18 * 1 + 18, 18 + 18 + 18 + 18)


def test_ops_on_parameters_alone_are_free():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1, bias=False)

        def forward(self, x):
            weight = torch.tanh(self.conv.weight) * 2 + 1  # would be precomputed at export
            return F.conv2d(x, weight)

    count = count_model(Scaled(), torch.randn(1, 2, 4, 4), freebie=False)
    assert (count.params, count.mults, count.adds) == (6, 2 * 3 * 16, 1 * 3 * 16)


def test_a_weight_sparsified_between_two_counts_counts_its_new_nonzeros():
    # The counter measures each weight once per count (nonzeros, per-output lengths): a second count must see the
    # weight as it is now. Linear 4 -> 3 on one input: dense 3 outputs × 4 mults, 3 × (4 - 1) adds; with 2 of each
    # row's 4 weights zeroed, 3 × 2 mults and 3 × (2 - 1) adds.
    layer = nn.Linear(4, 3, bias=False)
    x = torch.randn(1, 4)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    dense = count_model(layer, x)
    with torch.no_grad():
        layer.weight[:, :2] = 0
    sparse = count_model(layer, x)
    assert (dense.mults, dense.adds, sparse.mults, sparse.adds) == (12, 9, 6, 3)


def test_what_the_counter_knows_of_a_tensor_dies_with_it():
    # Facts are kept by tensor identity: a tensor allocated where a dead one was (same id) starts unknown.
    facts = FactMap()
    known = torch.ones(2)
    facts[known] = DYNAMIC
    assert facts.get(known) is DYNAMIC and facts.get(torch.ones(2)) is CONSTANT
    dead_id = id(known)
    del known
    assert not facts.entries  # dropped when the tensor died
    reused = next(t for t in (torch.ones(2) for _ in range(1000)) if id(t) == dead_id)
    assert facts.get(reused) is CONSTANT


def test_run_time_zeros_of_a_dynamic_conv_weight_do_not_reduce_the_count():
    class DynamicConv(nn.Module):
        def forward(self, x):  # a weight computed from the input, all zeros at run time
            return F.conv2d(x, F.relu(x[:1, :1, :1, :1] - 10).expand(2, 2, 1, 1))

    count = count_model(DynamicConv(), torch.randn(1, 2, 3, 3))
    # conv: L = 2 weights per output, N = 2·3·3 outputs: 36 mults, 18 adds; sub: 1 add; relu: 1 mult
    assert (count.mults, count.adds) == (36 + 1, 18 + 1)


@pytest.mark.parametrize("module, shape, expected", [
    (nn.Softmax(dim=-1), (1, 3, 10), (2 * 30, 3 * 9)),  # 2n mults + (n-1) adds per row: 3n-1 ops
    (nn.AvgPool2d(2), (1, 1, 4, 4), (4, 4 * 3)),
    # 3×3, stride 2, pad 1 on 6×6: per dim, windows read -1..1, 1..3, 3..5: 2, 3, 3 in bounds (8 in all),
    # so 8·8 = 64 valid elements per plane in 9 windows: 64 - 9 = 55 comparisons per channel
    (nn.MaxPool2d(3, 2, padding=1), (1, 2, 6, 6), (2 * 55, 0)),
    (nn.MaxPool2d((3,), 2, padding=1), (1, 2, 6, 6), (2 * 55, 0)),  # a 1-tuple kernel is 3×3
    (nn.AvgPool2d((2,)), (1, 1, 4, 4), (4, 4 * 3)),
    (nn.MaxPool3d((2,)), (1, 2, 6, 6, 6), (54 * 7, 0)),  # 2×2×2 windows
    (nn.AvgPool3d(2), (1, 2, 6, 6, 6), (54, 54 * 7)),
    (nn.AdaptiveAvgPool2d(3), (1, 1, 5, 5), (9, 7 * 7 - 9)),  # windows 2, 3, 2 per dim
    (nn.Hardswish(), (1, 5), (15, 5)),  # x·clip(x + 3, 0, 6)/6: +3, clip, /6, ×x = 3 mults + 1 add
    (nn.Hardsigmoid(), (1, 5), (10, 5)),  # clip(x + 3, 0, 6)/6: 2 mults + 1 add
    (nn.GELU(), (1, 5), (20, 5)),
    (nn.GELU(approximate="tanh"), (1, 5), (35, 10)),
    (nn.ReLU6(), (1, 5), (5, 0)),  # a clip: 1 op
    (nn.LeakyReLU(), (1, 5), (10, 0)),
    (nn.ELU(), (1, 5), (15, 5)),
    (nn.Softplus(), (1, 5), (10, 5)),
    (nn.Mish(), (1, 5), (20, 5)),
    (nn.Tanh(), (1, 5), (5, 0)),
    (nn.Sigmoid(), (1, 5), (10, 5)),
    (nn.Dropout(0.5), (1, 5), (0, 0)),
    (nn.Flatten(), (1, 2, 3), (0, 0)),
])
def test_rules_of_single_ops(module, shape, expected):
    count = count_model(module, torch.randn(*shape))
    assert (count.mults, count.adds) == expected


def test_count_restores_training_mode_and_moves_inputs_to_the_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
    model[1].eval()
    count_model(model, [torch.randn(2, 3).double().float()])
    assert model.training and model[0].training and not model[1].training


def test_bad_inputs_are_refused_with_one_line():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no input batches"):
        count_model(model, [])
    with pytest.raises(TypeError, match="expects tensors or \\(inputs, targets\\) batches"):
        count_model(model, ["x"])
    with pytest.raises(ValueError, match="accumulator_bits=0"):
        count_model(model, torch.randn(1, 3), accumulator_bits=0)
