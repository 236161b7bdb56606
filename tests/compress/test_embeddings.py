"""Language-model tables: an embedding is pruned and quantized per row (its input, token ids, is never quantized),
and a table tied to the output layer (read functionally by the lookup) is compressed once, for both uses."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import ActivationQuantizer, PruneTechnique, QuantizeTechnique, WeightMask, WeightQuantizer
from compress.base import find_parametrization


class _Untied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.decoder = nn.Linear(8, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embedding(tokens))


class _Tied(nn.Module):
    """The output layer owns the table; the lookup reads its (parametrized) weight."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(8, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.embedding(tokens, self.decoder.weight))


def _compress(model: nn.Module) -> None:
    prune = PruneTechnique({"final_sparsity": 0.5, "first_last_sparsity": None, "start": 0.0, "end": 0.0},
                           stage_epochs=1, where="prune")
    quantize = QuantizeTechnique({"weight_bits": 4, "activation_bits": 8, "first_last_bits": None}, stage_epochs=1,
                                 where="quantize")
    for technique in (prune, quantize):
        technique.configure(steps_per_epoch=1)
        technique.attach(model)
    prune.on_step_end(model, 0)  # end = start = step 0: the final sparsity at once


def test_an_embedding_is_pruned_and_quantized_per_row_and_its_token_input_is_not_quantized():
    torch.manual_seed(0)
    model = _Untied()
    _compress(model)
    table = model.embedding
    assert find_parametrization(table, WeightMask) is not None and "input_quantizer" not in table._modules
    quantizer = find_parametrization(table, WeightQuantizer)
    assert quantizer.micronet_bits == 4 and quantizer.micronet_scale_count == 50  # one step size per row
    assert isinstance(model.decoder.input_quantizer, ActivationQuantizer)
    weight = table.weight.detach()
    assert int((weight == 0).sum()) == 200  # half of 50 × 8 pruned
    assert all(len(row.unique()) <= 15 for row in weight)  # 2⁴ − 1 levels per row
    tokens = torch.tensor([[3, 7, 7, 49]])
    assert torch.equal(model.embedding(tokens)[0, 1], weight[7]) and model(tokens).shape == (1, 4, 50)


def test_a_tied_table_is_compressed_once_and_the_lookup_reads_the_compressed_rows():
    torch.manual_seed(0)
    model = _Tied()
    _compress(model)
    tables = [name for name, parameter in model.named_parameters() if parameter.shape == (50, 8)]
    assert tables == ["decoder.parametrizations.weight.original"]  # one table, one mask, one quantizer
    executed = model.decoder.weight.detach()
    assert int((executed == 0).sum()) == 200
    tokens = torch.tensor([[0, 1, 2]])
    lookup = F.embedding(tokens, model.decoder.weight)
    assert torch.equal(lookup[0], executed[:3])  # masked and on the 4-bit grid, as the output layer uses them
