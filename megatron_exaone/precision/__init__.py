"""Numerics of the compute path beyond BF16: the table of precisions and the precision pass
(`registry`), the FP8 backends it installs and their shared parts.

`registry.apply_precision` (the one entry point) switches decoder-layer GEMMs to a backend:
`fp8_torch` (torch's scaled matmuls on CUDA sm_89+), `fp8_emulated` (the same quantization with
high-precision matmuls, on any device: for tests) through `apply.convert_gemms`, or Transformer
Engine (`fp8_te`). `fp8_common` holds the scaling math the torch backends share, `fp8_ops` the
autograd functions and module classes. Configured by `config.schema.PrecisionConfig`.
"""

from .apply import PrecisionReport
from .fp8_common import Fp8Unavailable
from .fp8_ops import mark_fp8_weights_stale
from .fp8_te import holds_te_modules, load_te_extra_state, recompute_checkpoint, te_extra_state
from .registry import (
    PRECISIONS,
    PrecisionUnavailable,
    apply_precision,
    is_fp8,
    is_te,
    recipe_of,
    validate_precision,
)

__all__ = [
    "PRECISIONS",
    "Fp8Unavailable",
    "PrecisionReport",
    "PrecisionUnavailable",
    "apply_precision",
    "holds_te_modules",
    "is_fp8",
    "is_te",
    "load_te_extra_state",
    "mark_fp8_weights_stale",
    "recipe_of",
    "recompute_checkpoint",
    "te_extra_state",
    "validate_precision",
]
