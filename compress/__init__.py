"""Compression stages for MicroNet entries: gradual magnitude pruning, quantization-aware training,
knowledge distillation, composed into ordered stages by ``conf/compress/*.yaml``.

Works on any ``nn.Module`` (layers chosen by type — Conv/Linear/Embedding — and by name pattern) and declares
bit widths to the scorer only through ``scoring.protocol``'s attributes. See ``compress/base.py`` for
the hooks the training loop calls.
"""
# Each technique module registers its Technique subclass (compress.base.TECHNIQUES) when imported.
from .base import TECHNIQUES, Technique, register_technique
from .distillation import DistillTechnique
from .pruning import CubicSchedule, PruneTechnique, WeightMask, mask_sparsity, mask_zeros
from .quantization import ActivationQuantizer, QuantizeTechnique, WeightQuantizer
from .stages import Stage, attach_final, build_stages, calibrate
from .state import apply_compression_state, check_compression_state, check_restored, compression_state, \
    finalize_for_export

__all__ = [
    "TECHNIQUES", "ActivationQuantizer", "CubicSchedule", "DistillTechnique", "PruneTechnique", "QuantizeTechnique",
    "Stage", "Technique", "WeightMask", "WeightQuantizer", "apply_compression_state", "attach_final", "build_stages",
    "calibrate", "check_compression_state", "check_restored", "compression_state", "finalize_for_export",
    "mask_sparsity", "mask_zeros", "register_technique",
]
