"""What is attributed to one module (a layer of the per-layer table): its multiplies by operand width, its
additions (in the accumulator, or at a width of their own) and its stored values, widths unresolved until the
freebie is known. Imports :mod:`scoring.rules` and
:mod:`scoring.counter.facts`."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scoring.counter.facts import Width
from scoring.rules import weight_storage_bits

#: Name of the model's own module in the per-layer table.
MODEL_LAYER = "(model)"


@dataclass(frozen=True)
class Stored:
    """``numel`` values stored for inference at ``bits`` (None: unquantized); a weight also has ``nonzeros``."""

    numel: int
    bits: int | None
    nonzeros: int | None = None  # None: stored dense (biases, scales)
    mask_bits: int | None = None  # a declared mask (None: 1 bit per element) keeping ``kept`` values
    kept: int | None = None

    def total_bits(self, default: int) -> int:
        """The bits it takes, an unquantized value at ``default`` bits."""
        bits = self.bits if self.bits is not None else default
        if self.nonzeros is None:
            return self.numel * bits
        return weight_storage_bits(self.numel, self.nonzeros, bits, self.mask_bits, self.kept)


@dataclass
class Layer:
    """Counts attributed to one module, widths unresolved."""

    name: str
    type: str
    mults: Counter = field(default_factory=Counter)  # Width -> multiplies over all batches
    adds: int = 0  # all additions; those not in ``adds_at`` count at the accumulator width
    adds_at: Counter = field(default_factory=Counter)  # Width -> additions at a width of their own
    stored: list[Stored] = field(default_factory=list)  # filled from the storage accounting when tracing ends
    weight_width: Width | None = None
    input_width: Width | None = None
    notes: list[str] = field(default_factory=list)

    def add_ops(self, width: Width, mults: int, adds: int, adds_width: Width | None = None) -> None:
        """Count ``mults`` multiplies at ``width`` and ``adds`` additions, in the accumulator or at ``adds_width``."""
        if mults:
            self.mults[width] += mults
        self.input_width = width if self.input_width is None else self.input_width | width
        if adds_width is None:
            self.adds += adds
        else:
            self.add_adds(adds_width, adds)

    def add_adds(self, width: Width, adds: int) -> None:
        """Count ``adds`` additions at ``width`` (not the accumulator's)."""
        if adds:
            self.adds += adds
            self.adds_at[width] += adds

    def note(self, note: str) -> None:
        """Add ``note`` to the layer's notes, once."""
        if note not in self.notes:
            self.notes.append(note)

