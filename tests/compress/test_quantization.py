"""Quantization-aware training: grids, gradients, signedness, protocol attributes, schedules, accuracy."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress import ActivationQuantizer, QuantizeTechnique, WeightQuantizer
from compress.base import find_parametrization
from compress.quantization import _FakeQuantize
from scoring.protocol import is_quantizer, quantizer_bits, quantizer_scales

from .loop import Digits, correct, train


def quantize(cfg: dict, model: nn.Module, *, epochs: int = 4) -> QuantizeTechnique:
    technique = QuantizeTechnique(cfg, stage_epochs=epochs, where="quantize")
    technique.configure(steps_per_epoch=10)
    technique.attach(model)
    return technique


@pytest.mark.parametrize("method", ["lsq", "minmax", "moving_average"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_take_at_most_2_to_the_b_values_per_channel(bits: int, method: str):
    torch.manual_seed(bits)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 5), nn.Linear(8, 4))
    quantize({"weight_bits": bits, "activation_bits": bits, "method": method, "first_last_bits": None}, model)
    weight = model[1].weight.detach().flatten(1)  # 8 channels x 400 weights
    for row in weight:
        assert len(row.unique()) <= 2 ** bits
    if bits <= 4:  # with 400 weights per channel every level of the symmetric grid is used
        assert max(len(row.unique()) for row in weight) == 2 ** bits - 1


def test_gradients_equal_torch_learnable_fake_quantize():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, requires_grad=True)
    scale = torch.full((8,), 0.2, requires_grad=True)
    (_FakeQuantize.apply(weight, scale, True, -7, 7, 0.3) ** 2).sum().backward()
    ours = weight.grad.clone(), scale.grad.clone()
    weight.grad = scale.grad = None
    reference = torch._fake_quantize_learnable_per_channel_affine(weight, scale, torch.zeros(8), 0, -7, 7, 0.3)
    (reference ** 2).sum().backward()
    assert torch.equal(ours[0], weight.grad)
    assert torch.allclose(ours[1], scale.grad, rtol=1e-5, atol=1e-6)

    x = torch.randn(4, 5, 6, requires_grad=True)
    step = torch.tensor([0.1], requires_grad=True)
    (_FakeQuantize.apply(x, step, False, 0, 15, 0.2) ** 2).sum().backward()
    ours = x.grad.clone(), step.grad.clone()
    x.grad = step.grad = None
    (torch._fake_quantize_learnable_per_tensor_affine(x, step, torch.zeros(1), 0, 15, 0.2) ** 2).sum().backward()
    assert torch.equal(ours[0], x.grad)
    assert torch.allclose(ours[1], step.grad, rtol=1e-5)
    assert torch.equal(_FakeQuantize.apply(x, step, False, 0, 15, 0.2),
                       torch.fake_quantize_per_tensor_affine(x, 0.1, 0, 0, 15))


def test_inputs_after_relu_are_unsigned_and_the_stem_input_signed(digits: Digits):
    from models import create_model
    model = create_model("digits_cnn", num_classes=10)
    quantize({"weight_bits": 4, "activation_bits": 4}, model)
    model.train()
    model(digits.train_x[:64])
    q = {name: m for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}
    assert set(q) == {"conv1.0.input_quantizer", "conv2.0.input_quantizer", "conv3.0.input_quantizer",
                      "fc.input_quantizer"}
    assert (q["conv1.0.input_quantizer"].qmin, q["conv1.0.input_quantizer"].qmax) == (-127, 127)  # first: 8 bits
    assert (q["conv2.0.input_quantizer"].qmin, q["conv2.0.input_quantizer"].qmax) == (0, 15)
    assert (q["fc.input_quantizer"].qmin, q["fc.input_quantizer"].qmax) == (0, 255)  # last layer: 8 bits
    # What the scorer reads (scoring/protocol.py)
    conv2_weight = find_parametrization(model.conv2[0], WeightQuantizer)
    assert is_quantizer(conv2_weight) and quantizer_bits(conv2_weight) == 4
    assert quantizer_scales(conv2_weight) == (64, 32)  # one fp32 scale per output channel
    assert quantizer_bits(q["conv2.0.input_quantizer"]) == 4
    assert quantizer_scales(q["conv2.0.input_quantizer"]) == (1, 32)
    # the layer really consumes the quantized input: at most 16 levels
    seen = {}
    model.conv2[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.eval()
    model(digits.test_x[:32])
    assert len(seen["x"].unique()) <= 16 and (seen["x"] >= 0).all()


def test_layer_bits_overrides_and_exclusions():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 2))
    quantize({"weight_bits": 4, "activation_bits": 6, "first_last_bits": 8,
              "layer_bits": {"1": 3, "2": {"weight": 5, "activation": None}}, "exclude": ["3"]}, model)
    bits = [(find_parametrization(m, WeightQuantizer).micronet_bits if find_parametrization(m, WeightQuantizer)
             else None, m.input_quantizer.micronet_bits if hasattr(m, "input_quantizer") else None) for m in model]
    assert bits == [(8, 8), (3, 3), (5, None), (None, None)]


def test_observer_and_batch_norm_freezing_follow_the_epoch_schedule(digits: Digits):
    from models import create_model
    model = create_model("digits_cnn", num_classes=10)
    technique = QuantizeTechnique({"method": "moving_average", "unit": "epoch", "freeze_bn": 1,
                                   "freeze_observers": 2}, stage_epochs=3, where="quantize")
    running = {}

    def snapshot(epoch: int) -> None:
        running[epoch] = (model.conv2[1].running_mean.clone(), model.conv2[0].input_quantizer.scale.clone())

    original_hook = technique.on_epoch_start
    technique.on_epoch_start = lambda m, epoch: (original_hook(m, epoch), snapshot(epoch))  # type: ignore
    train(model, digits, epochs=3, techniques=[technique], lr=0.01)
    snapshot(3)
    bn_moved = [not torch.equal(running[e][0], running[e + 1][0]) for e in range(3)]
    scale_moved = [not torch.equal(running[e][1], running[e + 1][1]) for e in range(3)]
    assert bn_moved == [True, False, False]
    assert scale_moved == [True, True, False]
    assert model.conv2[0].input_quantizer.is_frozen and bool(model.conv2[0].input_quantizer.frozen)
    # frozen statistics end with the stage: a later stage (here without techniques) updates them again
    statistics = model.conv2[1].running_mean.clone()
    train(model, digits, epochs=1, lr=0.01)
    assert not torch.equal(model.conv2[1].running_mean, statistics)


class _SharedLayer(nn.Module):
    """``b`` runs twice in one forward (weight sharing), so its quantizers run twice before the backward."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.b(self.a(x))))))


@pytest.mark.parametrize("method", ["lsq", "minmax", "moving_average"])
def test_a_layer_used_twice_in_one_forward_trains(method: str):
    # Before: the second call updated the step size in place (clamp / observer) after the first call had
    # saved it for backward, and the backward failed with an autograd in-place error.
    torch.manual_seed(0)
    model = _SharedLayer()
    quantize({"method": method, "first_last_bits": None}, model)
    model(torch.randn(16, 8)).square().sum().backward()
    weight_quantizer = find_parametrization(model.b, WeightQuantizer)
    assert model.b.parametrizations["weight"].original.grad.abs().sum() > 0
    if method == "lsq":
        assert torch.isfinite(weight_quantizer.scale.grad).all()
        assert torch.isfinite(model.b.input_quantizer.scale.grad).all()


def test_bf16_inputs_keep_their_dtype():
    quantizer = ActivationQuantizer(8, "lsq")
    x = torch.randn(4, 16).bfloat16().requires_grad_()
    out = quantizer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and quantizer.scale.grad is not None


def test_evaluating_an_uncalibrated_input_quantizer_fails_clearly():
    quantizer = ActivationQuantizer(8, "minmax").eval()
    with pytest.raises(RuntimeError, match="has not seen a training batch"):
        quantizer(torch.randn(2, 3))


@pytest.mark.parametrize("cfg, message", [
    ({"weight_bits": 1}, "quantize.weight_bits=1: expected a bit width, one of 2, 3, 4, 5, 6, 7, 8, 16"),
    ({"activation_bits": 12}, "quantize.activation_bits=12: expected a bit width, one of 2, 3, 4, 5, 6, 7, 8, 16 or null"),
    ({"method": "pact"}, "quantize.method='pact': expected one of lsq, minmax, moving_average"),
    ({"freeze_bn": 2.0}, "quantize.freeze_bn=2.0: expected a number in [0.0, 1.0] or null"),
    ({"layer_bits": {"conv*": 9}}, "quantize.layer_bits.conv*=9: expected a bit width"),
    ({"unit": "step"}, "quantize.unit='step': expected one of fraction, epoch"),
])
def test_bad_config_names_key_value_and_range(cfg: dict, message: str):
    with pytest.raises(ValueError) as err:
        QuantizeTechnique(cfg, stage_epochs=4, where="quantize")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_8bit_qat_of_a_trained_digits_model_loses_at_most_one_point(trained, digits: Digits):
    model, baseline = trained
    technique = QuantizeTechnique({"weight_bits": 8, "activation_bits": 8}, stage_epochs=2, where="quantize")
    train(model, digits, epochs=2, techniques=[technique], lr=0.01)
    total = len(digits.test_y)
    assert baseline >= 0.95 * total
    assert correct(model, digits) >= baseline - 0.01 * total
    assert all(m.micronet_bits == 8 for m in model.modules() if is_quantizer(m))


def _calibrate_on_rank(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        quantizers = [ActivationQuantizer(4, method) for method in ("lsq", "minmax")]
        batch = torch.rand(32, 10) * (rank + 1) - 0.5 * rank  # rank 1 alone sees negative values
        for quantizer in quantizers:
            quantizer.train()(batch)
        torch.save([(q.scale.detach().clone(), q.qmin) for q in quantizers], f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_replicas_calibrate_identically(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_calibrate_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"out.{rank}") for rank in (0, 1))
    for (scale0, qmin0), (scale1, qmin1) in zip(rank0, rank1):
        assert torch.equal(scale0, scale1) and qmin0 == qmin1 == -7  # signed: one replica saw negatives
