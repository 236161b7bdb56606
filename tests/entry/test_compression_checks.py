"""compress.check_compression_state: every value of an entry's compression state is range-checked before
anything is built (an entry's state is data someone else wrote)."""
from __future__ import annotations

import copy

import pytest
from torch.nn.utils import parametrize

from compress import apply_compression_state, check_compression_state, compression_state
from models import create_model

from .conftest import make_compressed_model


@pytest.fixture(scope="module")
def state() -> dict:
    """The state of the digits CNN pruned and quantized to 4 bits (as in every entry test)."""
    return compression_state(make_compressed_model())


def edited(state: dict, edit) -> dict:
    changed = copy.deepcopy(state)
    edit(changed)
    return changed


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(extra=1), r"unknown key\(s\) extra; expected format, weights, inputs"),
    (lambda s: s.update(weights=[1]), r"weights and inputs must map layer names to descriptions"),
    (lambda s: s["weights"].update({"": s["weights"]["fc"]}), r"names layer '', which this model does not have"),
    (lambda s: s["weights"].update({"conv1.1": s["weights"]["fc"]}), r"names layer 'conv1\.1'"),  # a batch norm
    (lambda s: s["weights"].update(fc=[]), r"layer 'fc': weight parametrizations \[\] are not a mask"),
    (lambda s: s["weights"].update(fc="mask"), r"layer 'fc': weight parametrizations 'mask' are not a mask"),
    (lambda s: s["weights"]["fc"].insert(1, {"kind": "mask"}), r"\['weight_quantizer', 'mask'\] are not"),
    (lambda s: s["weights"]["fc"][0].update(bits=True), r"layer 'fc': weight quantizer bits=True: expected a bit "
                                                        r"width"),
    (lambda s: s["weights"]["fc"][0].update(bits=1), r"weight quantizer bits=1: expected a bit width"),
    (lambda s: s["weights"]["fc"][0].pop("method"), r"weight quantizer settings \['bits', 'kind'\]: expected exactly "
                                                    r"kind, bits, method"),
    (lambda s: s["weights"]["fc"].insert(0, {"kind": "mask", "structure": "nm"}), r"unknown mask setting\(s\) "
                                                                                  r"'structure'"),
    (lambda s: s["weights"]["fc"].insert(0, {"kind": "mask", "block_shape": [0, 4]}), r"block_shape=\[0, 4\]"),
    (lambda s: s["weights"]["fc"].insert(0, {"kind": "mask", "block_shape": [1, 129]}), r"1 <= cols <= 128"),
    (lambda s: s["weights"]["fc"].insert(0, {"kind": "mask", "block_shape": [1.5, 2]}), r"block_shape=\[1\.5, 2\]"),
    (lambda s: s["inputs"]["fc"].update(averaging_constant=0), r"layer 'fc': input quantizer averaging_constant=0: "
                                                               r"expected a number in \(0, 1\]"),
    (lambda s: s["inputs"]["fc"].update(bits=2**64), r"input quantizer bits=18446744073709551616"),
    (lambda s: s["inputs"].update(fc={"kind": "mask"}), r"input description \{'kind': 'mask'\} is not an "
                                                        r"input_quantizer"),
])
def test_out_of_range_states_are_refused_in_one_line(state, edit, message):
    with pytest.raises(ValueError, match=message) as info:
        check_compression_state(create_model("digits_cnn", num_classes=10), edited(state, edit))
    assert "\n" not in str(info.value)


def test_nothing_is_built_when_any_value_is_out_of_range(state):
    """The last layer's description is bad: no layer before it got a quantizer either."""
    model = create_model("digits_cnn", num_classes=10)
    with pytest.raises(ValueError, match="layer 'fc'"):
        apply_compression_state(model, edited(state, lambda s: s["inputs"]["fc"].update(method="exec")))
    assert not any(parametrize.is_parametrized(module) for module in model.modules())
    assert not any(name.endswith("input_quantizer") for name, _ in model.named_modules())
    apply_compression_state(model, state)  # the intact state builds as before
    assert compression_state(model) == state
