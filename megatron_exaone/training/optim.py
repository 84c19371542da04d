"""Optimizers: AdamW, or Muon for hidden weight matrices with AdamW for the rest (embeddings, output
head, router, norm gains), as in Moonlight / Kimi K2. Weight decay applies to matrices, not to norm
gains."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping

import torch
from torch import nn

from megatron_exaone.parallel.sharding import layout_of

from .muon import Muon, ShardedMatrix
from .offload import CpuOffloadAdamW

_ADAMW_ONLY = ("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")


def _named_params(chunks: Iterable[nn.Module]) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [
        (chunk, name, p)
        for chunk in chunks
        for name, p in chunk.named_parameters()
        if p.requires_grad
    ]


class _StateView(MutableMapping):
    """`optimizer.state` across several optimizers: each parameter's state lives in the optimizer
    that owns it."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._owner = {
            id(p): opt for opt in optimizers for g in opt.param_groups for p in g["params"]
        }
        self._optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> dict:
        state = self._owner[id(param)].state
        if param not in state:
            raise KeyError(param)
        return state[param]

    def __setitem__(self, param: torch.Tensor, value: dict) -> None:
        self._owner[id(param)].state[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._owner[id(param)].state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for opt in self._optimizers for p in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class Optimizers:
    """One or two torch optimizers stepped together, seen as one (`param_groups`, `state`, `step`);
    the learning rate is set each step from the curriculum."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.state = _StateView(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, lr: float) -> None:
        for group in self.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def master_weights(self) -> dict[int, torch.Tensor]:
        """id(device parameter) -> its FP32 master on the host, for the parameters whose optimizer
        keeps one (`optim.offload=cpu`); checkpoints save and load these as the weights."""
        return {
            id(p): master
            for opt in self.optimizers
            if isinstance(opt, CpuOffloadAdamW)
            for p, master in opt.masters.items()
        }

    def load_masters_into_params(self) -> None:
        """After a checkpoint loaded into the masters: the device parameters take their values."""
        for opt in self.optimizers:
            if isinstance(opt, CpuOffloadAdamW):
                opt.load_masters_into_params()


def build_optimizer(
    chunks: Iterable[nn.Module],
    name: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    muon_momentum: float = 0.95,
    muon_nesterov: bool = True,
    muon_ns_steps: int = 5,
    muon_adjust_lr: str = "match_rms_adamw",
    offload: str = "none",
    tp_group=None,
    tp_size: int = 1,
) -> Optimizers:
    """AdamW over everything (`name="adamw"`), or Muon over hidden matrices plus AdamW
    (`name="muon"`). `offload="cpu"`: the AdamW groups step on the host (`offload`)."""
    if offload not in ("none", "cpu"):
        raise ValueError(f"optim.offload={offload!r}: use 'none' or 'cpu'.")
    if name not in ("adamw", "muon"):
        raise ValueError(f"optimizer {name!r}: use 'adamw' or 'muon'.")
    named = _named_params(chunks)
    muon = [
        (c, n, p)
        for c, n, p in named
        if name == "muon" and p.ndim >= 2 and not n.endswith(_ADAMW_ONLY)
    ]
    in_muon = {id(p) for _, _, p in muon}
    decay = [p for _, _, p in named if p.ndim >= 2 and id(p) not in in_muon]
    no_decay = [p for _, _, p in named if p.ndim < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if g["params"]
    ]
    # torch's fused AdamW on GPU (one kernel per parameter group instead of foreach temporaries);
    # foreach on CPU.
    on_gpu = any(p.is_cuda for _, _, p in named)
    optimizers: list[torch.optim.Optimizer] = [
        CpuOffloadAdamW(groups, lr=lr, betas=betas, eps=eps)
        if offload == "cpu"
        else torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if on_gpu else None)
    ]
    if muon:
        matrices = {p: ShardedMatrix(p, layout_of(c, n, p), tp_group, tp_size) for c, n, p in muon}
        optimizers.append(
            Muon(
                [p for _, _, p in muon],
                matrices,
                lr=lr,
                weight_decay=weight_decay,
                momentum=muon_momentum,
                nesterov=muon_nesterov,
                ns_steps=muon_ns_steps,
                adjust_lr=muon_adjust_lr,
            )
        )
    return Optimizers(optimizers)
