"""Recounts of two verified 2019 CIFAR-100 entries, as an organizer recounts them (issue 20, point 5).

Each entry is rebuilt from its own public repository with its released checkpoint's nonzeros
(:mod:`tests.scoring.published`) and counted by this kit under the entry's own accounting (its bit widths, its
accumulator); the kit's count is compared with the entry's published one, and every difference is named with its
number: a rule of the entry that differs from a rule of the kit (``docs/rules.md``), or a bug in the entry's counting
code. Numbers "recounted" below were produced by running the entry's own counting code, unchanged, on its own
checkpoint (they reproduce the published scores).

Sources: RIAIR = peiswang/MicroNetChallenge, branch cifar100 @ a7311dfa (Score.md, score.py, flops_utils.py,
model/densenet-100.pth.tar); OSI-AI = Lee-Gihun/MicroNet_OSI-AI @ fb0163a7 (README.md "3. Scoring metric",
counting/counting.py, main.py, the final trained_model.pth).
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from scoring import count_model
from scoring.rules import ADDER_TREE
from tests.scoring.published import osi_ai_path, published, riair_densenet

IMAGE = (1, 3, 32, 32)  # the counts do not depend on the image: one CIFAR-sized input


def ops_of(count, types: tuple[str, ...]) -> float:
    """The 32-bit-equivalent ops of a count's layers of the given module types."""
    return sum(row["ops"] for row in count.layers if row["type"] in types)


# --- RIAIR, 1st: DenseNet-BC-100, 75 % pruned, 4-bit; verified 0.0044, 0.0085 with 32-bit accumulation ---------------
@pytest.fixture(scope="module")
def riair():
    """RIAIR's rebuilt network and the kit's count of it with 32-bit accumulation (their score type 2)."""
    return count_model(riair_densenet(), torch.rand(*IMAGE), accumulator_bits=32)


#: Elements (per image) of the tensors their Scale layers (folded BN / dequantization, fp16) run over; the kit's batch
#: norms, ReLUs and bias adds run over the same tensors. Bottleneck i of block b reads in = c_b + 12·i channels
#: (c = 24, 108, 150 at 32², 16², 8²); the 48-channel conv1 outputs; the 12-channel conv2 outputs.
BN1_INPUTS = (1024 * sum(24 + 12 * i for i in range(16)) + 256 * sum(108 + 12 * i for i in range(16))
              + 64 * sum(150 + 12 * i for i in range(16)) + 216 * 1024 + 300 * 256)  # + the two transitions
CONV1_OUTPUTS = 48 * 16 * (1024 + 256 + 64)
CONV2_OUTPUTS = 12 * 16 * (1024 + 256 + 64)
STEM_OUTPUT = 24 * 1024  # read by dense1.0's BN1 alone
FINAL_BN = 342 * 64
POOLED = 108 * 256 + 150 * 64  # the two transitions' 2×2 average pools' outputs
BIAS_FREE_SCALES = CONV2_OUTPUTS + STEM_OUTPUT + POOLED  # their dequantization-only Scales (bias 0)


def test_riair_element_counts_are_their_scale_layers():
    # Their 151 Scale layers (recounted from the merged checkpoint): 4,276,708 elements with a bias (50 BN1 Scales,
    # 48 after conv1, the final BN, the FC's 100 outputs) and 319,872 without.
    assert (BN1_INPUTS, CONV1_OUTPUTS, CONV2_OUTPUTS) == (3_222_528, 1_032_192, 258_048)
    assert BN1_INPUTS + CONV1_OUTPUTS + FINAL_BN + 100 == 4_276_708
    assert BIAS_FREE_SCALES == 319_872


def test_riair_rebuild_has_their_nonzeros_and_bit_widths(riair):
    layers = published("riair_cifar100")["layers"]
    rows = [row for row in riair.layers if row["type"] in ("Conv2d", "Linear")]
    assert len(rows) == len(layers) == 100  # 1 stem + 48 × 2 bottleneck convs + 2 transitions + the FC
    for row, (name, shape, per_output) in zip(rows, layers):
        assert row["sparsity"] == pytest.approx(1 - sum(per_output) / math.prod(shape)), name
    # score.py: weights 4 bits, the FC's 6; inputs 4 bits, the stem's and the FC's 32 (unquantized)
    assert [(r["weight_bits"], r["input_bits"]) for r in rows] == [(4, 32)] + [(4, 4)] * 98 + [(6, 32)]
    assert not riair.freebie
    # their table: convs 177,806 nonzeros (stem 427), FC 17,099
    assert sum(sum(per_output) for _, _, per_output in layers[:-1]) == 177_806
    assert sum(layers[-1][2]) == 17_099


def test_riair_parameters(riair):
    layers = published("riair_cifar100")["layers"]
    # Weights: both count a 1-bit mask per element (every tensor has zeros) + nonzeros × 4 (FC × 6): 1,589,762 bits
    # = 49,680.0625, their Conv2d 45,405.25 + Linear 4,274.8125 (score.py's params by module type).
    weights = sum(math.prod(shape) + (6 if name == "fc" else 4) * sum(per_output) for name, shape, per_output in layers)
    assert weights == 1_589_762 == 32 * (45_405.25 + 4_274.8125)
    # Per-channel values. Their Scales keep 25,046 fp16 values: 2 per channel where a bias is stored (the 50 BN1
    # Scales over 9,348 input channels, 48 × 48 after conv1, the final BN's 342, the FC's 100), 1 where not
    # (48 × 12 after conv2, 108 + 150 after the transitions, 24 after the stem).
    bn1_channels = sum(24 + 12 * i for i in range(16)) + sum(108 + 12 * i for i in range(16)) \
        + sum(150 + 12 * i for i in range(16)) + 216 + 300
    scale_values = 2 * (bn1_channels + 48 * 48 + 342 + 100) + 48 * 12 + 108 + 150 + 24
    assert (bn1_channels, scale_values) == (9_348, 25_046)
    # The kit stores the same values at 32 bits (no fp16 declared: project rules "bias width", "quantizer
    # parameters"): per-channel weight scales (3,262 output channels), folded BN biases, the unfolded BNs' γ and β,
    # the FC bias; plus 98 per-tensor input scales (RIAIR folds them into the Scales), minus 24: dense1.0's BN reads
    # the stem's output alone and folds into the stem conv (one bias per channel where RIAIR keeps a Scale's two).
    kit_values = scale_values + 98 - 24
    assert riair.param_bits == weights + 32 * kit_values
    assert riair.params == 74_800.0625
    # Theirs: 49,805.5625 = the weights + 125.5 for all Scales. Bug: flops_utils.py takes C = input.size(0) of the
    # (1, C, H, W) batch, so each Scale is charged 0.5 or 1 parameter; 25,046 fp16 values are 12,523. The rest is
    # fp16 (theirs) vs 32 bits (the kit) for those 25,046 values, and the 98 - 24 values above.
    their_params = 49_805.5625
    scale_bug, fp16_values = 12_523 - 125.5, 12_523
    assert riair.params - their_params == scale_bug + fp16_values + (98 - 24) == 24_994.5


def test_riair_ops_with_32_bit_accumulation(riair):
    # Their type 2 (FP32 accumulation in convs, pools and bias adds, FP16 else), by module type (score.py's
    # recount; their total 75,308,930.8408 gives Score.md's op score 0.007179):
    conv_mults, conv_adds = 8_017_091, 60_647_460.8408  # stem and FC multiplies at 32 bits, the others at 4
    scales, relu, quant, pools = 6_574_998, 10_944, 0, 58_437
    their_ops = conv_mults + conv_adds + scales + relu + quant + pools
    assert their_ops == pytest.approx(75_308_930.8408) and their_ops / 10.49e9 == pytest.approx(0.007179, abs=5e-7)
    dots = [row for row in riair.layers if row["type"] in ("Conv2d", "Linear")]
    # Multiplies: the same rule (the widest operand) and the same count.
    assert sum(row["mults"] * max(row["weight_bits"], row["input_bits"]) / 32 for row in dots) == conv_mults
    # Dot-product additions: their formula density·N·(k − 1) per layer (N outputs, k weights per output) subtracts
    # density·N where the exact Σ_c (n_c − 1)·H·W (the kit's) subtracts N. The kit's FC also adds its bias (+100;
    # RIAIR moved it into a Scale, below).
    layers = published("riair_cifar100")["layers"]
    positions = [row["mults"] // sum(per_output) for row, (_, _, per_output) in zip(dots, layers)]  # H·W
    formula = sum(Fraction(sum(per_output), math.prod(shape)) * len(per_output) * hw
                  * (Fraction(math.prod(shape), len(per_output)) - 1)
                  for hw, (_, shape, per_output) in zip(positions, layers))
    exact = sum((sum(per_output) - len(per_output)) * hw for hw, (_, _, per_output) in zip(positions, layers))
    assert float(formula) == pytest.approx(conv_adds) and exact == 59_492_391
    assert ops_of(riair, ("Conv2d", "Linear")) == conv_mults + exact + 100
    # Scales vs the kit's batch norms: the unfolded BNs' multiply at 32 bits, not fp16 (+0.5 each); the BNs that
    # follow a conv fold their multiply into its weight scales (-0.5 each, the bias add stays); the dequantization-
    # only Scales are free in the kit (rescaling a quantized tensor is a format conversion, docs/rules.md "Units";
    # -0.5 each); the FC's Scale (1.5 × 100) is the FC's bias add above.
    unfolded = BN1_INPUTS - STEM_OUTPUT + FINAL_BN
    assert ops_of(riair, ("BatchNorm2d",)) == 2 * unfolded + CONV1_OUTPUTS + STEM_OUTPUT == 7_496_448
    assert scales + unfolded / 2 - (CONV1_OUTPUTS + STEM_OUTPUT) / 2 - BIAS_FREE_SCALES / 2 - 150 == 7_496_448
    # ReLU: their Quant (round, clamp to [0, 15]) is the clamp at 0 of 4,254,720 elements, counted 0; the kit counts
    # the ReLU before each quantizer, 1 op per element at 32 bits. Their final ReLU is fp16 (0.5), the kit's 32-bit.
    assert ops_of(riair, ("ReLU",)) == relu + (BN1_INPUTS + CONV1_OUTPUTS) + FINAL_BN / 2 == 4_276_608
    # Pools: their AvgPool2d charges prod([kernel_size]) - 1 adds with kernel_size the int 2 (8): 1 (7) instead of
    # 3 (63) per output (bug, +93,648); and its multiply at fp16 (+18,795 at 32 bits).
    kernel_bug, pool_fp16 = 2 * POOLED + 56 * 342, (POOLED + 342) / 2
    assert ops_of(riair, ("AvgPool2d", "AdaptiveAvgPool2d")) == pools + kernel_bug + pool_fp16 == 170_880
    assert riair.ops == 79_453_518
    # Each difference above, summed: -1,155,069.8408 + 100 (dot products), +921,450 (Scales vs BNs: +1,609,920
    # - 528,384 - 159,936 - 150), +4,265,664 (ReLU and clamps), +112,443 (pools).
    differences = float(exact - formula) + 100 + 921_450 + 4_265_664 + 112_443
    assert riair.ops - their_ops == pytest.approx(differences) and differences == pytest.approx(4_144_587.1592)


def test_riair_score_with_32_bit_accumulation(riair):
    # Score.md type 2: 0.007179 + 0.001365 = 0.008544 (the leaderboard's "0.0085 under 32-bit accumulation").
    assert riair.score_terms("cifar100") == pytest.approx((74_800.0625 / 36.5e6, 79_453_518 / 10.49e9))
    assert riair.score("cifar100") == pytest.approx(0.0096235, abs=5e-8)
    assert 49_805.5625 / 36.5e6 + 75_308_930.8408 / 10.49e9 == pytest.approx(0.008544, abs=5e-7)


# --- RIAIR as verified: adder trees in the convs, fp16 outside them (their score types 0 and 4) ----------------------
@pytest.fixture(scope="module")
def riair_fp16_tree():
    """The kit's count of RIAIR's network as their fp16 run (batch norm, ReLU, pooling and the per-channel scales in
    fp16; Test.md: 80.17 %) with its quantized convs summed in adder trees (``accumulator_bits=adder_tree``)."""
    return count_model(riair_densenet(fp16=True), torch.rand(*IMAGE), accumulator_bits=ADDER_TREE)


def addition_tree(width: int, terms: int) -> int:
    """flops_utils.py ``addition_tree``: the bit-adds of summing ``terms`` products of ``width`` bits pairwise, one
    bit wider per level."""
    bits = 0
    while terms > 1:
        bits, terms, width = bits + terms // 2 * width, (terms + 1) // 2, width + 1
    return bits


#: Their type 0 (adder tree in the convs, FP16 everything else) by module type (score.py's recount; total
#: 29,420,863.6326 gives Score.md's op score 0.002805).
TYPE0 = {"Conv2d": 24_900_511.6296, "Linear": 34_148.0029, "Scale": 4_436_644, "AvgPool2d": 38_616, "ReLU": 10_944}


def test_riair_adder_trees_are_theirs(riair_fp16_tree):
    layers = published("riair_cifar100")["layers"]
    rows = [row for row in riair_fp16_tree.layers if row["type"] in ("Conv2d", "Linear")]
    tree_bits = 0
    for row, (name, _, per_output) in zip(rows[1:-1], layers[1:-1]):  # the 98 convs with quantized inputs
        positions = row["mults"] // sum(per_output)
        # products of an unsigned 4-bit input and a 4-bit weight: 8 bits wide (their base bit_width + act_bit_width)
        bits = positions * sum(addition_tree(8, terms) for terms in per_output)
        assert row["ops"] == (row["mults"] * 4 + bits) / 32, name
        tree_bits += bits
    assert tree_bits == 527_342_912  # = 16,479,466 32-bit additions
    # The stem and the FC read float inputs: both sum them at 32 bits, as RIAIR did.
    assert riair_fp16_tree.float_dot_products == {"conv1": "its input", "fc": "its input"}
    # Their Conv2d row differs only by the stem's additions: their density·N·(k - 1) = 427/648 · 24,576 · 26 =
    # 421,053.6296 vs the exact (427 - 24) · 1,024 = 412,672 (the formula difference of the 32-bit test).
    stem_formula = 427 / 648 * 24_576 * 26
    assert ops_of(riair_fp16_tree, ("Conv2d",)) == pytest.approx(TYPE0["Conv2d"] - stem_formula + 412_672)


def test_riair_fp16_adder_tree_ops_against_their_types_0_and_4(riair_fp16_tree):
    count = riair_fp16_tree
    assert sum(TYPE0.values()) == pytest.approx(29_420_863.6326)
    # FC: their formula's 17,049.0029 additions vs the exact 16,999, plus the kit's 32-bit bias add (100).
    assert ops_of(count, ("Linear",)) == 17_099 + 16_999 + 100 == pytest.approx(TYPE0["Linear"] - 50.0029 + 100)
    # Scales vs batch norms, all fp16 now: an unfolded BN is 1 multiply + 1 add at 16 bits, as their Scale with
    # bias (1 op per element); the BNs after conv1 fold into it (their multiply into the weight scales): the shift's
    # add alone, 0.5 (-0.5 each); dense1.0's BN folds into the float stem: its add at 32 bits, 1 (as theirs); the
    # dequantization-only Scales are free (-0.5 each); the FC's Scale (100 × 1) is the FC's bias add above.
    unfolded = BN1_INPUTS - STEM_OUTPUT + FINAL_BN
    assert ops_of(count, ("BatchNorm2d",)) == unfolded + CONV1_OUTPUTS / 2 + STEM_OUTPUT == 3_760_512
    assert TYPE0["Scale"] - CONV1_OUTPUTS / 2 - BIAS_FREE_SCALES / 2 - 100 == 3_760_512
    # ReLU: the clamps of their Quant layers, counted 0 by them, are ReLUs at fp16 in the kit (0.5 each).
    assert ops_of(count, ("ReLU",)) == TYPE0["ReLU"] + (BN1_INPUTS + CONV1_OUTPUTS) / 2 == 2_138_304
    # Pools: their kernel-size bug at fp16, (2 · 37,248 + 56 · 342) / 2 = 46,824.
    assert ops_of(count, ("AvgPool2d", "AdaptiveAvgPool2d")) == TYPE0["AvgPool2d"] + 46_824 == 85_440
    assert count.ops == 30_910_584
    # Their type 4 (the verified 0.0044) counts the Scales' bias adds (4,276,708 elements) and the pools' adds
    # (37,248 + 7 · 342) at FP32 instead of FP16: +0.5 each.
    type4 = sum(TYPE0.values()) + 4_276_708 / 2 + (POOLED + 7 * 342) / 2
    assert type4 == pytest.approx(31_579_038.6326) and type4 / 10.49e9 == pytest.approx(0.003010, abs=5e-7)
    assert count.ops - type4 == pytest.approx(-668_454.6326)


def test_riair_fp16_parameters_and_score(riair_fp16_tree):
    count = riair_fp16_tree
    # The weights (1,589,762 bits, as theirs) + the 25,046 - 24 + 98 per-channel values of the 32-bit test, now at
    # 16 bits (scale_bits 16, other_ops fp16: the BNs' γ, β and folded shifts) + the FC's bias, a float (32 bits:
    # bias_bits is 32).
    assert count.param_bits == 1_589_762 + 16 * (25_046 - 24 + 98 - 100) + 32 * 100
    # vs their 49,805.5625: their Scale bug (12,523 - 125.5), the 98 - 24 values (at 16 bits: 37), the FC bias (+50)
    assert count.params - 49_805.5625 == (12_523 - 125.5) + 37 + 50 == 12_484.5
    # Score.md type 4: 0.003010 + 0.001365 = 0.004375 (the leaderboard's verified 0.0044); type 0: 0.004169.
    assert count.score("cifar100") == pytest.approx(62_290.0625 / 36.5e6 + 30_910_584 / 10.49e9)
    assert count.score("cifar100") == pytest.approx(0.0046532, abs=5e-8)
    assert 49_805.5625 / 36.5e6 + 31_579_038.6326 / 10.49e9 == pytest.approx(0.004375, abs=5e-7)
    assert 49_805.5625 / 36.5e6 + sum(TYPE0.values()) / 10.49e9 == pytest.approx(0.004169, abs=5e-7)


# --- OSI-AI, 3rd: EfficientNet-style, 64 % pruned, early exit, 16-bit freebie; verified 0.0058 ----------------------
#: Their exit ratio on the 10,000 test images at threshold 0.85 (README.md: 29.29 %).
EXIT_RATIO = Fraction(2_929, 10_000)


@pytest.fixture(scope="module")
def osi():
    """The kit's counts of OSI-AI's two paths, {exits: count}: the exit path (upsample, stem, blocks 0..4, the exit
    module and its test) and the full path (that, then blocks 5..9, the head and the classifier)."""
    return {exits: count_model(osi_ai_path(exits), torch.rand(*IMAGE)) for exits in (True, False)}


def test_osi_ai_paths_counted_with_the_freebie(osi):
    assert osi[True].freebie and osi[False].freebie  # nothing quantized: params and multiplies at 16 bits
    assert osi[True].accumulator_bits == osi[False].accumulator_bits == 32  # their ACCUMULATOR_BITS = precision 32
    # Every batch norm folds into the conv before it (their counter: "Batchnorm counting as the bias of the
    # previous convolution"): 2 per block (+1 with an expansion conv), stem, head, 2 in the exit module.
    folded = [row for row in osi[False].layers if row["note"].startswith("folded into")]
    assert len(folded) == 10 * 2 + 9 + 2 + 2
    # Nearest upsampling 32 -> 63 is free (project rule); the padding, static or not, is data movement.
    assert "upsample_nearest2d" in osi[False].project_rules
    # The early-exit module's parameters are in the full path (the entry stores main network + exit module).
    nonzeros = published("osi_ai")["nonzeros"]
    assert sum(nonzeros[name] for name in nonzeros if not name.startswith("_exit")) == 168_417  # 64.0 % of 467,824
    assert sum(nonzeros[name] for name in nonzeros if name.startswith("_exit")) == 10_280  # 50.0 % of 20,560


def test_osi_ai_counts_are_their_counter_with_the_real_densities_and_the_kit_s_rules(osi):
    exit_path, full_path = osi[True], osi[False]
    assert (exit_path.ops, full_path.ops, full_path.params) == (20_334_301, 40_109_628.5, 109_329.5)
    # Their counting/counting.py recounted on their checkpoint with each layer's own nonzero fraction in place of
    # the uniform 0.64 / 0.50: exit path 20,379,052 ops, full path 40,245,979.5, params 3,498,640 bits.
    their_exit, their_full, their_param_bits = 20_379_052, 40_245_979.5, 3_498_640
    # Residual adds: their (the official read_model's) Add counts the expanded channels, H·W·6C instead of H·W·C:
    # block 3 15²·(240 - 40), block 6 15²·(384 - 64), block 8 7²·(480 - 80).
    residual = 225 * 200, 225 * 320 + 49 * 400
    # The exit test, uncounted by them: softmax over 100 (200 multiplies, 99 adds: 3n - 1), its max (99
    # comparisons) and the threshold comparison: 300 multiplies at 16 bits + 99 adds at 32 = 249.
    decision = 300 / 2 + 99
    assert exit_path.ops == their_exit - residual[0] + decision
    assert full_path.ops == their_full - sum(residual) + decision
    # Storage: _blocks.2._conv keeps 1,221 of 1,296 weights; 1,296 × 16 bits dense (20,736) is cheaper than
    # 1,221 × 16 + a 1,296-bit mask (20,832), and the kit stores the cheaper (project rule "weight storage").
    assert full_path.param_bits == their_param_bits - (1_221 * 16 + 1_296 - 1_296 * 16)


def test_osi_ai_score_is_the_exit_weighted_mean_of_the_two_paths(osi):
    exit_path, full_path = osi[True], osi[False]
    # Ops per test image: 29.29 % exit after block 4, the others run the full path (main.py
    # _count_early_exit_params_flops weights the two paths by the measured exit ratio, as the kit's mean over the
    # test set would): 0.2929 × 20,334,301 + 0.7071 × 40,109,628.5 = 34,317,435.07525.
    kit_ops = EXIT_RATIO * Fraction(exit_path.ops) + (1 - EXIT_RATIO) * Fraction(full_path.ops)
    assert kit_ops == Fraction("34317435.07525")
    kit_score = full_path.params / 36.5e6 + float(kit_ops) / 10.49e9
    assert kit_score == pytest.approx(0.0062668, abs=5e-8)
    # Published (README.md "3. Scoring metric", after pruning the early-exit module): params 0.002995, ops
    # 0.002803, score 0.005798. Their main.py counts every layer at the uniform sparsity of its part (0.64 main,
    # 0.50 exit module), not its own: recounted, exit path 14,469,491.02, full path 35,580,092.88, params 109,332.32;
    # the README adds its hand-counted upsampling row, 63·63·3 = 11,907 ops.
    uniform_exit, uniform_full, uniform_params, upsample = Fraction("14469491.02"), Fraction("35580092.88"), \
        Fraction("109332.32"), 63 * 63 * 3
    published_ops = EXIT_RATIO * uniform_exit + (1 - EXIT_RATIO) * uniform_full + upsample
    assert float(uniform_params / Fraction("36.5e6")) == pytest.approx(0.002995, abs=5e-7)
    assert float(published_ops / Fraction("10.49e9")) == pytest.approx(0.002803, abs=1e-6)  # 0.0028035, truncated
    assert float(uniform_params / Fraction("36.5e6") + published_ops / Fraction("10.49e9")) == \
        pytest.approx(0.005798, abs=1e-6)  # 0.0057989, truncated
    # Every difference, with its number: the uniform sparsity under-counts the exit path by 5,909,560.98 and the
    # full path by 4,665,886.62 (pruning spared the high-resolution early layers) and over-counts params by 0.18;
    # the residual adds (45,000; 136,600), the exit test (249 per path), the dense storage (3 params) and the free
    # upsampling (11,907, project rule) as in the test above.
    real_exit, real_full = uniform_exit + Fraction("5909560.98"), uniform_full + Fraction("4665886.62")
    assert Fraction(exit_path.ops) == real_exit - 45_000 + 249
    assert Fraction(full_path.ops) == real_full - 136_600 + 249
    assert Fraction(full_path.params) == uniform_params + Fraction("0.18") - 3
    assert kit_ops == published_ops - upsample + EXIT_RATIO * (Fraction("5909560.98") - 45_000 + 249) \
        + (1 - EXIT_RATIO) * (Fraction("4665886.62") - 136_600 + 249)
