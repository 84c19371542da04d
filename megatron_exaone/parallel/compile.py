"""Regional compilation: each decoder layer's forward (the MTP layer's too) compiled with torch.compile.

Layers of one kind (dense or MoE MLP, sliding or global attention) share compiled code, so compiling costs a few
graphs, not one per layer. Inductor fuses the elementwise work around the GEMMs (norms, RoPE, SwiGLU, routing, the
FP8 casts and scales), which otherwise runs as hundreds of small memory-bound kernels per layer.

The pass runs after the model is materialized and before activation checkpointing and FSDP2: checkpointing then
recomputes the compiled forward, and FSDP2's hooks stay on the (uncompiled) module call, outside the graph.
Parameter names are unchanged (the forward is replaced, the module is not wrapped).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.moe import grouped_mm_usable


def apply_compile(root: nn.Module) -> int:
    """Compile the forward of every decoder layer under `root` in place; returns how many were compiled."""
    device = next(root.parameters()).device
    for dtype in (torch.float32, torch.bfloat16):
        grouped_mm_usable(device.type, dtype)  # checked eagerly now; compiled code reads the cached answer
    layers = [m for m in root.modules() if isinstance(m, DecoderLayer)]
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    return len(layers)
