"""Numerics of the compute path beyond BF16: FP8 backends and the precision pass that installs them.

`apply_precision` (the pass, `apply.py`) switches decoder-layer GEMMs to an FP8 backend: `fp8_torch`
(torch's scaled matmuls on CUDA sm_89+), `fp8_emulated` (the same quantization with fp32 matmuls, on any device:
for tests). `fp8_common` holds the scaling math both share, `fp8_ops` the autograd functions and module classes.
Transformer Engine modes live in `fp8_te`. Nothing here imports the config package (which pulls in Hydra): the
trainer turns its `PrecisionConfig` into a `PrecisionPlan`.
"""

from .apply import PrecisionPlan, PrecisionReport, apply_precision
from .fp8_common import Fp8Unavailable
from .fp8_ops import mark_fp8_weights_stale

__all__ = ["PrecisionPlan", "PrecisionReport", "apply_precision", "Fp8Unavailable", "mark_fp8_weights_stale"]
