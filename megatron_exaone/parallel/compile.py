"""Regional compilation: each decoder layer's forward (the MTP layer's too) compiled with
torch.compile.

Layers of one kind (dense or MoE MLP, sliding or global attention) share compiled code, so compiling
costs a few graphs, not one per layer. Inductor fuses the elementwise work around the GEMMs (norms,
RoPE, SwiGLU, routing, the FP8 casts and scales), which otherwise runs as hundreds of small
memory-bound kernels per layer.

Full recompute of compiled layers is done by the compiler, not by torch.utils.checkpoint: each
layer's graph is partitioned with an activation memory budget of 0 (AOTAutograd's min-cut
partitioner then saves only what the backward cannot recompute, the same memory as checkpointing the
layer), so the recomputation is fused too and the MoE token counts are updated once. Wrapping
compiled layers in torch.utils.checkpoint instead hangs under tensor parallel (the layer is traced
while the checkpoint's saved-tensor hooks are active).

The pass runs after the model is materialized and before FSDP2, whose hooks stay on the (uncompiled)
module call, outside the graph. Parameter names are unchanged (the forward is replaced, the module
is not wrapped).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config
from torch import nn

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.moe import grouped_mm_usable

RECOMPILE_LIMIT = 64


def _compiled(forward: Callable, recompute: bool, backend: str) -> Callable:
    compiled = torch.compile(forward, backend=backend)
    if not recompute:
        return compiled

    @functools.wraps(forward)
    def recomputing(*args, **kwargs):
        # Read when the graph is partitioned, i.e. at the first call (and at recompiles).
        with functorch_config.patch(activation_memory_budget=0.0):
            return compiled(*args, **kwargs)

    return recomputing


def apply_compile(root: nn.Module, recompute: bool = False, backend: str = "inductor") -> int:
    """Compile the forward of every decoder layer under `root` in place, recomputing its activations
    in backward when `recompute` (the compiled form of full activation checkpointing); returns how
    many were compiled. `backend`: torch.compile's backend ("aot_eager" or "eager" trace without
    generating kernels, to debug)."""
    device = next(root.parameters()).device
    for dtype in (torch.float32, torch.bfloat16):
        # checked eagerly now; compiled code reads the cached answer
        grouped_mm_usable(device.type, dtype)
    layers = [m for m in root.modules() if isinstance(m, DecoderLayer)]
    # Every layer shares DecoderLayer.forward's code, so its graphs (one per kind x precision x
    # FP8-weight-cache state x shape) count against one recompile limit; past the default 8, Dynamo
    # would run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(
        torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
    )
    for layer in layers:
        layer.forward = _compiled(layer.forward, recompute, backend)
    return len(layers)
