"""Activation checkpointing (recompute) as a pass: whole decoder layers ("full") or chosen
sub-modules ("selective": attention, dense MLP, MoE block). Non-reentrant torch checkpointing;
parameter names unchanged."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.mlp import SwiGLUMLP
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.precision import holds_te_modules, recompute_checkpoint

from .mesh import LayoutError

RECOMPUTE_MODES = ("none", "full", "selective")
SELECTIVE_KINDS = {"attention": Attention, "mlp": SwiGLUMLP, "moe": MoEBlock}


def check_recompute(mode: str, selective: Sequence[str]) -> None:
    """Raise `LayoutError` for an unknown mode (`parallel.recompute`) or module kind
    (`parallel.recompute_modules`)."""
    if mode not in RECOMPUTE_MODES:
        raise LayoutError(f"parallel.recompute={mode!r}: use one of {', '.join(RECOMPUTE_MODES)}.")
    unknown = sorted(set(selective) - set(SELECTIVE_KINDS))
    if mode == "selective" and unknown:
        raise LayoutError(
            f"parallel.recompute_modules {unknown} are unknown; choose from "
            f"{sorted(SELECTIVE_KINDS)}."
        )


class _NotCountingTokens:
    """While active, MoE blocks do not count routed tokens: a recomputed forward must not count them
    twice. A class, not a generator: zero-bubble schedules recompute twice (input and weight
    gradients), entering the same context object again."""

    def __init__(self, module: nn.Module) -> None:
        self.blocks = [m for m in module.modules() if isinstance(m, MoEBlock)]

    def __enter__(self) -> None:
        for block in self.blocks:
            block.count_routed_tokens = False

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.count_routed_tokens = True


def _recompute_in_backward(module: nn.Module) -> None:
    original = module.forward
    # Transformer Engine modules must be recomputed under the forward's FP8 autocast: TE's own
    # checkpoint.
    run = (
        recompute_checkpoint
        if holds_te_modules(module)
        else functools.partial(checkpoint, use_reentrant=False)
    )

    def forward(*args, **kwargs):
        return run(
            original,
            *args,
            context_fn=lambda: (contextlib.nullcontext(), _NotCountingTokens(module)),
            **kwargs,
        )

    module.forward = forward


def apply_recompute(
    root: nn.Module, mode: str, selective: tuple[str, ...] = ("attention",)
) -> None:
    """mode "none" | "full" (every decoder layer) | "selective" (modules of the kinds in
    `selective`)."""
    check_recompute(mode, selective)
    if mode == "none":
        return
    kinds = (DecoderLayer,) if mode == "full" else tuple(SELECTIVE_KINDS[k] for k in selective)
    for module in root.modules():
        # Shared experts are SwiGLUMLPs inside MoE blocks; "mlp" means the dense MLP of a decoder
        # layer.
        if isinstance(module, kinds) and not (
            isinstance(module, SwiGLUMLP) and _is_shared_expert(root, module)
        ):
            _recompute_in_backward(module)


def _is_shared_expert(root: nn.Module, mlp: nn.Module) -> bool:
    return any(isinstance(m, MoEBlock) and m.shared_experts is mlp for m in root.modules())
