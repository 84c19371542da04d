"""Activation checkpointing (recompute) as a pass: whole decoder layers ("full") or chosen sub-modules
("selective": attention, dense MLP, MoE block). Non-reentrant torch checkpointing; parameter names unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.mlp import SwiGLUMLP
from megatron_exaone.model.moe import MoEBlock

SELECTIVE_KINDS = {"attention": Attention, "mlp": SwiGLUMLP, "moe": MoEBlock}


@contextlib.contextmanager
def _not_counting_tokens(module: nn.Module) -> Iterator[None]:
    """A recomputed MoE forward must not count its routed tokens a second time."""
    blocks = [m for m in module.modules() if isinstance(m, MoEBlock)]
    for block in blocks:
        block.count_routed_tokens = False
    try:
        yield
    finally:
        for block in blocks:
            block.count_routed_tokens = True


def _recompute_in_backward(module: nn.Module) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        return checkpoint(original, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _not_counting_tokens(module)), **kwargs)

    module.forward = forward


def apply_activation_checkpointing(root: nn.Module, mode: str, selective: tuple[str, ...] = ("attention",)) -> None:
    """mode "none" | "full" (every decoder layer) | "selective" (modules of the kinds in `selective`)."""
    if mode == "none":
        return
    if mode == "full":
        kinds: tuple[type, ...] = (DecoderLayer,)
    elif mode == "selective":
        unknown = sorted(set(selective) - set(SELECTIVE_KINDS))
        if unknown:
            raise ValueError(f"selective recompute kinds {unknown} are unknown; choose from {sorted(SELECTIVE_KINDS)}.")
        kinds = tuple(SELECTIVE_KINDS[k] for k in selective)
    else:
        raise ValueError(f"activation checkpointing mode {mode!r}: use 'none', 'full' or 'selective'.")
    for module in root.modules():
        # Shared experts are SwiGLUMLPs inside MoE blocks; "mlp" means the dense MLP of a decoder layer.
        if isinstance(module, kinds) and not (isinstance(module, SwiGLUMLP) and _is_shared_expert(root, module)):
            _recompute_in_backward(module)


def _is_shared_expert(root: nn.Module, mlp: nn.Module) -> bool:
    return any(isinstance(m, MoEBlock) and m.shared_experts is mlp for m in root.modules())
