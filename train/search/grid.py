"""The search's vocabulary: one layer's :class:`Setting` (bits, sparsity), the grid of settings measured, the count
modes a cost is given in, and which way each gate metric improves.

Pure: imports nothing of ours but the gate's metric names (scoring core).
"""
from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Grid defaults: bit widths (None = unquantized, written ``float``) and sparsities.
DEFAULT_BITS: tuple[int | None, ...] = (None, 8, 6, 4, 3, 2)
DEFAULT_SPARSITY: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
#: The count modes a cost is given in (keys of each setting's ``cost``): the freebie (16-bit counting) is lost for
#: the whole model once any tensor is quantized below 16 bits, so only unquantized settings have a freebie-on cost.
FREEBIE_OFF, FREEBIE_ON = "freebie_off", "freebie_on"


@dataclass(frozen=True)
class Setting:
    """One layer's compression: weight and input ``bits`` (None: unquantized) and the fraction ``sparsity`` pruned."""

    bits: int | None
    sparsity: float

    @property
    def quantized(self) -> bool:
        return self.bits is not None


#: The trained model's own setting of every layer: the reference each measurement changes one layer from.
REFERENCE = Setting(None, 0.0)


def grid(bits: Sequence[int | None], sparsity: Sequence[float]) -> list[Setting]:
    """Every (bits, sparsity) pair, the reference (float, dense) first."""
    settings = [Setting(b, s) for b in bits for s in sparsity]
    return [REFERENCE] + [s for s in settings if s != REFERENCE]


def grid_bits(values: Sequence[Any]) -> list[int | None]:
    """The bit widths of a grid: ``float`` (or None) = unquantized, else 2..8; ValueError for a bad one."""
    bits = []
    for value in values:
        if value is None or value == "float":
            bits.append(None)
        elif isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 8:
            bits.append(value)
        else:
            raise ValueError(f"{value!r} is not a bit width: use float or 2..8, e.g. float,8,6,4,3,2")
    if not bits:
        raise ValueError("no bit width: use float or 2..8, e.g. float,8,6,4,3,2")
    return bits


def grid_sparsity(values: Sequence[Any]) -> list[float]:
    """The sparsities of a grid: fractions in [0, 1); ValueError for a bad one."""
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in values):
        raise ValueError(f"{list(values)!r}: expected fractions in [0, 1), e.g. 0,0.5,0.8,0.9,0.95")
    return [float(v) for v in values]


def layer_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly the layer ``name`` (compress selects layers by pattern)."""
    return glob.escape(name)


def settings_text(settings: Mapping[str, Setting]) -> str:
    """``conv1.0 8-bit dense, conv2.0 4-bit 95%, …``"""
    return ", ".join(f"{layer} {'float' if s.bits is None else f'{s.bits}-bit'} "
                     f"{'dense' if not s.sparsity else f'{s.sparsity:.0%}'}" for layer, s in settings.items())
